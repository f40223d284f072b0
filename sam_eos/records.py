"""The raw-data file: one row per Hessian check, readable with `numpy.loadtxt`.

Layout: `#` comment lines first (a title, the run's settings as JSON, the column names), then
one whitespace-separated row per check, flushed as soon as it is written so an interrupted run
keeps every measurement. Notes (e.g. a failed check) are `#` lines between rows. The first eight
columns keep the original program's order: time, hessian_norm, 2/eta, sam_edge, grad_norm, loss,
g_alignment, sg_alignment.
"""

import json
import math
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from sam_eos.errors import InputError

ORIGINAL_COLUMNS = (
    "time_hours",  # training time (hours) when the check was taken
    "hessian_norm",  # operator norm max(|lambda_max|, |lambda_min|)
    "two_over_eta",
    "sam_edge",
    "grad_norm",
    "loss",
    "g_alignment",  # |<g, v>| / ||g||, v the principal direction
    "sg_alignment",  # the same for the SAM gradient
)
SETTINGS_PREFIX = "# settings: "
COLUMNS_PREFIX = "# columns: "
NOTE_PREFIX = "# note: "


def column_names(num_principal_components: int) -> list[str]:
    """All columns for a run measuring k eigenvalues (eig_2 .. eig_k appear when k > 1)."""
    further = [f"eig_{i}" for i in range(2, num_principal_components + 1)]
    return [
        *ORIGINAL_COLUMNS,
        "step",
        *further,
        "lambda_max",
        "lambda_min",
        "hessian_vector_products",
    ]


def check_output_path(path: str, flag_name: str) -> None:
    """Fail now, not after hours of training, if `path` cannot be written.

    Creates the file's directory and writes (then removes) a scratch file in it. An empty path
    means "no output" and passes.
    """
    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    try:
        if os.path.isdir(path):
            raise OSError(f"{path} is a directory")
        if os.path.exists(path) and not os.path.isfile(path):  # e.g. /dev/full, a pipe
            raise OSError(f"{path} is not a regular file")
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".sam_eos_check_"):
            pass
    except OSError as error:
        raise InputError(
            f"--{flag_name}={path} cannot be written ({error.strerror or error}); "
            f"choose a path in a writable directory, or pass --{flag_name}= to skip it"
        ) from error


class RawDataWriter:
    """Writes the raw-data file of one run: afresh (truncating any old file) with its header,
    or, with `append=True` (a resumed run), continuing the file after its existing rows."""

    def __init__(
        self, path: str, columns: Sequence[str], settings: dict[str, Any], append: bool = False
    ):
        self.columns = list(columns)
        self._file = open(path, "a" if append else "w") if path else None  # noqa: SIM115
        if not append:
            self._write("# sam_eos raw data: one row per Hessian check\n")
            self._write(SETTINGS_PREFIX + json.dumps(settings, sort_keys=True, default=str) + "\n")
            self._write(COLUMNS_PREFIX + " ".join(self.columns) + "\n")

    def _write(self, text: str) -> None:
        if self._file is not None:
            self._file.write(text)
            self._file.flush()

    def row(self, values: dict[str, float]) -> None:
        """Appends one row; `values` maps every column name to a number (nan allowed)."""
        self._write(" ".join(_format(values[name]) for name in self.columns) + "\n")

    def note(self, text: str) -> None:
        """Appends a `# note:` line (kept by readers as a comment)."""
        self._write(NOTE_PREFIX + " ".join(text.split()) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _format(value: float) -> str:
    value = float(value)
    if math.isnan(value):
        return "nan"
    return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def keep_first_rows(path: str, num_rows: int) -> None:
    """Truncates a raw-data file after its `num_rows`-th row (the header and the notes before
    that row stay): what a resumed run does with rows written after its last checkpoint."""
    with open(path) as file:
        lines = file.readlines()
    kept, rows = [], 0
    for line in lines:
        if rows == num_rows and not line.startswith("#"):
            break
        if rows == num_rows and line.startswith(NOTE_PREFIX):
            break
        kept.append(line)
        rows += not line.startswith("#")
    scratch = path + ".resume"
    with open(scratch, "w") as file:  # written aside and renamed: a kill now loses nothing
        file.writelines(kept)
    os.replace(scratch, path)


def read_raw_data(path: str) -> tuple[dict[str, Any], list[str], np.ndarray]:
    """(settings, column names, rows [num_checks, num_columns]) of a raw-data file."""
    settings: dict[str, Any] = {}
    columns: list[str] = list(ORIGINAL_COLUMNS)
    with open(path) as file:
        for line in file:
            if line.startswith(SETTINGS_PREFIX):
                settings = json.loads(line[len(SETTINGS_PREFIX):])
            elif line.startswith(COLUMNS_PREFIX):
                columns = line[len(COLUMNS_PREFIX):].split()
    rows = np.loadtxt(path, comments="#", ndmin=2)
    if rows.size == 0:
        rows = np.zeros((0, len(columns)))
    return settings, columns, rows
