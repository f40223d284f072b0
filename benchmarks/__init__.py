"""Benchmarks of sam_eos: eigensolver accuracy and cost, compilation, SAM step cost, loop
overhead and memory. Run `python3 -m benchmarks.run --help`; results are in BENCHMARKS.md."""
