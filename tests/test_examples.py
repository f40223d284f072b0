"""The Flax NNX and Equinox examples run, reach Adam's edge and write TensorBoard scalars."""

import importlib.util
import pathlib

import numpy as np
import pytest

from sam_eos.reports.tensorboard_writer import read_scalars

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
