"""How far a run has got: a progress line every so many seconds of training time, or a live
bar on a terminal.

`progress_line` is pure (numbers in, text out); `Progress` holds the clock-free state the loop
feeds it (step and training seconds) and decides when to log. On a terminal (stderr is a TTY)
it draws a tqdm bar on stderr instead of log lines. Times are seconds of training time.
"""

import dataclasses
import math
import sys
from typing import IO

from absl import logging


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Where a run stands, in steps and seconds of training time."""

    step: int
    training_seconds: float
    steps_per_second: float | None  # None before the first step of this process
    time_limit_seconds: float
    max_steps: int | None = None
    sharpness: float | None = None  # the last check's; None before the first check
    sam_edge: float | None = None


def fraction_done(snapshot: Snapshot) -> float:
    """The larger of the time and step fractions (the run stops at whichever comes first),
    in [0, 1]."""
    fraction = snapshot.training_seconds / snapshot.time_limit_seconds
    if snapshot.max_steps:
        fraction = max(fraction, snapshot.step / snapshot.max_steps)
    return min(max(fraction, 0.0), 1.0)


def eta_seconds(snapshot: Snapshot) -> float:
    """Seconds of training time left: until the time limit or, at the current rate, until
    `max_steps`, whichever is sooner."""
    left = max(snapshot.time_limit_seconds - snapshot.training_seconds, 0.0)
    if snapshot.max_steps is not None and snapshot.steps_per_second:
        left = min(left, max(snapshot.max_steps - snapshot.step, 0) / snapshot.steps_per_second)
    return left


def format_duration(seconds: float) -> str:
    """`seconds` for people: "42s", "3m 05s", "2h 07m"."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {seconds:02d}s"
    return f"{seconds}s"


def _number(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4g}"


def progress_line(snapshot: Snapshot) -> str:
    """One progress line, e.g. "step 1200 | 45.3 steps/s | 12m 00s of 4h 00m training (5%) |
    ETA 3h 48m | sharpness 19.6, SAM edge 20.1"."""
    rate = snapshot.steps_per_second
    steps = f"step {snapshot.step}" + (f" of {snapshot.max_steps}" if snapshot.max_steps else "")
    return " | ".join([
        steps,
        "n/a steps/s" if rate is None else f"{rate:.3g} steps/s",
        f"{format_duration(snapshot.training_seconds)} of "
        f"{format_duration(snapshot.time_limit_seconds)} training "
        f"({100 * snapshot.training_seconds / snapshot.time_limit_seconds:.0f}%)",
        f"ETA {format_duration(eta_seconds(snapshot))}",
        f"sharpness {_number(snapshot.sharpness)}, SAM edge {_number(snapshot.sam_edge)}",
    ])


class Progress:
    """Reports a run's progress: a log line every `every_seconds` of training time, or (on a
    terminal) a live bar on `stream`, redrawn at every update. `every_seconds` 0 or
    `enabled=False` (e.g. processes other than 0): silent."""

    def __init__(self, *, every_seconds: float, time_limit_seconds: float,
                 max_steps: int | None, enabled: bool = True, stream: IO[str] | None = None,
                 live: bool | None = None):
        self._every = every_seconds
        self._enabled = enabled and every_seconds > 0
        self._limits = dict(time_limit_seconds=time_limit_seconds, max_steps=max_steps)
        self._stream = stream or sys.stderr
        self._live = self._stream.isatty() if live is None else live
        self._start: tuple[int, float] | None = None  # (step, seconds) when this process began
        self._last_logged = 0.0
        self._sharpness: float | None = None
        self._sam_edge: float | None = None
        self._bar = None

    def snapshot(self, step: int, training_seconds: float) -> Snapshot:
        """Where the run stands; the rate counts this process's steps and seconds only."""
        if self._start is None:
            self._start = (step, training_seconds)
        start_step, start_seconds = self._start
        elapsed = training_seconds - start_seconds
        rate = (step - start_step) / elapsed if step > start_step and elapsed > 0 else None
        return Snapshot(step, training_seconds, rate, sharpness=self._sharpness,
                        sam_edge=self._sam_edge, **self._limits)

    def update(self, step: int, training_seconds: float) -> None:
        """Called between dispatches: redraws the bar, or logs when a line is due."""
        if not self._enabled:
            return
        snapshot = self.snapshot(step, training_seconds)
        if self._live:
            self._draw(snapshot)
        elif training_seconds - self._last_logged >= self._every:
            self._last_logged = training_seconds
            logging.info("Progress: %s", progress_line(snapshot))

    def checked(self, step: int, training_seconds: float, row: dict[str, float]) -> None:
        """Called after each check with its raw-data row: keeps its sharpness and SAM edge."""
        self._sharpness, self._sam_edge = row.get("hessian_norm"), row.get("sam_edge")
        self.update(step, training_seconds)

    def clear(self) -> None:
        """Clears the bar (before log lines such as a check's)."""
        if self._bar is not None:
            self._bar.clear()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _draw(self, snapshot: Snapshot) -> None:
        if self._bar is None:
            from tqdm import tqdm  # only on a terminal

            self._bar = tqdm(total=1000, file=self._stream, bar_format="{bar:20}| {desc}",
                             dynamic_ncols=True, leave=True)
        self._bar.n = round(1000 * fraction_done(snapshot))
        self._bar.set_description_str(progress_line(snapshot), refresh=False)
        self._bar.refresh()
