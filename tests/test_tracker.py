"""SharpnessTracker and the effective-sharpness operator against dense matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sam_eos
from tests.conftest import dense_hessian, make_mlp, tanh_mlp_loss


@pytest.fixture(scope="module")
def adam_trajectory():
    """Ten points 5 Adam steps apart on a small tanh MLP (~200 parameters), each with the
    optimizer state reached there."""
    params, batch = make_mlp([6, 12, 8, 3], num_examples=40, seed=3)
    optimizer = optax.adam(0.01)
    state = optimizer.init(params)

    @jax.jit
    def train_step(params, state):
        grads = jax.grad(tanh_mlp_loss)(params, batch)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    points = []
    for step in range(50):
        params, state = train_step(params, state)
        if step % 5 == 4:
            points.append((params, state))
    return points, batch


@pytest.fixture(scope="module")
def shared_tracker():
    """One tracker for the operator tests: one compile per kind of operator, not per test."""
    return sam_eos.SharpnessTracker(tanh_mlp_loss, k=1)


def dense_operator(params, batch, rho_eff=0.0, preconditioner=None):
    """P^-1/2 (H + rho_eff H^2) P^-1/2 as a dense float64 matrix."""
    h = dense_hessian(tanh_mlp_loss, params, batch)
    a = h + float(rho_eff) * h @ h
    if preconditioner is not None:
        scale = 1.0 / np.sqrt(np.asarray(ravel_pytree(preconditioner)[0], np.float64))
        a = scale[:, None] * a * scale[None, :]
    return a


def top(matrix, k):
    return np.linalg.eigvalsh(matrix)[::-1][:k]


def test_tracker_matches_dense_eigenvalues_along_an_adam_trajectory(adam_trajectory):
    points, batch = adam_trajectory
    traces = []

    def counted_loss(params, batch):
        traces.append(1)  # Python side effect: runs only while tracing
        return tanh_mlp_loss(params, batch)

    tracker = sam_eos.SharpnessTracker(counted_loss, k=2)
    state = tracker.init(points[0][0], jax.random.key(0))
    products = []
    for params, _ in points:
        result, state = tracker.update(state, params, batch)
        expected = top(dense_operator(params, batch), 2)
        np.testing.assert_allclose(np.asarray(result.eigenvalues), expected, rtol=1e-4)
        assert bool(result.converged) and float(result.error_bound) <= 1e-5
        direction = np.asarray(ravel_pytree(result.direction)[0], np.float64)
        h = dense_operator(params, batch)
        np.testing.assert_allclose(direction @ h @ direction, expected[0], rtol=1e-4)
        products.append(int(result.hessian_vector_products))
        if len(products) == 1:
            traced_once = len(traces)
    assert traced_once > 0 and len(traces) == traced_once  # compiled once, reused nine times
    assert np.median(products[1:]) < products[0], products


@pytest.mark.parametrize("preconditioned", [False, True], ids=["sgd family", "adam"])
@pytest.mark.parametrize("variant", ["none", "sam", "usam"])
def test_effective_sharpness_matches_the_dense_operator(adam_trajectory, shared_tracker,
                                                       preconditioned, variant):
    """Every (optimizer, variant) pair: the SGD family (sgd, momentum, nesterov) shares P = I,
    Adam has its own P."""
    points, batch = adam_trajectory
    params, opt_state = points[-1]
    rho = 0.05
    grad_norm = jnp.linalg.norm(ravel_pytree(jax.grad(tanh_mlp_loss)(params, batch))[0])
    rho_eff = sam_eos.effective_radius(variant, rho, grad_norm)
    preconditioner = (sam_eos.adam_preconditioner(opt_state, b2=0.999, eps=1e-8)
                      if preconditioned else None)
    tracker = shared_tracker
    result, _ = tracker.update(tracker.init(params, jax.random.key(1)), params, batch,
                               rho_eff=rho_eff, preconditioner=preconditioner)
    expected = top(dense_operator(params, batch, rho_eff, preconditioner), 1)
    np.testing.assert_allclose(np.asarray(result.eigenvalues), expected, rtol=1e-4)
    products = int(result.hessian_vector_products)
    assert products > 0
    if variant == "none":  # a Python 0 radius costs what the Hessian alone does
        plain, _ = tracker.update(tracker.init(params, jax.random.key(1)), params, batch,
                                  preconditioner=preconditioner)
        assert rho_eff == 0.0 and int(plain.hessian_vector_products) == products
    else:  # two Hessian products per operator product
        assert products % 2 == 0


def test_effective_operator_products_match_the_dense_matrix(adam_trajectory):
    points, batch = adam_trajectory
    params, opt_state = points[3]
    preconditioner = sam_eos.adam_preconditioner(opt_state)
    _, _, matvec = sam_eos.effective_sharpness_operator(
        tanh_mlp_loss, params, batch, rho_eff=0.3, preconditioner=preconditioner)
    v = jax.random.normal(jax.random.key(2), ravel_pytree(params)[0].shape)
    expected = dense_operator(params, batch, 0.3, preconditioner) @ np.asarray(v, np.float64)
    got = np.asarray(matvec(v), np.float64)
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5


def test_adam_preconditioner_is_what_optax_divided_by(adam_trajectory):
    points, batch = adam_trajectory
    params, state = points[0]
    optimizer = optax.adam(0.01)
    grads = jax.grad(tanh_mlp_loss)(params, batch)
    updates, new_state = optimizer.update(grads, state, params)
    preconditioner = sam_eos.adam_preconditioner(new_state)
    adam_state = new_state[0]
    mu_hat = jax.tree.map(lambda m: m / (1 - 0.9 ** adam_state.count), adam_state.mu)
    expected = jax.tree.map(lambda m, p: -0.01 * m / p, mu_hat, preconditioner)
    np.testing.assert_allclose(ravel_pytree(updates)[0], ravel_pytree(expected)[0], rtol=1e-5)


def test_effective_radius_of_each_variant():
    assert sam_eos.effective_radius("none", 0.1, 2.0) == 0.0
    assert sam_eos.effective_radius("usam", 0.1, 2.0) == 0.1
    assert float(sam_eos.effective_radius("sam", 0.1, 2.0)) == pytest.approx(0.05)
    assert float(sam_eos.effective_radius("sam", 0.1, 0.0)) == np.inf
    with pytest.raises(ValueError, match="unknown SAM variant"):
        sam_eos.effective_radius("asam", 0.1, 1.0)
