"""Checkpoint and resume: a killed run, resumed, ends where an uninterrupted one does."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sam_eos import errors
from sam_eos.loop import check, checkpoint, schedule, train
from sam_eos.reports import raw_data
from sam_eos.reports.raw_data import keep_first_rows, read_raw_data
from tests.conftest import ROOT, TINY_TRANSFORMER, environment, shakespeare_like_text
from tests.conftest import two_layer_loss as mlp_loss
from tests.conftest import two_layer_problem as mlp_problem


def config(tmp_path, name: str, max_steps: int, **changes) -> train.TrainConfig:
    settings = dict(
        step_size=0.1, rho=0.05, max_steps=max_steps, hessian_check_every_steps=5,
        outputs=train.Outputs(raw_data=str(tmp_path / f"{name}.txt")),
        checkpoint_dir=str(tmp_path / name), checkpoint_every_minutes=1e-4,
    )
    settings.update(changes)
    return train.TrainConfig(**settings)


def test_resume_continues_the_run_and_its_raw_data(tmp_path):
    params, batch = mlp_problem()
    whole = train.run(mlp_loss, params, train.FullBatch(batch), config(tmp_path, "whole", 30))
    first = train.run(mlp_loss, params, train.FullBatch(batch), config(tmp_path, "split", 12))
    assert first.steps == 12
    # The same command with more steps resumes at step 12 (max_steps may change on resume).
    resumed = train.run(mlp_loss, params, train.FullBatch(batch), config(tmp_path, "split", 30))
    assert resumed.steps == 30
    assert resumed.training_seconds >= first.training_seconds  # the clock carries on
    for name in params:
        np.testing.assert_allclose(resumed.params[name], whole.params[name], rtol=1e-6)
    _, _, whole_rows = read_raw_data(str(tmp_path / "whole.txt"))
    settings, _, split_rows = read_raw_data(str(tmp_path / "split.txt"))
    np.testing.assert_allclose(untimed(split_rows), untimed(whole_rows), rtol=1e-5)
    # The plots cover the whole run: steps 0, 5, ..., 30.
    assert len(resumed.rows) == len(split_rows) == 7
    assert open(tmp_path / "split.txt").read().count("# settings:") == 1


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    params, batch = mlp_problem()
    train.run(mlp_loss, params, train.FullBatch(batch), config(tmp_path, "run", 3))
    with pytest.raises(errors.InputError, match=r"rho: checkpoint 0.05, now 0.2"):
        train.run(mlp_loss, params, train.FullBatch(batch), config(tmp_path, "run", 6, rho=0.2))


def test_raw_data_of_another_run_is_moved_aside_not_continued(tmp_path):
    params, batch = mlp_problem()
    train.run(mlp_loss, params, train.FullBatch(batch), config(tmp_path, "run", 3))
    raw = tmp_path / "run.txt"
    raw.write_text(raw.read_text().replace('"seed": 0', '"seed": 5'))
    other_run = raw.read_text()
    resumed = train.run(mlp_loss, params, train.FullBatch(batch), config(tmp_path, "run", 6))
    assert (tmp_path / "run.1.txt").read_text() == other_run  # kept whole, under a new name
    # The resumed run (the checkpoint is of seed 0) starts a file of its own at its step 3.
    _, _, rows = read_raw_data(str(raw))
    assert rows[:, 8].tolist() == [5]  # the check at step 3 was taken before; next one: 5
    assert [row["step"] for row in resumed.rows] == [5]


def test_a_fresh_run_moves_a_finished_run_of_the_same_settings_aside(tmp_path):
    params, batch = mlp_problem()
    first = config(tmp_path, "run", 5, checkpoint_dir="")
    train.run(mlp_loss, params, train.FullBatch(batch), first)
    finished = (tmp_path / "run.txt").read_text()
    second = train.run(mlp_loss, params, train.FullBatch(batch), first)
    assert (tmp_path / "run.1.txt").read_text() == finished
    _, _, rows = read_raw_data(str(tmp_path / "run.txt"))
    assert rows[:, 8].tolist() == [0, 5] == [row["step"] for row in second.rows]


def test_settings_differences_and_keep_first_rows(tmp_path):
    saved = {"rho": 0.1, "max_steps": 10, "flags": {"seed": 0, "time_limit_in_hours": 1.0}}
    now = {"rho": 0.1, "max_steps": 99, "flags": {"seed": 1, "time_limit_in_hours": 9.0}}
    assert checkpoint.settings_differences(saved, now) == ["flags.seed: checkpoint 0, now 1"]
    path = tmp_path / "raw.txt"
    path.write_text("# h\n# columns: a\n1\n# note: two\n2\n3\n# note: after\n")
    keep_first_rows(str(path), 2)
    assert path.read_text() == "# h\n# columns: a\n1\n# note: two\n2\n"
    keep_first_rows(str(path), 0)
    assert path.read_text() == "# h\n# columns: a\n"


def untimed(rows: np.ndarray) -> np.ndarray:
    """The raw-data rows (k = 1) without their timings."""
    return raw_data.untimed(raw_data.column_names(1), rows)


def state_template(params, config: train.TrainConfig) -> dict:
    """The loop's state (`train.run`) for `checkpoint.Checkpointer.restore`."""
    return check.initial_state(params, train.optax.sgd(0.1).init(params),
                               config).checkpoint_tree()


def restore_params(directory) -> list[np.ndarray]:
    manager = ocp.CheckpointManager(str(directory))
    state = manager.restore(manager.latest_step(),
                            args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    manager.close()
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_end(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_like_text())

    def command(name: str) -> list[str]:
        return [sys.executable, "-m", "transformer", f"--corpus={corpus}", "--test_lines=100",
                "--rho=0.05", "--max_steps=40", "--hessian_check_every_steps=10",
                *TINY_TRANSFORMER, f"--raw_data_output={tmp_path / name}.txt",
                f"--checkpoint_dir={tmp_path / name}", "--checkpoint_every_minutes=0.001",
                "--eigs_curve_output=", "--eigs_se_only_output=", "--alignment_curve_output=",
                f"--loss_curve_output={tmp_path / name}.pdf"]

    options = dict(cwd=ROOT, env=environment(), text=True, capture_output=True, timeout=300)
    whole = subprocess.run(command("whole"), **options)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = subprocess.Popen(command("killed"), cwd=ROOT, env=environment(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    raw = tmp_path / "killed.txt"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and killed.poll() is None:
        rows = [line for line in raw.read_text().splitlines() if not line.startswith("#")] \
            if raw.exists() else []
        if len(rows) >= 2 and os.path.isdir(tmp_path / "killed") and any(
                name.isdigit() for name in os.listdir(tmp_path / "killed")):
            break
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL  # it really was killed mid-run

    resumed = subprocess.run(command("killed"), **options)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from the checkpoint at step" in resumed.stderr
    assert resumed.stdout.split("Test loss:")[1] == whole.stdout.split("Test loss:")[1]
    _, _, whole_rows = read_raw_data(str(tmp_path / "whole.txt"))
    _, _, resumed_rows = read_raw_data(str(raw))
    np.testing.assert_allclose(untimed(resumed_rows), untimed(whole_rows), rtol=1e-5)
    for a, b in zip(restore_params(tmp_path / "killed"), restore_params(tmp_path / "whole"),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)



def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    params, batch = mlp_problem()
    train.run(mlp_loss, params, train.FullBatch(batch), config(tmp_path, "run", 7))
    directory = tmp_path / "run"
    steps = sorted(int(name) for name in os.listdir(directory) if name.isdigit())
    assert len(steps) == 2  # orbax keeps the latest two
    # Damage every data file of the latest checkpoint.
    for root, _, files in os.walk(directory / str(steps[-1])):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(max(os.path.getsize(os.path.join(root, name)) // 3, 1))
    checkpointer = checkpoint.Checkpointer(str(directory), train.settings_record(
        config(tmp_path, "run", 7), {}))
    template = state_template(params, config(tmp_path, "run", 7))
    state, position = checkpointer.restore(template)
    checkpointer.close()
    assert position.step == steps[0]
    # The previous checkpoint is intact: a fresh run to that step ends with the same params.
    fresh = train.run(mlp_loss, params, train.FullBatch(batch),
                      config(tmp_path, "fresh", steps[0], checkpoint_dir=""))
    for name in params:
        np.testing.assert_allclose(state["params"][name], fresh.params[name], rtol=1e-6)


def test_an_empty_latest_checkpoint_directory_is_skipped_and_none_left_is_an_error(tmp_path):
    params, batch = mlp_problem()
    run_config = config(tmp_path, "run", 3)
    train.run(mlp_loss, params, train.FullBatch(batch), run_config)
    directory = tmp_path / "run"
    (directory / "45").mkdir()  # an empty step directory, e.g. a half-deleted copy
    checkpointer = checkpoint.Checkpointer(str(directory), train.settings_record(run_config, {}))
    template = state_template(params, config(tmp_path, "run", 7))
    _, position = checkpointer.restore(template)
    assert position.step == 3
    for name in os.listdir(directory):
        if name.isdigit() and name != "45":
            import shutil

            shutil.rmtree(directory / name)
    with pytest.raises(errors.InputError, match="no checkpoint in .* can be restored"):
        checkpointer.restore(template)
    checkpointer.close()


def test_a_failed_save_is_logged_and_the_run_goes_on(tmp_path, monkeypatch):
    params, batch = mlp_problem()
    run_config = config(tmp_path, "run", 3)
    checkpointer = checkpoint.Checkpointer(str(tmp_path / "run"),
                                           train.settings_record(run_config, {}))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointer._manager, "save", disk_full)
    state = (params, train.optax.sgd(0.1).init(params))
    assert checkpointer.save(state, schedule.Position(step=2)) is False
    monkeypatch.undo()
    assert checkpointer.save(state, schedule.Position(step=2)) is True
    checkpointer.close()
    assert checkpoint.Checkpointer(str(tmp_path / "run"), {}).latest_step() == 2
