"""sam_eos.sam_edge against the paper's formula and its limits."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from sam_eos import sam_edge


def paper_formula(grad_norm, step_size, rho):
    return (grad_norm / (2 * rho)) * (np.sqrt(1 + 8 * rho / (step_size * grad_norm)) - 1)


def test_equals_paper_formula_on_random_inputs():
    rng = np.random.default_rng(0)
    grad_norm = 10.0 ** rng.uniform(-3, 2, 1000)
    step_size = 10.0 ** rng.uniform(-3, 0, 1000)
    rho = 10.0 ** rng.uniform(-3, 0, 1000)
    np.testing.assert_allclose(
        sam_edge(grad_norm, step_size, rho), paper_formula(grad_norm, step_size, rho), rtol=1e-9
    )


def test_rho_zero_is_two_over_eta_whatever_the_gradient():
    for grad_norm in (0.0, 1e-12, 0.3, 1e12):
        assert sam_edge(grad_norm, 0.01, 0.0) == 2 / 0.01


def test_continuous_as_rho_tends_to_zero():
    rhos = (1e-4, 1e-8, 1e-12, 1e-16)
    values = [float(sam_edge(0.5, 0.1, rho)) for rho in rhos]
    np.testing.assert_allclose(values[-1], 20.0, rtol=1e-12)
    # First order: edge = (2/eta) (1 - 2 rho / (eta ||g||)) + O(rho^2): a gap of ~800 rho here.
    for rho, value in zip(rhos, values, strict=True):
        assert 0 <= 20.0 - value <= 801 * rho
    assert values == sorted(values)  # rises towards 2/eta as rho falls


def test_below_two_over_eta_and_falls_with_the_gradient():
    edges = [float(sam_edge(g, 0.01, 0.1)) for g in (10.0, 1.0, 0.1, 0.01)]
    assert all(e < 200.0 for e in edges)
    assert edges == sorted(edges, reverse=True)


def test_finite_at_zero_and_huge_gradient():
    assert sam_edge(0.0, 0.01, 0.1) == 0.0
    np.testing.assert_allclose(sam_edge(1e300, 0.01, 0.1), 200.0, rtol=1e-9)
    assert np.isfinite(sam_edge(1e-300, 0.01, 0.1))


def test_jax_inputs_match():
    value = sam_edge(jnp.float32(0.7), jnp.float32(0.05), 0.2)
    assert np.asarray(value).dtype == np.float64 and not isinstance(value, jnp.ndarray)
    np.testing.assert_allclose(float(value), paper_formula(0.7, 0.05, 0.2), rtol=1e-5)
    assert np.isfinite(float(sam_edge(jnp.float32(0.0), jnp.float32(0.05), 0.2)))


positive = st.floats(min_value=1e-12, max_value=1e12, allow_nan=False, allow_infinity=False)


@given(grad_norm=positive, step_size=positive, rho=positive)
def test_finite_positive_and_at_most_two_over_eta(grad_norm, step_size, rho):
    edge = float(sam_edge(grad_norm, step_size, rho))
    assert np.isfinite(edge)
    assert edge > 0
    assert edge <= 2 / step_size
