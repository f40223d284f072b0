"""Faults during a run: a full disk under the raw data, damaged or deleted raw data before a
resume, two runs on one output, plots that cannot be written, a signal while compiling. Each
test checks that nothing already measured is lost."""

import errno
import logging
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from sam_eos import errors
from sam_eos.loop import checkpoint, locks, train
from sam_eos.reports import raw_data
from sam_eos.reports.raw_data import read_raw_data, untimed
from tests.conftest import ROOT, TINY_TRANSFORMER, environment, shakespeare_like_text
from tests.conftest import two_layer_loss as mlp_loss
from tests.conftest import two_layer_problem as mlp_problem

STEP = 8  # the `step` column


def config(tmp_path, max_steps: int, **changes) -> train.TrainConfig:
    settings = dict(
        step_size=0.1, rho=0.05, max_steps=max_steps, hessian_check_every_steps=5,
        outputs=train.Outputs(raw_data=str(tmp_path / "raw.txt"),
                              loss_curve=str(tmp_path / "loss.pdf")),
        checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every_minutes=1e-4,
    )
    settings.update(changes)
    return train.TrainConfig(**settings)


def run(run_config: train.TrainConfig) -> train.RunResult:
    params, batch = mlp_problem()
    return train.run(mlp_loss, params, train.FullBatch(batch), run_config)


def steps_on_file(path) -> list[int]:
    return [int(step) for step in read_raw_data(str(path))[2][:, STEP]]


def latest_checkpoint(directory) -> int:
    checkpointer = checkpoint.Checkpointer(str(directory), {})
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


class _HalfThenFull:
    """A raw file that takes half of the next write, then reports a full disk."""

    def __init__(self, file):
        self._file = file

    def write(self, data) -> int:
        self._file.write(bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):  # tell, truncate, close
        return getattr(self._file, name)


def fill_disk_at_row(monkeypatch, row_number: int, half_written: bool) -> None:
    """From the `row_number`-th row on, raw-data writes fail as on a full disk: through
    /dev/full (the kernel's ENOSPC), or with half of the row written first."""
    original_row = raw_data.RawDataWriter.row
    rows = []

    def row(self, values):
        rows.append(values)
        if len(rows) == row_number:
            self._file = (_HalfThenFull(self._file) if half_written
                          else open("/dev/full", "wb", buffering=0))  # noqa: SIM115
        original_row(self, values)

    monkeypatch.setattr(raw_data.RawDataWriter, "row", row)


@pytest.mark.parametrize("half_written", [False, True])
def test_a_full_disk_under_the_raw_data_stops_the_run_and_keeps_what_was_measured(
        tmp_path, monkeypatch, caplog, half_written):
    fill_disk_at_row(monkeypatch, 3, half_written)
    with caplog.at_level(logging.INFO):
        failed = run(config(tmp_path, 20))
    assert failed.status == "output_failed"
    assert failed.exit_code == errors.EXIT_OUTPUT_FAILED == 4
    assert failed.steps == 10  # stopped at the failed row, not later
    assert [row["step"] for row in failed.rows] == [0, 5, 10]  # in memory: all measured
    assert steps_on_file(tmp_path / "raw.txt") == [0, 5]  # whole rows only
    assert (tmp_path / "raw.txt").read_text().endswith("\n")  # a half row is cut back
    assert (tmp_path / "loss.pdf").stat().st_size > 0  # drawn from the rows in memory
    assert latest_checkpoint(tmp_path / "ckpt") == 10  # a final checkpoint
    error_lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(error_lines) == 1 and "Could not write the raw data" in error_lines[0]
    assert all(r.exc_info is None for r in caplog.records if r.levelno >= logging.ERROR)
    assert "exit code 4" in error_lines[0]

    monkeypatch.undo()  # space freed: the same command resumes and completes the file
    resumed = run(config(tmp_path, 20))
    assert resumed.exit_code == 0
    assert steps_on_file(tmp_path / "raw.txt") == [0, 5, 10, 15, 20]
    assert [row["step"] for row in resumed.rows] == [0, 5, 10, 15, 20]


def test_a_half_written_last_row_of_a_finished_run_is_dropped_and_taken_again(tmp_path):
    run(config(tmp_path, 10))
    raw = tmp_path / "raw.txt"
    whole = raw.read_text()
    last_row_start = whole.rstrip("\n").rfind("\n") + 1
    (tmp_path / "whole.txt").write_text(whole)
    raw.write_text(whole[:last_row_start + 20])  # cut inside the row of step 10
    assert steps_on_file(raw) == [0, 5]  # readers drop the cut row
    again = run(config(tmp_path, 10))  # the same command
    assert again.exit_code == 0
    assert steps_on_file(raw) == [0, 5, 10]
    assert raw.read_text().count("# settings:") == 1
    # The rows kept are as they were, and the check at step 10 measured the same again.
    _, columns, rows = read_raw_data(str(raw))
    _, _, whole_rows = read_raw_data(str(tmp_path / "whole.txt"))
    np.testing.assert_allclose(untimed(columns, rows), untimed(columns, whole_rows), rtol=1e-6)


def test_raw_data_deleted_before_a_resume_never_leads_to_repeated_steps(tmp_path):
    run(config(tmp_path, 20))
    raw = tmp_path / "raw.txt"
    os.remove(raw)
    run(config(tmp_path, 30))  # starts the file afresh at the checkpoint's step 20
    assert steps_on_file(raw) == [20, 25, 30]
    # As if killed after writing one more row but before its checkpoint.
    lines = raw.read_text().splitlines(keepends=True)
    raw.write_text("".join(lines) + lines[-1].replace(" 30 ", " 35 "))
    finished = run(config(tmp_path, 40))
    assert steps_on_file(raw) == [20, 25, 30, 35, 40]
    assert [row["step"] for row in finished.rows] == [20, 25, 30, 35, 40]


def test_raw_data_cut_short_before_a_resume_continues_after_the_rows_it_holds(tmp_path):
    run(config(tmp_path, 20))
    raw = tmp_path / "raw.txt"
    raw_data.keep_first_rows(str(raw), 2)  # rows 0 and 5 left
    finished = run(config(tmp_path, 30))
    # Steps 10 and 15 are gone for good; 20 (the checkpoint's) is measured again.
    assert steps_on_file(raw) == [0, 5, 20, 25, 30]
    assert [row["step"] for row in finished.rows] == [0, 5, 20, 25, 30]


@pytest.mark.parametrize("locked", ["raw_data", "checkpoint_dir"])
def test_a_second_run_on_the_same_outputs_fails_before_training(tmp_path, locked):
    run(config(tmp_path, 5))
    raw = tmp_path / "raw.txt"
    before = raw.read_text()
    other = tmp_path / "other"
    other.mkdir()
    # The first run's outputs stay; the second, run while they are locked, shares one.
    if locked == "raw_data":
        second = config(other, 10, outputs=train.Outputs(raw_data=str(raw)))
        held = locks.lock_run_outputs(str(raw), "")
    else:
        second = config(other, 10, checkpoint_dir=str(tmp_path / "ckpt"))
        held = locks.lock_run_outputs("", str(tmp_path / "ckpt"))
    try:
        with pytest.raises(errors.InputError, match="another run is writing"):
            run(second)
    finally:
        for lock in held:
            lock.release()
    assert raw.read_text() == before  # the first run's rows are untouched
    assert not os.listdir(other)  # the second run wrote nothing
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "loss.pdf", "other", "raw.txt"]
    assert ".sam_eos.lock" not in os.listdir(tmp_path / "ckpt")  # released


def test_a_plot_that_cannot_be_written_is_one_log_line_and_the_run_goes_on(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    outputs = train.Outputs(raw_data=str(tmp_path / "raw.txt"),
                            loss_curve=str(blocked / "loss.pdf"),
                            eigs_curve=str(tmp_path / "eigs.pdf"))
    with caplog.at_level(logging.INFO):
        result = run(config(tmp_path, 5, outputs=outputs))
    assert result.exit_code == 0
    assert steps_on_file(tmp_path / "raw.txt") == [0, 5]
    assert (tmp_path / "eigs.pdf").stat().st_size > 0  # the other plot is drawn
    error_lines = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(error_lines) == 1 and "loss.pdf" in error_lines[0].getMessage()
    assert error_lines[0].exc_info is None


def test_a_run_without_checks_leaves_earlier_plots_alone(tmp_path):
    (tmp_path / "loss.pdf").write_bytes(b"an earlier run's plot")
    result = run(config(tmp_path, 5, hessian_check_every_steps=None, checkpoint_dir=""))
    assert result.rows == [] and result.steps == 5
    assert (tmp_path / "loss.pdf").read_bytes() == b"an earlier run's plot"


def test_sigterm_while_compiling_stops_before_training(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_like_text())
    raw = tmp_path / "raw.txt"
    command = [sys.executable, "-m", "transformer", f"--corpus={corpus}", "--test_lines=100",
               "--max_steps=40", "--hessian_check_every_steps=10", *TINY_TRANSFORMER,
               f"--raw_data_output={raw}", "--eigs_curve_output=", "--eigs_se_only_output=",
               "--alignment_curve_output=", "--loss_curve_output="]
    process = subprocess.Popen(command, cwd=ROOT, env=environment(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = []
    for line in process.stderr:
        log.append(line)
        if "Compiling the step" in line:  # logged with the stop flag installed
            process.send_signal(signal.SIGTERM)
            break
    stdout, rest = process.communicate(timeout=120)
    log.append(rest)
    assert process.returncode == errors.EXIT_INTERRUPTED_SIGTERM == 143, "".join(log)[-3000:]
    assert "check at step" not in "".join(log)  # it never trained
    assert "Stopped (interrupted) after 0 steps" in "".join(log)
    assert steps_on_file(raw) == []
    assert "Test loss:" in stdout  # the test metric is still printed
