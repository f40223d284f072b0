"""Exact Hessian-vector products and the top of the Hessian's spectrum.

`top_eigenvalues` runs Lanczos (`sam_eos.lanczos`) with full reorthogonalisation on exact
Hessian-vector products, inside one jit-compiled function, so a run compiles it once per
parameter shape and every later check reuses the executable. A check can start warm from the
previous check's Ritz vectors (`start_vectors=info.ritz_vectors`): a cold start is the same
call with `start_vectors=None` (zeros), so warm and cold share one executable. The paper's own
estimator, power iteration on central finite differences, is kept as `method="power"` for
side-by-side comparisons.

A check can also run in bounded chunks, e.g. to read a stop flag in between: call with a fixed
`num_matvecs=C` (one executable), `start_vectors` the previous chunk's `info.ritz_vectors`
and `start_noise=0.0`, until `info.converged`; each chunk restarts from the previous one's Ritz
vectors (for k > 1 on clustered eigenvalues, prefer chunks of 32 products or more).

Accelerators: `product_noise_floor` measures the products' relative error at the default matmul
precision against "highest" (once per run); passed as `noise_floor`, it bounds the reported
`error_bound` from below. When it exceeds the tolerance, the tolerance cannot be met at that
precision: run the checks with `precision="highest"` (whose floor is 0 by this measure), or
keep the default and report `error_bound` as it is.

Memory: Lanczos stores its basis, `(min(max_iterations, 128) + 1) x num_params` numbers in the
parameters' dtype: 100 rows of the 2.8M-parameter MNIST MLP take 1.1 GB (float32).
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sam_eos import lanczos
from sam_eos.power_iteration import power_iteration
from sam_eos.types import LossFn, PyTree

# `(v, hv) -> hv'` on flat [n] vectors: a change applied to every product (tests inject noise).
ProductTransform = Callable[[jax.Array, jax.Array], jax.Array]

METHODS = ("lanczos", "power")
# Lanczos: the products allowed per call, over restarts from its Ritz vectors (the basis holds
# at most lanczos.MAX_BASIS_STEPS of them at once, so a huge value costs nothing unused).
DEFAULT_MAX_ITERATIONS = {"lanczos": 100, "power": 100}
# Lanczos stops when min(res, res^2 / gap), its estimate of each eigenvalue's error, is below
# tolerance * ||H||; 1e-5 leaves a margin of ten below the 1e-4 relative error asked of it.
# On clustered spectra the risk is stopping on lambda_2 before lambda_1 shows,
# and 1e-4 did so where 1e-5 did not (BENCHMARKS.md, warm-started checks).
DEFAULT_TOLERANCE = {"lanczos": 1e-5, "power": 1e-3}
# How Hessian-vector products are formed: "linearize" linearises the gradient once per check
# (one primal pass, reused by every product); "forward_over_reverse" is jvp(grad) per product.
HVP_MODES = ("auto", "linearize", "forward_over_reverse")
# "auto" per backend (absent: linearize). Measured (BENCHMARKS.md): linearize 0.91-0.97x
# the time of jvp(grad) on the CPU (MLP 3 x 200), 0.76x on an H200 (MNIST MLP 3 x 1000).
AUTO_HVP_MODE: dict[str, str] = {}
# Weight of the unit random vector added to a warm start's unit combination of Ritz vectors,
# so that a direction that has become the top one since the last check can still be found.
DEFAULT_START_NOISE = 1e-2
# Ritz vectors kept for the next warm start beyond the k asked for: the directions next in line
# can overtake the top k between two checks (measured: BENCHMARKS.md, warm starts).
DEFAULT_EXTRA_VECTORS = 2


class EigenInfo(NamedTuple):
    """Diagnostics of one eigensolver run (all jax scalars unless said)."""

    bottom_eigenvalue: jax.Array  # smallest Ritz value (Lanczos); nan for power iteration
    # Hessian-vector products used (int32); for power iteration, finite-difference products,
    # each of which costs two gradient evaluations.
    hessian_vector_products: jax.Array
    # Estimated error of the top eigenvalues relative to ||H||: for Lanczos, the larger of its
    # own estimate and the `noise_floor` it was given. What it promises: each of the k Ritz
    # values is within it of *an* eigenvalue (a residual bound, the larger of its values at the
    # last two steps, sharpened by the gap to the next Ritz value). It cannot promise that no
    # eigenvalue lies above the top one: a direction the Krylov space has barely seen (the new
    # top of a near-degenerate cluster, orthogonal to a warm start's block) can stay unseen.
    # How often that happens is measured, not promised: the loop's audits
    # (`--eigensolver_audit_every`) and the check_misses benchmark compare with cold solves.
    error_bound: jax.Array
    converged: jax.Array  # bool: met max(tolerance, noise_floor) before max_iterations
    # float [block_size, num_params]: the top unit Ritz vectors, flat in `ravel_pytree(params)`
    # order (zero rows where fewer were found); pass them as the next check's `start_vectors`.
    # Power iteration: its principal direction in row 0, zeros elsewhere.
    ritz_vectors: jax.Array | None = None


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


def warm_block_size(k: int, block_size: int | None = None) -> int:
    """Rows of `start_vectors` / `ritz_vectors` for k eigenvalues (default k + 2)."""
    return k + DEFAULT_EXTRA_VECTORS if block_size is None else max(block_size, k)


def cold_start_vectors(params: PyTree, k: int, block_size: int | None = None) -> jax.Array:
    """float zeros [warm_block_size(k, block_size), num_params]: the `start_vectors` of a cold
    start, shaped like a warm one (for a loop's state or a checkpoint before the first check)."""
    flat = jax.eval_shape(lambda p: ravel_pytree(p)[0], params)  # traced: no op compiled
    return jnp.zeros((warm_block_size(k, block_size), flat.size), flat.dtype)


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


# Options only Lanczos uses: giving one with method="power" is an error, not ignored.
LANCZOS_ONLY_OPTIONS = ("start_vectors", "block_size", "start_noise", "noise_floor", "hvp_mode",
                        "precision", "product_transform")


def top_eigenvalues(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    key: jax.Array,
    k: int = 1,
    *,
    method: str = "lanczos",
    num_matvecs: int | None = None,
    tolerance: float | None = None,
    start_vectors: jax.Array | None = None,
    block_size: int | None = None,
    start_noise: float | jax.Array | None = None,
    noise_floor: float | jax.Array | None = None,
    hvp_mode: str | None = None,
    precision: str | None = None,
    product_transform: ProductTransform | None = None,
) -> tuple[jax.Array, PyTree, EigenInfo]:
    """The k algebraically largest eigenvalues of the Hessian of `loss_fn` at `params`.

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`. It is a static argument of the compiled
        solver: pass the same function object on every call (a new lambda compiles anew).
      params, batch: pytrees; the Hessian is taken with respect to `params`.
      key: PRNG key of the random start (component).
      k: how many eigenvalues, a positive int; Lanczos finds at most
        min(num_params, lanczos.MAX_BASIS_STEPS = 128) in one call (its basis holds that many
        rows; a larger budget restarts, it does not widen the basis). Checked before compiling.
      method: "lanczos" (default; exact HVPs, full reorthogonalisation, stops when the
        estimated error of every top-k Ritz value, and of the bottom one when it may be the
        largest in magnitude, is below `max(tolerance, noise_floor) * ||H||`) or "power"
        (`sam_eos.power_iteration`, the original's estimator: power iteration on central
        finite differences, stopping when successive product norms agree to `tolerance`
        relatively; it returns magnitudes, the norms of the last products, estimating the
        largest |eigenvalues|; block power with Gram-Schmidt for k > 1).
      num_matvecs: the product budget, an int >= k: HVPs (Lanczos, restarting from its Ritz
        vectors every 128 steps, so any budget is allowed) or power iterations (each k
        finite-difference products); default 100. Static.
      tolerance: >= 0; default 1e-5 (Lanczos) or 1e-3 (power, as the original).
      The rest are Lanczos's only; any of them with method="power" is a ValueError:
      start_vectors: float [warm_block_size(k, block_size), num_params] (flat,
        `ravel_pytree` order), the previous check's `info.ritz_vectors`; None, all zeros or
        non-finite: a cold start. Lanczos starts from the rows with random weights (random
        signs, magnitudes in [0.5, 1.5]), so a top eigenvector that has turned across the rows
        is unlikely to cancel out of the start. Warm and cold calls share one compiled solver.
      block_size: Ritz vectors returned for the next warm start (default k + 2; static).
      start_noise: weight of a unit random vector added to a warm start (traced; default
        1e-2); 0 to continue a chunked solve exactly from the previous chunk.
      noise_floor: the products' relative error (`product_noise_floor`, traced; default 0);
        the reported error bound is at least this, and steps stop once the bound is below it.
      hvp_mode: "auto" (default; per backend, see AUTO_HVP_MODE), "linearize" or
        "forward_over_reverse".
      precision: matmul precision of the products (None: JAX's default; "highest" removes
        the TF32 noise floor on GPUs at a cost in time).
      product_transform: `(v, hv) -> hv'` applied to every product (tests: injected noise).
    Returns:
      `(eigenvalues, direction, info)`: eigenvalues float [k] in descending order, the unit
      eigenvector (a params-shaped pytree) of the first, and an `EigenInfo`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown eigensolver method {method!r}; choose one of {METHODS}")
    num_matvecs = DEFAULT_MAX_ITERATIONS[method] if num_matvecs is None else num_matvecs
    tolerance = DEFAULT_TOLERANCE[method] if tolerance is None else tolerance
    lanczos.check_options(k, num_matvecs, tolerance, cold_start_vectors(params, 1).shape[1],
                          solver=method)
    if method == "power":
        given = [name for name, value in zip(LANCZOS_ONLY_OPTIONS, (
            start_vectors, block_size, start_noise, noise_floor, hvp_mode, precision,
            product_transform), strict=True) if value is not None]
        if given:
            raise ValueError(f"method='power' does not use {', '.join(given)}")
        eigenvalues, direction, info = _power_iteration(
            loss_fn, params, batch, key, jnp.float32(tolerance), k=k,
            max_iterations=num_matvecs,
        )
        flat_direction = ravel_pytree(direction)[0]
        block = cold_start_vectors(params, k).at[0].set(flat_direction)
        return eigenvalues, direction, info._replace(ritz_vectors=block)
    if start_vectors is None:
        start_vectors = cold_start_vectors(params, k, block_size)
    return _lanczos_check(
        loss_fn, params, batch, key, jnp.float32(tolerance),
        jnp.float32(0.0 if noise_floor is None else noise_floor), start_vectors,
        jnp.float32(DEFAULT_START_NOISE if start_noise is None else start_noise), k=k,
        max_iterations=num_matvecs, block_size=warm_block_size(k, block_size),
        hvp_mode=resolve_hvp_mode(hvp_mode or "auto"), precision=precision,
        product_transform=product_transform,
    )


def lanczos_iterations_allowed(num_params: int, max_iterations: int) -> int:
    """Lanczos steps one cycle holds: a Krylov space has at most `num_params` dimensions, and
    the basis at most lanczos.MAX_BASIS_STEPS rows (then Lanczos restarts)."""
    return lanczos.basis_steps(num_params, max_iterations)


@functools.partial(
    jax.jit,
    static_argnames=("loss_fn", "k", "max_iterations", "block_size", "hvp_mode", "precision",
                     "product_transform"),
)
def _lanczos_check(loss_fn, params, batch, key, tolerance, noise_floor, start_vectors,
                   start_noise, *, k, max_iterations, block_size, hvp_mode, precision,
                   product_transform):
    """One Lanczos check: `(top [k], principal direction pytree, EigenInfo)`."""
    with jax.default_matmul_precision(precision):
        flat_params, unravel, matvec = hessian_operator(loss_fn, params, batch, hvp_mode)

    def product(v):
        with jax.default_matmul_precision(precision):
            hv = matvec(v)
        return hv if product_transform is None else product_transform(v, hv)

    start_vectors = start_vectors.astype(flat_params.dtype)
    result = lanczos.solve(
        product, start_vectors, key, tolerance, noise_floor, start_noise, k=k,
        max_steps=max_iterations, block_size=block_size,
    )
    info = EigenInfo(
        bottom_eigenvalue=result.bottom,
        hessian_vector_products=result.steps,
        error_bound=jnp.maximum(result.bound, noise_floor),
        converged=result.converged,
        ritz_vectors=result.vectors,
    )
    return result.top, unravel(result.vectors[0]), info


def _power_iteration(loss_fn, params, batch, key, tolerance, *, k, max_iterations):
    """`power_iteration.power_iteration` (the original's estimator) with an `EigenInfo`."""
    result = power_iteration(loss_fn, params, batch, key, tolerance, k=k,
                             max_iterations=max_iterations)
    nan = jnp.asarray(jnp.nan, result.magnitudes.dtype)
    info = EigenInfo(nan, result.iterations * k, nan, result.converged)
    return result.magnitudes, result.direction, info
