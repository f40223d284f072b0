"""The loop's schedule: when checks, checkpoints and stops come, and how many steps run next."""

import math

import pytest

from sam_eos.loop import schedule
from sam_eos.loop.schedule import Position, Schedule


def at(step=0, seconds=0.0, next_check=0.0, last_checked=-1) -> Position:
    return Position(step=step, training_seconds=seconds, next_check_seconds=next_check,
                    last_checked_step=last_checked)


def test_step_based_checks_come_every_so_many_steps_from_step_0():
    plan = Schedule(time_limit_seconds=100, check_every_steps=10)
    due = [step for step in range(35) if schedule.check_due(plan, at(step, seconds=step))]
    assert due == [0, 10, 20, 30]


def test_no_check_twice_at_one_step():
    plan = Schedule(time_limit_seconds=100, check_every_steps=10)
    assert not schedule.check_due(plan, at(20, last_checked=20))


def test_the_time_gap_counts_from_the_end_of_the_previous_check():
    plan = Schedule(time_limit_seconds=100, check_gap_seconds=5.0)
    assert schedule.check_due(plan, at(0))  # the first check, at step 0
    # That check ran from 0 s to 3 s: the next is due at 8 s, not 5 s.
    next_check = schedule.next_check_after(plan, check_end_seconds=3.0)
    assert next_check == 8.0
    assert not schedule.check_due(plan, at(7, seconds=7.9, next_check=next_check))
    assert schedule.check_due(plan, at(8, seconds=8.0, next_check=next_check))


def test_without_time_based_checks_none_is_ever_due_by_time():
    plan = Schedule(time_limit_seconds=100, check_every_steps=50)
    assert schedule.next_check_after(plan, 3.0) == math.inf
    assert not schedule.check_due(plan, at(7, seconds=99.0))


def test_a_zero_gap_checks_every_step_and_runs_one_step_at_a_time():
    plan = Schedule(time_limit_seconds=100, check_gap_seconds=0.0)
    for step in range(3):
        assert schedule.check_due(plan, at(step, seconds=step,
                                           next_check=schedule.next_check_after(plan, step)))
    assert schedule.steps_next(plan, at(3), dispatch_size=64) == 1


@pytest.mark.parametrize(("step", "dispatch_size", "rows_left", "expected"), [
    (0, 64, None, 10),  # up to the next step-based check
    (7, 64, None, 3),
    (10, 2, None, 2),  # the dispatch size, when smaller
    (90, 64, None, 5),  # up to max_steps (95)
    (20, 64, 4, 4),  # batches left in the device's chunk
])
def test_steps_next_ends_at_checks_max_steps_and_the_chunk(step, dispatch_size, rows_left,
                                                           expected):
    plan = Schedule(time_limit_seconds=100, check_every_steps=10, max_steps=95)
    assert schedule.steps_next(plan, at(step), dispatch_size, rows_left) == expected


def test_stops_at_the_time_limit_and_at_max_steps():
    plan = Schedule(time_limit_seconds=60, max_steps=100)
    assert not schedule.out_of_time(plan, at(seconds=59.9))
    assert schedule.out_of_time(plan, at(seconds=60.0))
    assert not schedule.reached_max_steps(plan, at(99))
    assert schedule.reached_max_steps(plan, at(100))
    assert not schedule.reached_max_steps(Schedule(time_limit_seconds=60), at(10**9))


def test_checkpoints_every_so_many_seconds_of_training_time():
    plan = Schedule(time_limit_seconds=1000, checkpoint_every_seconds=600)
    assert not schedule.checkpoint_due(plan, at(seconds=599.0), last_saved_seconds=0.0)
    assert schedule.checkpoint_due(plan, at(seconds=600.0), last_saved_seconds=0.0)
    assert not schedule.checkpoint_due(Schedule(time_limit_seconds=9), at(seconds=8.0), 0.0)


def test_from_hours_converts_hours_and_minutes_to_seconds():
    plan = Schedule.from_hours(time_limit_in_hours=0.5, hessian_check_gap=0.25,
                               hessian_check_every_steps=None, max_steps=7,
                               checkpoint_every_minutes=10.0)
    assert plan == Schedule(time_limit_seconds=1800.0, check_gap_seconds=900.0,
                            max_steps=7, checkpoint_every_seconds=600.0)
    assert plan.has_checks
    assert not Schedule(time_limit_seconds=1).has_checks


def test_the_dispatch_size_doubles_when_fast_and_halves_when_slow():
    target = schedule.DISPATCH_TARGET_SECONDS
    assert schedule.adapt_dispatch_size(8, 8, target / 4, maximum=1024) == 16
    assert schedule.adapt_dispatch_size(8, 3, target / 4, maximum=1024) == 8  # a short one
    assert schedule.adapt_dispatch_size(1024, 1024, target / 4, maximum=1024) == 1024
    assert schedule.adapt_dispatch_size(8, 8, 3 * target, maximum=1024) == 4
    assert schedule.adapt_dispatch_size(1, 1, 3 * target, maximum=1024) == 1
    assert schedule.adapt_dispatch_size(8, 8, target, maximum=1024) == 8
