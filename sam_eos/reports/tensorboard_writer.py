"""TensorBoard event files of a run, written while it goes: one scalar per raw-data column.

Fed the raw-data file's rows (`Recorder.check`), so the curves equal its columns (to float32,
TensorBoard's scalar type). tensorboardX writes the event files with protobuf alone, without
TensorFlow or the `tensorboard` package (`tensorboard --logdir DIR` reads them); it is optional
for the library (`pip install tensorboardX`, or the `tensorboard` extra) and pinned in
`requirements.txt` for the programs.
"""

import glob
import json
import math
import os
import struct
import time
from typing import Any

import numpy as np

STEP_COLUMN = "step"


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
    Non-finite values (a failed check's nan, an unmeasured column) are left out: a gap where the
    raw data holds nan. Events are written synchronously (tensorboardX's `EventsWriter`, not the
    `SummaryWriter`, whose thread can hold events past `flush`): a row is on disk when
    `write_row` returns.
    """

    def __init__(self, log_dir: str, settings: dict[str, Any], purge_step: int | None = None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2

        self._event_pb2 = event_pb2
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
        """Every finite column of `row` but the step as a scalar at x = row["step"], in one
        event; then flushes, so `tensorboard --logdir` shows the point mid-run."""
        from tensorboardX.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=name, simple_value=value) for name, value in row.items()
                  if name != STEP_COLUMN and math.isfinite(value)]
        self._write(step=int(row[STEP_COLUMN]), summary=Summary(value=values))
        self._events.flush()

    def close(self) -> None:
        self._events.close()


def read_scalars(log_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar in `log_dir`'s event files as TensorBoard shows it: tag -> (steps int
    [m], values float32 [m]) in the order written, after each resumed run's purge (a
    session start at step s hides the earlier points at s and later). Needs tensorboardX."""
    from tensorboardX.proto import event_pb2

    points: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
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
