"""Errors and exit codes shared by both programs.

`InputError` is raised for anything a user typed or supplied that cannot work (a bad flag, a
missing file, a corrupt corpus). The programs turn it into one clear message on stderr and exit
code `EXIT_BAD_INPUT`, before any training starts.
"""

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
# An output (raw data, plots) could not be written mid-run, e.g. a full disk: the run stopped
# there, keeping what was measured.
EXIT_OUTPUT_FAILED = 4
EXIT_INTERRUPTED_SIGINT = 130  # 128 + SIGINT, the shell's convention
EXIT_INTERRUPTED_SIGTERM = 143  # 128 + SIGTERM


class InputError(ValueError):
    """A problem with the user's input: flags, files or data. The message says what to change."""
