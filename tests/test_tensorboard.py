"""TensorBoard event files: written while the run goes, equal to the raw data, no repeated
point after a resume; the tracker's results as flat scalars for any writer."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_eos
from sam_eos import errors
from sam_eos.cli import flags as program_flags
from sam_eos.loop import train
from sam_eos.reports.raw_data import keep_first_rows, read_raw_data
from sam_eos.reports.tensorboard_writer import TensorBoardWriter, read_scalars
from tests.conftest import assert_tensorboard_equals_raw_data
from tests.conftest import two_layer_loss as mlp_loss
from tests.conftest import two_layer_problem as mlp_problem


def test_points_are_readable_before_close_and_a_resume_hides_the_repeated_ones(tmp_path):
    first = TensorBoardWriter(str(tmp_path), {"rho": 0.1})
    for step in (0, 10, 20):
        first.write_row({"step": step, "lambda_max": 1.0 + step, "sam_edge": math.nan})
    # Flushed after each row: a reader sees every point while the writer is still open.
    steps, values = read_scalars(str(tmp_path))["lambda_max"]
    np.testing.assert_array_equal(steps, [0, 10, 20])
    np.testing.assert_array_equal(values, [1.0, 11.0, 21.0])
    assert "sam_edge" not in read_scalars(str(tmp_path))  # nan: a gap, not a point
    first.close()
    # Resumed after its row at step 10: the earlier run's step 20 is hidden, the new one shows.
    resumed = TensorBoardWriter(str(tmp_path), {"rho": 0.1}, purge_step=11)
    resumed.write_row({"step": 20, "lambda_max": 5.0})
    resumed.close()
    steps, values = read_scalars(str(tmp_path))["lambda_max"]
    np.testing.assert_array_equal(steps, [0, 10, 20])
    np.testing.assert_array_equal(values, [1.0, 11.0, 5.0])


def config(tmp_path, max_steps: int) -> train.TrainConfig:
    return train.TrainConfig(
        step_size=0.1, rho=0.05, max_steps=max_steps, hessian_check_every_steps=5,
        outputs=train.Outputs(raw_data=str(tmp_path / "raw.txt"),
                              tensorboard_dir=str(tmp_path / "tb")),
        checkpoint_dir=str(tmp_path / "checkpoints"), checkpoint_every_minutes=1e-4)


def test_a_resumed_run_writes_each_step_once_equal_to_the_raw_data(tmp_path):
    params, batch = mlp_problem()
    train.run(mlp_loss, params, train.FullBatch(batch), config(tmp_path, 12))
    # A crash left TensorBoard a point past the checkpoint (step 15) and lost the raw data's
    # last row (step 10): the resumed run continues after the raw data's step 5.
    crashed = TensorBoardWriter(str(tmp_path / "tb"), {}, purge_step=13)
    crashed.write_row({"step": 15, "lambda_max": 99.0})
    crashed.close()
    keep_first_rows(str(tmp_path / "raw.txt"), 2)
    train.run(mlp_loss, params, train.FullBatch(batch), config(tmp_path, 20))
    _, columns, rows = read_raw_data(str(tmp_path / "raw.txt"))
    np.testing.assert_array_equal(rows[:, columns.index("step")], [0, 5, 15, 20])
    # TensorBoard shows the raw data's points, each once: the old 10 and 15 are hidden.
    assert_tensorboard_equals_raw_data(tmp_path / "tb", tmp_path / "raw.txt")
    assert {"lambda_max", "sam_edge", "two_over_eta", "loss", "grad_norm"} <= set(
        read_scalars(str(tmp_path / "tb")))


def test_the_flag_needs_the_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(program_flags, "FLAGS", types.SimpleNamespace(
        tensorboard_dir=str(tmp_path / "tb")))
    assert program_flags.tensorboard_dir_from_flags() == str(tmp_path / "tb")
    monkeypatch.setattr(program_flags, "writer_available", lambda: False)
    with pytest.raises(errors.InputError, match="--tensorboard_dir needs tensorboardX"):
        program_flags.tensorboard_dir_from_flags()


def test_a_tracker_result_is_a_flat_dict_of_scalars():
    def loss(params, batch):
        return 0.5 * jnp.sum(batch * params**2)

    tracker = sam_eos.SharpnessTracker(loss, k=2)
    state = tracker.init(jnp.zeros(5), jax.random.key(0))
    result, _ = tracker.update(state, jnp.zeros(5), jnp.arange(1.0, 6.0))
    scalars = result.scalars("effective_sharpness")
    assert sorted(scalars) == sorted(f"effective_sharpness/{name}" for name in (
        "lambda_1", "lambda_2", "error_bound", "hessian_vector_products", "converged"))
    assert all(type(value) is float for value in scalars.values())
    assert scalars["effective_sharpness/lambda_1"] == pytest.approx(5.0, rel=1e-5)
    assert scalars["effective_sharpness/lambda_2"] == pytest.approx(4.0, rel=1e-5)
    assert scalars["effective_sharpness/converged"] == 1.0
