"""The one eigensolver path: warm-started Lanczos on a curvature operator, optax-style.

`init` gives a cold start's state; `update` solves at a point, warm-started from the state,
and returns an `EigenInfo` (`sam_eos.lanczos`) and the state for the next solve:

    state = eigensolver.init(params, k=1)
    info, state = eigensolver.update(loss_fn, params, batch, key, state, k=1)

The operator is the Hessian H; with `rho_eff`, H + rho_eff H^2; with a diagonal
`preconditioner` P, P^-1/2 (.) P^-1/2 (`sam_eos.effective_sharpness`). A solve can run in
bounded chunks, e.g. to read a stop flag in between: a fixed `num_matvecs`, the previous
chunk's state and `start_noise=0`, until `info.converged`; each chunk restarts from the
previous one's Ritz vectors (for k > 1 on clustered eigenvalues, prefer chunks of 32 products
or more).

`update` is pure: its callers jit it once (`top_eigenvalues`, `SharpnessTracker`, the loop's
checks), once per parameter shape for warm and cold starts alike. The original's estimator,
power iteration on finite differences, is its own function (`sam_eos.power_iteration`).

Accelerators: `sam_eos.hessian.product_noise_floor` measures the products' relative error at
the default matmul precision against "highest" (once per run); passed as `noise_floor`, it
bounds `error_bound` from below. A tolerance below it cannot be met: solve with
`precision="highest"`, or keep the default and report `error_bound` as it is.

Layout: the state's Ritz vectors, the basis and every product's vector are row-stacked pytrees
in the layout of `params` (`sam_eos.rows`: each leaf [rows, *leaf_shape]), so a product needs
no flattening, and with sharded parameters (`NamedSharding`s) each leaf stays sharded as its
parameter, its rows axis replicated. A flat state, [rows, num_params] in `ravel_pytree(params)`
order (`init(..., flat=True)`, the training loop's checkpointed layout), is solved flat.

Memory: the Lanczos basis holds `basis_size` vectors of num_params (default
`lanczos.default_basis_size(block)`, 14 for k = 1), float32 or wider, whatever the budget: a
thick restart keeps the top Ritz vectors when it is full. Low-precision parameters (bfloat16,
float16) are solved in float32: each product casts its vector to the parameters' dtype and its
result back. The products keep their precision's rounding: measure it with
`hessian.product_noise_floor` (against float32 products at the upcast parameters) on a first
solve's top Ritz vector and pass it as `noise_floor` (`SharpnessTracker` does this itself).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sam_eos import lanczos, rows, trainable
from sam_eos.effective_sharpness import effective_sharpness_matvec, products_per_matvec
from sam_eos.hessian import ProductTransform, resolve_hvp_mode
from sam_eos.lanczos import EigenInfo
from sam_eos.types import LossFn, PyTree

# The products allowed per solve, over thick restarts (the basis holds `basis_size` vectors
# whatever the budget, so a huge value costs nothing unused).
DEFAULT_NUM_MATVECS = 100
# Lanczos stops when min(res, res^2 / gap), its estimate of each eigenvalue's error, is below
# tolerance * ||H||; 1e-5 leaves a margin of ten below the 1e-4 relative error asked of it.
# On clustered spectra the risk is stopping on lambda_2 before lambda_1 shows,
# and 1e-4 did so where 1e-5 did not (BENCHMARKS.md, warm-started checks).
DEFAULT_TOLERANCE = 1e-5
# Weight of the unit random vector added to a warm start's combination of Ritz vectors,
# so that a direction that has become the top one since the last solve can still be found.
DEFAULT_START_NOISE = 1e-2
# Ritz vectors kept for the next warm start beyond the k asked for: the directions next in line
# can overtake the top k between two solves (measured: BENCHMARKS.md, warm starts).
DEFAULT_EXTRA_VECTORS = 2


class SolverState(NamedTuple):
    """What one solve leaves for the next: its Ritz vectors in `solver_dtype`, row-stacked in
    the layout of `params` (a params-shaped pytree whose leaves are [block, *leaf_shape],
    sharded as the parameters with the rows axis replicated), or flat [block, num_params] in
    `ravel_pytree(params)` order; all zeros: a cold start."""

    ritz_vectors: PyTree


def solver_dtype(dtype) -> jnp.dtype:
    """The dtype of the solver's vectors for parameters of `dtype`: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def warm_block_size(k: int, block_size: int | None = None) -> int:
    """Rows of a state's Ritz vectors for k eigenvalues (default k + DEFAULT_EXTRA_VECTORS)."""
    return k + DEFAULT_EXTRA_VECTORS if block_size is None else max(block_size, k)


def init(params: PyTree, k: int = 1, block_size: int | None = None,
         num_matvecs: int | None = None, basis_size: int | None = None, *,
         flat: bool = False) -> SolverState:
    """A cold start: zero rows in `solver_dtype`, row-stacked as `params` (each leaf
    [rows, *leaf_shape], with a leaf's `NamedSharding` extended by a replicated rows axis), or
    with `flat` one array [rows, num_params]. `warm_block_size(k, block_size)` rows, fewer when
    one basis of `basis_size` vectors or `num_matvecs` products holds fewer (a solve returns at
    most that many), never fewer than k. Nothing is compiled."""
    size = jax.eval_shape(lambda p: ravel_pytree(p)[0], params)
    count = warm_block_size(k, block_size)
    if num_matvecs is not None:
        basis = lanczos.default_basis_size(count) if basis_size is None else basis_size
        count = max(min(count, lanczos.basis_steps(size.size, num_matvecs, basis)), k)
    dtype = solver_dtype(size.dtype)
    if flat:
        return SolverState(jnp.zeros((count, size.size), dtype))
    shardings = rows.vector_shardings(params)

    def zeros(leaf, sharding):
        placement = None if sharding is None else rows.rows_sharding(sharding)
        return jnp.zeros((count, *jnp.shape(leaf)), dtype, device=placement)

    leaves, treedef = jax.tree.flatten(params)
    return SolverState(jax.tree.unflatten(treedef, [
        zeros(leaf, sharding) for leaf, sharding in
        zip(leaves, shardings or (None,) * len(leaves), strict=True)]))


def update(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    key: jax.Array,
    state: SolverState,
    *,
    k: int = 1,
    num_matvecs: int = DEFAULT_NUM_MATVECS,
    tolerance: float | jax.Array = DEFAULT_TOLERANCE,
    noise_floor: float | jax.Array = 0.0,
    start_noise: float | jax.Array = DEFAULT_START_NOISE,
    rho_eff: float | jax.Array = 0.0,
    preconditioner: PyTree | None = None,
    hvp_mode: str = "auto",
    precision: str | None = None,
    product_transform: ProductTransform | None = None,
    basis_size: int | None = None,
    shardings: tuple | None = None,
    threshold: float | jax.Array = -jnp.inf,
) -> tuple[EigenInfo, SolverState]:
    """The top-k eigenpairs of the operator at `params` on `batch`, warm-started from `state`.

    Pure; trace it inside a jit (k, num_matvecs, hvp_mode, precision, product_transform and
    whether rho_eff is a Python 0 or preconditioner None are static; the rest may be traced).

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`; H is its Hessian in `params`.
      key: PRNG key of the random start component and of breakdown restarts.
      state: `init(...)`'s or the previous solve's; its rows are the block returned, in its
        layout (params-shaped rows or flat ones, `SolverState`).
      k: how many eigenvalues; num_matvecs: the operator products allowed, all restart cycles
        together (each one HVP, two with a rho_eff that is not a Python 0).
      tolerance: >= 0; stop when the estimated error of every top-k Ritz value, and of the
        bottom one when it may be the largest in magnitude, is below
        `max(tolerance, noise_floor) * ||A||`.
      noise_floor: the products' relative error (`hessian.product_noise_floor`: TF32 matmuls,
        bfloat16/float16 params, or mixed precision given its `reference_loss_fn`); the
        reported bound is at least it.
      start_noise: weight of a unit random vector added to a warm start; 0 to continue a
        chunked solve exactly from the previous chunk.
      rho_eff, preconditioner: the operator, as `effective_sharpness_operator`.
      hvp_mode: "auto", "linearize" or "forward_over_reverse" (`hessian.hessian_operator`).
      precision: matmul precision of the products (None: JAX's default; "highest" removes
        the TF32 noise floor on GPUs at a cost in time).
      product_transform: `(v, av) -> av'` on flat [num_params] vectors, applied to every
        product (tests: injected noise; it flattens each product).
      basis_size: vectors of num_params the Lanczos basis holds, >= k + 2 (static; None:
        `lanczos.default_basis_size`): memory against products.
      shardings: static, `rows.vector_shardings(params)` (each leaf's `NamedSharding`) or None:
        a params-shaped state's vectors are held sharded so (`lanczos.solve`).
      threshold: in the operator's units; only the top eigenvalues above it and the first
        below it must converge (`lanczos.solve`); -inf: all k.
    Returns:
      `(info, next state)`; `info.hessian_vector_products` counts HVPs.
    """
    with jax.default_matmul_precision(precision):
        operator = effective_sharpness_matvec(
            loss_fn, params, batch, rho_eff=rho_eff, preconditioner=preconditioner,
            hvp_mode=hvp_mode)
    start = state.ritz_vectors
    stacked = rows.is_stacked(start, params)
    dtype = solver_dtype(jnp.result_type(*jax.tree.leaves(params)))

    def matvec(v: PyTree) -> PyTree:
        """A product in the state's layout, computed in the params' own."""
        vector = v if stacked else rows.row(rows.unravel(v[None], params), 0)
        vector = jax.tree.map(lambda x, p: x.astype(jnp.result_type(p)), vector, params)
        with jax.default_matmul_precision(precision):
            product = operator(vector)
        if product_transform is not None:
            flat, unravel = ravel_pytree(vector)
            product = unravel(product_transform(flat, ravel_pytree(product)[0]))
        product = jax.tree.map(lambda x: x.astype(dtype), product)
        return product if stacked else ravel_pytree(product)[0]

    info = lanczos.solve(
        matvec, jax.tree.map(lambda x: x.astype(dtype), start), key,
        jnp.asarray(tolerance, dtype), jnp.asarray(noise_floor, dtype),
        jnp.asarray(start_noise, dtype), k=k, num_matvecs=num_matvecs,
        block_size=rows.count(start), basis_size=basis_size,
        shardings=shardings if stacked else None, threshold=threshold)
    info = info._replace(
        ritz_vectors=jax.tree.map(lambda x, s: x.astype(s.dtype), info.ritz_vectors, start),
        hessian_vector_products=info.hessian_vector_products * products_per_matvec(rho_eff))
    return info, SolverState(info.ritz_vectors)


def top_eigenvalues(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    key: jax.Array,
    k: int = 1,
    *,
    num_matvecs: int = DEFAULT_NUM_MATVECS,
    tolerance: float = DEFAULT_TOLERANCE,
    start_vectors: PyTree | None = None,
    block_size: int | None = None,
    start_noise: float | jax.Array = DEFAULT_START_NOISE,
    noise_floor: float | jax.Array = 0.0,
    hvp_mode: str = "auto",
    precision: str | None = None,
    product_transform: ProductTransform | None = None,
    basis_size: int | None = None,
) -> tuple[jax.Array, PyTree, EigenInfo]:
    """The k algebraically largest eigenvalues of the Hessian of `loss_fn` at `params`.

    One compiled `update` (exact HVPs, Lanczos with full reorthogonalisation): a run compiles
    it once per parameter shape and every later call reuses the executable.

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`. It is a static argument of the compiled
        solver: pass the same function object on every call (a new lambda compiles anew).
      params, batch: pytrees; the Hessian is taken with respect to `params`.
      key: PRNG key of the random start (component).
      k: how many eigenvalues, a positive int, at most num_params and `basis_size - 2`.
        Checked before compiling.
      num_matvecs: the HVP budget, an int >= k (static); the basis restarts from its Ritz
        vectors whenever it is full, so any budget is allowed.
      tolerance: >= 0, as `update`'s (traced).
      start_vectors: the previous call's `info.ritz_vectors` (rows in the layout of `params`,
        each leaf [block, *leaf_shape]; or flat [block, num_params] in `ravel_pytree` order,
        and then `info.ritz_vectors` is flat too), combined with random weights
        (`lanczos.start_vector`); None (zeros in the params' layout, `init`), all zeros or
        non-finite: a cold start.
      block_size: Ritz vectors returned for the next warm start when `start_vectors` is None
        (default k + 2; static); else as many as `start_vectors` has rows.
      start_noise, noise_floor, hvp_mode, precision, product_transform, basis_size: as
        `update`'s.
    Returns:
      `(eigenvalues, direction, info)`: eigenvalues float [k] in descending order, the unit
      eigenvector (a params-shaped pytree, each leaf sharded as its parameter) of the first,
      and an `EigenInfo`.
    """
    trainable.check_params(params)
    flat = jax.eval_shape(lambda p: ravel_pytree(p)[0], params)
    lanczos.check_options(k, num_matvecs, tolerance, flat.size, basis_size=basis_size)
    state = init(params, k, block_size) if start_vectors is None else SolverState(start_vectors)
    return _top_eigenvalues(
        loss_fn, params, batch, key, state, jnp.float32(tolerance), jnp.float32(noise_floor),
        jnp.float32(start_noise), k=k, num_matvecs=num_matvecs,
        hvp_mode=resolve_hvp_mode(hvp_mode), precision=precision,
        product_transform=product_transform, basis_size=basis_size,
        shardings=rows.vector_shardings(params))


def top_direction(ritz_vectors: PyTree, params: PyTree, shardings: tuple | None = None
                  ) -> PyTree:
    """The first Ritz vector of a block (either layout, `SolverState`) as a params pytree, in
    the params' dtypes and, given `shardings` (`rows.vector_shardings`), their shardings."""
    first = jax.tree.map(lambda x: x[:1], ritz_vectors)  # unravel one row, not the block
    direction = rows.row(first if rows.is_stacked(first, params) else rows.unravel(first, params),
                         0)
    direction = jax.tree.map(lambda x, p: x.astype(jnp.result_type(p)), direction, params)
    return rows.constrain(direction, shardings, stacked=False)


@functools.partial(jax.jit, static_argnames=("loss_fn", "k", "num_matvecs", "hvp_mode",
                                             "precision", "product_transform", "basis_size",
                                             "shardings"))
def _top_eigenvalues(loss_fn, params, batch, key, state, tolerance, noise_floor, start_noise,
                     **options):
    info, _ = update(loss_fn, params, batch, key, state, tolerance=tolerance,
                     noise_floor=noise_floor, start_noise=start_noise, **options)
    direction = top_direction(info.ritz_vectors, params, options["shardings"])
    return info.eigenvalues, direction, info
