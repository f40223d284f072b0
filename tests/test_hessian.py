"""hvp and top_eigenvalues against the dense Hessian of small networks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
import pytest
from jax.flatten_util import ravel_pytree

from sam_eos.eigensolver import top_eigenvalues
from sam_eos.hessian import hvp
from tests.conftest import dense_hessian, make_mlp, mlp_loss

KEY = jax.random.PRNGKey(0)


@pytest.fixture(scope="module")
def small_mlp():
    """About two thousand parameters, with its dense Hessian's spectrum."""
    params, batch = make_mlp([16, 40, 30, 3])
    hessian = dense_hessian(mlp_loss, params, batch)
    assert 1500 < hessian.shape[0] < 5000
    return params, batch, np.linalg.eigvalsh(hessian)[::-1]


def test_hvp_matches_dense_hessian_times_v():
    params, batch = make_mlp([4, 6, 3], num_examples=10, seed=1)
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.PRNGKey(5), flat.shape)
    expected = dense_hessian(mlp_loss, params, batch) @ np.asarray(v, np.float64)
    got = np.asarray(ravel_pytree(hvp(mlp_loss, params, batch, unravel(v)))[0], np.float64)
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4


@pytest.mark.parametrize("k", [1, 3])
def test_top_eigenvalues_match_eigvalsh(small_mlp, k):
    params, batch, spectrum = small_mlp
    eigenvalues, direction, _ = top_eigenvalues(mlp_loss, params, batch, KEY, k)
    assert eigenvalues.shape == (k,)
    np.testing.assert_allclose(np.asarray(eigenvalues), spectrum[:k], rtol=1e-4)
    assert np.all(np.diff(np.asarray(eigenvalues)) <= 0)  # descending
    np.testing.assert_allclose(float(otu.tree_norm(direction)), 1.0, rtol=1e-5)
    rayleigh = float(otu.tree_vdot(direction, hvp(mlp_loss, params, batch, direction)))
    np.testing.assert_allclose(rayleigh, spectrum[0], rtol=1e-4)


def test_info_reports_bottom_eigenvalue_and_cost(small_mlp):
    params, batch, spectrum = small_mlp
    _, _, info = top_eigenvalues(mlp_loss, params, batch, KEY, 1)
    assert bool(info.converged)
    assert 2 <= int(info.hessian_vector_products) <= 100
    # Lanczos' smallest Ritz value approaches the bottom of the spectrum from above.
    assert spectrum[-1] - 1e-4 <= float(info.bottom_eigenvalue) <= spectrum[-1] * 0.5


def test_second_call_on_new_params_does_not_recompile(small_mlp):
    params, batch, _ = small_mlp
    traces = []

    def counted_loss(p, b):
        traces.append(1)
        return mlp_loss(p, b)

    top_eigenvalues(counted_loss, params, batch, KEY, 2)
    first = len(traces)
    assert first > 0
    moved = jax.tree.map(lambda x: x * 1.01, params)
    eigenvalues, _, _ = top_eigenvalues(counted_loss, moved, batch, KEY, 2)
    assert len(traces) == first  # no new trace: the compiled solver was reused
    assert np.all(np.isfinite(np.asarray(eigenvalues)))


def quadratic_loss(params, batch):
    return 0.5 * params @ (batch @ params)


def test_degenerate_and_tiny_problems():
    # A repeated top eigenvalue (Lanczos restarts on breakdown to find both copies).
    a = jnp.diag(jnp.array([5.0, 5.0, 2.0, 1.0, -3.0]))
    eigenvalues, direction, info = top_eigenvalues(
        quadratic_loss, jnp.zeros(5), a, KEY, 3
    )
    np.testing.assert_allclose(np.asarray(eigenvalues), [5.0, 5.0, 2.0], rtol=1e-5)
    np.testing.assert_allclose(float(info.bottom_eigenvalue), -3.0, rtol=1e-5)
    assert bool(info.converged)
    # Two parameters: the whole space is exhausted after two steps.
    b = jnp.array([[2.0, 1.0], [1.0, 2.0]])
    eigenvalues, direction, _ = top_eigenvalues(quadratic_loss, jnp.zeros(2), b, KEY, 2)
    np.testing.assert_allclose(np.asarray(eigenvalues), [3.0, 1.0], rtol=1e-5)
    np.testing.assert_allclose(np.abs(np.asarray(direction)), [2**-0.5, 2**-0.5], rtol=1e-4)


def test_rejects_too_many_eigenvalues():
    with pytest.raises(ValueError, match="more eigenvalues than num_params=2"):
        top_eigenvalues(quadratic_loss, jnp.zeros(2), jnp.eye(2), KEY, 3)

