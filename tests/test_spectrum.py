"""sam_eos.spectrum against dense Hessians of a small MLP (1,013 parameters, float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sam_eos import lanczos, spectrum
from tests.conftest import make_mlp, mlp_loss

SIZES = [10, 30, 20, 3]  # 1,013 parameters
NUM_EXAMPLES = 64


@jax.jit
def _dense_hessian(params, batch):
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda f: mlp_loss(unravel(f), batch))(flat)


def dense_hessian(params, batch):
    """The Hessian of `mlp_loss` at `params` [n, n] (float64 copy of a compiled float32 one)."""
    return np.asarray(_dense_hessian(params, batch), np.float64)


def hutchinson_standard_error(hessian, num_probes):
    """Rademacher Hutchinson's standard error: sqrt(2 sum_{i != j} H_ij^2 / num_probes)."""
    off_diagonal = np.sum(hessian**2) - np.sum(np.diag(hessian) ** 2)
    return np.sqrt(2 * off_diagonal / num_probes)


@pytest.fixture(scope="module")
def mlp():
    """`(params, batch, dense Hessian float64 [n, n], its eigenvalues ascending)`."""
    params, batch = make_mlp(SIZES, num_examples=NUM_EXAMPLES)
    hessian = dense_hessian(params, batch)
    assert hessian.shape == (1013, 1013)
    return params, batch, hessian, np.linalg.eigvalsh(hessian)


@pytest.mark.parametrize("seed", [0, 1])
def test_xtrace_within_three_standard_errors_and_two_percent(mlp, seed):
    params, batch, hessian, _ = mlp
    exact = np.trace(hessian)
    estimate, standard_error = spectrum.hessian_trace(
        mlp_loss, params, batch, jax.random.PRNGKey(seed), 300
    )
    error = abs(float(estimate) - exact)
    assert 0 < float(standard_error) < 0.01 * exact
    assert error <= 3 * float(standard_error)
    assert error <= 0.02 * exact


def test_hutchinson_standard_error_matches_its_formula(mlp):
    params, batch, hessian, _ = mlp
    exact = np.trace(hessian)
    estimate, standard_error = spectrum.hessian_trace(
        mlp_loss, params, batch, jax.random.PRNGKey(0), 200, method="hutchinson"
    )
    assert abs(float(estimate) - exact) <= 3 * float(standard_error)
    expected = hutchinson_standard_error(hessian, 200)
    assert 0.7 * expected < float(standard_error) < 1.4 * expected


def test_trace_refuses_too_few_products():
    with pytest.raises(ValueError, match="at least 2 probes"):
        spectrum.trace_probes(3, "xtrace")
    with pytest.raises(ValueError, match="unknown trace method"):
        spectrum.trace_probes(10, "hutch++")


def test_slq_nodes_lie_in_the_spectrum_and_weights_sum_to_one(mlp):
    params, batch, _, eigenvalues = mlp
    nodes, weights = spectrum.spectral_density(
        mlp_loss, params, batch, jax.random.PRNGKey(0), 4, 60
    )
    assert nodes.shape == weights.shape == (4, 60)
    nodes, weights = np.asarray(nodes), np.asarray(weights)
    scale = np.max(np.abs(eigenvalues))
    assert np.all(nodes >= eigenvalues[0] - 1e-4 * scale)
    assert np.all(nodes <= eigenvalues[-1] + 1e-4 * scale)
    # 60 steps reach the ends of the spectrum (the extreme Ritz values converge first).
    np.testing.assert_allclose(nodes.max(axis=1), eigenvalues[-1], rtol=1e-4)
    assert np.all(weights >= 0)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)


def test_slq_first_moment_is_trace_over_dimension(mlp):
    params, batch, hessian, _ = mlp
    n = hessian.shape[0]
    num_probes = 600
    # The first moment is Hutchinson's estimate with these probes: its relative standard
    # error must leave the 5 % bound 3 standard errors of margin.
    assert hutchinson_standard_error(hessian, num_probes) < 0.05 / 3 * np.trace(hessian)
    nodes, weights = spectrum.spectral_density(
        mlp_loss, params, batch, jax.random.PRNGKey(1), num_probes, 4
    )
    first_moment = float(jnp.mean(jnp.sum(nodes * weights, axis=1)))
    np.testing.assert_allclose(first_moment, np.trace(hessian) / n, rtol=0.05)


def test_density_on_grid_integrates_to_one_and_keeps_the_mean(mlp):
    params, batch, _, eigenvalues = mlp
    nodes, weights = spectrum.spectral_density(
        mlp_loss, params, batch, jax.random.PRNGKey(2), 3, 30
    )
    width = 0.05
    grid = jnp.linspace(eigenvalues[0] - 10 * width, eigenvalues[-1] + 10 * width, 4001)
    density = np.asarray(spectrum.density_on_grid(nodes, weights, grid, width))
    assert density.shape == (4001,) and np.all(density >= 0)
    np.testing.assert_allclose(np.trapezoid(density, grid), 1.0, atol=1e-3)
    first_moment = float(jnp.mean(jnp.sum(nodes * weights, axis=1)))
    np.testing.assert_allclose(np.trapezoid(grid * density, grid), first_moment, atol=1e-3)


def test_tridiagonal_of_a_low_rank_operator_survives_breakdown():
    # Rank 3: the Krylov space is invariant after 3 steps; later blocks carry no weight.
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(20, 3)))[0]
    matrix = jnp.asarray(basis @ np.diag([3.0, 1.0, -2.0]) @ basis.T, jnp.float32)
    start = jnp.ones((20,), jnp.float32) / np.sqrt(20)
    alpha, beta = jax.jit(
        lambda s: lanczos.tridiagonal(lambda v: matrix @ v, s, jax.random.PRNGKey(0), steps=8)
    )(start)
    nodes, weights = spectrum.gauss_quadrature(alpha, beta)
    assert np.all(np.isfinite(np.asarray(nodes)))
    assert np.all(np.asarray(nodes) >= -2.0 - 1e-5) and np.all(np.asarray(nodes) <= 3.0 + 1e-5)
    # Squared first entries of LAPACK's float32 eigenvectors of T (8 x 8), orthonormal to
    # O(8 eps) ~ 1e-6 by a processor-dependent order of operations (measured here: 1.8e-7).
    np.testing.assert_allclose(float(jnp.sum(weights)), 1.0, atol=1e-5)
    expected_moment = float(start @ matrix @ start)
    np.testing.assert_allclose(float(jnp.sum(nodes * weights)), expected_moment, atol=1e-5)


def test_tridiagonal_of_an_exact_eigenvector_puts_all_weight_on_its_eigenvalue():
    # The first residual is exactly zero (matfree's tridiag_sym gives nan here).
    matrix = jnp.diag(jnp.asarray([3.0, 1.0, -2.0] + [0.0] * 17))
    start = jnp.zeros((20,)).at[0].set(1.0)
    alpha, beta = lanczos.tridiagonal(lambda v: matrix @ v, start, jax.random.PRNGKey(0), steps=4)
    nodes, weights = spectrum.gauss_quadrature(alpha, beta)
    assert float(beta[0]) == 0.0
    assert np.all(np.isfinite(np.asarray(nodes)))
    assert np.all((np.asarray(nodes) >= -2.0 - 1e-5) & (np.asarray(nodes) <= 3.0 + 1e-5))
    np.testing.assert_allclose(float(jnp.sum(weights * (nodes == nodes.max()))), 1.0, atol=1e-6)
    np.testing.assert_allclose(float(nodes.max()), 3.0, rtol=1e-6)


def stacked_batches(batch, num_batches):
    """The batch split into `num_batches` equal batches stacked along a new leading axis."""
    return jax.tree.map(lambda x: x.reshape(num_batches, -1, *x.shape[1:]), batch)


def dense_gradient_curvature(params, batch):
    """g^T H g / ||g||^2 from the dense Hessian, in float64."""
    flat, unravel = ravel_pytree(params)
    gradient = np.asarray(jax.grad(lambda f: mlp_loss(unravel(f), batch))(flat), np.float64)
    hessian = dense_hessian(params, batch)
    return gradient @ hessian @ gradient / (gradient @ gradient)


def test_batch_sharpness_matches_the_dense_formula(mlp):
    params, batch, _, _ = mlp
    batches = stacked_batches(batch, 4)
    expected = [
        dense_gradient_curvature(params, jax.tree.map(lambda x, i=i: x[i], batches))
        for i in range(4)
    ]
    samples = spectrum.batch_sharpness_samples(mlp_loss, params, batches)
    assert samples.shape == (4,)
    np.testing.assert_allclose(np.asarray(samples), expected, rtol=1e-4)
    value = spectrum.batch_sharpness(mlp_loss, params, batches)
    np.testing.assert_allclose(float(value), np.mean(expected), rtol=1e-4)


def test_stopping_rule():
    assert not spectrum.enough_batches(np.array([1.0]), max_batches=10)
    assert spectrum.enough_batches(np.array([2.0, 2.0]), max_batches=10)  # no spread
    spread = np.array([1.0, 3.0, 2.0, 2.5])  # standard error 0.43 = 20 % of the mean
    assert not spectrum.enough_batches(spread, max_batches=10)
    assert spectrum.enough_batches(spread, max_batches=4)
    assert spectrum.enough_batches(spread, max_batches=10, relative_error=0.25)
    assert spectrum.enough_batches(np.array([1.0, np.nan]), max_batches=10)
    mean, standard_error = spectrum.mean_and_standard_error(spread)
    assert mean == pytest.approx(2.125)
    assert standard_error == pytest.approx(np.std(spread, ddof=1) / 2)


def test_sam_point_sharpness_matches_dense_top_eigenvalue(mlp):
    params, batch, _, eigenvalues = mlp
    rho = 0.5
    flat, unravel = ravel_pytree(params)
    gradient = np.asarray(jax.grad(lambda f: mlp_loss(unravel(f), batch))(flat), np.float64)
    perturbed = np.asarray(flat, np.float64) + rho * gradient / (
        np.linalg.norm(gradient) + 1e-5
    )
    perturbed_params = unravel(jnp.asarray(perturbed, jnp.float32))
    expected = np.linalg.eigvalsh(dense_hessian(perturbed_params, batch))[-1]
    assert abs(expected - eigenvalues[-1]) > 1e-2 * eigenvalues[-1]  # a different point
    value, info = spectrum.sam_point_sharpness(mlp_loss, params, batch, jax.random.PRNGKey(0), rho)
    np.testing.assert_allclose(float(value), expected, rtol=1e-4)
    assert bool(info.converged)


def test_measurements_compile_once_per_shape(mlp):
    params, batch, _, _ = mlp
    traces = []

    def counted_loss(p, b):
        traces.append(1)
        return mlp_loss(p, b)

    batches = stacked_batches(batch, 2)

    def measure(p, seed):
        key = jax.random.PRNGKey(seed)
        spectrum.hessian_trace(counted_loss, p, batch, key, 20)
        spectrum.spectral_density(counted_loss, p, batch, key, 2, 5)
        spectrum.batch_sharpness(counted_loss, p, batches)
        spectrum.sam_point_sharpness(counted_loss, p, batch, jax.random.PRNGKey(0), 0.1)

    measure(params, 0)
    first = len(traces)
    assert first > 0
    measure(jax.tree.map(lambda x: x * 1.01, params), 1)
    assert len(traces) == first
