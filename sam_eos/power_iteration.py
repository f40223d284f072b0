"""The original code's sharpness estimator: power iteration on finite-difference products.

Each product is a central difference of gradients, exactly as the original computes it:

    FD(v) = (grad L(theta + 1e-3 v) - grad L(theta - 1e-3 v)) / (2 * 1e-3 + 1e-5)

From a random unit start v_0, iteration t forms p_t = FD(v_{t-1}) and v_t = p_t / ||p_t||. It
stops after the first iteration whose norm ||p_t|| is within `tolerance` (relative to ||p_t||)
of the previous one (||p_0|| counts as 1, the start's norm, as in the original), or is at most
1e-3, or after `num_matvecs` iterations. It returns ||p_t|| (which equals v_t . p_t, the original's
value) and v_t. So the value is a magnitude, >= 0: the largest |eigenvalue| when iteration
converges, biased upwards on ReLU networks, where a gradient difference across the kinks of
the activations adds to H v (see BENCHMARKS.md).

Low-precision parameters (bfloat16, float16) are upcast to float32 first: the loss is called on
float32 copies and the vectors and differences are float32 (in bfloat16 a step of 1e-3 is below
the rounding of most weights, and the differences round away). A loss that casts the parameters
back to their low precision inside still loses the step: it sees the original values.

For k > 1 the same runs on a block of k vectors: the products are orthonormalised by
Gram-Schmidt (in order) and the values are the norms of the orthogonalised products (|R_ii| of
a QR factorisation), which approach the k largest |eigenvalues|; iteration stops when every
value meets the relative test or the largest is at most 1e-3. For k = 1 this is the original.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sam_eos import convolutions
from sam_eos.hessian import upcast_params
from sam_eos.lanczos import EigenInfo, check_options
from sam_eos.types import LossFn, PyTree

FINITE_DIFFERENCE_OFFSET = 1e-3  # the original's DIFFERENTIATION_STEP_SIZE
FINITE_DIFFERENCE_DENOMINATOR = 2 * FINITE_DIFFERENCE_OFFSET + 1e-5  # the original's, eps added
NORM_FLOOR = 1e-3  # iteration stops once a product's norm is at most this
DEFAULT_TOLERANCE = 1e-3
DEFAULT_NUM_MATVECS = 100  # iterations, each k products


class PowerResult(NamedTuple):
    """What `power_iteration` returns (jax arrays)."""

    magnitudes: jax.Array  # float [k], descending: the last products' (orthogonalised) norms
    direction: PyTree  # unit vector, params-shaped: the direction of the first value's product
    iterations: jax.Array  # int32: iterations taken; each forms k products (2k gradients)
    converged: jax.Array  # bool: stopped by the norm tests with a finite value, not by the cap


def finite_difference_hvp(loss_fn: LossFn, params: PyTree, batch: PyTree, v: PyTree) -> PyTree:
    """The original's central-difference approximation of H(params) v: a params pytree."""
    gradient = jax.grad(loss_fn)

    def shifted(sign: float) -> PyTree:
        moved = jax.tree.map(lambda p, d: p + sign * FINITE_DIFFERENCE_OFFSET * d, params, v)
        return gradient(moved, batch)

    return jax.tree.map(
        lambda plus, minus: (plus - minus) / FINITE_DIFFERENCE_DENOMINATOR,
        shifted(1.0),
        shifted(-1.0),
    )


def _gram_schmidt(products: jax.Array, previous: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Orthonormal rows spanning `products` [k, n] in order, and each row's norm before
    normalising [k]. A zero row keeps the previous vector's row instead of dividing by zero."""
    rows, norms = [], []
    for i in range(products.shape[0]):
        row = products[i]
        for q in rows:
            row = row - jnp.vdot(q, row) * q
        norm = jnp.linalg.norm(row)
        rows.append(jnp.where(norm > 0, row / jnp.where(norm > 0, norm, 1.0), previous[i]))
        norms.append(norm)
    return jnp.stack(rows), jnp.stack(norms)


def _keeps_going(norms: jax.Array, previous: jax.Array, tolerance: jax.Array) -> jax.Array:
    """The original's loop test: some norm still moves by more than `tolerance` relatively and
    the largest is above NORM_FLOOR. False on nan, so a diverged run stops at once."""
    moving = jnp.any(jnp.abs(norms - previous) > tolerance * norms)
    return moving & (jnp.max(norms) > NORM_FLOOR)


def power_iteration(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    key: jax.Array,
    tolerance: float | jax.Array = DEFAULT_TOLERANCE,
    *,
    k: int = 1,
    num_matvecs: int = DEFAULT_NUM_MATVECS,
) -> PowerResult:
    """The original's estimate of the k largest |eigenvalues| of the Hessian at `params`.

    `key` draws the Gaussian start, normalised per vector; `tolerance` is traced (changing it
    does not recompile; a negative one leaves only the budget to stop it). `loss_fn`, `k` and
    `num_matvecs`, the iterations allowed (each forms k products), are static and checked
    before compiling. See the module's docstring for the iteration and what is returned.
    """
    num_params = jax.eval_shape(lambda p: ravel_pytree(p)[0], params).size
    check_options(k, num_matvecs, tolerance, num_params, solver="power")
    return _power_iteration(loss_fn, params, batch, key, tolerance, k=k,
                            num_matvecs=num_matvecs)


@functools.partial(jax.jit, static_argnames=("loss_fn", "k", "num_matvecs"))
def _power_iteration(loss_fn, params, batch, key, tolerance, *, k, num_matvecs):
    original_flat, original_unravel = ravel_pytree(params)
    params = upcast_params(params)  # float32 finite differences (module docstring)
    flat_params, unravel = ravel_pytree(params)
    dtype = flat_params.dtype

    # Inside the loop, on the CPU, its convolutions in XLA's canonical layout (as a standalone
    # gradient's are): `sam_eos.convolutions`.
    @convolutions.for_backend
    def products_of(vectors: jax.Array) -> jax.Array:  # [k, n] -> [k, n]
        product = lambda v: ravel_pytree(  # noqa: E731
            finite_difference_hvp(loss_fn, params, batch, unravel(v)))[0]
        return jax.vmap(product)(vectors)

    def body(state):
        i, vectors, norms, _ = state
        new_vectors, new_norms = _gram_schmidt(products_of(vectors), vectors)
        return i + 1, new_vectors, new_norms, _keeps_going(new_norms, norms, tolerance)

    def cond(state):
        i, _, _, going = state
        return going & (i < num_matvecs)

    start = jax.random.normal(key, (k, flat_params.size), dtype)
    start = start / jnp.linalg.norm(start, axis=1, keepdims=True)
    state = (jnp.int32(0), start, jnp.ones((k,), dtype), jnp.bool_(True))
    iterations, vectors, norms, going = jax.lax.while_loop(cond, body, state)
    order = jnp.argsort(-norms)
    converged = ~going & jnp.all(jnp.isfinite(norms))
    direction = original_unravel(vectors[order[0]].astype(original_flat.dtype))
    return PowerResult(norms[order], direction, iterations, converged)


def eigen_info(result: PowerResult, block: jax.Array) -> EigenInfo:
    """`result` read as an `EigenInfo`, for tables beside Lanczos: its magnitudes as the
    eigenvalues, its direction (flat) as the first row of zeros shaped like `block` [rows, n]
    (a next warm start's block), iterations x k products, and nan bottom eigenvalue and error
    bound (power iteration estimates neither). Pure."""
    k = result.magnitudes.shape[0]
    direction = ravel_pytree(result.direction)[0].astype(block.dtype)
    return EigenInfo(
        eigenvalues=result.magnitudes,
        ritz_vectors=jnp.zeros_like(block).at[0].set(direction),
        bottom_eigenvalue=jnp.asarray(jnp.nan, result.magnitudes.dtype),
        hessian_vector_products=result.iterations * k,
        error_bound=jnp.asarray(jnp.nan, result.magnitudes.dtype),
        converged=result.converged)
