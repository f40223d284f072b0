"""TensorBoard event files of a run, written while it goes: one scalar per raw-data column.

Fed the raw-data file's rows (`Recorder.check`), so the curves equal its columns (to float32,
TensorBoard's scalar type). Each column's tag is `<group>/<column>` (`tag_for`: `sharpness/`,
`edge/`, `solver/`, `training/`, `layers/`, and `other/` for a column the map does not know),
so TensorBoard's scalars page shows them in groups; and each event file holds a custom-scalars
layout (`layout_for`) that puts lambda_max, the SAM edge and 2/eta on one chart, the effective
sharpness and its threshold on another and the layers on a third: the paper's plot in
TensorBoard's "Custom Scalars" page.

tensorboardX writes the event files with protobuf alone, without TensorFlow or the
`tensorboard` package (`tensorboard --logdir DIR` reads them); it is optional for the library
(`pip install tensorboardX`, or the `tensorboard` extra) and pinned in `requirements.txt` for
the programs.
"""

import glob
import json
import math
import os
import re
import struct
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

STEP_COLUMN = "step"

# The raw-data columns (`sam_eos.reports.raw_data.column_names` and the optional measurements'
# `sam_eos.loop.measurements.extra_column_names`) by tag group; `tag_for` names the rest.
TAG_GROUPS = {
    "sharpness": ("hessian_norm", "lambda_max", "lambda_min", "effective_sharpness", "trace",
                  "trace_standard_error", "batch_sharpness", "batch_sharpness_standard_error",
                  "sam_point_sharpness"),
    "edge": ("two_over_eta", "sam_edge", "stability_threshold"),
    "solver": ("hessian_vector_products", "check_seconds", "error_bound", "audit_error",
               "converged", "batch_sharpness_batches", "sam_point_hessian_vector_products"),
    "training": ("time_hours", "loss", "grad_norm", "g_alignment", "sg_alignment"),
    "layers": ("layer_hessian_vector_products", "layer_error_bound"),
}
_GROUP_OF = {column: group for group, columns in TAG_GROUPS.items() for column in columns}
# Columns named by pattern: eig_2 .. eig_k, and a column per layer.
_PATTERN_GROUPS = ((re.compile(r"eig_\d+"), "sharpness"),
                   (re.compile(r"layer_(sharpness|share)/.+"), "layers"))
OTHER_GROUP = "other"
LAYOUT_TAG = "custom_scalars__config__"  # TensorBoard's custom-scalars layout entry


def tag_for(column: str) -> str:
    """The TensorBoard tag of a raw-data column: `<group>/<column>`, e.g. `sharpness/lambda_max`,
    `edge/sam_edge`, `layers/layer_sharpness/<layer>`; `other/<column>` for a column that
    TAG_GROUPS does not know."""
    group = _GROUP_OF.get(column) or next(
        (group for pattern, group in _PATTERN_GROUPS if pattern.fullmatch(column)), OTHER_GROUP)
    return f"{group}/{column}"


def _exactly(column: str) -> str:
    """The regex (TensorBoard matches a chart's tags with `re.match`) of one column's tag."""
    return re.escape(tag_for(column)) + "$"


def layout_for(columns: Iterable[str]) -> dict[str, dict[str, list[str]]]:
    """The custom-scalars layout of a run with these raw-data columns: category -> chart title
    -> tag regexes, with only the charts whose tags the run has.

    - "edge of stability": "lambda_max, the SAM edge and 2/eta" (with lambda_max), and
      "effective sharpness against its threshold" (a run with the METHOD_COLUMNS);
    - "layers" (a run with layer columns): "each layer's sharpness" with lambda_max (a layer's
      block of the Hessian has no larger top eigenvalue), and "each layer's share of the top
      eigenvector";
    - "training": "loss".
    """
    present = set(columns)
    edge = {}
    if "lambda_max" in present:
        edge["lambda_max, the SAM edge and 2/eta"] = [
            _exactly(c) for c in ("lambda_max", "sam_edge", "two_over_eta") if c in present]
    if {"effective_sharpness", "stability_threshold"} <= present:
        edge["effective sharpness against its threshold"] = [
            _exactly("effective_sharpness"), _exactly("stability_threshold")]
    layers = {}
    for kind, title in (("sharpness", "each layer's sharpness"),
                        ("share", "each layer's share of the top eigenvector")):
        if any(c.startswith(f"layer_{kind}/") for c in present):
            reference = [_exactly("lambda_max")] if kind == "sharpness" and (
                "lambda_max" in present) else []
            layers[title] = [re.escape(f"layers/layer_{kind}/"), *reference]  # every layer
    training = {"loss": [_exactly("loss")]} if "loss" in present else {}
    layout = {"edge of stability": edge, "layers": layers, "training": training}
    return {category: charts for category, charts in layout.items() if charts}


def writer_available() -> bool:
    """Whether tensorboardX imports."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


MISSING_WRITER = ("--tensorboard_dir needs tensorboardX, which is not installed: "
                  "pip install tensorboardX (or the sam_eos[tensorboard] extra)")


class TensorBoardWriter:
    """Scalars of one run's rows in `log_dir`, x = the row's `step`.

    Args:
      log_dir: the event files' folder (created).
      settings: the run's settings, written once as text ("settings").
      purge_step: a resumed run's first step not on record: TensorBoard hides the earlier run's
        points at this step and later, so repeated steps show once. None: a fresh run, which
        hides every earlier point in `log_dir` (as purge_step 0) and writes the settings.
    Each column is written under its tag (`tag_for`). The first row also writes the layout of
    the Custom Scalars page (`layout_for` its columns, so a row must hold every column, nan where
    unmeasured, as the recorder's do): once per event file, so a resumed run's file has it too.
    Non-finite values (a failed check's nan, an unmeasured column) are left out: a gap where the
    raw data holds nan. Events are written synchronously (tensorboardX's `EventsWriter`, not the
    `SummaryWriter`, whose thread can hold events past `flush`): a row is on disk when
    `write_row` returns.
    """

    def __init__(self, log_dir: str, settings: dict[str, Any], purge_step: int | None = None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2

        self._event_pb2 = event_pb2
        self._layout_written = False
        os.makedirs(log_dir, exist_ok=True)
        # A unique suffix: two writers started in one second get two files, in order.
        self._events = EventsWriter(os.path.join(log_dir, "events"), f".{time.time_ns()}")
        step = 0 if purge_step is None else purge_step
        self._write(step=step, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))
        if purge_step is None:
            from tensorboardX.summary import text

            settings_text = json.dumps(settings, sort_keys=True, indent=1, default=str)
            self._write(step=0, summary=text("settings", "    " + settings_text.replace(
                "\n", "\n    ")))
        self._events.flush()

    def _write(self, **fields: Any) -> None:
        self._events.write_event(self._event_pb2.Event(wall_time=time.time(), **fields))

    def write_row(self, row: dict[str, float]) -> None:
        """Every finite column of `row` but the step as a scalar (tag `tag_for` its name) at
        x = row["step"], in one event (after the layout, for the first row); then flushes, so
        `tensorboard --logdir` shows the point mid-run."""
        from tensorboardX.proto.summary_pb2 import Summary

        step = int(row[STEP_COLUMN])
        if not self._layout_written:
            from tensorboardX.summary import custom_scalars

            layout = layout_for(name for name in row if name != STEP_COLUMN)
            if layout:
                self._write(step=step, summary=custom_scalars({
                    category: {title: ["Multiline", tags] for title, tags in charts.items()}
                    for category, charts in layout.items()}))
            self._layout_written = True
        values = [Summary.Value(tag=tag_for(name), simple_value=value)
                  for name, value in row.items()
                  if name != STEP_COLUMN and math.isfinite(value)]
        self._write(step=step, summary=Summary(value=values))
        self._events.flush()

    def close(self) -> None:
        self._events.close()


def _event_files(log_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*")))


def read_scalars(log_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar in `log_dir`'s event files as TensorBoard shows it: tag (`tag_for` a
    column) -> (steps int [m], values float32 [m]) in the order written, after each resumed
    run's purge (a session start at step s hides the earlier points at s and later). Needs
    tensorboardX."""
    from tensorboardX.proto import event_pb2

    points: dict[str, list[tuple[int, float]]] = {}
    for path in _event_files(log_dir):
        for record in _records(path):
            event = event_pb2.Event.FromString(record)
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                points = {tag: [p for p in kept if p[0] < event.step]
                          for tag, kept in points.items()}
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    points.setdefault(value.tag, []).append((event.step, value.simple_value))
    return {tag: (np.array([p[0] for p in kept], int), np.array([p[1] for p in kept],
                                                               np.float32))
            for tag, kept in points.items()}


def read_layouts(log_dir: str) -> list[dict[str, dict[str, list[str]]]]:
    """The custom-scalars layouts in `log_dir`'s event files, in file order (one per file that
    has one): category -> chart title -> tag regexes, as `layout_for` gives them. Needs
    tensorboardX."""
    from tensorboardX.proto import event_pb2, layout_pb2

    layouts = []
    for path in _event_files(log_dir):
        for record in _records(path):
            for value in event_pb2.Event.FromString(record).summary.value:
                if value.tag == LAYOUT_TAG:
                    layout = layout_pb2.Layout.FromString(value.tensor.string_val[0])
                    layouts.append({category.title: {chart.title: list(chart.multiline.tag)
                                                     for chart in category.chart}
                                    for category in layout.category})
    return layouts


def _records(path: str):
    """The records of a TFRecord file (length, its checksum, data, its checksum; checksums
    not verified), stopping at a record cut short by a write in progress."""
    with open(path, "rb") as file:
        while header := file.read(12):
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = file.read(length + 4)
            if len(data) < length + 4:
                return
            yield data[:length]
