"""sam_gradient and sam_update against the formula computed by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from sam_eos import tree
from sam_eos.sam import sam_gradient, sam_update


def loss_fn(params, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ params["w"]) @ params["v"] - y) ** 2)


def setup():
    k = jax.random.split(jax.random.PRNGKey(3), 4)
    params = {"w": jax.random.normal(k[0], (5, 7)), "v": jax.random.normal(k[1], (7,))}
    batch = (jax.random.normal(k[2], (11, 5)), jax.random.normal(k[3], (11,)))
    return params, batch


def test_sam_gradient_is_the_gradient_at_the_perturbed_point():
    params, batch = setup()
    rho = 0.05
    g = jax.grad(loss_fn)(params, batch)
    g_norm = np.sqrt(sum(np.sum(np.asarray(x) ** 2) for x in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda p, d: p + rho * d / (g_norm + 1e-5), params, g)
    expected = jax.grad(loss_fn)(perturbed, batch)
    got = sam_gradient(loss_fn, params, batch, rho)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got["w"], g["w"])  # SAM really moved


def test_sam_update_is_params_minus_step_times_sam_gradient():
    params, batch = setup()
    new = sam_update(loss_fn, params, batch, 0.3, 0.1)
    sg = sam_gradient(loss_fn, params, batch, 0.1)
    for name in params:
        np.testing.assert_allclose(new[name], params[name] - 0.3 * sg[name], rtol=1e-6)


def test_rho_zero_is_exactly_gradient_descent_with_one_gradient():
    params, batch = setup()
    calls = []

    def counting_loss(p, b):
        calls.append(1)
        return loss_fn(p, b)

    new = sam_update(counting_loss, params, batch, 0.3, 0.0)
    assert len(calls) == 1  # no second evaluation
    g = jax.grad(loss_fn)(params, batch)
    for name in params:
        np.testing.assert_array_equal(new[name], params[name] - 0.3 * g[name])


def test_optax_sgd_step_equals_sam_update():
    params, batch = setup()
    optimizer = optax.sgd(0.3)
    updates, _ = optimizer.update(sam_gradient(loss_fn, params, batch, 0.1),
                                  optimizer.init(params), params)
    stepped = optax.apply_updates(params, updates)
    expected = sam_update(loss_fn, params, batch, 0.3, 0.1)
    for name in params:
        np.testing.assert_allclose(stepped[name], expected[name], rtol=1e-6)


def test_tree_helpers():
    a = {"x": jnp.array([3.0, 0.0]), "y": jnp.array([[4.0]])}
    b = {"x": jnp.array([1.0, 2.0]), "y": jnp.array([[0.0]])}
    assert float(otu.tree_norm(a)) == 5.0
    assert float(otu.tree_vdot(a, b)) == 3.0
    np.testing.assert_allclose(tree.alignment(a, b), 3.0 / (5.0 * np.sqrt(5.0)), rtol=1e-6)
    np.testing.assert_allclose(tree.alignment(a, otu.tree_scale(-2.0, a)), 1.0, rtol=1e-6)
    zero = jax.tree.map(jnp.zeros_like, a)
    assert float(tree.alignment(a, zero)) == 0.0
    u = tree.random_unit_direction(jax.random.PRNGKey(0), a)
    np.testing.assert_allclose(otu.tree_norm(u), 1.0, rtol=1e-6)
    assert jax.tree.structure(u) == jax.tree.structure(a)
