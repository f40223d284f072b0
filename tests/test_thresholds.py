"""Each optimizer's stability threshold, and the SAM/USAM edges built on it, against the
dynamics themselves: the curvature at which optax's own optimizer, run on a quadratic, stops
converging, found by bisection."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sam_eos import sam_edge, stability_threshold, usam_edge

STEPS = 4000


def growth(optimizer: optax.GradientTransformation, curvature, *, rho=0.0, scale=1.0):
    """How much |x| grew over the second half of a run of `optimizer` on
    L(x) = curvature x^2 / 2: log(max |x| over its last 50 steps / max over the 50 before the
    half); positive once the iterates diverge. The gradient is taken at x + rho grad L(x)
    (unnormalised SAM; rho = 0: the plain gradient); `scale` multiplies the optimizer's update
    (a frozen diagonal preconditioner's 1 / P)."""

    def step(carry, _):
        x, state, log_scale = carry
        g = curvature * (x + rho * curvature * x)
        updates, state = optimizer.update(g, state, x)
        x = x + scale * updates
        # The dynamics are linear in (x, momenta): renormalise them, keeping the log of the
        # scale, so that float32 neither overflows nor underflows.
        floats = [a for a in jax.tree.leaves(state) if jnp.issubdtype(a.dtype, jnp.floating)]
        size = jnp.abs(x) + sum(jnp.abs(a) for a in floats)
        rescale = lambda a: a / size if jnp.issubdtype(a.dtype, jnp.floating) else a
        return (x / size, jax.tree.map(rescale, state), log_scale + jnp.log(size)), log_scale

    x0 = jnp.ones(())
    _, log_sizes = jax.lax.scan(step, (x0, optimizer.init(x0), 0.0), None, length=STEPS)
    half = STEPS // 2
    return jnp.max(log_sizes[-50:]) - jnp.max(log_sizes[half - 50:half])


def bisect_edge(optimizer, *, rho=0.0, scale=1.0, low=1e-3, high=1e4, iterations=50) -> float:
    """The curvature at which the iterates stop converging (geometric bisection)."""
    measure = jax.jit(functools.partial(growth, optimizer, rho=rho, scale=scale))
    assert float(measure(low)) < 0 and not float(measure(high)) < 0
    for _ in range(iterations):
        middle = np.sqrt(low * high)
        if float(measure(middle)) < 0:
            low = middle
        else:
            high = middle
    return float(np.sqrt(low * high))


@pytest.mark.parametrize("eta", [0.01, 0.5])
def test_sgd_threshold_is_where_gd_stops_converging(eta):
    edge = bisect_edge(optax.sgd(eta))
    np.testing.assert_allclose(edge, stability_threshold("sgd", eta), rtol=1e-3)


@pytest.mark.parametrize(("eta", "beta"), [(0.01, 0.9), (0.3, 0.5), (0.1, 0.0)])
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_thresholds_match_optax_dynamics(eta, beta, nesterov):
    edge = bisect_edge(optax.sgd(eta, momentum=beta, nesterov=nesterov))
    name = "nesterov" if nesterov else "momentum"
    np.testing.assert_allclose(edge, stability_threshold(name, eta, momentum=beta), rtol=1e-3)


@pytest.mark.parametrize(("eta", "b1", "preconditioner"), [(1e-3, 0.9, 0.02), (0.05, 0.5, 3.0)])
def test_adam_threshold_bounds_the_preconditioned_curvature(eta, b1, preconditioner):
    # Adam with its second moment frozen: debiased momentum (as optax's adam), divided by P.
    frozen_adam = optax.chain(optax.ema(b1, debias=True), optax.scale(-eta))
    edge = bisect_edge(frozen_adam, scale=1.0 / preconditioner)
    np.testing.assert_allclose(edge / preconditioner, stability_threshold("adam", eta, b1=b1),
                               rtol=1e-3)
    assert stability_threshold("adam", 1.0) == pytest.approx(38.0)


@pytest.mark.parametrize(("eta", "rho", "beta"), [(0.1, 0.5, 0.0), (0.02, 0.05, 0.6)])
def test_usam_edge_is_where_usam_stops_converging(eta, rho, beta):
    edge = bisect_edge(optax.sgd(eta, momentum=beta or None), rho=rho)
    threshold = stability_threshold("momentum", eta, momentum=beta)
    np.testing.assert_allclose(edge, usam_edge(eta, rho, threshold=threshold), rtol=1e-3)
    if beta == 0:  # the default threshold is GD's: eta lambda (1 + rho lambda) = 2
        np.testing.assert_allclose(edge, usam_edge(eta, rho), rtol=1e-3)


def test_sam_edge_with_a_threshold_solves_the_composed_equation():
    rng = np.random.default_rng(1)
    grad_norm, eta, rho = 10.0 ** rng.uniform(-3, 1, (3, 200))
    threshold = stability_threshold("momentum", 1.0, momentum=0.6) / eta
    edge = sam_edge(grad_norm, eta, rho, threshold=threshold)
    np.testing.assert_allclose(edge + rho * edge**2 / grad_norm, threshold, rtol=1e-9)
    np.testing.assert_allclose(edge, usam_edge(eta, rho / grad_norm, threshold=threshold),
                               rtol=1e-12)
    # At T = 2 / eta it is the paper's edge.
    np.testing.assert_array_equal(sam_edge(grad_norm, eta, rho, threshold=2 / eta),
                                  sam_edge(grad_norm, eta, rho))


def test_bad_hyperparameters_are_errors():
    with pytest.raises(ValueError, match="momentum must be in"):
        stability_threshold("momentum", 0.1, momentum=1.0)
    with pytest.raises(ValueError, match="needs momentum"):
        stability_threshold("nesterov", 0.1)
    with pytest.raises(ValueError, match="not \\['momentum'\\]"):
        stability_threshold("adam", 0.1, momentum=0.9)
    with pytest.raises(ValueError, match="unknown optimizer"):
        stability_threshold("rmsprop", 0.1)
    with pytest.raises(ValueError, match="positive"):
        stability_threshold("sgd", 0.0)


def test_edges_work_under_jit_with_a_traced_threshold():
    composed = jax.jit(lambda t: sam_edge(1.0, 0.1, 0.1, threshold=t))(jnp.float32(4.0))
    np.testing.assert_allclose(float(composed), sam_edge(1.0, 0.1, 0.1, threshold=4.0),
                               rtol=1e-6)
    unnormalised = jax.jit(lambda t: usam_edge(0.1, 0.1, threshold=t))(jnp.float32(4.0))
    np.testing.assert_allclose(float(unnormalised), usam_edge(0.1, 0.1, threshold=4.0),
                               rtol=1e-6)
