"""Runs under other optimizers and USAM: each check's stability threshold and effective
sharpness against dense matrices, the composed SAM edge, the plots and the summary."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from sam_eos import adam_preconditioner, sam_edge, stability_threshold, usam_edge
from sam_eos.loop import measurements, train
from sam_eos.reports import figures, summary
from sam_eos.reports.raw_data import read_raw_data
from tests.conftest import assert_valid_pdf, dense_hessian, outputs
from tests.conftest import two_layer_loss as mlp_loss
from tests.conftest import two_layer_problem as mlp_problem

CASES = {  # name: (TrainConfig changes, the threshold they imply at eta = 0.05)
    "momentum + SAM": (dict(optimizer="momentum", momentum=0.6, rho=0.05),
                       stability_threshold("momentum", 0.05, momentum=0.6)),
    "nesterov": (dict(optimizer="nesterov", momentum=0.5),
                 stability_threshold("nesterov", 0.05, momentum=0.5)),
    "USAM": (dict(sam_variant="usam", rho=0.05), 2 / 0.05),
    "adam + SAM": (dict(optimizer="adam", rho=0.05, adam_b1=0.8),
                   stability_threshold("adam", 0.05, b1=0.8)),
}


def run_case(tmp_path, changes, steps=8):
    """A run whose last check is at its last step, so the returned state is the one measured."""
    params, batch = mlp_problem()
    config = train.TrainConfig(step_size=0.05, max_steps=steps, hessian_check_every_steps=4,
                               outputs=outputs(tmp_path, plots=True), **changes)
    result = train.run(mlp_loss, params, train.FullBatch(batch), config)
    assert (result.status, result.steps) == ("max_steps", steps)
    settings, columns, rows = read_raw_data(str(tmp_path / "raw.txt"))
    return result, batch, settings, dict(zip(columns, rows[-1], strict=True)), rows, columns


def dense_effective_sharpness(params, batch, rho_eff, preconditioner=None):
    h = dense_hessian(mlp_loss, params, batch)
    a = h + rho_eff * h @ h
    if preconditioner is not None:
        scale = 1 / np.sqrt(np.asarray(ravel_pytree(preconditioner)[0], np.float64))
        a = scale[:, None] * a * scale[None, :]
    return float(np.linalg.eigvalsh(a)[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_each_method_is_measured_against_its_own_threshold(tmp_path, name):
    changes, threshold = CASES[name]
    result, batch, settings, last, rows, columns = run_case(tmp_path, changes)
    assert columns[-3:] == ["converged", "stability_threshold", "effective_sharpness"]
    np.testing.assert_allclose(rows[:, columns.index("stability_threshold")], threshold,
                               rtol=1e-6)
    grad_norm = float(jnp.linalg.norm(ravel_pytree(jax.grad(mlp_loss)(result.params,
                                                                        batch))[0]))
    rho = changes.get("rho", 0.0)
    rho_eff = rho if changes.get("sam_variant") == "usam" else rho / grad_norm
    preconditioner = None
    if changes.get("optimizer") == "adam":
        preconditioner = adam_preconditioner(result.opt_state, b2=0.999, eps=1e-8)
        assert np.isnan(last["sam_edge"])  # no edge in lambda units under a preconditioner
        assert np.isnan(rows[0, columns.index("effective_sharpness")])  # no P before a step
    elif changes.get("sam_variant") == "usam":
        np.testing.assert_allclose(last["sam_edge"], usam_edge(0.05, rho), rtol=1e-5)
    else:
        np.testing.assert_allclose(last["sam_edge"],
                                   sam_edge(grad_norm, 0.05, rho, threshold=threshold),
                                   rtol=1e-4)
    expected = dense_effective_sharpness(result.params, batch, rho_eff, preconditioner)
    np.testing.assert_allclose(last["effective_sharpness"], expected, rtol=1e-4)
    run_summary = summary.summarize(result.rows, steps=result.steps, test_name="error",
                                    test_value=None, seconds={})
    ratios = [row["effective_sharpness"] / row["stability_threshold"] for row in result.rows[1:]]
    np.testing.assert_allclose(run_summary["median_effective_sharpness_over_threshold"],
                               np.median(ratios), rtol=1e-9)
    assert any("x the threshold" in line for line in summary.summary_lines(run_summary))
    assert_valid_pdf(tmp_path / "eigs.pdf")
    ax = figures.make_figure("eigs_curve", [figures.RunData(settings, columns, rows)]).axes[0]
    labels = [line.get_label() for line in ax.lines]
    assert "effective sharpness" in labels
    assert f"edge of {figures.method_label(settings)}: T" in labels
    assert r"$2/\eta$" not in labels


def test_method_labels_name_the_optimizer_and_the_variant():
    label = figures.method_label
    assert label({"rho": 0.0}) == "GD"
    assert label({"rho": 0.1}) == "SAM rho=0.1"
    assert label({"optimizer": "momentum", "momentum": 0.9, "rho": 0.05}) == (
        "momentum 0.9 + SAM rho=0.05")
    assert label({"optimizer": "adam", "adam_b1": 0.9, "rho": 0.01, "sam_variant": "usam"}) == (
        "Adam b1=0.9 + USAM rho=0.01")


def test_config_refuses_bad_hyperparameters_with_the_flags_messages():
    with pytest.raises(train.errors.InputError, match="--momentum must be in"):
        train.TrainConfig(step_size=0.1, optimizer="momentum", momentum=1.0)
    with pytest.raises(train.errors.InputError, match="--optimizer must be one of"):
        train.TrainConfig(step_size=0.1, optimizer="rmsprop")
    with pytest.raises(train.errors.InputError, match="--sam_variant must be one of"):
        train.TrainConfig(step_size=0.1, sam_variant="asam")
    with pytest.raises(train.errors.InputError, match="--rho must be >= 0"):
        train.TrainConfig(step_size=0.1, rho=-1.0)
    with pytest.raises(train.errors.InputError, match="exceeds the eigensolver's budget"):
        train.TrainConfig(step_size=0.1, num_principal_components=101)


def test_a_small_budget_keeps_every_warm_start_block_one_shape(tmp_path):
    """Adam's effective sharpness and the SAM point solve within a 2-product budget: their
    Ritz blocks keep the shape their compiled functions expect, check after check."""
    changes = dict(optimizer="adam", rho=0.05, eigensolver_max_iterations=2,
                   spectrum=measurements.SpectrumOptions(sam_point_sharpness=True))
    result, _, _, _, rows, columns = run_case(tmp_path, changes, steps=12)
    assert "failed" not in (tmp_path / "raw.txt").read_text()
    for name in ("effective_sharpness", "sam_point_sharpness"):
        assert np.all(np.isfinite(rows[1:, columns.index(name)])), name


def test_an_explicit_optimizer_with_another_configured_one_is_an_error():
    params, batch = mlp_problem()
    config = train.TrainConfig(step_size=0.1, optimizer="adam", max_steps=1)
    with pytest.raises(ValueError, match="not both"):
        train.run(mlp_loss, params, train.FullBatch(batch), config, optimizer=optax.sgd(0.1))
