"""What a run leaves behind: raw-data rows, log lines, checkpoints and plots.

`Recorder` is the loop's only door to files. Only process 0 writes raw data and plots (the
others get empty paths); every process saves its part of a checkpoint.
"""

import json
import math
import os
from typing import Any

import numpy as np
from absl import logging

from sam_eos import checkpoint, distributed, errors
from sam_eos.plots import draw_plots
from sam_eos.records import RawDataWriter, column_names, keep_first_rows, read_raw_data

PyTree = Any
SECONDS_PER_HOUR = 3600.0


def measured_row(step: int, seconds: float, m: dict[str, Any], *, step_size: float,
                 eigensolver: str) -> dict[str, float]:
    """One raw-data row from a check's measurement (`sam_eos.train`: the eigensolver's results,
    `sam_eos.steps.make_measure`'s and `check_seconds`, the check's wall time), at `seconds`
    of training time; eigenvalue columns are nan when the eigensolver did not converge."""
    eigenvalues = np.asarray(m["eigenvalues"], np.float64)
    lambda_min = float(m["lambda_min"])
    if not bool(m["converged"]):
        eigenvalues = np.full_like(eigenvalues, np.nan)
        lambda_min = math.nan
    lambda_max = float(eigenvalues[0])
    magnitudes = [abs(lambda_max)] + ([] if math.isnan(lambda_min) else [abs(lambda_min)])
    if eigensolver == "power":  # the eigenvalues of largest magnitude
        magnitudes = list(np.abs(eigenvalues))
    row = {
        "time_hours": seconds / SECONDS_PER_HOUR,
        "hessian_norm": max(magnitudes),
        "two_over_eta": 2.0 / step_size,
        "sam_edge": float(m["sam_edge"]),
        "grad_norm": float(m["grad_norm"]),
        "loss": float(m["loss"]),
        "g_alignment": float(m["g_alignment"]),
        "sg_alignment": float(m["sg_alignment"]),
        "step": float(step),
        "lambda_max": lambda_max,
        "lambda_min": lambda_min,
        "hessian_vector_products": float(m["hessian_vector_products"]),
        "check_seconds": float(m.get("check_seconds", math.nan)),
        "error_bound": float(m["error_bound"]),
    }
    for i in range(1, len(eigenvalues)):
        row[f"eig_{i + 1}"] = float(eigenvalues[i])
    return row


def failed_row(step: int, seconds: float, *, step_size: float,
               num_components: int) -> dict[str, float]:
    """The row of a check that raised: nan but for time, 2/eta and step."""
    row = dict.fromkeys(column_names(num_components), math.nan)
    row.update(time_hours=seconds / SECONDS_PER_HOUR, two_over_eta=2.0 / step_size,
               step=float(step))
    return row


def log_row(row: dict[str, float], seconds_taken: float) -> None:
    logging.info(
        "check at step %d, %.4f h: loss %.6g | sharpness %.6g | SAM edge %.6g | 2/eta %.6g | "
        "||g|| %.4g | alignment g %.3f, SAM g %.3f | %d HVPs in %.2f s, error bound %.2g",
        row["step"], row["time_hours"], row["loss"], row["hessian_norm"], row["sam_edge"],
        row["two_over_eta"], row["grad_norm"], row["g_alignment"], row["sg_alignment"],
        row["hessian_vector_products"], seconds_taken, row["error_bound"],
    )


def resume_raw_data(path: str, settings: dict[str, Any], columns: list[str],
                    rows_written: int) -> list[dict[str, float]]:
    """The rows a resumed run had written (the file cut back to them); checks the header."""
    if not path:
        return []
    if not os.path.exists(path):
        logging.warning("The raw-data file %s is gone; the resumed run starts it afresh.", path)
        return []
    saved_settings, saved_columns, _ = read_raw_data(path)
    differences = checkpoint.settings_differences(saved_settings, json.loads(
        json.dumps(settings, default=str)))
    if differences or saved_columns != columns:
        raise errors.InputError(
            f"{path} holds another run's raw data ({'; '.join(differences[:3]) or 'columns'}); "
            "move it away or pass the original --raw_data_output to resume"
        )
    keep_first_rows(path, rows_written)
    _, _, table = read_raw_data(path)
    return [dict(zip(columns, map(float, row), strict=True)) for row in table]


class Recorder:
    """Rows (in memory and in the raw-data file), notes, checkpoints and the final plots.

    `outputs` maps `raw_data` and the plot names to paths ('' skips one); `plot_paths` are
    the plots'. `checkpoint_dir` '' means no checkpoints. `x_axis`: the plots' ("steps" or
    "hours").
    """

    def __init__(self, *, raw_data: str, plot_paths: dict[str, str], checkpoint_dir: str,
                 settings: dict[str, Any], num_components: int, step_size: float,
                 eigensolver: str, run_name: str, x_axis: str = "steps"):
        self.columns = column_names(num_components)
        self.rows: list[dict[str, float]] = []
        self._raw_data, self._plot_paths, self._settings = raw_data, plot_paths, settings
        self._num_components, self._step_size = num_components, step_size
        self._eigensolver, self._run_name = eigensolver, run_name
        self._x_axis = x_axis
        self._checkpointer = (checkpoint.Checkpointer(checkpoint_dir, settings)
                              if checkpoint_dir else None)
        self._writer: RawDataWriter | None = None

    def restore(self, template: PyTree) -> tuple[PyTree, checkpoint.Position] | None:
        """The latest checkpoint's (state, position), or None (no checkpoint: a fresh run)."""
        if self._checkpointer is None or self._checkpointer.latest_step() is None:
            return None
        return self._checkpointer.restore(template)

    def open(self, position: checkpoint.Position, resumed: bool) -> None:
        """Opens the raw-data file (continued after a resume). Only process 0 has one, so only
        it can fail here; every process hears of it, or the others would wait for it in the
        loop's first collective. Every process must call this."""
        failure = None
        try:
            if resumed:
                self.rows = resume_raw_data(self._raw_data, self._settings, self.columns,
                                            position.rows_written)
            self._writer = RawDataWriter(self._raw_data, self.columns, self._settings,
                                         append=bool(self.rows))
        except (errors.InputError, OSError) as error:
            failure = error
        distributed.raise_if_any_process_failed(failure)

    def check(self, step: int, seconds: float, measured: dict[str, Any] | BaseException,
              seconds_taken: float) -> dict[str, float]:
        """Records and logs one check at `seconds` of training time: its measurement, or the
        error it raised (a nan row and a note)."""
        if isinstance(measured, BaseException):
            logging.error("Hessian check at step %d failed: %s", step, measured,
                          exc_info=measured)
            row = failed_row(step, seconds, step_size=self._step_size,
                             num_components=self._num_components)
            self.note(f"check at step {step} failed: {type(measured).__name__}: {measured}")
        else:
            row = measured_row(step, seconds, measured, step_size=self._step_size,
                               eigensolver=self._eigensolver)
            if not bool(measured["converged"]):
                message = (
                    f"check at step {step}: the eigensolver did not converge in "
                    f"{int(measured['hessian_vector_products'])} products (error bound "
                    f"{float(measured['error_bound']):.3g}); last estimate "
                    f"{np.asarray(measured['eigenvalues']).tolist()} recorded as nan"
                )
                logging.warning(message)
                self.note(message)
        self._writer.row(row)
        self.rows.append(row)
        if not isinstance(measured, BaseException):
            log_row(row, seconds_taken)
        return row

    def note(self, text: str) -> None:
        self._writer.note(text)

    def save(self, state: PyTree, position: checkpoint.Position) -> None:
        if self._checkpointer is not None:
            self._checkpointer.save(state, position)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def finish(self, state: PyTree | None, position: checkpoint.Position) -> list[str]:
        """Saves a last checkpoint (when `state` is consistent, else None), then draws; the
        plots written."""
        if self._checkpointer is not None:
            if state is not None:
                self._checkpointer.save(state, position)
            self._checkpointer.close()
        return self.draw()

    def draw(self) -> list[str]:
        """Draws the plots from the rows (titled and labelled from the settings); the paths
        written."""
        rows, columns = self.rows, self.columns
        table = (np.array([[r[name] for name in columns] for r in rows]) if rows
                 else np.zeros((0, 0)))
        try:
            return draw_plots(table, columns, {**self._settings, "run_name": self._run_name},
                              self._plot_paths, self._x_axis)
        except Exception:  # noqa: BLE001 - drawing must not hide the run's result
            logging.exception("Drawing the plots failed; the raw data is complete.")
            return []
