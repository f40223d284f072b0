"""TensorBoard event files: written while the run goes, equal to the raw data, no repeated
point after a resume, grouped tags and the Custom Scalars layout; the tracker's results as flat
scalars for any writer."""

import math
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_eos
from sam_eos import errors
from sam_eos.cli import flags as program_flags
from sam_eos.loop import measurements, train
from sam_eos.reports.raw_data import METHOD_COLUMNS, column_names, keep_first_rows, read_raw_data
from sam_eos.reports.tensorboard_writer import (
    OTHER_GROUP,
    TensorBoardWriter,
    read_layouts,
    read_scalars,
    tag_for,
)
from tests.conftest import assert_tensorboard_equals_raw_data
from tests.conftest import two_layer_loss as mlp_loss
from tests.conftest import two_layer_problem as mlp_problem


def test_points_are_readable_before_close_and_a_resume_hides_the_repeated_ones(tmp_path):
    first = TensorBoardWriter(str(tmp_path), {"rho": 0.1})
    for step in (0, 10, 20):
        first.write_row({"step": step, "lambda_max": 1.0 + step, "sam_edge": math.nan})
    # Flushed after each row: a reader sees every point while the writer is still open.
    steps, values = read_scalars(str(tmp_path))["sharpness/lambda_max"]
    np.testing.assert_array_equal(steps, [0, 10, 20])
    np.testing.assert_array_equal(values, [1.0, 11.0, 21.0])
    assert "edge/sam_edge" not in read_scalars(str(tmp_path))  # nan: a gap, not a point
    first.close()
    # Resumed after its row at step 10: the earlier run's step 20 is hidden, the new one shows.
    resumed = TensorBoardWriter(str(tmp_path), {"rho": 0.1}, purge_step=11)
    resumed.write_row({"step": 20, "lambda_max": 5.0})
    resumed.close()
    steps, values = read_scalars(str(tmp_path))["sharpness/lambda_max"]
    np.testing.assert_array_equal(steps, [0, 10, 20])
    np.testing.assert_array_equal(values, [1.0, 11.0, 5.0])


ALL_MEASUREMENTS = measurements.SpectrumOptions(
    hessian_trace_matvecs=4, spectral_density_every_checks=1, batch_sharpness=True,
    sam_point_sharpness=True, layer_sharpness=True)


def test_every_column_has_a_group_and_an_unknown_one_is_still_written(tmp_path):
    columns = column_names(3, [*METHOD_COLUMNS, *measurements.extra_column_names(
        ALL_MEASUREMENTS, ["dense_1", "dense_2"])])
    tags = {name: tag_for(name) for name in columns if name != "step"}
    assert not [name for name, tag in tags.items() if tag.startswith(OTHER_GROUP + "/")]
    assert len(set(tags.values())) == len(tags)  # one tag per column
    assert {tags["lambda_max"], tags["eig_3"], tags["sam_edge"], tags["two_over_eta"],
            tags["error_bound"], tags["audit_error"], tags["loss"],
            tags["layer_sharpness/dense_1"]} == {
        "sharpness/lambda_max", "sharpness/eig_3", "edge/sam_edge", "edge/two_over_eta",
        "solver/error_bound", "solver/audit_error", "training/loss",
        "layers/layer_sharpness/dense_1"}
    writer = TensorBoardWriter(str(tmp_path), {})
    writer.write_row({"step": 0, "lambda_max": 2.0, "my_column": 3.0})
    writer.close()
    assert set(read_scalars(str(tmp_path))) == {"sharpness/lambda_max", "other/my_column"}


def write_run(log_dir, columns, steps, purge_step=None):
    writer = TensorBoardWriter(str(log_dir), {}, purge_step)
    for step in steps:
        writer.write_row({name: float(step) if name == "step" else 1.0 + step
                          for name in columns})
    writer.close()


def test_the_event_files_hold_the_custom_scalars_layout_of_the_run_s_columns(tmp_path):
    columns = column_names(2, [*METHOD_COLUMNS, *measurements.extra_column_names(
        ALL_MEASUREMENTS, ["dense_1", "dense_2"])])
    write_run(tmp_path, columns, [0, 10, 20])
    write_run(tmp_path, columns, [20, 30], purge_step=11)  # a resumed run: a file of its own
    layouts = read_layouts(str(tmp_path))
    assert len(layouts) == 2 and layouts[0] == layouts[1]  # once per event file
    charts = {title: tags for category in layouts[0].values() for title, tags in
              category.items()}
    assert list(layouts[0]) == ["edge of stability", "layers", "training"]
    written = set(read_scalars(str(tmp_path)))

    def shown(title):  # the tags a chart shows: TensorBoard matches each regex with re.match
        return {tag for regex in charts[title] for tag in written if re.match(regex, tag)}

    assert shown("lambda_max, the SAM edge and 2/eta") == {
        "sharpness/lambda_max", "edge/sam_edge", "edge/two_over_eta"}
    assert shown("effective sharpness against its threshold") == {
        "sharpness/effective_sharpness", "edge/stability_threshold"}
    assert shown("each layer's sharpness") == {
        "layers/layer_sharpness/dense_1", "layers/layer_sharpness/dense_2",
        "sharpness/lambda_max"}
    assert shown("each layer's share of the top eigenvector") == {
        "layers/layer_share/dense_1", "layers/layer_share/dense_2"}
    assert shown("loss") == {"training/loss"}


def test_a_plain_run_s_layout_has_only_the_charts_of_its_columns(tmp_path):
    write_run(tmp_path, column_names(1), [0])
    assert read_layouts(str(tmp_path)) == [{
        "edge of stability": {"lambda_max, the SAM edge and 2/eta": [
            "sharpness/lambda_max$", "edge/sam_edge$", "edge/two_over_eta$"]},
        "training": {"loss": ["training/loss$"]}}]


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
    assert {"sharpness/lambda_max", "edge/sam_edge", "edge/two_over_eta", "training/loss",
            "training/grad_norm"} <= set(read_scalars(str(tmp_path / "tb")))
    # A layout in each file: the first run's, the crashed writer's (of its one row's columns)
    # and the resumed run's, equal to the first.
    first, crashed, resumed = read_layouts(str(tmp_path / "tb"))
    assert resumed == first and "training" in first and "training" not in crashed


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
