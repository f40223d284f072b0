"""Running a program's `main` under absl: bad input becomes one message and exit code 2
(flags absl cannot parse too); `--help` exits 0."""

import logging as std_logging
import os
import sys
from collections.abc import Callable
from typing import Any

from absl import app, logging

from sam_eos.cli.parsing import parse_flags
from sam_eos.errors import EXIT_BAD_INPUT, InputError
from sam_eos.loop import distributed
from sam_eos.loop.train import RunResult
from sam_eos.reports import raw_data, summary

__all__ = ["InputError", "report_test_value", "run_main"]


QUIET_LIBRARIES = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/xla_bridge")


def _quiet_libraries(record: std_logging.LogRecord) -> bool:
    """Keeps the libraries' INFO chatter (checkpoint threads, TFDS readers) out of the log."""
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in QUIET_LIBRARIES)


def run_main(main: Callable[[list[str]], int | None]) -> None:
    """`absl.app.run(main)`, logging at INFO, with `InputError` turned into
    `error: <message>` on stderr and exit code EXIT_BAD_INPUT (no traceback), as is a flag
    absl cannot parse (`sam_eos.cli.parsing.parse_flags`); `--help` exits 0."""

    def wrapped(argv: list[str]) -> None:
        if len(argv) > 1:
            print(f"error: unexpected arguments {argv[1:]}; flags look like --name=value",
                  file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
        logging.set_verbosity(logging.INFO)
        logging.get_absl_handler().addFilter(_quiet_libraries)
        try:
            distributed.initialize_multihost()
            if not distributed.is_main_process():  # process 0 logs the run; others only warn
                logging.set_verbosity(logging.WARNING)
            code = main(argv)
        except InputError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
        sys.exit(code or 0)

    app.run(wrapped, flags_parser=parse_flags)


def report_test_value(name: str, result: RunResult, evaluate: Callable[[Any], float]) -> int:
    """Prints `Test <name>: <value>` on process 0 (not computed when the run diverged), then
    `end_run`; returns the run's exit code. Every process calls `evaluate` on its own copy of
    the trained parameters, so it can evaluate its share of the test set and sum over processes."""
    value = None
    if result.status == "diverged":
        message = f"Test {name}: not computed (the run diverged)"
    else:
        value = evaluate(distributed.local_copy(result.params))
        message = f"Test {name}: {value:.4f}"
    if distributed.is_main_process():
        print(message)
        end_run(result, name, value)
    return result.exit_code


def end_run(result: RunResult, test_name: str, test_value: float | None) -> dict[str, Any]:
    """Logs the run's summary (`sam_eos.reports.summary`), appends it to the raw data as a
    `# summary:` line (when there is raw data), and logs the files written. Process 0 only."""
    run_summary = summary.summarize(result.rows, steps=result.steps, test_name=test_name,
                                    test_value=test_value, seconds=result.seconds)
    for line in summary.summary_lines(run_summary):
        logging.info(line)
    try:
        raw_data.append_summary(result.raw_data, run_summary)
    except OSError as error:
        logging.error("Could not append the summary to %s: %s", result.raw_data, error)
    log_files(result.files)
    return run_summary


def log_files(paths: list[str]) -> None:
    """One log line per output file (or folder) the run wrote."""
    if not paths:
        logging.info("No output files were written.")
        return
    logging.info("Files written:")
    for path in paths:
        logging.info("  %s", os.path.abspath(path))
