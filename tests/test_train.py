"""The shared training loop: stopping rules, raw data, plots, divergence and the SAM edge."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_eos import errors
from sam_eos.edge import sam_edge
from sam_eos.loop import train
from sam_eos.reports.raw_data import read_raw_data
from sam_eos.sam import sam_update
from tests.conftest import assert_valid_pdf, outputs
from tests.conftest import two_layer_loss as mlp_loss
from tests.conftest import two_layer_problem as mlp_problem


def quadratic_loss(params, batch):
    """0.5 w^T A w: its Hessian is A whatever w."""
    return 0.5 * params @ (batch @ params)


def test_stops_at_max_steps_with_rows_header_and_pdfs(tmp_path):
    params, batch = mlp_problem()
    config = train.TrainConfig(
        step_size=0.1, rho=0.05, max_steps=25, hessian_check_every_steps=10,
        num_principal_components=2, outputs=outputs(tmp_path, plots=True), run_name="unit test",
        seed=7,
    )
    result = train.run(mlp_loss, params, train.FullBatch(batch), config,
                       settings={"program": "test"})
    assert (result.status, result.steps, result.exit_code) == ("max_steps", 25, 0)
    settings, columns, rows = read_raw_data(str(tmp_path / "raw.txt"))
    assert settings["seed"] == 7 and settings["program"] == "test" and settings["rho"] == 0.05
    assert columns[:9] == ["time_hours", "hessian_norm", "two_over_eta", "sam_edge",
                           "grad_norm", "loss", "g_alignment", "sg_alignment", "step"]
    assert columns[9:] == ["eig_2", "lambda_max", "lambda_min", "hessian_vector_products",
                           "check_seconds", "error_bound", "audit_error",
                           "converged"]  # a default run's
    np.testing.assert_array_equal(rows[:, columns.index("converged")], 1)
    assert rows.shape == (3, len(columns))
    np.testing.assert_array_equal(rows[:, columns.index("step")], [0, 10, 20])
    np.testing.assert_allclose(rows[:, 2], 2 / 0.1)
    assert np.all(np.diff(rows[:, 0]) >= 0)
    # numpy loads it by name (the first line names the columns).
    assert np.genfromtxt(tmp_path / "raw.txt", names=True).shape == (rows.shape[0],)
    # Row 0 is the initial point: its loss and SAM edge follow from the parameters.
    g = jax.grad(mlp_loss)(params, batch)
    g_norm = float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g))))
    np.testing.assert_allclose(rows[0, 5], float(mlp_loss(params, batch)), rtol=1e-5)
    np.testing.assert_allclose(rows[0, 4], g_norm, rtol=1e-5)
    np.testing.assert_allclose(rows[0, 3], sam_edge(g_norm, 0.1, 0.05), rtol=1e-5)
    assert np.all((rows[:, 6] >= 0) & (rows[:, 6] <= 1))
    for name in ("eigs.pdf", "eigs_se_only.pdf", "a.pdf", "ell.pdf"):
        assert_valid_pdf(tmp_path / name)


def test_params_equal_sam_updates_on_the_same_stream_of_batches(tmp_path):
    params, _ = mlp_problem()
    batches = [mlp_problem(seed=s, num_examples=8)[1] for s in range(1, 20)]
    config = train.TrainConfig(step_size=0.05, rho=0.1, max_steps=19,
                               hessian_check_every_steps=7, outputs=outputs(tmp_path))
    result = train.run(mlp_loss, params, train.BatchStream(iter(batches)), config)
    expected = params
    for batch in batches:
        expected = sam_update(mlp_loss, expected, batch, 0.05, 0.1)
    for name in params:
        np.testing.assert_allclose(result.params[name], expected[name], rtol=2e-5, atol=1e-6)
    # Each check measured the batch of the step it preceded.
    for row in result.rows:
        step = int(row["step"])
        np.testing.assert_allclose(
            row["loss"], float(mlp_loss(_params_at(params, batches, step), batches[step])),
            rtol=1e-4,
        )


def _params_at(params, batches, step):
    for batch in batches[:step]:
        params = sam_update(mlp_loss, params, batch, 0.05, 0.1)
    return params


def test_stops_at_the_time_limit(tmp_path):
    params, batch = mlp_problem()
    limit_s = 4.0
    config = train.TrainConfig(step_size=0.01, time_limit_in_hours=limit_s / 3600,
                               max_steps=10**9, hessian_check_gap=0.5 / 3600,
                               outputs=outputs(tmp_path))
    result = train.run(mlp_loss, params, train.FullBatch(batch), config)
    assert result.status == "time_limit" and result.exit_code == 0
    # It stops at the first look at the clock past the limit (compiling counts as training
    # time; the generous upper bound only catches a loop that ignores the limit).
    assert limit_s <= result.training_seconds < limit_s + 60
    assert 1 <= result.steps < 10**9
    _, _, rows = read_raw_data(str(tmp_path / "raw.txt"))
    assert len(rows) >= 1 and rows[0, 0] < 1e-3


def test_a_zero_gap_checks_every_step_even_with_a_full_batch(tmp_path):
    params, batch = mlp_problem()
    config = train.TrainConfig(step_size=0.05, max_steps=40, hessian_check_gap=0.0,
                               eigensolver_max_iterations=8)
    result = train.run(mlp_loss, params, train.FullBatch(batch), config)
    assert [int(row["step"]) for row in result.rows] == list(range(41))


def test_divergence_stops_keeps_rows_and_draws_finite_plots(tmp_path):
    params, batch = mlp_problem()
    config = train.TrainConfig(step_size=50.0, max_steps=500, hessian_check_every_steps=1,
                               outputs=outputs(tmp_path, plots=True))
    result = train.run(mlp_loss, params, train.FullBatch(batch), config)
    assert result.status == "diverged"
    assert result.exit_code == errors.EXIT_DIVERGED
    assert result.steps < 500
    text = open(tmp_path / "raw.txt").read()
    assert "# note: diverged at step" in text
    _, _, rows = read_raw_data(str(tmp_path / "raw.txt"))
    assert len(rows) >= 1 and np.isfinite(rows[0, 5])
    for name in ("eigs.pdf", "eigs_se_only.pdf", "a.pdf", "ell.pdf"):
        assert_valid_pdf(tmp_path / name)


def test_unconverged_check_keeps_its_estimate_with_a_note_and_training_goes_on(tmp_path):
    params, batch = mlp_problem()
    config = train.TrainConfig(step_size=0.1, max_steps=6, hessian_check_every_steps=3,
                               eigensolver_max_iterations=2, eigensolver_tolerance=1e-12,
                               outputs=outputs(tmp_path))
    result = train.run(mlp_loss, params, train.FullBatch(batch), config)
    assert result.status == "max_steps" and result.steps == 6
    text = open(tmp_path / "raw.txt").read()
    assert text.count("# note: check at step") == 3 and "did not converge" in text
    _, columns, rows = read_raw_data(str(tmp_path / "raw.txt"))
    column = lambda name: rows[:, columns.index(name)]  # noqa: E731
    assert np.all(np.isfinite(column("hessian_norm"))) and np.all(column("hessian_norm") > 0)
    assert np.all(column("converged") == 0) and np.all(column("error_bound") > 1e-12)
    assert np.all(column("hessian_vector_products") == 2)
    assert np.all(np.isfinite(column("loss")))


def test_power_at_its_cap_keeps_its_last_estimate_as_the_original(tmp_path):
    params, batch = mlp_problem()
    config = train.TrainConfig(step_size=0.1, max_steps=3, hessian_check_every_steps=3,
                               eigensolver="power", eigensolver_max_iterations=2,
                               eigensolver_tolerance=1e-12, outputs=outputs(tmp_path))
    result = train.run(mlp_loss, params, train.FullBatch(batch), config)
    text = open(tmp_path / "raw.txt").read()
    assert text.count("did not converge") == 2 and "recorded as it is, with converged 0" in text
    _, columns, rows = read_raw_data(str(tmp_path / "raw.txt"))
    norms = rows[:, columns.index("hessian_norm")]
    assert np.all(np.isfinite(norms)) and np.all(norms > 0)
    assert [row["hessian_norm"] for row in result.rows] == pytest.approx(norms.tolist())
    assert np.all(rows[:, columns.index("hessian_vector_products")] == 2)


def test_a_second_run_to_the_same_path_starts_afresh_and_keeps_the_first_aside(tmp_path):
    params, batch = mlp_problem()
    kept = []
    for max_steps, seed in ((20, 1), (4, 2)):
        config = train.TrainConfig(step_size=0.1, max_steps=max_steps, seed=seed,
                                   hessian_check_every_steps=2, outputs=outputs(tmp_path))
        train.run(mlp_loss, params, train.FullBatch(batch), config)
        kept.append((tmp_path / "raw.txt").read_text())
    settings, columns, rows = read_raw_data(str(tmp_path / "raw.txt"))
    assert settings["seed"] == 2
    np.testing.assert_array_equal(rows[:, columns.index("step")], [0, 2, 4])
    assert open(tmp_path / "raw.txt").read().count("# settings:") == 1
    assert (tmp_path / "raw.1.txt").read_text() == kept[0]  # the first run's file, whole
    first_settings, _, first_rows = read_raw_data(str(tmp_path / "raw.1.txt"))
    assert first_settings["seed"] == 1 and first_rows[:, columns.index("step")][-1] == 20


def test_empty_output_paths_skip_outputs(tmp_path):
    params, batch = mlp_problem()
    config = train.TrainConfig(step_size=0.1, max_steps=3, hessian_check_every_steps=1)
    result = train.run(mlp_loss, params, train.FullBatch(batch), config)
    assert len(result.rows) == 4  # steps 0, 1, 2 and the final state at step 3
    assert os.listdir(tmp_path) == []


def test_sam_settles_where_the_sharpness_meets_the_sam_edge(tmp_path):
    """The paper's one-dimensional analysis, through the whole loop.

    On 0.5 w^T A w SAM falls into a two-cycle along the top eigenvector with
    |w| = eta lambda rho / (2 - eta lambda), where ||g|| = eta rho lambda^2 / (2 - eta lambda):
    exactly the gradient norm at which the SAM edge equals lambda.
    """
    curvature, step_size, rho = 3.0, 0.5, 0.1
    hessian = jnp.diag(jnp.array([curvature, 1.0, 0.5]))
    config = train.TrainConfig(step_size=step_size, rho=rho, max_steps=400,
                               hessian_check_every_steps=100, outputs=outputs(tmp_path))
    result = train.run(quadratic_loss, jnp.array([1.0, 1.0, 1.0]), train.FullBatch(hessian),
                       config)
    last = result.rows[-1]
    np.testing.assert_allclose(last["hessian_norm"], curvature, rtol=1e-5)
    np.testing.assert_allclose(last["sam_edge"], curvature, rtol=1e-3)
    expected_grad = step_size * rho * curvature**2 / (2 - step_size * curvature)
    np.testing.assert_allclose(last["grad_norm"], expected_grad, rtol=1e-3)
    assert last["sam_edge"] < last["two_over_eta"]
    assert last["sg_alignment"] > 0.999  # the gradients point along the top eigenvector
    # Gradient descent on the same problem just converges: no edge to ride.
    gd = train.run(quadratic_loss, jnp.array([1.0, 1.0, 1.0]), train.FullBatch(hessian),
                   train.TrainConfig(step_size=step_size, max_steps=400,
                                     hessian_check_every_steps=100))
    assert gd.rows[-1]["grad_norm"] < 1e-6
    assert math.isclose(gd.rows[-1]["sam_edge"], 2 / step_size)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_both_eigensolvers_run_in_the_loop(tmp_path, method):
    hessian = jnp.diag(jnp.array([4.0, 2.0, 1.0, -0.5]))
    config = train.TrainConfig(step_size=0.1, max_steps=2, hessian_check_every_steps=1,
                               eigensolver=method, outputs=outputs(tmp_path))
    result = train.run(quadratic_loss, jnp.ones(4), train.FullBatch(hessian), config)
    # The original's finite difference divides by 2e-3 + 1e-5, not 2e-3: 0.5 % low.
    expected = 4.0 if method == "lanczos" else 4.0 * 2e-3 / (2e-3 + 1e-5)
    for row in result.rows:
        np.testing.assert_allclose(row["hessian_norm"], expected, rtol=2e-3)
        np.testing.assert_allclose(row["lambda_max"], expected, rtol=2e-3)
    if method == "lanczos":
        np.testing.assert_allclose(result.rows[0]["lambda_min"], -0.5, rtol=1e-4)
