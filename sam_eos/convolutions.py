"""Convolutions in the canonical layout of XLA's CPU backend, wherever they are traced.

XLA's CPU backend runs a convolution through Eigen's fast kernel only when its dimension
numbers are canonical: input (batch, spatial..., feature), kernel (spatial..., in, out), output
(batch, spatial..., feature). Its `ConvCanonicalization` pass rewrites the others into that form
with transposes, but only in the entry computation (`xla/service/cpu/conv_canonicalization.cc`
visits `module->entry_computation()` alone). A convolution inside a `while` body, as every
Hessian-vector product inside the Lanczos loop is, keeps its dimension numbers and is compiled as
a naive loop nest. JAX's transpose rules give the backward pass of a convolution such numbers
(`b01f_01oi->b01f` for the input's cotangent, `f01b_i01o->01bf` for the kernel's): measured on
the NNX MNIST-tutorial CNN (52k params, batch 128, 2 CPU cores), a tracker update took 2.8x a
standalone jitted `sam_eos.hvp` per product, and 0.7x with the rewrite below (BENCHMARKS.md,
`loop_cost`).

`canonical_convolutions(fn)` is `fn` with every convolution written as XLA writes it at the top
level: transposes in, a canonical convolution, a transpose out. `for_backend(fn)` applies it on
the backends that need it (CPU) and returns `fn` itself elsewhere.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core
from jax.extend.core import primitives

# Backends whose compiler canonicalises convolutions in the entry computation only.
CANONICALISING_BACKENDS = ("cpu",)


def canonical_dimension_numbers(num_spatial: int) -> jax.lax.ConvDimensionNumbers:
    """XLA CPU's canonical layout in JAX's convention ((batch, feature, spatial...) positions of
    input and output, (out, in, spatial...) of the kernel): NHWC, HWIO, NHWC for 2-D."""
    spatial = tuple(range(1, num_spatial + 1))
    return jax.lax.ConvDimensionNumbers(
        lhs_spec=(0, num_spatial + 1, *spatial),
        rhs_spec=(num_spatial + 1, num_spatial, *range(num_spatial)),
        out_spec=(0, num_spatial + 1, *spatial))


def _canonical_convolution(lhs: jax.Array, rhs: jax.Array, *,
                           dimension_numbers: jax.lax.ConvDimensionNumbers,
                           **params: Any) -> jax.Array:
    """One `conv_general_dilated` with `params`, computed in the canonical layout: its input and
    kernel transposed to it, its output transposed back (as `ConvCanonicalization` does)."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    canonical = canonical_dimension_numbers(len(lhs_spec) - 2)
    if tuple(dimension_numbers) == tuple(canonical):
        return primitives.conv_general_dilated_p.bind(
            lhs, rhs, dimension_numbers=dimension_numbers, **params)
    # Each permutation lists the original axes in canonical order.
    lhs_order = (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])
    rhs_order = (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])
    out_order = (out_spec[0], *out_spec[2:], out_spec[1])
    out = primitives.conv_general_dilated_p.bind(
        jax.lax.transpose(lhs, lhs_order), jax.lax.transpose(rhs, rhs_order),
        dimension_numbers=canonical, **params)
    return jax.lax.transpose(out, tuple(int(axis) for axis in np.argsort(out_order)))


def _evaluate(jaxpr: core.Jaxpr, consts: Sequence[Any], *args: Any) -> list[Any]:
    """`jaxpr` applied to `args`, each convolution in the canonical layout, nested `jit`s
    inlined (a convolution inside one is compiled where it is inlined); every other equation is
    bound as it is."""
    env: dict[Any, Any] = {}

    def read(atom):
        return atom.val if isinstance(atom, core.Literal) else env[atom]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        inputs = [read(atom) for atom in eqn.invars]
        with eqn.ctx.manager:
            if eqn.primitive is primitives.conv_general_dilated_p:
                outputs = [_canonical_convolution(*inputs, **eqn.params)]
            elif eqn.primitive is primitives.jit_p:
                inner = eqn.params["jaxpr"]
                outputs = _evaluate(inner.jaxpr, inner.consts, *inputs)
            else:
                outputs = eqn.primitive.bind(*inputs, **eqn.primitive.get_bind_params(eqn.params))
                if not eqn.primitive.multiple_results:
                    outputs = [outputs]
        for var, value in zip(eqn.outvars, outputs, strict=True):
            if not isinstance(var, core.DropVar):
                env[var] = value
    return [read(atom) for atom in jaxpr.outvars]


def canonical_convolutions(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` (pytrees in and out) with every convolution it traces in XLA CPU's canonical
    layout; the same values. Traced once per call; what `fn` closes over (e.g. a linearisation's
    residuals) stays outside, as before."""
    def canonical(*args: Any) -> Any:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outputs = _evaluate(closed.jaxpr, closed.consts, *jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), outputs)
    return canonical


def for_backend(fn: Callable[..., Any], backend: str | None = None) -> Callable[..., Any]:
    """`canonical_convolutions(fn)` on CANONICALISING_BACKENDS (`backend`, default JAX's
    default), `fn` itself elsewhere."""
    if (backend or jax.default_backend()) in CANONICALISING_BACKENDS:
        return canonical_convolutions(fn)
    return fn
