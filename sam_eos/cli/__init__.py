"""The command line: the flags both programs share, their parsing, running a program, and
redrawing plots from raw data (`python3 -m sam_eos.cli.replot`)."""
