"""Exact Hessian-vector products: `hvp` on pytrees, `hessian_operator` on flat vectors, and
`product_noise_floor`, the products' relative error at a matmul precision.

The top of the spectrum is found from these products by `sam_eos.eigensolver` (Lanczos).
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sam_eos.types import LossFn, PyTree

# `(v, hv) -> hv'` on flat [n] vectors: a change applied to every product (tests inject noise).
ProductTransform = Callable[[jax.Array, jax.Array], jax.Array]

# How Hessian-vector products are formed: "linearize" linearises the gradient once per check
# (one primal pass, reused by every product); "forward_over_reverse" is jvp(grad) per product.
HVP_MODES = ("auto", "linearize", "forward_over_reverse")
# "auto" per backend (absent: linearize). Measured (BENCHMARKS.md): linearize 0.91-0.97x
# the time of jvp(grad) on the CPU (MLP 3 x 200), 0.76x on an H200 (MNIST MLP 3 x 1000).
AUTO_HVP_MODE: dict[str, str] = {}


def hvp(loss_fn: LossFn, params: PyTree, batch: PyTree, v: PyTree) -> PyTree:
    """The exact Hessian-vector product H(params) v (forward-over-reverse): a params pytree."""
    gradient = lambda p: jax.grad(loss_fn)(p, batch)  # noqa: E731
    return jax.jvp(gradient, (params,), (v,))[1]


def resolve_hvp_mode(hvp_mode: str, backend: str | None = None) -> str:
    """The concrete product mode for `hvp_mode` ("auto": the faster one measured on `backend`,
    default JAX's default backend)."""
    if hvp_mode not in HVP_MODES:
        raise ValueError(f"unknown hvp_mode {hvp_mode!r}; choose one of {HVP_MODES}")
    if hvp_mode != "auto":
        return hvp_mode
    return AUTO_HVP_MODE.get(backend or jax.default_backend(), "linearize")


def hessian_operator(
    loss_fn: LossFn, params: PyTree, batch: PyTree, hvp_mode: str = "auto"
) -> tuple[jax.Array, Callable[[jax.Array], PyTree], Callable[[jax.Array], jax.Array]]:
    """`(flat_params [n], unravel, matvec)`, matvec: flat [n] -> H flat [n] (exact).

    With "linearize" the gradient's primal pass runs here, once; call this inside a jit and
    reuse `matvec`.
    """
    flat_params, unravel = ravel_pytree(params)

    def flat_gradient(flat):
        return ravel_pytree(jax.grad(loss_fn)(unravel(flat), batch))[0]

    if resolve_hvp_mode(hvp_mode) == "linearize":
        _, matvec = jax.linearize(flat_gradient, flat_params)
    else:
        def matvec(v):
            return jax.jvp(flat_gradient, (flat_params,), (v,))[1]
    return flat_params, unravel, matvec


# Backends whose default float32 matmuls are full float32, so that the default precision's
# products equal "highest"'s: there the noise floor is 0 by construction (measured on the CPU: 0,
# `tests/test_hessian_warm.py`), and `product_noise_floor` returns it without compiling the two
# products (about 9 s of compiling per run for a small transformer on a CPU).
EXACT_DEFAULT_PRECISION_BACKENDS = ("cpu",)


def product_noise_floor(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    vector: jax.Array,
    *,
    precision: str | None = None,
    product_transform: ProductTransform | None = None,
    always_measure: bool = False,
) -> jax.Array:
    """Relative error of the solver's products: ||H_p v - H v|| / ||H v|| (float scalar).

    0 without measuring on EXACT_DEFAULT_PRECISION_BACKENDS when neither `precision` nor
    `product_transform` is given, unless `always_measure`.

    H_p v is the product at matmul `precision` (None: JAX's default, e.g. TF32 on recent
    GPUs), through `product_transform` if given; H v is the product at "highest" precision.
    `vector` is flat [num_params]; pass the first check's top Ritz vector
    (`info.ritz_vectors[0]`): then ||H v|| ~ ||H|| and the value bounds the products' shift of
    the top Ritz value relative to ||H|| (|v^T E v| <= ||E v||). Measure it once per run and
    pass it as `noise_floor` to later checks.
    """
    exact = (jax.default_backend() in EXACT_DEFAULT_PRECISION_BACKENDS and precision is None
             and product_transform is None)
    if exact and not always_measure:
        return jnp.zeros((), vector.dtype)
    return _measured_noise_floor(loss_fn, params, batch, vector, precision=precision,
                                 product_transform=product_transform)


@functools.partial(jax.jit, static_argnames=("loss_fn", "precision", "product_transform"))
def _measured_noise_floor(loss_fn, params, batch, vector, *, precision, product_transform):
    """`product_noise_floor`, measured: the product at `precision` against "highest"."""
    _, _, matvec = hessian_operator(loss_fn, params, batch, "forward_over_reverse")
    with jax.default_matmul_precision(precision):
        product = matvec(vector)
    if product_transform is not None:
        product = product_transform(vector, product)
    with jax.default_matmul_precision("highest"):
        reference = matvec(vector)
    return jnp.linalg.norm(product - reference) / jnp.linalg.norm(reference)
