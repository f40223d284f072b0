"""Runs a program's `main` on many flag sets in one process; prints each InputError message.

    python tests/flag_cases.py PROGRAM CASES.json

CASES.json is a list of argument lists; the output's last line is a JSON list of messages
(null where `main` raised nothing, which for bad inputs is a bug). Every case must fail before
training starts.
"""

import importlib
import json
import pathlib
import sys


def main() -> None:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from absl import flags

    from sam_eos.errors import InputError

    program = importlib.import_module(f"{sys.argv[1]}.__main__")
    cases = json.loads(pathlib.Path(sys.argv[2]).read_text())
    messages = []
    for argv in cases:
        flags.FLAGS.unparse_flags()
        flags.FLAGS([sys.argv[1], *argv])
        try:
            program.main([sys.argv[1]])
        except InputError as error:
            messages.append(str(error))
        else:
            messages.append(None)
    print(json.dumps(messages))


if __name__ == "__main__":
    main()
