"""Low-precision parameters and mixed precision (issue 41 item 2): bfloat16 and float16 params
are solved in float32, the tracker's bound includes the products' measured noise and covers the
difference to a float32 solve, and power iteration takes its finite differences in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import sam_eos
from sam_eos import hessian, rows
from sam_eos.power_iteration import power_iteration

SIZES = (16, 48, 32, 4)  # 2,516 params


def init_mlp(key, dtype=jnp.float32):
    params = []
    for a, b in zip(SIZES[:-1], SIZES[1:], strict=True):
        key, sub = jax.random.split(key)
        params.append({"w": (jax.random.normal(sub, (a, b)) / jnp.sqrt(a)).astype(dtype),
                       "b": jnp.zeros(b, dtype)})
    return params


def mlp_loss(params, batch):
    """Computes in the params' dtype (bfloat16 params: bfloat16 matmuls and tanh); the mean
    squared error in float32."""
    x, y = batch
    h = x.astype(params[0]["w"].dtype)
    for i, layer in enumerate(params):
        h = h @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return jnp.mean((h.astype(jnp.float32) - y) ** 2)


def bf16_inside_loss(params, batch):
    """Mixed precision: float32 params, computed in bfloat16."""
    return mlp_loss(jax.tree.map(lambda p: p.astype(jnp.bfloat16), params), batch)


def make_batch():
    return (jax.random.normal(jax.random.key(1), (64, SIZES[0])),
            jax.random.normal(jax.random.key(2), (64, SIZES[-1])))


def upcast(params):
    return jax.tree.map(lambda p: p.astype(jnp.float32), params)


def float32_top(params, batch):
    """The float32 answer at the same values: float32 copies, a float32 loss, tight."""
    values, _, info = sam_eos.top_eigenvalues(mlp_loss, upcast(params), batch,
                                              jax.random.key(3), tolerance=1e-6)
    assert bool(info.converged)
    return float(values[0])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_tracker_bound_covers_the_float32_solve(dtype):
    batch = make_batch()
    params = init_mlp(jax.random.key(0), dtype)
    reference = float32_top(params, batch)
    tracker = sam_eos.SharpnessTracker(mlp_loss)
    state = tracker.init(params, jax.random.key(4))
    for call in ("cold", "warm"):  # a cold start measures after its solve, a warm one before
        result, state = tracker.update(state, params, batch)
        value, bound = float(result.eigenvalues[0]), float(result.error_bound)
        assert result.eigenvalues.dtype == jnp.float32
        assert bool(result.converged), call
        assert result.direction[0]["w"].dtype == dtype
        # Both relative to ||H|| (here the top eigenvalue is the largest in magnitude).
        assert abs(value - reference) / abs(reference) <= bound, (call, value, reference, bound)
        assert 1e-4 < bound < 0.2, (call, bound)  # the products' rounding, far above 1e-5


def test_without_the_floor_the_bound_is_too_tight():
    """What the tracker's floor corrects: the solver alone reports a bound near its tolerance."""
    batch = make_batch()
    params = init_mlp(jax.random.key(0), jnp.bfloat16)
    _, _, info = sam_eos.top_eigenvalues(mlp_loss, params, batch, jax.random.key(3))
    floor = hessian.product_noise_floor(mlp_loss, params, batch,
                                        rows.row(info.ritz_vectors, 0))
    assert float(info.error_bound) < 1e-4 < float(floor) < 0.2
    _, _, floored = sam_eos.top_eigenvalues(mlp_loss, params, batch, jax.random.key(3),
                                            noise_floor=floor)
    assert float(floored.error_bound) >= float(floor)


def test_float32_params_measure_nothing_and_mixed_precision_uses_the_reference():
    batch = make_batch()
    params = init_mlp(jax.random.key(0))
    assert not hessian.low_precision(params)
    assert hessian.low_precision({"a": params, "b": jnp.ones(2, jnp.float16)})
    vector = jnp.ones(ravel_pytree(params)[0].size) / np.sqrt(2516.0)
    assert float(hessian.product_noise_floor(mlp_loss, params, batch, vector)) == 0.0
    # Float32 params, bfloat16 compute: the dtype cannot tell, the reference loss does.
    floor = float(hessian.product_noise_floor(bf16_inside_loss, params, batch, vector,
                                              reference_loss_fn=mlp_loss))
    assert 1e-4 < floor < 0.2
    reference = float32_top(params, batch)
    tracker = sam_eos.SharpnessTracker(bf16_inside_loss, reference_loss_fn=mlp_loss)
    result, _ = tracker.update(tracker.init(params, jax.random.key(4)), params, batch)
    value, bound = float(result.eigenvalues[0]), float(result.error_bound)
    assert abs(value - reference) / abs(reference) <= bound < 0.2
    assert bound > 1e-4


def test_power_iteration_differences_in_float32():
    batch = make_batch()
    params = init_mlp(jax.random.key(0), jnp.bfloat16)
    low = power_iteration(mlp_loss, params, batch, jax.random.key(5))
    full = power_iteration(mlp_loss, upcast(params), batch, jax.random.key(5))
    assert bool(low.converged)
    # The same float32 computation on the same values.
    np.testing.assert_allclose(low.magnitudes, full.magnitudes, rtol=1e-6)
    assert low.direction[0]["w"].dtype == jnp.bfloat16
    # Within power iteration's usual accuracy of the float32 Lanczos answer:
    # Measured 0.8 % below it (power iteration stops on a relative change of 1e-3 per step).
    np.testing.assert_allclose(float(low.magnitudes[0]), float32_top(params, batch), rtol=2e-2)


def test_per_layer_bounds_include_the_floor_and_cover_float32_layer_solves():
    batch = make_batch()
    params = init_mlp(jax.random.key(0), jnp.bfloat16)
    reference, _ = sam_eos.layer_sharpness(mlp_loss, upcast(params), batch, jax.random.key(3),
                                           tolerance=1e-6)
    tracker = sam_eos.SharpnessTracker(mlp_loss, per_layer=True)
    state = tracker.init(params, jax.random.key(4))
    for _ in range(2):
        result, state = tracker.update(state, params, batch)
    for name, info in result.layer_info.items():
        value, bound = float(info.eigenvalues[0]), float(info.error_bound)
        norm = max(abs(value), abs(float(info.bottom_eigenvalue)))
        assert bound > 1e-4, (name, bound)  # the products' rounding, not the solver's 1e-5
        assert abs(value - float(reference[name])) / norm <= bound, (name, value, bound)
