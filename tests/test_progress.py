"""Progress: the line's content for given numbers, and the loop's progress lines and bar."""

import io
import logging

import jax
import pytest

from sam_eos.loop import progress, train
from sam_eos.loop.progress import Progress, Snapshot, progress_line


def snapshot(**changes) -> Snapshot:
    values = dict(step=1200, training_seconds=720.0, steps_per_second=2.0,
                  time_limit_seconds=4 * 3600.0, max_steps=None, sharpness=19.61,
                  sam_edge=20.14)
    values.update(changes)
    return Snapshot(**values)


def test_the_line_names_step_rate_time_against_the_limit_eta_and_the_last_check():
    assert progress_line(snapshot()) == (
        "step 1200 | 2 steps/s | 12m 00s of 4h 00m training (5%) | ETA 3h 48m | "
        "sharpness 19.61, SAM edge 20.14"
    )


def test_the_eta_is_the_sooner_of_the_time_limit_and_max_steps():
    # 800 steps left at 2 steps/s: 400 s, sooner than the 3 h 48 min left.
    line = progress_line(snapshot(max_steps=2000))
    assert line.startswith("step 1200 of 2000 | ")
    assert "ETA 6m 40s" in line
    assert progress.eta_seconds(snapshot(max_steps=2000)) == 400.0
    # 100 000 steps at 2 steps/s would take longer than the time limit.
    assert progress.eta_seconds(snapshot(max_steps=100_000)) == 4 * 3600.0 - 720.0
    assert progress.fraction_done(snapshot(max_steps=2000)) == 0.6


def test_before_the_first_step_and_check_the_line_says_n_a():
    line = progress_line(snapshot(step=0, training_seconds=3.0, steps_per_second=None,
                                  sharpness=None, sam_edge=None))
    assert line == ("step 0 | n/a steps/s | 3s of 4h 00m training (0%) | ETA 3h 59m | "
                    "sharpness n/a, SAM edge n/a")


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (42.4, "42s"), (185, "3m 05s"),
                                           (7620, "2h 07m"), (-3, "0s")])
def test_durations_read_as_hours_minutes_seconds(seconds, text):
    assert progress.format_duration(seconds) == text


def test_lines_come_every_interval_of_training_time_with_this_process_rate(caplog):
    reporter = Progress(every_seconds=30, time_limit_seconds=3600, max_steps=None,
                        stream=io.StringIO(), live=False)
    with caplog.at_level(logging.INFO):
        for step, seconds in [(100, 10.0), (200, 20.0), (300, 31.0), (400, 50.0),
                              (500, 61.0)]:
            reporter.update(step, seconds)
        reporter.checked(500, 62.0, {"hessian_norm": 3.5, "sam_edge": 4.0})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Progress")]
    # Logged at 31 s and 61 s (not at 62 s: under 30 s after the last line); the rate counts
    # steps from the first update (100 at 10 s).
    assert lines == [
        "Progress: step 300 | 9.52 steps/s | 31s of 1h 00m training (1%) | ETA 59m 29s | "
        "sharpness n/a, SAM edge n/a",
        "Progress: step 500 | 7.84 steps/s | 1m 01s of 1h 00m training (2%) | ETA 58m 59s | "
        "sharpness n/a, SAM edge n/a",
    ]
    assert reporter.snapshot(500, 62.0).sharpness == 3.5


def test_off_at_zero_seconds_and_a_live_bar_on_a_terminal(caplog):
    silent = Progress(every_seconds=0, time_limit_seconds=60, max_steps=10, live=False)
    with caplog.at_level(logging.INFO):
        silent.update(5, 100.0)
    assert not [r for r in caplog.records if "Progress" in r.getMessage()]
    stream = io.StringIO()
    bar = Progress(every_seconds=30, time_limit_seconds=60, max_steps=10, stream=stream,
                   live=True)
    bar.update(0, 0.0)
    bar.update(5, 3.0)
    bar.close()
    assert "step 5 of 10 | 1.67 steps/s | 3s of 1m 00s training (5%) | ETA 3s" in \
        stream.getvalue()


def test_a_run_logs_progress_lines(tmp_path, caplog):
    params = jax.numpy.ones(3)
    batch = jax.numpy.diag(jax.numpy.array([1.0, 2.0, 3.0]))
    config = train.TrainConfig(step_size=0.1, max_steps=30, hessian_check_every_steps=10,
                               progress_every_seconds=1e-6)
    with caplog.at_level(logging.INFO):
        result = train.run(lambda w, a: 0.5 * w @ (a @ w), params, train.FullBatch(batch),
                           config)
    assert result.steps == 30
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Progress")]
    assert lines and lines[-1].startswith("Progress: step 30 of 30 | ")
    # After the checks the line carries the last sharpness: the Hessian's top eigenvalue, 3.
    assert lines[-1].endswith("sharpness 3, SAM edge 20")
