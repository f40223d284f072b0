"""When the training loop checks, saves, stops and how many steps it runs next: pure functions.

Everything here is a function of the loop's `Position` (step, training seconds, ...) and the
`Schedule` (the flags' stopping and checking rules), with no clock, device or file: the loop in
`sam_eos.loop.train` reads the clock, asks these functions, and acts. Times are seconds of training
time (steps and checks, not compiling or start-up).
"""

import dataclasses

from sam_eos.units import SECONDS_PER_HOUR


@dataclasses.dataclass
class Position:
    """Where a run is, beside its parameters (all JSON-friendly)."""

    step: int = 0
    training_seconds: float = 0.0
    next_check_seconds: float = 0.0
    batches_taken: int = 0
    rows_written: int = 0
    last_checked_step: int = -1


# A dispatch of several steps aims at this many seconds: long enough to hide Python's
# per-dispatch cost, short enough for the time limit and time-based checks to stay on time.
DISPATCH_TARGET_SECONDS = 0.25


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The loop's rules, in steps and seconds of training time."""

    time_limit_seconds: float
    check_gap_seconds: float | None = None  # None: no time-based checks; 0: every step
    check_every_steps: int | None = None  # None: no step-based checks
    max_steps: int | None = None
    checkpoint_every_seconds: float | None = None  # None: no checkpoints

    @classmethod
    def from_hours(cls, *, time_limit_in_hours: float, hessian_check_gap: float | None,
                   hessian_check_every_steps: int | None, max_steps: int | None,
                   checkpoint_every_minutes: float | None) -> "Schedule":
        """From the flags' units (hours, minutes)."""
        return cls(
            time_limit_seconds=time_limit_in_hours * SECONDS_PER_HOUR,
            check_gap_seconds=None if hessian_check_gap is None
            else hessian_check_gap * SECONDS_PER_HOUR,
            check_every_steps=hessian_check_every_steps,
            max_steps=max_steps,
            checkpoint_every_seconds=None if checkpoint_every_minutes is None
            else checkpoint_every_minutes * 60.0,
        )

    @property
    def has_checks(self) -> bool:
        return self.check_gap_seconds is not None or self.check_every_steps is not None


def check_due(schedule: Schedule, position: Position) -> bool:
    """Whether a Hessian check comes before the step at `position.step`.

    Step-based: every `check_every_steps` steps, step 0 included. Time-based: once the training
    time reaches `position.next_check_seconds` (0 at the start, so step 0 is checked too; then
    `next_check_after` the previous check ended). Never twice at one step (e.g. the last check
    before a resume).
    """
    if position.step == position.last_checked_step:
        return False
    every, gap = schedule.check_every_steps, schedule.check_gap_seconds
    by_steps = every is not None and position.step % every == 0
    by_time = gap is not None and position.training_seconds >= position.next_check_seconds
    return by_steps or by_time


def next_check_after(schedule: Schedule, check_end_seconds: float) -> float:
    """When the next time-based check is due: a gap after the previous check *ended* (as the
    original), so a slow check does not eat into training time. Infinite without such checks."""
    if schedule.check_gap_seconds is None:
        return float("inf")
    return check_end_seconds + schedule.check_gap_seconds


def checkpoint_due(schedule: Schedule, position: Position, last_saved_seconds: float) -> bool:
    """Whether `checkpoint_every_seconds` of training time passed since the last save."""
    every = schedule.checkpoint_every_seconds
    return every is not None and position.training_seconds - last_saved_seconds >= every


def out_of_time(schedule: Schedule, position: Position) -> bool:
    return position.training_seconds >= schedule.time_limit_seconds


def reached_max_steps(schedule: Schedule, position: Position) -> bool:
    """At `max_steps` (a check due there is still taken first: it measures the final state)."""
    return schedule.max_steps is not None and position.step >= schedule.max_steps


def steps_next(schedule: Schedule, position: Position, dispatch_size: int,
               rows_left: int | None = None) -> int:
    """How many steps the next dispatch runs (at least 1): `dispatch_size`, cut to end at the
    next step-based check and at `max_steps`; 1 when every step is checked; at most `rows_left`
    (batches left in the device's current chunk of data; None: no limit)."""
    limit = 1 if schedule.check_gap_seconds == 0 else dispatch_size
    every = schedule.check_every_steps
    if every is not None:
        limit = min(limit, every - position.step % every)
    if schedule.max_steps is not None:
        limit = min(limit, schedule.max_steps - position.step)
    if rows_left is not None:
        limit = min(limit, rows_left)
    return max(limit, 1)


def adapt_dispatch_size(size: int, steps_run: int, seconds: float, maximum: int) -> int:
    """The next dispatch size: doubled when a full-size dispatch took under half the target
    (`DISPATCH_TARGET_SECONDS`), halved when one took over twice the target; in [1, maximum]."""
    if seconds < DISPATCH_TARGET_SECONDS / 2 and steps_run == size:
        return min(2 * size, maximum)
    if seconds > 2 * DISPATCH_TARGET_SECONDS and size > 1:
        return size // 2
    return min(size, maximum)
