"""What a run leaves behind: the raw-data file, its PDF figures, output paths and the summary."""
