"""Exact Hessian-vector products: `hvp` on pytrees, `tree_operator` (a params-shaped vector in
and out, the solvers' products) and `hessian_operator` on flat vectors, and
`product_noise_floor`, the products' relative error at a matmul precision.

The top of the spectrum is found from these products by `sam_eos.eigensolver` (Lanczos).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from sam_eos import convolutions, rows
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


def tree_operator(loss_fn: LossFn, params: PyTree, batch: PyTree, hvp_mode: str = "auto"
                  ) -> Callable[[PyTree], PyTree]:
    """matvec: a params-shaped vector v -> H v, params-shaped (exact), leaf by leaf in the
    params' own layout and sharding: nothing is flattened.

    With "linearize" the gradient's primal pass runs here, once; call this inside a jit and
    reuse `matvec`. On the CPU its convolutions are in XLA's canonical layout, so that a
    product inside a loop runs Eigen's kernels, as a standalone one does
    (`sam_eos.convolutions`).
    """
    def gradient(p):
        return jax.grad(loss_fn)(p, batch)

    if resolve_hvp_mode(hvp_mode) == "linearize":
        matvec = jax.linearize(gradient, params)[1]
    else:
        def matvec(v):
            return jax.jvp(gradient, (params,), (v,))[1]
    return convolutions.for_backend(matvec)


def hessian_operator(
    loss_fn: LossFn, params: PyTree, batch: PyTree, hvp_mode: str = "auto"
) -> tuple[jax.Array, Callable[[jax.Array], PyTree], Callable[[jax.Array], jax.Array]]:
    """`(flat_params [n], unravel, matvec)`, matvec: flat [n] -> H flat [n] (exact): the
    `tree_operator` between `ravel_pytree` layouts, as `tree_operator` computes it."""
    flat_params, unravel = ravel_pytree(params)
    matvec = tree_operator(loss_fn, params, batch, hvp_mode)
    return flat_params, unravel, lambda v: ravel_pytree(matvec(unravel(v)))[0]


# Backends whose default float32 matmuls are full float32, so that the default precision's
# products equal "highest"'s: there the noise floor is 0 by construction (measured on the CPU: 0,
# `tests/test_hessian_warm.py`), and `product_noise_floor` returns it without compiling the two
# products (about 9 s of compiling per run for a small transformer on a CPU).
EXACT_DEFAULT_PRECISION_BACKENDS = ("cpu",)


def low_precision(params: PyTree) -> bool:
    """Whether some floating leaf of `params` is narrower than float32 (bfloat16, float16): its
    products then carry that precision's rounding. Static: reads dtypes only."""
    return any(jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
               and jnp.finfo(jnp.result_type(leaf)).bits < 32
               for leaf in jax.tree.leaves(params))


def upcast_params(params: PyTree) -> PyTree:
    """`params` with every leaf at least float32 (bfloat16 and float16 leaves cast up)."""
    return jax.tree.map(
        lambda p: jnp.asarray(p, jnp.promote_types(jnp.result_type(p), jnp.float32)), params)


def product_noise_floor(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    vector: jax.Array,
    *,
    precision: str | None = None,
    product_transform: ProductTransform | None = None,
    always_measure: bool = False,
    reference_loss_fn: LossFn | None = None,
) -> jax.Array:
    """Relative error of the solver's products: ||H_p v - H v|| / ||H v|| (float32 scalar).

    H_p v is the product the solver forms: `loss_fn` at `params` as they are (bfloat16 or
    float16 leaves: in that dtype, `vector` cast to it), at matmul `precision` (None: JAX's
    default, e.g. TF32 on recent GPUs), through `product_transform` if given. H v is the
    reference: `reference_loss_fn` (default `loss_fn`) at `params` upcast to float32, `vector`
    in float32, at "highest" precision. So it measures TF32 matmuls, low-precision parameters
    (a loss that computes in the parameters' dtype computes in float32 on the upcast ones), and,
    given `reference_loss_fn`, mixed precision: float32 parameters with a `loss_fn` that
    computes in bfloat16 inside, against `reference_loss_fn`, the same loss in float32.
    A loss that casts to a low precision inside whatever its parameters' dtype needs
    `reference_loss_fn` too: else the reference computes in that precision and the value is low.

    0 without measuring on EXACT_DEFAULT_PRECISION_BACKENDS when nothing differs from the
    reference but the matmuls (no `precision`, `product_transform` or `reference_loss_fn`, no
    low-precision leaf), unless `always_measure`.

    `vector` is params-shaped, or flat [num_params] in `ravel_pytree(params)` order; pass the
    first check's top Ritz vector (`eigensolver.top_direction(info.ritz_vectors, params)`, or
    a flat block's `info.ritz_vectors[0]`): then ||H v|| ~ ||H|| and the value bounds the
    products' shift of the top Ritz value relative to ||H|| (|v^T E v| <= ||E v||). Measure it
    once per run and pass it as `noise_floor` to later checks.
    """
    exact = (jax.default_backend() in EXACT_DEFAULT_PRECISION_BACKENDS and precision is None
             and product_transform is None and reference_loss_fn is None
             and not low_precision(params))
    if exact and not always_measure:
        return jnp.zeros((), jnp.promote_types(jnp.result_type(*jax.tree.leaves(vector)),
                                                jnp.float32))
    return _measured_noise_floor(loss_fn, params, batch, vector, precision=precision,
                                 product_transform=product_transform,
                                 reference_loss_fn=reference_loss_fn)


def measured_noise_floor(loss_fn, params, batch, vector, *, precision=None,
                         product_transform=None, reference_loss_fn=None) -> jax.Array:
    """`product_noise_floor`, always measured, in the params' own layout; pure, to trace
    inside a jit."""
    if not rows.shaped_as(vector, params):  # flat [num_params]
        vector = rows.row(rows.unravel(vector[None], params), 0)
    dtype = jnp.promote_types(jnp.result_type(*jax.tree.leaves(vector)), jnp.float32)
    matvec = tree_operator(loss_fn, params, batch, "forward_over_reverse")
    low = jax.tree.map(lambda x, p: x.astype(jnp.result_type(p)), vector, params)
    with jax.default_matmul_precision(precision):
        product = matvec(low)
    if product_transform is not None:
        flat, unravel = ravel_pytree(low)
        product = unravel(product_transform(flat, ravel_pytree(product)[0]))
    reference_matvec = matvec  # float32 params, the same loss: only the precision differs
    if low_precision(params) or reference_loss_fn is not None:
        reference_matvec = tree_operator(
            loss_fn if reference_loss_fn is None else reference_loss_fn, upcast_params(params),
            batch, "forward_over_reverse")
    with jax.default_matmul_precision("highest"):
        reference = reference_matvec(jax.tree.map(lambda x: x.astype(dtype), vector))
    reference = jax.tree.map(lambda x: x.astype(dtype), reference)
    error = jax.tree.map(lambda a, b: a.astype(dtype) - b, product, reference)
    return otu.tree_norm(error) / otu.tree_norm(reference)


_measured_noise_floor = jax.jit(
    measured_noise_floor,
    static_argnames=("loss_fn", "precision", "product_transform", "reference_loss_fn"))
