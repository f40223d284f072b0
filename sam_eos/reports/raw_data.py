r"""The raw-data file: one row per Hessian check, loadable by column name.

Layout: the first line holds the column names; then `#` comment lines (a title, the run's
settings as JSON); then one whitespace-separated row per check, flushed as soon as it is
written so an interrupted run keeps every measurement. Notes (e.g. a failed check) are `#`
lines between rows; a finished run ends with a `# summary:` JSON line. Counts (`step`,
`hessian_vector_products`) are written as integers. Both one-liners load it by name:

    numpy.genfromtxt(path, names=True)                  # data["hessian_norm"]
    pandas.read_csv(path, sep=r"\s+", comment="#")       # frame["hessian_norm"]

(`numpy.loadtxt(path, skiprows=1)` gives the bare table.) The first eight columns keep the
original program's order: time, hessian_norm, 2/eta, sam_edge, grad_norm, loss, g_alignment,
sg_alignment. `read_raw_data` also reads the older format (names in a `# columns:` comment);
`read_original_raw_data` reads the original program's files.
"""

import contextlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from sam_eos.errors import InputError
from sam_eos.units import SECONDS_PER_HOUR

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
INTEGER_COLUMNS = frozenset({"step", "hessian_vector_products", "batch_sharpness_batches",
                             "sam_point_hessian_vector_products",
                             "layer_hessian_vector_products"})  # written without a ".0"
TITLE = "# sam_eos raw data: one row per Hessian check; the first line names the columns\n"
SETTINGS_PREFIX = "# settings: "
COLUMNS_PREFIX = "# columns: "  # files written before the names line (still read)
NOTE_PREFIX = "# note: "
SUMMARY_PREFIX = "# summary: "


def column_names(num_principal_components: int, extra: Sequence[str] = (),
                 audits: bool = True) -> list[str]:
    """All columns for a run measuring k eigenvalues (eig_2 .. eig_k appear when k > 1), with
    `audit_error` when its checks are audited, then the `extra` columns: a non-default method's
    METHOD_COLUMNS and the optional measurements' (`sam_eos.loop.measurements`)."""
    further = [f"eig_{i}" for i in range(2, num_principal_components + 1)]
    return [
        *ORIGINAL_COLUMNS,
        "step",
        *further,
        "lambda_max",
        "lambda_min",
        "hessian_vector_products",
        "check_seconds",  # wall-clock seconds the check took
        "error_bound",  # the eigensolver's error bound relative to ||H||, noise floor included
        # audited checks: (cold top - warm top) / |larger|, > 0 when the warm one missed; else nan
        *(["audit_error"] if audits else []),
        "converged",  # 1: the eigensolver met its tolerance; 0: its last estimate, unconverged
        *extra,
    ]


# A run with another optimizer than SGD, or with USAM: its base optimizer's threshold T and the
# top eigenvalue of P^-1/2 (H + rho_eff H^2) P^-1/2, at the edge when equal (`sam_eos.edge`).
METHOD_COLUMNS = ("stability_threshold", "effective_sharpness")

# Columns that are wall-clock times: they differ between two runs that measure the same.
TIMING_COLUMNS = ("time_hours", "check_seconds")


def untimed(columns: Sequence[str], rows: np.ndarray) -> np.ndarray:
    """`rows` [checks, len(columns)] without the TIMING_COLUMNS: what a rerun, a resumed run
    or the same run on other devices must reproduce."""
    keep = [i for i, name in enumerate(columns) if name not in TIMING_COLUMNS]
    return np.asarray(rows)[:, keep]


def check_output_path(path: str, flag_name: str) -> None:
    """Fail now (InputError), not after hours of training, if `path` cannot be written: creates
    its directory and writes (then removes) a scratch file there. An empty path (no output) passes.
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
    """Writes one run's raw-data file: afresh (truncating any old file) with its header, or, with
    `append=True` (a resumed run), after the file's existing rows.

    Each line is one unbuffered write: a failed write (a full disk) raises at once, from that
    line's call, after cutting the file back to its last whole line (should that fail too,
    readers drop a last line without its newline). `close` never raises.
    """

    def __init__(
        self, path: str, columns: Sequence[str], settings: dict[str, Any], append: bool = False
    ):
        self.columns = list(columns)
        self._file = open(path, "ab" if append else "wb", buffering=0) if path else None  # noqa: SIM115
        if not append:
            self._write(" ".join(self.columns) + "\n")
            self._write(TITLE)
            self._write(SETTINGS_PREFIX + json.dumps(settings, sort_keys=True, default=str) + "\n")

    def _write(self, text: str) -> None:
        if self._file is None:
            return
        data, start = memoryview(text.encode()), self._file.tell()
        try:
            while data:  # a raw write may take only part of the line
                data = data[self._file.write(data):]
        except OSError:
            with contextlib.suppress(OSError):  # cutting frees space: usually possible
                self._file.truncate(start)
            raise

    def row(self, values: dict[str, float]) -> None:
        """Appends one row; `values` maps every column name to a number (nan allowed)."""
        self._write(" ".join(format_value(values[name], name in INTEGER_COLUMNS)
                             for name in self.columns) + "\n")

    def note(self, text: str) -> None:
        """Appends a `# note:` line (kept by readers as a comment)."""
        self._write(NOTE_PREFIX + " ".join(text.split()) + "\n")

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            with contextlib.suppress(OSError):  # nothing is buffered: nothing is lost
                file.close()


def format_value(value: float, integer: bool = False) -> str:
    """A number as written in a row: `repr` of the float (exact), `nan`, `inf`, `-inf`, or, for
    an integer column holding a whole number, the integer (`50`, not `50.0`)."""
    value = float(value)
    if math.isnan(value):
        return "nan"
    if not math.isfinite(value):
        return "inf" if value > 0 else "-inf"
    if integer and value.is_integer():
        return str(int(value))
    return repr(value)


def _is_names_line(line: str) -> bool:
    """Whether an uncommented line holds column names rather than numbers."""
    fields = line.split()
    if not fields or line.startswith("#"):
        return False
    try:
        float(fields[0])
    except ValueError:
        return True
    return False


def complete_lines(path: str) -> list[str]:
    """The lines of a text file, without a last line cut short (no newline): a row whose write
    was interrupted (a kill, a full disk) is dropped, not half read."""
    with open(path) as file:
        lines = file.readlines()
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    return lines


def keep_first_rows(path: str, num_rows: int) -> int:
    """Truncates a raw-data file after its `num_rows`-th row, as a resumed run does with rows
    written after its last checkpoint: the header and earlier notes stay; a `# summary:` line
    and a last line cut short go. Returns the rows kept (fewer if the file holds fewer)."""
    lines = complete_lines(path)
    kept, rows = [], 0
    for number, line in enumerate(lines):
        if line.startswith(SUMMARY_PREFIX):
            continue
        is_row = bool(line.strip()) and not line.startswith("#") and not (
            number == 0 and _is_names_line(line))
        if rows == num_rows and (is_row or line.startswith(NOTE_PREFIX)):
            break
        kept.append(line)
        rows += is_row
    scratch = path + ".resume"
    with open(scratch, "w") as file:  # written aside and renamed: a kill now loses nothing
        file.writelines(kept)
    os.replace(scratch, path)
    return rows


def read_raw_data(path: str) -> tuple[dict[str, Any], list[str], np.ndarray]:
    """(settings, column names, rows [num_checks, num_columns] as floats) of a raw-data file, in
    this format or the older one (names in a `# columns:` comment). Raises ValueError for a file
    without column names, e.g. the original program's (`read_original_raw_data` reads those)."""
    settings: dict[str, Any] = {}
    columns: list[str] | None = None
    skip = 0
    with open(path) as file:
        for number, line in enumerate(file):
            if number == 0 and _is_names_line(line):
                columns, skip = line.split(), 1
            elif line.startswith(SETTINGS_PREFIX):
                settings = json.loads(line[len(SETTINGS_PREFIX):])
            elif line.startswith(COLUMNS_PREFIX) and columns is None:
                columns = line[len(COLUMNS_PREFIX):].split()
    if columns is None:
        raise ValueError(f"{path} has no column names: not a sam_eos raw-data file (a file "
                         "of the original program reads with read_original_raw_data, or "
                         "`python3 -m sam_eos.cli.replot --original_format`)")
    rows = _load_rows(path, skip, len(columns))
    if rows.shape[1] != len(columns):
        raise ValueError(f"{path}: {len(columns)} column names but rows of {rows.shape[1]} "
                         "values")
    return settings, columns, rows


def _load_rows(path: str, skip: int, num_columns: int) -> np.ndarray:
    """The numeric rows [n, num_columns] after `skip` lines (no rows yet: n = 0, no warning);
    a last row cut short is left out."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "loadtxt: input contained no data")
        rows = np.loadtxt(complete_lines(path)[skip:], comments="#", ndmin=2)
    return rows if rows.size else np.zeros((0, num_columns))


def read_original_raw_data(path: str) -> tuple[dict[str, Any], list[str], np.ndarray]:
    """A raw-data file of the original program, as `read_raw_data` returns ours.

    That file has no header and eight columns, the first the training time in seconds (taken
    after the eigensolver): returned as `ORIGINAL_COLUMNS`, time in hours. The settings are
    what the columns tell: the step size (from 2/eta) and rho (from the SAM edge at ||g||,
    inverting `sam_eos.edge.sam_edge`), marked `"source": "original program"`.
    """
    rows = _load_rows(path, 0, len(ORIGINAL_COLUMNS))
    if rows.shape[1] != len(ORIGINAL_COLUMNS):
        raise ValueError(f"{path}: the original program wrote {len(ORIGINAL_COLUMNS)} columns, "
                         f"this file has {rows.shape[1]}")
    rows = rows.copy()
    rows[:, 0] /= SECONDS_PER_HOUR
    settings: dict[str, Any] = {"source": "original program",
                                "run_name": os.path.basename(path)}
    two_over_eta = rows[:, 2][np.isfinite(rows[:, 2]) & (rows[:, 2] > 0)]
    if two_over_eta.size:
        step_size = 2.0 / float(np.median(two_over_eta))
        settings["step_size"] = float(f"{step_size:.6g}")
        rho = _rho_from_sam_edge(rows[:, 3], rows[:, 4], step_size)
        if rho is not None:
            settings["rho"] = rho
    return settings, list(ORIGINAL_COLUMNS), rows


def _rho_from_sam_edge(edge: np.ndarray, grad_norm: np.ndarray, step_size: float) -> float | None:
    """rho such that sam_edge(||g||, eta, rho) = edge (median over the rows; 6 digits), from
    edge = (4/eta) / (1 + sqrt(1 + t)), t = 8 rho / (eta ||g||)."""
    usable = np.isfinite(edge) & np.isfinite(grad_norm) & (edge > 0) & (grad_norm > 0)
    if not np.any(usable):
        return None
    root = 4.0 / (step_size * edge[usable]) - 1.0  # sqrt(1 + t)
    t = np.maximum(root**2 - 1.0, 0.0)
    rho = float(np.median(t * step_size * grad_norm[usable] / 8.0))
    return float(f"{rho:.6g}") if rho > 1e-12 else 0.0


def append_summary(path: str, summary: dict[str, Any]) -> None:
    """Appends the run's summary (`sam_eos.reports.summary.summarize`) as a
    `# summary: {json}` line; non-finite numbers become null. An empty path writes nothing."""
    if not path:
        return
    with open(path, "a") as file:
        file.write(SUMMARY_PREFIX + json.dumps(_finite_or_none(summary), sort_keys=True) + "\n")


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_summary(path: str) -> dict[str, Any] | None:
    """The last `# summary:` of a raw-data file, or None (a run still going, or interrupted)."""
    summary = None
    with open(path) as file:
        for line in file:
            if line.startswith(SUMMARY_PREFIX):
                summary = json.loads(line[len(SUMMARY_PREFIX):])
    return summary


# Settings a resumed run may change (more time or steps, other outputs' timing).
RESUMABLE_CHANGES = frozenset(
    {"time_limit_in_hours", "max_steps", "checkpoint_every_minutes", "checkpoint_dir",
     "plot_x", "progress_every_seconds"}
)


def settings_differences(saved: Any, current: Any, path: str = "") -> list[str]:
    """Human-readable differences between two settings records, ignoring RESUMABLE_CHANGES."""
    if isinstance(saved, dict) and isinstance(current, dict):
        differences = []
        for key in sorted(set(saved) | set(current)):
            if key in RESUMABLE_CHANGES:
                continue
            name = f"{path}.{key}" if path else str(key)
            if key not in saved or key not in current:
                differences.append(f"{name} only in the {'checkpoint' if key in saved else 'run'}")
            else:
                differences += settings_differences(saved[key], current[key], name)
        return differences
    if saved != current:
        return [f"{path}: checkpoint {saved!r}, now {current!r}"]
    return []


def is_same_run(path: str, settings: dict[str, Any], columns: Sequence[str]) -> bool:
    """Whether the raw-data file at `path` was written by a run with these settings and
    columns (settings compared as `settings_differences` does, so a resumed run may have more
    time or steps). False for a file that is not raw data."""
    try:
        saved_settings, saved_columns, _ = read_raw_data(path)
    except (OSError, ValueError):
        return False
    current = json.loads(json.dumps(settings, default=str))
    return saved_columns == list(columns) and not settings_differences(saved_settings, current)


# ---------------------------------------------------------------------------------------------
# The spectral densities beside the raw data

DENSITY_SUFFIX = "_density.npz"
# Check step s: nodes_s, weights_s, float [probes, lanczos_steps]; marks_s, float [3]: DENSITY_MARKS
DENSITY_MARKS = ("lambda_max", "two_over_eta", "sam_edge")


def density_data_path(raw_data_path: str) -> str:
    """Where the densities of the run writing `raw_data_path` go: `<raw stem>_density.npz`."""
    return os.path.splitext(raw_data_path)[0] + DENSITY_SUFFIX if raw_data_path else ""


def read_density(path: str) -> dict[int, dict[str, np.ndarray]]:
    """Check step -> {"nodes", "weights", "marks"} of a densities file, in step order."""
    with np.load(path) as data:
        steps = sorted(int(name[len("nodes_"):]) for name in data.files
                       if name.startswith("nodes_"))
        return {step: {part: np.array(data[f"{part}_{step}"])
                       for part in ("nodes", "weights", "marks")} for step in steps}


class DensityWriter:
    """Keeps a run's densities in memory and rewrites its `.npz` after each one (written aside
    and renamed, so an interrupted run keeps every density taken). `keep_up_to_step`: a resumed
    run keeps the saved densities up to that step; None starts afresh."""

    def __init__(self, path: str, keep_up_to_step: int | None = None):
        self.path = path
        self.checks: dict[int, dict[str, np.ndarray]] = {}
        if path and keep_up_to_step is not None and os.path.exists(path):
            self.checks = {step: check for step, check in read_density(path).items()
                           if step <= keep_up_to_step}

    def add(self, step: int, nodes: np.ndarray, weights: np.ndarray,
            marks: dict[str, float]) -> None:
        """Records the density of the check at `step` (`marks`: DENSITY_MARKS -> value)."""
        self.checks[int(step)] = {
            "nodes": np.asarray(nodes), "weights": np.asarray(weights),
            "marks": np.array([marks[name] for name in DENSITY_MARKS], np.float64)}
        self._save()

    def _save(self) -> None:
        if not self.path:
            return
        arrays = {f"{part}_{step}": value for step, check in self.checks.items()
                  for part, value in check.items()}
        scratch = self.path + ".partial.npz"
        np.savez(scratch, **arrays)
        os.replace(scratch, self.path)
