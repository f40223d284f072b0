"""Benchmarks of sam_eos, one module each on a shared harness (`benchmarks.harness`):
`python3 -m benchmarks [--quick]` runs them, stores JSON and regenerates BENCHMARKS.md."""
