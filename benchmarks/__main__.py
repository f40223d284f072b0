"""Runs the benchmarks, stores each result as JSON and regenerates BENCHMARKS.md from them.

    python3 -m benchmarks --quick            # every benchmark, short (about 4 minutes on 2 CPUs)
    python3 -m benchmarks                    # the full versions
    python3 -m benchmarks --only check_cost,sam_step
    python3 -m benchmarks --report_only      # rewrite BENCHMARKS.md from the stored JSON

Results go to benchmarks/results/<backend>/<name>.json (machine, commit, date, command, figures);
BENCHMARKS.md shows every backend's stored results, one table per benchmark, each saying which
run it comes from. Data: `--data_dir` (default ../shared/data); generated data of the same shapes
stands in when the files are missing, and the tables say so.
"""

import argparse
import importlib
import logging
import pathlib
import shlex
import sys
import time

from benchmarks import harness, report

BENCHMARKS = ("sam_step", "check_cost", "check_misses", "cluster_swaps", "stopping_rules",
              "solver_step", "layer_cost", "loop_overhead", "loop_cost", "compile_time", "memory",
              "scale")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Short versions of every benchmark.")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"Comma-separated subset of {', '.join(BENCHMARKS)}.")
    parser.add_argument("--data_dir", default=str(harness.REPO_ROOT.parent / "shared" / "data"))
    parser.add_argument("--report_only", action="store_true",
                        help="Only regenerate BENCHMARKS.md from the stored results.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.getLogger("absl").setLevel(logging.WARNING)  # the loop's check lines
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"unknown benchmarks {unknown}; choose from {', '.join(BENCHMARKS)}")
    if not args.report_only:
        context = harness.Context(quick=args.quick, data_dir=pathlib.Path(args.data_dir),
                                  command=shlex.join(["python3", "-m", "benchmarks", *argv]))
        started = harness.machine()
        for name in names:
            module = importlib.import_module(f"benchmarks.{name}")
            began = time.perf_counter()
            print(f"{name}: running", file=sys.stderr, flush=True)
            result = module.run(context)
            result["seconds"] = round(time.perf_counter() - began, 1)
            path = harness.write_result(name, result, context, started)
            print(f"{name}: {result['seconds']:.0f} s, wrote {path}", file=sys.stderr)
    path = report.write_report()
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
