"""The command line of every program: absl flag parsing with the documented exit codes, and the
project's own flags (for the raw-data settings).

absl exits 1 both for `--help` and for a flag it cannot parse; `parse_flags` (an `absl.app.run`
flags_parser) exits 0 after help and EXIT_BAD_INPUT (2), with absl's message, after an error.
"""

import os
import sys
import textwrap
from typing import Any

from absl import flags

from sam_eos.errors import EXIT_BAD_INPUT, EXIT_OK

PROJECT_PACKAGES = ("sam_eos", "image_classification", "transformer", "experiments")


def parse_flags(argv: list[str]) -> list[str]:
    """Parses `argv` into absl's FLAGS and returns the arguments left (argv[0] first).

    A parsing error (unknown flag, bad value) prints absl's message on stderr and exits with
    EXIT_BAD_INPUT; `--help`, `--helpshort`, `--helpfull` print help on stdout and exit 0.
    Use as `app.run(main, flags_parser=parse_flags)`.
    """
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        message = str(error)
        if "\n" in message:
            message = "\n" + textwrap.indent(message, "  ")
        sys.stderr.write(f"FATAL Flags parsing error: {message}\n"
                         "Pass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(EXIT_BAD_INPUT)
    except SystemExit as stop:
        # absl's help flags print the help while parsing, then exit 1: help is not an error.
        sys.exit(EXIT_OK if stop.code == 1 else stop.code)


def is_project_module(module_name: str, packages: tuple[str, ...] = PROJECT_PACKAGES) -> bool:
    """Whether absl's name for a defining module is one of the project's: a dotted module name
    in `packages` ("sam_eos.cli.flags"), or the path of a main module inside one of their
    directories (`python3 -m transformer` defines flags as ".../transformer/__main__.py")."""
    if module_name.endswith(".py"):  # a package's directory, or a subpackage's parent
        directories = os.path.dirname(os.path.abspath(module_name)).split(os.sep)
        return any(name in packages for name in directories[-2:])
    return module_name.split(".")[0] in packages


def project_flag_values(
    flag_values: flags.FlagValues = flags.FLAGS,
    packages: tuple[str, ...] = PROJECT_PACKAGES,
) -> dict[str, Any]:
    """The flags defined by the project's modules (name -> value), without absl's, TFDS's,
    orbax's or JAX's: what the raw-data settings record."""
    return {
        flag.name: flag.value
        for module, module_flags in flag_values.flags_by_module_dict().items()
        if is_project_module(module, packages)
        for flag in module_flags
    }
