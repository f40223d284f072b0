"""Lanczos for the top of a symmetric operator's spectrum: warm starts, restarts, bounded work.

`solve` runs Lanczos with full reorthogonalisation on a flat `matvec` (`[n] -> [n]`), traced
inside the caller's jit. It starts from a block of previous Ritz vectors when given one (a warm
start: the rows with random weights, `start_vector`) plus a small random component, and
restarts from its own top-k Ritz vectors whenever the basis is full, so the number of products
allowed (`num_matvecs`) is a budget, not a size:

- the basis holds at most `MAX_BASIS_STEPS + 1` vectors, whatever `num_matvecs`;
- each step's tridiagonal eigenproblem has the size of the smallest bucket in `_ritz_sizes`
  that holds the steps taken so far, not the size of the basis;
- orthogonalisation sweeps only the rows filled so far.

So a step costs O(steps so far x n) and a huge `num_matvecs` costs nothing until it is used.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sam_eos.types import Matvec

# Basis rows held at once (the top few eigenvalues take 3-30 steps to 1e-4): longer runs
# restart from their Ritz vectors, so memory stays (MAX_BASIS_STEPS + 1) x n (1.4 GB for 2.8M
# float32 parameters) and a step's orthogonalisation, O(rows x n), stays bounded.
MAX_BASIS_STEPS = 128
BLOCK_ROWS = 8  # basis rows orthogonalised against per block
REORTHOGONALISE_BELOW = 2**-0.5  # sweep again when a sweep leaves less than this of ||w||
# Bucket sizes of the tridiagonal eigenproblem: 16, 64, ... up to the basis (one eigh each to
# compile; a 64 x 64 eigh is cheap next to a product).
SMALLEST_RITZ_SIZE = 16
RITZ_SIZE_GROWTH = 4


class EigenInfo(NamedTuple):
    """What an eigensolver found (jax arrays): `solve`'s result, and `sam_eos.top_eigenvalues`'
    and `sam_eos.eigensolver.update`'s, whose products are Hessian-vector products."""

    eigenvalues: jax.Array  # float [k], the k algebraically largest Ritz values, descending
    # float [block, n]: the unit Ritz vectors (rows) of the `block` largest Ritz values, flat
    # (`ravel_pytree(params)` order for a Hessian); rows past the steps taken are zero. Pass
    # them as the next solve's start block (a warm start).
    ritz_vectors: jax.Array
    bottom_eigenvalue: jax.Array  # float scalar, the smallest Ritz value of the last cycle
    # int32 scalar: products used, all cycles together (`solve`: of `matvec`; the Hessian
    # solvers: Hessian-vector products, two per product of H + rho_eff H^2)
    hessian_vector_products: jax.Array
    # float scalar: estimated error of `eigenvalues` relative to ||A||. What it promises: each
    # of the k Ritz values is within it of *an* eigenvalue (a residual bound, the larger of its
    # values at the last two steps, sharpened by the gap to the next Ritz value; at least the
    # `noise_floor` the Hessian solvers are given). It cannot promise that no eigenvalue lies
    # above the top one: a direction the Krylov space has barely seen (the new top of a
    # near-degenerate cluster, orthogonal to a warm start's block) can stay unseen. How often
    # that happens is measured, not promised: the loop's audits (`--eigensolver_audit_every`)
    # and the check_misses benchmark compare with cold solves.
    error_bound: jax.Array
    converged: jax.Array  # bool scalar: bound <= max(tolerance, noise_floor), or space exhausted


def check_options(k, num_matvecs, tolerance, num_params: int, solver: str = "lanczos") -> None:
    """ValueError, naming the argument, unless k and `num_matvecs` are positive ints,
    k <= num_params and, for Lanczos, `tolerance` >= 0 (a traced one is not checked) and k <=
    the budget and the steps one cycle holds. Power iteration takes a negative tolerance: only
    its budget then stops it, as in the original."""
    for name, value in (("k", k), ("num_matvecs", num_matvecs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, not {value!r}")
    if k > num_params:
        raise ValueError(f"k={k} is more eigenvalues than num_params={num_params}")
    if solver != "lanczos":
        return
    try:
        negative = not float(tolerance) >= 0
    except (TypeError, jax.errors.ConcretizationTypeError):
        negative = False  # traced: checked by its caller, if at all
    if negative:
        raise ValueError(f"tolerance must be >= 0, not {tolerance!r}")
    if k > num_matvecs:
        raise ValueError(f"k={k} eigenvalues need num_matvecs >= k, not {num_matvecs}")
    allowed = basis_steps(num_params, num_matvecs)
    if k > allowed:
        raise ValueError(
            f"k={k} is more than one Lanczos cycle holds: min(num_params={num_params}, "
            f"MAX_BASIS_STEPS={MAX_BASIS_STEPS}) = {allowed}; ask for k <= {allowed}")


def basis_steps(n: int, num_matvecs: int) -> int:
    """Steps one cycle holds: at most `n` (a Krylov space's dimension) and MAX_BASIS_STEPS."""
    return min(num_matvecs, n, MAX_BASIS_STEPS)


def _ritz_sizes(k: int, capacity: int) -> tuple[int, ...]:
    """Bucket sizes of the tridiagonal eigenproblem, from max(k, 16) to `capacity`."""
    sizes, size = [], max(k, SMALLEST_RITZ_SIZE)
    while size < capacity:
        sizes.append(size)
        size *= RITZ_SIZE_GROWTH
    return (*sizes, capacity)


# Weights of a warm block's rows in the start vector: a random sign times a magnitude in
# [1 - ROW_WEIGHT_SPREAD, 1 + ROW_WEIGHT_SPREAD]. In a plain sum a turned top eigenvector can
# cancel (overlaps -0.74, +0.46, +0.26 on MNIST summed to -0.02, and Lanczos converged on the
# second eigenvalue); random weights make that improbable, and a row holding the top alone
# keeps at least half its weight.
ROW_WEIGHT_SPREAD = 0.5
RESTART_SALT = 2**20  # folded into the key of a restart's row weights


def start_vector(start_block: jax.Array, key: jax.Array, start_noise: jax.Array) -> jax.Array:
    """Unit start vector [n]: the unit rows of `start_block` [k, n] with random weights (signs
    and magnitudes, ROW_WEIGHT_SPREAD) plus `start_noise` times a unit random vector; the
    random vector alone (a cold start) when no row is finite and nonzero."""
    norms = jnp.linalg.norm(start_block, axis=1)
    usable = jnp.isfinite(norms) & (norms > 0)
    rows = jnp.where(usable[:, None], start_block / jnp.where(usable, norms, 1.0)[:, None], 0.0)
    weight_key, noise_key = jax.random.split(key)
    signs = jnp.where(jax.random.bernoulli(weight_key, shape=norms.shape), 1.0, -1.0)
    magnitudes = jax.random.uniform(jax.random.fold_in(weight_key, 1), norms.shape,
                                    minval=1 - ROW_WEIGHT_SPREAD, maxval=1 + ROW_WEIGHT_SPREAD)
    combined = (signs * magnitudes).astype(rows.dtype) @ rows
    combined_norm = jnp.linalg.norm(combined)
    random = jax.random.normal(noise_key, combined.shape, combined.dtype)
    random = random / jnp.linalg.norm(random)
    warm = combined_norm > 0
    vector = jnp.where(
        warm, combined / jnp.where(warm, combined_norm, 1.0) + start_noise * random, random
    )
    return vector / jnp.linalg.norm(vector)


def _valid_rows(b: jax.Array, num_rows: jax.Array) -> jax.Array:
    """bool [BLOCK_ROWS]: which rows of block `b` are among the first `num_rows`."""
    return b * BLOCK_ROWS + jnp.arange(BLOCK_ROWS) < num_rows


def _orthogonalise(basis: jax.Array, w: jax.Array, num_rows: jax.Array) -> jax.Array:
    """w minus its projection on the first `num_rows` rows of `basis` [rows, n].

    Block modified Gram-Schmidt over only the blocks that hold those rows, swept again when
    the first sweep leaves less than REORTHOGONALISE_BELOW of ||w||; rows past `num_rows`
    (stale ones from an earlier cycle) get weight zero.
    """
    num_blocks = (num_rows + BLOCK_ROWS - 1) // BLOCK_ROWS

    def project_out(b, w):
        block = jax.lax.dynamic_slice_in_dim(basis, b * BLOCK_ROWS, BLOCK_ROWS)
        weights = jnp.where(_valid_rows(b, num_rows), block @ w, 0.0)
        return w - weights @ block

    def sweep(w):
        return jax.lax.fori_loop(0, num_blocks, project_out, w)

    once = sweep(w)
    # A second sweep only when the first removed much of w: otherwise what `once` keeps of the
    # basis is about eps times the part removed (the DGKS criterion, Daniel et al. 1976).
    return jax.lax.cond(jnp.linalg.norm(once) < REORTHOGONALISE_BELOW * jnp.linalg.norm(w),
                        sweep, lambda w: w, once)


def _combine_rows(basis: jax.Array, coefficients: jax.Array, num_rows: jax.Array) -> jax.Array:
    """[k, n]: coefficients [k, rows] times the first `num_rows` rows of `basis`, by blocks."""

    def add_block(b, total):
        rows = jax.lax.dynamic_slice_in_dim(basis, b * BLOCK_ROWS, BLOCK_ROWS)
        weights = jax.lax.dynamic_slice_in_dim(coefficients, b * BLOCK_ROWS, BLOCK_ROWS, axis=1)
        return total + jnp.where(_valid_rows(b, num_rows), weights, 0.0) @ rows

    num_blocks = (num_rows + BLOCK_ROWS - 1) // BLOCK_ROWS
    zeros = jnp.zeros((coefficients.shape[0], basis.shape[1]), basis.dtype)
    return jax.lax.fori_loop(0, num_blocks, add_block, zeros)


def _gaps(chosen, values, residuals, active) -> jax.Array:
    """Gap from each `chosen` Ritz value to the rest of the spectrum, conservatively: the
    distance to each other active Ritz value less that value's residual (an unconverged
    neighbour may stand for an eigenvalue up to its residual closer), the smallest over them.

    With Ritz distances alone, a warm start's first steps, whose other Ritz values are still
    far inside the spectrum, claimed errors 20x below the true ones."""
    distances = jnp.abs(chosen[:, None] - values[None, :])
    itself = distances == 0
    distances = jnp.where(active[None, :] & ~itself, distances - residuals[None, :], jnp.inf)
    return jnp.min(distances, axis=1)


def _error_bound(residual: jax.Array, gap: jax.Array) -> jax.Array:
    """Error of a Ritz value with residual norm `residual`: at most the residual, and about
    residual^2 / gap when the nearest other Ritz value is `gap` away (unknown: infinite gap)."""
    usable = jnp.isfinite(gap) & (gap > 0)
    return jnp.where(usable, jnp.minimum(residual, residual**2 / jnp.where(usable, gap, 1.0)),
                     residual)


class _Estimates(NamedTuple):
    top: jax.Array  # [block] descending Ritz values
    coordinates: jax.Array  # [block, rows] the Ritz vectors' coefficients (0: none yet)
    bottom: jax.Array  # smallest Ritz value
    bound: jax.Array  # relative error estimate of `top` (and of `bottom` when it is ||H||)


def _estimates_at_size(alpha, beta, j, *, k: int, block: int, size: int, rows: int
                       ) -> _Estimates:
    """Ritz estimates from the leading (j+1) x (j+1) block of T, diagonalised at `size`:
    the top `block` Ritz pairs, and the error bound of the top k."""
    alpha, beta = alpha[:size], beta[:size]
    index = jnp.arange(size)
    active = index <= j
    scale = jnp.max(jnp.abs(jnp.where(active, alpha, 0.0))) + 2 * jnp.max(jnp.abs(beta))
    # Padding: a far-away diagonal, decoupled, so its eigenvalues sort below the block's.
    diagonal = jnp.where(active, alpha, -4.0 * scale - 1.0)
    off_diagonal = jnp.where(index[:-1] < j, beta[:-1], 0.0)
    t = jnp.diag(diagonal) + jnp.diag(off_diagonal, 1) + jnp.diag(off_diagonal, -1)
    values, vectors = jnp.linalg.eigh(t)  # ascending: the padding first, the block last
    bottom_index = size - (j + 1)
    sorted_active = index >= bottom_index
    top = jnp.flip(values)[:block]  # padding values past j + 1
    top_vectors = jnp.flip(vectors, axis=1)[:, :block]  # [size, block]
    bottom = values[bottom_index]
    norm_estimate = jnp.maximum(jnp.abs(top[0]), jnp.abs(bottom))
    residuals = jnp.abs(beta[j] * vectors[j])  # [size], of every Ritz pair
    residual = jnp.flip(residuals)[:k]
    gaps = _gaps(top[:k], values, residuals, sorted_active)
    bound = jnp.max(_error_bound(residual[:k], gaps))
    # The bottom Ritz value must converge too when it may be the operator norm.
    bottom_residual = residuals[bottom_index]
    bottom_gap = _gaps(bottom[None], values, residuals, sorted_active)[0]
    matters = (jnp.abs(bottom) + bottom_residual >= jnp.abs(top[0])) & (j > 0)
    bound = jnp.maximum(bound, jnp.where(matters, _error_bound(bottom_residual, bottom_gap), 0.0))
    relative = bound / jnp.maximum(norm_estimate, jnp.finfo(alpha.dtype).tiny)
    found = jnp.arange(block) <= j  # Ritz pairs that exist after j + 1 steps
    coordinates = jnp.zeros((block, rows), alpha.dtype).at[:, :size].set(
        jnp.where(found[:, None], top_vectors.T, 0.0))
    return _Estimates(top, coordinates, bottom, relative)


def _no_estimates(k: int, rows: int, dtype) -> _Estimates:
    """Estimates before any step: zeros, with an infinite bound."""
    return _Estimates(jnp.zeros((k,), dtype), jnp.zeros((k, rows), dtype), jnp.zeros((), dtype),
                      jnp.asarray(jnp.inf, dtype))


def _estimates(alpha, beta, j, *, k: int, block: int, sizes: tuple[int, ...], rows: int
               ) -> _Estimates:
    """Ritz estimates after step j, diagonalising at the smallest bucket holding j + 1 steps."""
    bucket = jnp.searchsorted(jnp.asarray(sizes), j + 1)
    branches = [
        functools.partial(_estimates_at_size, k=k, block=block, size=size, rows=rows)
        for size in sizes
    ]
    return jax.lax.switch(bucket, branches, alpha, beta, j)


class _Cycle(NamedTuple):
    """The state of one Lanczos cycle (a run from one start vector)."""

    j: jax.Array  # steps taken in this cycle
    basis: jax.Array  # [rows, n]; rows 0..j hold the Lanczos vectors
    alpha: jax.Array  # [rows] diagonal of T
    beta: jax.Array  # [rows] off-diagonal of T
    converged: jax.Array
    estimates: "_Estimates"  # after the last step
    previous_breakdown: jax.Array
    norm_bound: jax.Array  # a cheap bound on ||T||, the scale of the breakdown test
    previous_bound: jax.Array  # the error estimate of the step before (inf before step 2)


def _run_cycle(matvec, basis, start, limit, key, stop_bound, *, k, block, sizes) -> _Cycle:
    """Lanczos from the unit vector `start` for at most `limit` (traced) steps."""
    rows, n = basis.shape
    dtype = basis.dtype
    eps = jnp.finfo(dtype).eps
    basis = basis.at[0].set(start)

    def fresh_direction(j, basis, w, b):
        """A random unit vector orthogonal to the basis (a restart after a breakdown)."""
        fresh = jax.random.normal(jax.random.fold_in(key, j), (n,), dtype)
        fresh = _orthogonalise(basis, fresh, j + 1)
        norm = jnp.linalg.norm(fresh)
        return fresh / jnp.where(norm > 0, norm, 1.0)

    def next_lanczos_vector(j, basis, w, b):
        return w / b

    def body(state: _Cycle) -> _Cycle:
        j, basis, alpha, beta = state.j, state.basis, state.alpha, state.beta
        v = basis[j]
        w = matvec(v)
        a = jnp.vdot(v, w)
        previous = jnp.where(j > 0, beta[j - 1], 0.0) * basis[jnp.maximum(j - 1, 0)]
        w = _orthogonalise(basis, w - a * v - previous, j + 1)
        b = jnp.linalg.norm(w)
        alpha = alpha.at[j].set(a)
        norm_bound = jnp.maximum(
            state.norm_bound, jnp.abs(a) + jnp.abs(beta[jnp.maximum(j - 1, 0)]) + b
        )
        # Breakdown: the Krylov space is invariant. Continue from a fresh random direction
        # orthogonal to the basis, decoupled from it (beta = 0): a low-rank operator does not
        # divide by zero, and a copy of a repeated eigenvalue can still be found.
        breakdown = b <= 100 * eps * norm_bound
        b = jnp.where(breakdown, 0.0, b)
        beta = beta.at[j].set(b)
        following = jax.lax.cond(breakdown, fresh_direction, next_lanczos_vector, j, basis, w, b)
        basis = basis.at[j + 1].set(following)
        estimates = _estimates(alpha, beta, j, k=k, block=block, sizes=sizes, rows=rows)
        # The larger estimate of two successive steps (a cycle's first keeps its own): in a
        # turning cluster the top Ritz vector can mix two eigenvectors, and its residual dips
        # below the tolerance for one step while the true error stays 100x the estimate.
        bound = jnp.where(j > 0, jnp.maximum(estimates.bound, state.previous_bound),
                          estimates.bound)
        # At least `block` steps: a warm start sums `block` Ritz vectors, and with close
        # eigenvalues that sum is nearly an eigenvector (seen: 2 steps, a bound below 1e-4, a
        # true error of 4e-2). A second breakdown in a row: the rest of the space is flat.
        converged = (
            (j + 1 >= max(block, 2)) & (bound <= stop_bound)
            & (~breakdown | state.previous_breakdown)
        )
        return _Cycle(j + 1, basis, alpha, beta, converged, estimates._replace(bound=bound),
                      breakdown, norm_bound, estimates.bound)

    def cond(state: _Cycle):
        # A nan or inf operator (a diverged run) stops at once, unconverged.
        finite = (state.j == 0) | jnp.isfinite(state.estimates.bound)
        return (state.j < limit) & ~state.converged & finite

    zeros = jnp.zeros((rows,), dtype)
    no = jnp.bool_(False)
    initial = _Cycle(jnp.int32(0), basis, zeros, zeros, no, _no_estimates(block, rows, dtype),
                     no, zeros[0], jnp.asarray(jnp.inf, dtype))
    return jax.lax.while_loop(cond, body, initial)


def solve(
    matvec: Matvec,
    start_block: jax.Array,
    key: jax.Array,
    tolerance: jax.Array,
    noise_floor: jax.Array,
    start_noise: jax.Array,
    *,
    k: int,
    num_matvecs: int,
    block_size: int,
) -> EigenInfo:
    """The top-k eigenpairs of the symmetric operator `matvec` on R^n (trace inside a jit).

    Args:
      matvec: `[n] -> [n]`, the operator.
      start_block: float [k', n] previous Ritz vectors (any k'); all-zero rows: a cold start.
      key: PRNG key of the random start component and of breakdown restarts.
      tolerance: relative error asked of the top-k Ritz values (of ||H||).
      noise_floor: the products' own relative error; steps stop once the bound is below
        max(tolerance, noise_floor), since the products cannot resolve less, and the bound
        reported is at least it.
      start_noise: weight of the unit random vector added to a warm start (0: none).
      k: how many eigenpairs; num_matvecs: the products allowed, all restart cycles together.
      block_size: how many Ritz vectors to return (at least k; at most the steps one cycle
        holds), the next warm start's block: a couple more than k keep the directions that
        may overtake the top k by the next check.
    """
    n = start_block.shape[1]
    dtype = start_block.dtype
    steps_per_cycle = basis_steps(n, num_matvecs)
    if k > steps_per_cycle:
        raise ValueError(
            f"k={k} eigenvalues need at least k Lanczos steps; only {steps_per_cycle} allowed"
        )
    rows = -(-(steps_per_cycle + 1) // BLOCK_ROWS) * BLOCK_ROWS  # whole blocks
    block = min(max(block_size, k), steps_per_cycle)
    sizes = _ritz_sizes(block, steps_per_cycle)
    stop_bound = jnp.maximum(tolerance, noise_floor)
    start = start_vector(start_block, key, start_noise)

    def cycle_body(state):
        cycle, used, start, basis, _, _, _, _ = state
        limit = jnp.minimum(steps_per_cycle, num_matvecs - used)
        # The basis is reused: rows past a cycle's steps are stale and get weight zero.
        run = _run_cycle(
            matvec, basis, start, limit, jax.random.fold_in(key, cycle + 1), stop_bound,
            k=k, block=block, sizes=sizes,
        )
        estimates = run.estimates
        vectors = _combine_rows(run.basis, estimates.coordinates, run.j)
        norms = jnp.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / jnp.where(norms > 0, norms, 1.0)
        exhausted = run.j == n  # a whole space: exact
        converged = run.converged | exhausted
        restart = start_vector(vectors, jax.random.fold_in(key, cycle + RESTART_SALT),
                               jnp.zeros((), dtype))  # no random component
        return (cycle + 1, used + run.j, restart, run.basis, estimates, vectors, converged,
                jnp.isfinite(estimates.bound))

    def cycle_cond(state):
        _, used, _, _, _, _, converged, finite = state
        return (used < num_matvecs) & ~converged & finite

    empty = _no_estimates(block, rows, dtype)
    basis = jnp.zeros((rows, n), dtype)
    initial = (jnp.int32(0), jnp.int32(0), start, basis, empty, jnp.zeros((block, n), dtype),
               jnp.bool_(False), jnp.bool_(True))
    _, used, _, _, estimates, vectors, converged, _ = jax.lax.while_loop(
        cycle_cond, cycle_body, initial
    )
    return EigenInfo(estimates.top[:k], vectors, estimates.bottom, used,
                     jnp.maximum(estimates.bound, noise_floor), converged)


# ---------------------------------------------------------------------------------------------
# The plain tridiagonalisation (spectral density by stochastic Lanczos quadrature)


def tridiagonal(
    matvec: Matvec, start: jax.Array, key: jax.Array, *, steps: int
) -> tuple[jax.Array, jax.Array]:
    """`(alpha [steps], beta [steps - 1])`: the Lanczos tridiagonal T of `matvec` after exactly
    `steps` products from the unit vector `start` [n] (trace inside a jit; steps <= n).

    The same cycle as `solve` (full reorthogonalisation), with no stopping test and no restart.
    After a breakdown beta is 0 and the run continues from a random direction (`key`)
    orthogonal to the basis, so every eigenvalue of T still lies in the operator's spectrum's
    range and T's later blocks carry no weight of `start`.
    """
    n = start.shape[0]
    if not 1 <= steps <= n:
        raise ValueError(f"steps={steps} must be between 1 and the dimension {n}")
    rows = -(-(steps + 1) // BLOCK_ROWS) * BLOCK_ROWS  # whole blocks
    basis = jnp.zeros((rows, n), start.dtype)
    never = jnp.asarray(-jnp.inf, start.dtype)  # no stopping test: exactly `steps` products
    run = _run_cycle(
        matvec, basis, start, steps, key, never, k=1, block=1, sizes=_ritz_sizes(1, steps)
    )
    return run.alpha[:steps], run.beta[: steps - 1]
