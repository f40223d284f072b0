"""What a run leaves behind: raw-data rows, log lines, checkpoints and plots.

`Recorder` is the loop's only door to files. Only process 0 writes raw data and plots (the
others get empty paths); every process saves its part of a checkpoint.
"""

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from sam_eos import errors
from sam_eos.loop import checkpoint, distributed, schedule
from sam_eos.loop.check import Measurement
from sam_eos.loop.config import Outputs, TrainConfig
from sam_eos.loop.state import LoopState
from sam_eos.reports import paths
from sam_eos.reports.figures import RunData, draw_density, draw_layers, draw_plots
from sam_eos.reports.raw_data import (
    DensityWriter,
    RawDataWriter,
    column_names,
    density_data_path,
    is_same_run,
    keep_first_rows,
    read_raw_data,
)
from sam_eos.reports.tensorboard_writer import TensorBoardWriter
from sam_eos.units import SECONDS_PER_HOUR


def measured_row(step: int, seconds: float, m: dict[str, Any], check_seconds: float, *,
                 step_size: float, eigensolver: str) -> dict[str, float]:
    """One raw-data row from a check's columns (`sam_eos.loop.check.Measurement.columns`) and
    wall time `check_seconds`, at `seconds` of training time. An unconverged check keeps its
    last estimate, with its `error_bound` and `converged` 0; only a non-finite estimate is
    nan. With a non-default method's `stability_threshold` it adds the METHOD_COLUMNS:
    `effective_sharpness` is the measured one (Adam's) or, with P = I, max f(lambda) over
    lambda_max and lambda_min for f(lambda) = lambda + rho_eff lambda^2 (H + rho_eff H^2
    shares H's eigenvectors). With `power`, whose lambda_max is a magnitude, that is
    f(|lambda|): an upper bound when the eigenvalue of largest magnitude is negative."""
    eigenvalues = np.asarray(m["eigenvalues"], np.float64)
    lambda_min = float(m["lambda_min"])
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
        "check_seconds": float(check_seconds),
        "error_bound": float(m["error_bound"]),
        "converged": float(bool(m["converged"])),
    }
    if "audit_error" in m:
        row["audit_error"] = float(m["audit_error"])
    for i in range(1, len(eigenvalues)):
        row[f"eig_{i + 1}"] = float(eigenvalues[i])
    if "stability_threshold" in m:
        row["stability_threshold"] = float(m["stability_threshold"])
        row["effective_sharpness"] = float(m["effective_sharpness"]) if (
            "effective_sharpness" in m) else composed_sharpness(
            lambda_max, lambda_min, float(m["rho_eff"]))
    return row


def composed_sharpness(lambda_max: float, lambda_min: float, rho_eff: float) -> float:
    """The top eigenvalue of H + rho_eff H^2 from H's extreme eigenvalues: max of
    lambda + rho_eff lambda^2 over the two (nan lambda_min: lambda_max's alone)."""
    values = [v + rho_eff * v * v for v in (lambda_max, lambda_min) if math.isfinite(v)]
    return max(values) if values else math.nan


def failed_row(step: int, seconds: float, *, step_size: float,
               columns: Sequence[str]) -> dict[str, float]:
    """The row of a check that raised: nan but for time, 2/eta and step."""
    row = dict.fromkeys(columns, math.nan)
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
    if "stability_threshold" in row:
        logging.info("  effective sharpness %.6g | threshold T %.6g | ratio %.4g",
                     row["effective_sharpness"], row["stability_threshold"],
                     row["effective_sharpness"] / row["stability_threshold"])


def start_raw_data(path: str, settings: dict[str, Any], columns: list[str], resuming: bool,
                   rows_written: int) -> list[dict[str, float]] | None:
    """Readies the raw-data path for a starting run: the rows to continue after (a resumed
    run's own file, cut back to its checkpoint's rows), or None for a new file.

    No run's raw data is overwritten: a file of another run, or of an earlier run of these
    settings when this one does not resume, is moved aside under a numbered name, logged. A
    resumed run's file that was deleted or cut short continues with the rows it still has.
    """
    if not path:
        return None
    exists = os.path.exists(path) and os.path.getsize(path) > 0
    same_run = exists and is_same_run(path, settings, columns)
    action = paths.raw_data_action(exists, resuming, same_run)
    if action == "move_aside":
        moved = paths.move_aside(path)
        logging.warning("%s holds the raw data of %s; moved it to %s so that nothing is "
                        "overwritten.", path, "an earlier run of these settings" if same_run
                        else "another run", moved)
        return None
    if action == "create":
        if resuming and rows_written:
            logging.warning("The raw-data file %s is gone; the resumed run starts it afresh.",
                            path)
        return None
    kept = keep_first_rows(path, rows_written)
    if kept < rows_written:
        logging.warning("The raw-data file %s holds %d of the %d rows the checkpoint counts "
                        "(cut short or replaced); the run continues after those %d.", path,
                        kept, rows_written, kept)
    _, _, table = read_raw_data(path)
    return [dict(zip(columns, map(float, row), strict=True)) for row in table]


def _match_position_to_rows(position: schedule.Position, rows: list[dict[str, float]]) -> None:
    """Makes a resumed position agree with the raw data it continues: the rows written are
    those on file, and a last check whose row is missing (cut short, deleted) is taken again at
    the same step, so no step is repeated or left out later."""
    position.rows_written = len(rows)
    if not any(row["step"] == position.last_checked_step for row in rows):
        position.last_checked_step = -1


def _purge_step(position: schedule.Position, rows: list[dict[str, float]]) -> int:
    """A resumed run's first step not on record: after its last row (or its last check when
    there is no raw data), so TensorBoard hides the earlier run's points from there on."""
    last = int(rows[-1]["step"]) if rows else position.last_checked_step
    return max(last + 1, 0)


class Recorder:
    """Rows (in memory and in the raw-data file), notes, checkpoints and the final plots.

    `outputs`: the paths this process writes ('' skips one; only process 0 has any);
    `settings`: the raw-data header's; `extra_columns`: those of the method and the optional
    measurements. From `config`: the checkpoint directory ('' : none), the columns of its k
    and audits, the plots' x axis and title, and whether spectral densities are kept (in
    `<raw stem>_density.npz` when there is raw data, drawn into `outputs.density_curve`).
    """

    def __init__(self, config: TrainConfig, outputs: Outputs, settings: dict[str, Any],
                 extra_columns: Sequence[str] = ()):
        self.columns = column_names(config.num_principal_components, extra_columns,
                                    config.audits())
        self._with_density = bool(config.spectrum.spectral_density_every_checks)
        self._density_plot, self._layers_plot = outputs.density_curve, outputs.layers_curve
        self.densities: DensityWriter | None = None
        self.rows: list[dict[str, float]] = []
        self._raw_data, self._plot_paths, self._settings = (outputs.raw_data, outputs.plots(),
                                                            settings)
        self._step_size, self._eigensolver = config.step_size, config.eigensolver
        self._run_name, self._x_axis = config.run_name, config.plot_x
        self._checkpointer = (checkpoint.Checkpointer(config.checkpoint_dir, settings)
                              if config.checkpoint_dir else None)
        self._writer: RawDataWriter | None = None
        self._tensorboard_dir = outputs.tensorboard_dir
        self._tensorboard: TensorBoardWriter | None = None
        self.output_failed = False  # a raw-data write failed: the run should stop

    def restore(self, template: LoopState) -> tuple[LoopState, schedule.Position] | None:
        """The latest checkpoint's (state, position), or None (no checkpoint: a fresh run)."""
        if self._checkpointer is None or self._checkpointer.latest_step() is None:
            return None
        tree, position = self._checkpointer.restore(template.checkpoint_tree())
        return LoopState.from_checkpoint_tree(tree), position

    def open(self, position: schedule.Position, resumed: bool) -> None:
        """Opens the raw-data file (continued after a resume; another run's moved aside) and
        matches `position` to the rows it holds (`_match_position_to_rows`). Only process 0
        has one, so only it can fail here; every process hears of it, or the others would wait
        for it in the loop's first collective. Every process must call this."""
        failure = None
        try:
            rows = start_raw_data(self._raw_data, self._settings, self.columns, resumed,
                                  position.rows_written)
            self.rows = rows or []
            if self._raw_data:
                _match_position_to_rows(position, self.rows)
            self._writer = RawDataWriter(self._raw_data, self.columns, self._settings,
                                         append=rows is not None)
            if self._tensorboard_dir:
                self._tensorboard = TensorBoardWriter(
                    self._tensorboard_dir, self._settings, _purge_step(position, self.rows)
                    if resumed else None)
            if self._with_density:
                last = int(self.rows[-1]["step"]) if self.rows else None
                self.densities = DensityWriter(density_data_path(self._raw_data), last)
        except errors.InputError as error:
            failure = error
        except OSError as error:
            failure = errors.InputError(
                f"--raw_data_output={self._raw_data} cannot be written ({error.strerror or error})")
        distributed.raise_if_any_process_failed(failure)

    def check(self, step: int, seconds: float, measurement: Measurement) -> dict[str, float]:
        """Records and logs one check at `seconds` of training time: its columns and extra
        columns (and density), or the error it raised (a nan row and a note)."""
        failure, measured = measurement.error, measurement.columns
        if failure is not None:
            logging.error("Hessian check at step %d failed: %s", step, failure,
                          exc_info=failure)
            row = failed_row(step, seconds, step_size=self._step_size, columns=self.columns)
            self.note(f"check at step {step} failed: {type(failure).__name__}: {failure}")
        else:
            row = measured_row(step, seconds, measured, measurement.seconds,
                               step_size=self._step_size, eigensolver=self._eigensolver)
            if not bool(measured["converged"]):
                message = (
                    f"check at step {step}: the eigensolver did not converge in "
                    f"{int(measured['hessian_vector_products'])} products (error bound "
                    f"{float(measured['error_bound']):.3g}); last estimate "
                    f"{np.asarray(measured['eigenvalues']).tolist()} recorded as it is, "
                    "with converged 0"
                )
                logging.warning(message)
                self.note(message)
            self._add_extra(row, measurement.extra)
        self.rows.append(row)
        self._write(self._writer.row, row)
        if self._tensorboard is not None:
            self._tensorboard.write_row(row)
        if failure is None:
            log_row(row, measurement.seconds)
        return row

    def _add_extra(self, row: dict[str, float], extra: Any) -> None:
        """Merges the optional measurements into `row` (nan where one is missing) and keeps
        their density, marked with this row's lambda_max, 2/eta and SAM edge."""
        for name in self.columns:
            row.setdefault(name, math.nan)
        if extra is None:
            return
        row.update(extra.columns)
        if extra.error:
            self.note(f"spectrum measurements at step {int(row['step'])} failed: {extra.error}")
        if extra.density is not None and self.densities is not None:
            self.densities.add(int(row["step"]), *extra.density, marks=row)

    def note(self, text: str) -> None:
        self._write(self._writer.note, text)

    def _write(self, write: Any, line: Any) -> None:
        """Writes one line of raw data; the first failure is logged in one line and sets
        `output_failed` (the rows stay in memory, for the plots), later lines are skipped."""
        if self.output_failed:
            return
        try:
            write(line)
        except OSError as error:
            self.output_failed = True
            self._writer.close()
            logging.error("Could not write the raw data to %s (%s); the run stops here with "
                          "exit code %d, keeping the %d rows measured.", self._raw_data,
                          error.strerror or error, errors.EXIT_OUTPUT_FAILED, len(self.rows))

    def save(self, state: LoopState, position: schedule.Position) -> None:
        if self._checkpointer is not None:
            self._checkpointer.save(state.checkpoint_tree(), position)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def finish(self, state: LoopState | None, position: schedule.Position) -> list[str]:
        """Saves a last checkpoint (when `state` is consistent, else None), then draws; the
        plots written."""
        if self._checkpointer is not None:
            if state is not None:
                self._checkpointer.save(state.checkpoint_tree(), position)
            self._checkpointer.close()
        return self.draw()

    def draw(self) -> list[str]:
        """Draws the plots from the rows in memory (titled and labelled from the settings); the
        paths written. None without rows (earlier plots stay). A plot that cannot be drawn or
        written is logged in one line; the others are drawn."""
        rows, columns = self.rows, self.columns
        if not rows:
            logging.warning("No checks were recorded: no plots drawn.")
            return []
        table = np.array([[r[name] for name in columns] for r in rows])
        settings = {**self._settings, "run_name": self._run_name}
        try:
            written = draw_plots(table, columns, settings, self._plot_paths, self._x_axis)
        except Exception as error:  # noqa: BLE001 - a plot must not hide the run's result
            logging.error("%s; the raw data is complete.", checkpoint.first_line(error))
            return []
        return written + self._draw_layers(RunData(settings, columns, table)) + \
            self._draw_density()

    def _draw_layers(self, run: RunData) -> list[str]:
        """The layers plot (when asked for and measured): [its path], or []."""
        try:
            drawn = draw_layers([run], self._layers_plot, self._x_axis)
        except Exception:  # noqa: BLE001 - drawing must not hide the run's result
            logging.exception("Drawing the layers plot failed; its data is complete.")
            return []
        return [self._layers_plot] if drawn else []

    def _draw_density(self) -> list[str]:
        """The density plot (when kept and asked for): [its path], or []."""
        if self.densities is None:
            return []
        try:
            drawn = draw_density(self.densities.checks, self._density_plot, self._run_name)
        except Exception:  # noqa: BLE001 - drawing must not hide the run's result
            logging.exception("Drawing the density plot failed; its data is complete.")
            return []
        return [self._density_plot] if drawn else []
