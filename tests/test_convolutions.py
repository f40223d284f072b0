"""Convolutions in the solver's loop compile as standalone ones do on the CPU: the products'
convolutions are rewritten in XLA CPU's canonical layout (`sam_eos.convolutions`), which XLA
itself does only outside loops. Checked in the compiled HLO, not by timing."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_eos
from sam_eos import convolutions
from sam_eos.power_iteration import power_iteration

CANONICAL_2D = "b01f_01io->b01f"  # HLO's dim_labels of NHWC input, HWIO kernel, NHWC output


def conv_loss(params, batch):
    """Two NHWC 3x3 convolutions and a linear layer, as Flax writes them: mean squared error."""
    x, y = batch
    for name in ("k1", "k2"):
        x = jnp.tanh(jax.lax.conv_general_dilated(
            x, params[name], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return jnp.mean((x.reshape(x.shape[0], -1) @ params["w"] - y) ** 2)


def conv_problem():
    keys = jax.random.split(jax.random.key(0), 5)
    params = {"k1": 0.3 * jax.random.normal(keys[0], (3, 3, 1, 4)),
              "k2": 0.3 * jax.random.normal(keys[1], (3, 3, 4, 4)),
              "w": 0.1 * jax.random.normal(keys[2], (4 * 6 * 6, 3))}
    batch = (jax.random.normal(keys[3], (16, 6, 6, 1)), jax.random.normal(keys[4], (16, 3)))
    return params, batch


def dim_labels(hlo_text: str) -> list[str]:
    """The dim_labels of every convolution in compiled HLO text."""
    return re.findall(r"= \S+ convolution\(.*?dim_labels=([^,\s]+)", hlo_text)


def solver_hlo(params, batch) -> str:
    """The compiled solver's HLO, traced anew: a new loss object, so no trace is reused."""
    def loss(p, b):
        return conv_loss(p, b)
    solve = jax.jit(lambda p, b, key: sam_eos.top_eigenvalues(loss, p, b, key)[0])
    return solve.lower(params, batch, jax.random.key(0)).compile().as_text()


def test_the_solvers_convolutions_are_all_canonical_in_the_compiled_loop():
    params, batch = conv_problem()
    labels = dim_labels(solver_hlo(params, batch))
    assert len(labels) >= 8  # the forward, tangent and backward convolutions of both layers
    assert set(labels) == {CANONICAL_2D}, labels


def test_without_the_rewrite_the_loop_keeps_non_canonical_convolutions(monkeypatch):
    """The cause the rewrite removes: XLA canonicalises the entry computation's convolutions
    only, and the backward pass's convolutions inside the solver's while loop stay as JAX
    wrote them (compiled as naive loop nests: about 3x the time on the NNX CNN)."""
    monkeypatch.setattr(convolutions, "CANONICALISING_BACKENDS", ())
    params, batch = conv_problem()
    labels = dim_labels(solver_hlo(params, batch))
    assert set(labels) - {CANONICAL_2D}, labels


@pytest.mark.parametrize("case", ["NCHW", "NHWC strided dilated", "grouped", "1-D NCW"])
def test_the_rewrite_keeps_values_and_gradients(case):
    key_x, key_k = jax.random.split(jax.random.key(1))
    options = {"window_strides": (1, 1), "padding": "SAME"}
    if case == "NCHW":
        x, k = jax.random.normal(key_x, (4, 3, 7, 6)), jax.random.normal(key_k, (5, 3, 3, 2))
        options["dimension_numbers"] = ("NCHW", "OIHW", "NCHW")
    elif case == "NHWC strided dilated":
        x, k = jax.random.normal(key_x, (4, 9, 8, 3)), jax.random.normal(key_k, (3, 2, 3, 5))
        options.update(window_strides=(2, 1), rhs_dilation=(1, 2),
                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    elif case == "grouped":
        x, k = jax.random.normal(key_x, (4, 7, 6, 4)), jax.random.normal(key_k, (3, 3, 2, 6))
        options.update(feature_group_count=2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
        x, k = jax.random.normal(key_x, (4, 3, 10)), jax.random.normal(key_k, (5, 3, 3))
        options.update(window_strides=(1,), dimension_numbers=("NCH", "OIH", "NCH"))

    def loss(k, x):
        return jnp.sum(jnp.sin(jax.lax.conv_general_dilated(x, k, **options)))

    gradient = jax.grad(loss)  # its backward convolutions have non-canonical numbers
    rewritten = convolutions.canonical_convolutions(gradient)
    numbers = [eqn.params["dimension_numbers"] for eqn in jax.make_jaxpr(rewritten)(k, x).eqns
               if eqn.primitive.name == "conv_general_dilated"]
    canonical = convolutions.canonical_dimension_numbers(x.ndim - 2)
    assert numbers and all(n == canonical for n in numbers), numbers
    # The same sums in another memory order: float32 rounding apart, equal.
    np.testing.assert_allclose(rewritten(k, x), gradient(k, x), rtol=1e-5, atol=1e-5)


def test_other_backends_get_the_function_itself():
    def fn(v):
        return v
    assert convolutions.for_backend(fn, backend="gpu") is fn
    assert convolutions.for_backend(fn, backend="cpu") is not fn


def test_the_originals_power_iteration_runs_canonical_convolutions_too():
    params, batch = conv_problem()

    def loss(p, b):
        return conv_loss(p, b)
    power = jax.jit(lambda p, b, key: power_iteration(loss, p, b, key).magnitudes)
    labels = dim_labels(power.lower(params, batch, jax.random.key(0)).compile().as_text())
    assert len(labels) >= 8 and set(labels) == {CANONICAL_2D}, labels
