"""Running a program's `main` under absl: bad input becomes one message and exit code 2."""

import sys
from collections.abc import Callable

from absl import app, logging

from sam_eos.errors import EXIT_BAD_INPUT, InputError

__all__ = ["InputError", "run_main"]


def run_main(main: Callable[[list[str]], int | None]) -> None:
    """`absl.app.run(main)`, logging at INFO, with `InputError` turned into
    `error: <message>` on stderr and exit code EXIT_BAD_INPUT (no traceback)."""

    def wrapped(argv: list[str]) -> None:
        if len(argv) > 1:
            print(f"error: unexpected arguments {argv[1:]}; flags look like --name=value",
                  file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
        logging.set_verbosity(logging.INFO)
        try:
            code = main(argv)
        except InputError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
        sys.exit(code or 0)

    app.run(wrapped)
