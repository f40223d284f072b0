"""The Flax NNX and Equinox examples run, reach Adam's edge and write TensorBoard scalars; the
language-model example tracks AdamW's preconditioned sharpness against its scheduled edge."""

import collections
import importlib.util
import logging
import math
import pathlib
import re

import jax
import numpy as np
import pytest

from sam_eos.reports.tensorboard_writer import read_layouts, read_scalars
from tests.conftest import shakespeare_like_text

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["flax_nnx_loop", "equinox_loop"])
def test_the_example_reaches_adams_edge_and_writes_tensorboard(name, tmp_path):
    records = load(name).run(steps=300, every=25, tensorboard_dir=str(tmp_path))
    ratios = np.array([r["edge_ratio"] for r in records])
    # Below the edge early on, about at it (effective sharpness / threshold near 1) later.
    assert ratios[0] < 0.9
    second_half = ratios[len(ratios) // 2:]
    assert 0.85 < second_half.mean() < 1.15, ratios
    assert all(r["effective_sharpness/converged"] == 1.0 for r in records)
    scalars = read_scalars(str(tmp_path))
    steps, values = scalars["effective_sharpness/lambda_1"]
    np.testing.assert_array_equal(steps, np.arange(25, 301, 25))
    np.testing.assert_array_equal(values, np.float32(
        [r["effective_sharpness/lambda_1"] for r in records]))
    assert "sharpness/lambda_1" in scalars and "stability_threshold" in scalars


def test_the_language_model_measures_against_adams_edge_at_the_scheduled_rate(tmp_path, caplog):
    # Generated text stands in for tiny_shakespeare, so the test runs without ../shared/data.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "input.txt").write_text(shakespeare_like_text())
    peak, decay = 3e-3, 0.1
    with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
        records = load("language_model").run(
            size="tiny", steps=4, every=2, learning_rate=peak, warmup_steps=2,
            weight_decay=decay, data_dir=tmp_path / "data", tensorboard_dir=str(tmp_path / "tb"))
    assert [r["step"] for r in records] == [2, 4]
    # The next step's rate: the warmup's end (the peak) at step 2; the cosine's end, a tenth of
    # the peak, at step 4 = --steps.
    for record, rate in zip(records, [peak, peak / 10], strict=True):
        assert record["learning_rate"] == pytest.approx(rate, rel=1e-6)
        assert record["stability_threshold"] == pytest.approx(38 / rate, rel=1e-6)  # b1 = 0.9
        assert record["adamw_edge"] == pytest.approx(38 / rate - 19 * decay, rel=1e-6)
        assert math.isfinite(record["lambda_max"]) and record["lambda_max"] > 0
        assert math.isfinite(record["effective_sharpness"]) and record["effective_sharpness"] > 0
        # Adam's preconditioner divides by sqrt(v_hat) + eps, far below 1 this early.
        assert record["effective_sharpness"] > record["lambda_max"]
        assert record["converged"] == record["effective_converged"] == 1.0
        assert record["edge_ratio"] == pytest.approx(
            record["effective_sharpness"] / record["adamw_edge"])
        assert math.isfinite(record["validation_loss"]) and record["loss"] > 0
    # Both solves at both checks run one compiled tracker update, and the step compiles once.
    compiled = collections.Counter(re.findall(r"Compiling (\S+)", caplog.text))
    assert compiled["jit(_measure)"] == 1 and compiled["jit(_train_step)"] == 1, compiled
    scalars = read_scalars(str(tmp_path / "tb"))
    for tag, column in [("sharpness/lambda_max", "lambda_max"),
                        ("sharpness/effective_sharpness", "effective_sharpness"),
                        ("edge/stability_threshold", "stability_threshold"),
                        ("other/adamw_edge", "adamw_edge"),
                        ("other/learning_rate", "learning_rate"), ("training/loss", "loss")]:
        steps, values = scalars[tag]
        np.testing.assert_array_equal(steps, [2, 4])
        np.testing.assert_array_equal(values, np.float32([r[column] for r in records]))
    assert "effective sharpness against its threshold" in read_layouts(
        str(tmp_path / "tb"))[0]["edge of stability"]


def test_the_language_model_says_where_the_text_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"input\.txt.*--data_dir"):
        load("language_model").run(size="tiny", steps=4, every=2, data_dir=tmp_path)
