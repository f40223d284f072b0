"""Thick-restart Lanczos for the top of a symmetric operator's spectrum, in bounded memory.

`solve` runs Lanczos with full reorthogonalisation on a `matvec` over vectors of any pytree
layout (a params-shaped tree, or one flat [n] array), traced inside the caller's jit. Its basis
and Ritz vectors are row-stacked in that layout (`sam_eos.rows`: each leaf [rows, *leaf_shape]),
so a product takes a row as it is, sharded as the parameters are, and nothing is flattened.
It starts from a block of previous Ritz vectors when given one (a warm
start: the rows with random weights, `start_vector`) plus a small random component, and beside
that vector from `DEFAULT_RANDOM_ROWS` unit random rows (`start_rows`): the steps are band
Lanczos', so the space is the block Krylov space of the start rows. One vector cannot resolve a
near-degenerate top pair it is mostly aligned with, nor find a top direction it lacks (a pair
that swapped since the last solve): it converges on lambda_2 with a bound far below its error.
The random row's sequence carries both eigenvectors of the pair, so the block resolves it
(measured: BENCHMARKS.md, `cluster_swaps`; products against memory: README, Memory). Its basis
holds `basis_size` vectors of n entries whatever the budget: when the basis is full it keeps its
top Ritz vectors and the last residual direction and goes on from there (a thick restart, Wu
and Simon 2000), so what the Krylov space knows of the top of the spectrum survives, and
`num_matvecs` is a budget, not a size:

- memory: `basis_size` vectors of n (beside the operator's own); `basis_size` is the one knob
  of memory against products (BENCHMARKS.md, `scale`);
- each step's projected eigenproblem is at most (basis_size - 1) square;
- a step costs one product and O(basis_size x n) for its orthogonalisation.

The projected matrix is V^T A V itself, built from each product's Gram-Schmidt coefficients,
so the plain (tridiagonal) and the restarted (arrow-shaped) phases share one code path.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from sam_eos import rows
from sam_eos.types import PyTree

# Vectors of length n the basis holds unless told otherwise: memory against products, measured
# in BENCHMARKS.md (`scale` for memory, `check_misses` for products).
DEFAULT_BASIS_SIZE = 14
VECTORS_PER_EIGENVALUE = 7  # the default basis' growth with k (`default_basis_size`)
# Ritz vectors kept at a restart: the block asked for, and at least this fraction of the
# basis's columns; new products refill the rest.
KEEP_FRACTION = 0.5
REORTHOGONALISE_BELOW = 2**-0.5  # sweep again when a sweep leaves less than this of ||w||


class EigenInfo(NamedTuple):
    """What an eigensolver found (jax arrays): `solve`'s result, and `sam_eos.top_eigenvalues`'
    and `sam_eos.eigensolver.update`'s, whose products are Hessian-vector products."""

    eigenvalues: jax.Array  # float [k], the k algebraically largest Ritz values, descending
    # The unit Ritz vectors of the `block` largest Ritz values, row-stacked in the start
    # block's layout (`sam_eos.rows`): for the Hessian solvers a params-shaped tree with leaves
    # [block, *leaf_shape] by default, or flat [block, num_params] (`ravel_pytree(params)`
    # order) when started from flat rows; rows past the steps taken are zero. Pass them as the
    # next solve's start block (a warm start).
    ritz_vectors: PyTree
    # float scalar: the smallest Ritz value (its vector is kept through restarts)
    bottom_eigenvalue: jax.Array
    # int32 scalar: products used, all cycles together (`solve`: of `matvec`; the Hessian
    # solvers: Hessian-vector products, two per product of H + rho_eff H^2)
    hessian_vector_products: jax.Array
    # float scalar: estimated error of `eigenvalues` relative to ||A||. What it promises: each
    # of the k Ritz values is within it of *an* eigenvalue (a residual bound, the larger of its
    # values at the last two steps, sharpened by the gap to the next Ritz value; plus the
    # `noise_floor` the Hessian solvers are given). It cannot promise that no eigenvalue lies
    # above the top one: a direction the Krylov space has barely seen can stay unseen. The
    # random start row makes that improbable for a top cluster the block covers (the new top
    # of a swapped pair, orthogonal to a warm start's block, is found); how often it happens is
    # measured, not promised: the loop's audits (`--eigensolver_audit_every`) and the
    # check_misses and cluster_swaps benchmarks compare with cold solves.
    error_bound: jax.Array
    converged: jax.Array  # bool scalar: own bound <= max(tolerance, noise_floor), or exhausted


def check_options(k, num_matvecs, tolerance, num_params: int, solver: str = "lanczos",
                  basis_size: int | None = None) -> None:
    """ValueError, naming the argument, unless k and `num_matvecs` are positive ints,
    k <= num_params and, for Lanczos, `tolerance` >= 0 (a traced one is not checked), k <= the
    budget and `basis_size` (None: `default_basis_size`) an int >= k + 3. Power
    iteration takes a negative tolerance: only its budget then stops it, as in the original."""
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
    least = k + 3
    if basis_size is not None and (isinstance(basis_size, bool) or
                                   not isinstance(basis_size, int) or basis_size < least):
        raise ValueError(
            f"basis_size must be an int >= k + 3 = {least} (the top k and the bottom Ritz "
            f"vectors a restart keeps, the direction still to multiply and one new "
            f"direction), not {basis_size!r}")


def default_basis_size(block: int) -> int:
    """The basis for a warm block of `block` Ritz vectors (k + 2 for k eigenvalues):
    DEFAULT_BASIS_SIZE up to a block of 3 (k = 1), and VECTORS_PER_EIGENVALUE more per Ritz
    vector beyond it.
    Several eigenvalues of a cluster converge together only in a basis several times k wide:
    along the check_misses SAM run, k = 3 in a basis of 12 stopped short of its tolerance at the
    budget (worst error 7e-4)."""
    return DEFAULT_BASIS_SIZE + VECTORS_PER_EIGENVALUE * max(block - 3, 0)


def basis_rows(n: int, num_matvecs: int, basis_size: int) -> int:
    """Vectors of n a solve's basis holds: `basis_size`, fewer when the budget or the space
    fills fewer (the start vector and one row per product)."""
    return min(basis_size, n + 1, num_matvecs + 1)


def basis_steps(n: int, num_matvecs: int, basis_size: int = DEFAULT_BASIS_SIZE) -> int:
    """Products one basis holds before a restart: at most `n` (a space's dimension), the
    budget, and `basis_size - 1` (the last row holds the next direction)."""
    return min(num_matvecs, n, basis_size - 1)


# Weights of a warm block's rows in the start vector: a random sign times a magnitude in
# [1 - ROW_WEIGHT_SPREAD, 1 + ROW_WEIGHT_SPREAD]. In a plain sum a turned top eigenvector can
# cancel (overlaps -0.74, +0.46, +0.26 on MNIST summed to -0.02, and Lanczos converged on the
# second eigenvalue); random weights make that improbable, and a row holding the top alone
# keeps at least half its weight.
ROW_WEIGHT_SPREAD = 0.5
RESTART_SALT = 2**20  # folded into the key of a restart's row weights
RANDOM_ROW_SALT = 2**21  # folded into the key of the random start rows
# Random rows started beside the warm vector (band Lanczos): a direction the warm vector lacks,
# e.g. the new top of a near-degenerate pair that swapped, grows in the random row's Krylov
# sequence, and a pair the warm vector mixes is resolved by the two sequences together.
DEFAULT_RANDOM_ROWS = 1


def start_vector(start_block: PyTree, key: jax.Array, start_noise: jax.Array) -> PyTree:
    """Unit start vector (one row of `start_block`'s layout): the unit rows of `start_block`
    (k rows, row-stacked) with random weights (signs and magnitudes, ROW_WEIGHT_SPREAD) plus
    `start_noise` times a unit random vector (`rows.random_vector`); the random vector alone (a
    cold start) when no row is finite and nonzero."""
    norms = rows.norms(start_block)
    usable = jnp.isfinite(norms) & (norms > 0)
    weight_key, noise_key = jax.random.split(key)
    signs = jnp.where(jax.random.bernoulli(weight_key, shape=norms.shape), 1.0, -1.0)
    magnitudes = jax.random.uniform(jax.random.fold_in(weight_key, 1), norms.shape,
                                    minval=1 - ROW_WEIGHT_SPREAD, maxval=1 + ROW_WEIGHT_SPREAD)
    # Row by row, the weights divided by the norms: no temporary the size of the block, and a
    # non-finite row is left out rather than multiplied by zero (nan).
    dtype = rows.dtype(start_block)
    weights = (signs * magnitudes / jnp.where(usable, norms, 1.0)).astype(dtype)
    combined = jax.tree.map(jnp.zeros_like, rows.row(start_block, 0))
    for i in range(rows.count(start_block)):
        combined = jax.tree.map(lambda c, x, i=i: c + jnp.where(usable[i], weights[i] * x, 0.0),
                                combined, rows.row(start_block, i))
    combined_norm = otu.tree_norm(combined)
    random = rows.random_vector(noise_key, combined, dtype)
    random = otu.tree_scale(1 / otu.tree_norm(random), random)
    warm = combined_norm > 0
    vector = jax.tree.map(
        lambda c, r: jnp.where(warm, c / jnp.where(warm, combined_norm, 1.0) + start_noise * r, r),
        combined, random)
    return otu.tree_scale(1 / otu.tree_norm(vector), vector)


def _orthogonalise(basis: PyTree, w: PyTree, num_rows: jax.Array
                   ) -> tuple[PyTree, jax.Array]:
    """`(w', coefficients [rows])`: w minus its projection on the first `num_rows` rows of
    `basis` (row-stacked), and the projection's coefficients (rows past `num_rows`, stale ones from
    before a restart, get zero).

    Classical Gram-Schmidt, swept again when the first sweep leaves less than
    REORTHOGONALISE_BELOW of ||w||: otherwise what is left of the basis is about eps times the
    part removed (the DGKS criterion, Daniel et al. 1976).
    """
    used = jnp.arange(rows.count(basis)) < num_rows

    def sweep(w):
        coefficients = jnp.where(used, rows.dots(basis, w), 0.0)
        return otu.tree_sub(w, rows.combine(coefficients, basis)), coefficients

    once, first = sweep(w)

    def again(once):
        twice, second = sweep(once)
        return twice, first + second

    return jax.lax.cond(otu.tree_norm(once) < REORTHOGONALISE_BELOW * otu.tree_norm(w),
                        again, lambda once: (once, first), once)


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
    coordinates: jax.Array  # [block, rows] the Ritz vectors' coefficients in the basis
    bottom: jax.Array  # smallest Ritz value
    bound: jax.Array  # relative error estimate of `top` (and of `bottom` when it is ||H||)


def _no_estimates(block: int, rows: int, dtype) -> _Estimates:
    """Estimates before any step: zeros, with an infinite bound."""
    return _Estimates(jnp.zeros((block,), dtype), jnp.zeros((block, rows), dtype),
                      jnp.zeros((), dtype), jnp.asarray(jnp.inf, dtype))


def _ritz_pairs(projected: jax.Array, j: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenpairs of the leading j x j block of `projected` [rows, rows], ascending. The rest
    is replaced by a far-away decoupled diagonal, so its values sort first."""
    rows = projected.shape[0]
    active = jnp.arange(rows) < j
    both = active[:, None] & active[None, :]
    scale = jnp.max(jnp.sum(jnp.abs(jnp.where(both, projected, 0.0)), axis=1))  # >= ||block||
    t = jnp.where(both, projected, 0.0) + jnp.diag(jnp.where(active, 0.0, -4.0 * scale - 1.0))
    return jnp.linalg.eigh(t)


def _needed(top: jax.Array, residual: jax.Array, threshold: jax.Array) -> jax.Array:
    """bool [k]: the Ritz values whose error the bound covers: the first, every one above
    `threshold`, and the first below it until its residual bound puts an eigenvalue below
    `threshold` (the count is then certified; the tolerance, near the line)."""
    above = top >= threshold
    first = jnp.arange(top.shape[0]) == 0
    first_below = ~above & jnp.concatenate([jnp.ones((1,), bool), above[:-1]])
    return first | above | (first_below & (top + residual >= threshold))


def _estimates(projected, j, filled, threshold, *, k: int, block: int) -> _Estimates:
    """Ritz estimates over the j multiplied rows of the basis: the top `block` Ritz pairs, and
    the error bound of the top k that `_needed` selects (relative to ||A||). A Ritz pair's
    residual is its coupling to the rows filled but not yet multiplied (rows j .. filled - 1),
    exactly: the basis is orthonormal and A maps each multiplied row into the filled ones
    plus the last residual."""
    rows = projected.shape[0]
    values, vectors = _ritz_pairs(projected, j)  # vectors [rows, rows], zero past j
    index = jnp.arange(rows)
    pending = (index >= j) & (index < filled)
    coupling = jnp.where(pending[:, None], projected, 0.0) @ vectors  # [rows, pairs]
    residuals = jnp.linalg.norm(coupling, axis=0)  # [rows], of every Ritz pair
    bottom_index = rows - j
    sorted_active = index >= bottom_index
    top = jnp.flip(values)[:block]
    top_vectors = jnp.flip(vectors, axis=1)[:, :block]  # [rows, block]
    bottom = values[bottom_index]
    norm_estimate = jnp.maximum(jnp.abs(top[0]), jnp.abs(bottom))
    residual = jnp.flip(residuals)[:k]
    gaps = _gaps(top[:k], values, residuals, sorted_active)
    bound = jnp.max(jnp.where(_needed(top[:k], residual, threshold),
                              _error_bound(residual, gaps), 0.0))
    # The bottom Ritz value must converge too when it may be the operator norm.
    bottom_residual = residuals[bottom_index]
    bottom_gap = _gaps(bottom[None], values, residuals, sorted_active)[0]
    matters = (jnp.abs(bottom) + bottom_residual >= jnp.abs(top[0])) & (j > 1)
    bound = jnp.maximum(bound, jnp.where(matters, _error_bound(bottom_residual, bottom_gap), 0.0))
    relative = bound / jnp.maximum(norm_estimate, jnp.finfo(projected.dtype).tiny)
    found = jnp.arange(block) < j  # Ritz pairs that exist after j products
    coordinates = jnp.where(found[:, None], top_vectors.T, 0.0)
    return _Estimates(top, coordinates, bottom, relative)


class _Run(NamedTuple):
    """Lanczos' state between steps."""

    # row-stacked [rows, *leaf_shape] per leaf: orthonormal rows 0 .. filled - 1; rows < j are
    # multiplied
    basis: PyTree
    # [rows, rows]: the known entries of V^T A V: among the multiplied rows, and between them
    # and the filled rows (zero elsewhere)
    projected: jax.Array
    beta: jax.Array  # [rows]: the residual's norm after each product (0: a breakdown)
    j: jax.Array  # rows multiplied
    filled: jax.Array  # rows filled
    used: jax.Array  # products, all together
    estimates: _Estimates  # after the last step
    converged: jax.Array
    previous_breakdown: jax.Array
    norm_bound: jax.Array  # a cheap bound on ||A||, the scale of the breakdown test
    previous_bound: jax.Array  # the error estimate of the step before (inf before step 2)


def _start(first: PyTree, size: int, block: int) -> _Run:
    """The state before the first product from the orthonormal start rows `first` (a
    row-stacked block of one or more rows), in a basis of `size` rows. With several rows the
    steps are those of band Lanczos (Ruhe 1979): each row in turn is multiplied and its
    residual appended, so the space is the block Krylov space of the start rows."""
    dtype = rows.dtype(first)
    width = rows.count(first)
    basis = rows.zeros(size, rows.row(first, 0), dtype)
    for i in range(width):
        basis = rows.set_row(basis, i, rows.row(first, i))
    no = jnp.bool_(False)
    return _Run(basis, jnp.zeros((size, size), dtype), jnp.zeros((size,), dtype), jnp.int32(0),
                jnp.int32(width), jnp.int32(0), _no_estimates(block, size, dtype), no, no,
                jnp.zeros((), dtype), jnp.asarray(jnp.inf, dtype))


def start_rows(first: PyTree, start_block: PyTree, key: jax.Array, start_noise: jax.Array,
               random_rows: int) -> PyTree:
    """The rows a solve starts from, row-stacked and orthonormal: the unit vector `first`
    (`start_vector`), then `random_rows` unit random vectors. A chunk that continues the
    previous one (`start_noise` 0) starts its i-th extra row from `start_block`'s row i + 1
    instead, where that row is usable: the previous chunk's exploration, not a new one."""
    vectors = [first]
    dtype = rows.dtype(start_block)
    norms = rows.norms(start_block)
    for i in range(random_rows):
        vector = rows.random_vector(jax.random.fold_in(key, RANDOM_ROW_SALT + i), first, dtype)
        if i + 1 < rows.count(start_block):
            warm = rows.row(start_block, i + 1)
            use = (start_noise == 0) & jnp.isfinite(norms[i + 1]) & (norms[i + 1] > 0)
            warm, _ = _orthogonalise(rows.stack(vectors), warm, jnp.int32(len(vectors)))
            # A row (nearly) in the span of those before it: the random vector instead.
            use = use & (otu.tree_norm(warm) > 1e-3 * norms[i + 1])
            vector = jax.tree.map(lambda w, r, use=use: jnp.where(use, w, r), warm, vector)
        for _ in range(2):  # twice: the random vector may be far from orthogonal
            vector, _ = _orthogonalise(rows.stack(vectors), vector, jnp.int32(len(vectors)))
        vectors.append(otu.tree_scale(1 / otu.tree_norm(vector), vector))
    return rows.stack(vectors)


def _step(matvec, run: _Run, key, stop_bound, threshold, *, k: int, block: int,
          estimate: bool) -> _Run:
    """One product, of row j: its column of the projected matrix, its residual as the next
    filled row (when there is room) and, with `estimate`, the Ritz estimates and the stopping
    test."""
    basis, j, filled = run.basis, run.j, run.filled
    size, n, dtype = rows.count(basis), rows.size(basis), rows.dtype(basis)
    eps = jnp.finfo(dtype).eps
    w, coefficients = _orthogonalise(basis, matvec(rows.row(basis, j)), filled)
    projected = run.projected.at[j].set(coefficients).at[:, j].set(coefficients)
    b = otu.tree_norm(w)
    norm_bound = jnp.maximum(run.norm_bound, jnp.sum(jnp.abs(coefficients)) + b)
    # Breakdown: the space is invariant. Continue from a fresh random direction orthogonal to
    # the basis, decoupled from it (coupling 0): a low-rank operator does not divide by zero,
    # and a copy of a repeated eigenvalue can still be found.
    breakdown = b <= 100 * eps * norm_bound
    b = jnp.where(breakdown, 0.0, b)

    def fresh_direction(w):
        fresh = rows.random_vector(jax.random.fold_in(key, run.used), w, dtype)
        fresh, _ = _orthogonalise(basis, fresh, filled)
        return otu.tree_scale(1 / jnp.maximum(otu.tree_norm(fresh), jnp.finfo(dtype).tiny),
                              fresh)

    following = jax.lax.cond(breakdown, fresh_direction,
                             lambda w: otu.tree_scale(1 / jnp.where(b > 0, b, 1.0), w), w)
    room = filled < size
    slot = jnp.minimum(filled, size - 1)
    basis = rows.set_row(basis, slot, jax.tree.map(
        lambda new, old: jnp.where(room, new, old), following, rows.row(basis, slot)))
    projected = jnp.where(room, projected.at[slot, j].set(b).at[j, slot].set(b), projected)
    run = run._replace(basis=basis, projected=projected, beta=run.beta.at[j].set(b), j=j + 1,
                       filled=jnp.where(room, filled + 1, filled), used=run.used + 1,
                       previous_breakdown=breakdown, norm_bound=norm_bound)
    if not estimate:
        return run
    estimates = _estimates(projected, j + 1, run.filled, threshold, k=k, block=block)
    # The larger estimate of two successive steps: in a turning cluster the top Ritz vector
    # can mix two eigenvectors, and its residual dips below the tolerance for one step while
    # the true error stays 100x the estimate.
    bound = jnp.where(run.used > 1, jnp.maximum(estimates.bound, run.previous_bound),
                      estimates.bound)
    # At least `block` products: a warm start sums `block` Ritz vectors, and with close
    # eigenvalues that sum is nearly an eigenvector (seen: 2 steps, a bound below 1e-4, a true
    # error of 4e-2). Two breakdowns in a row: the rest of the space is flat. A whole space
    # (n multiplied rows): exact.
    converged = (
        (run.used >= max(block, 2)) & (bound <= stop_bound)
        & (~breakdown | (run.previous_breakdown & breakdown))
    ) | (j + 1 == n)
    return run._replace(estimates=estimates._replace(bound=bound), converged=converged,
                        previous_bound=estimates.bound)


def _thick_restart(run: _Run, keep: int, shardings: tuple | None) -> _Run:
    """The top `keep` Ritz vectors and the bottom one of the multiplied rows, then the rows
    filled but not yet multiplied, as the new basis' first rows. Their projected matrix: the
    Ritz values' diagonal, and each pending row's coupling to each Ritz vector (an arrow for
    one row). The bottom Ritz vector is kept so that `bottom_eigenvalue` keeps improving: it
    may be the operator's norm, which scales the error bound. The basis rotates in place
    (`rows.rotate`, chunked along axes `shardings` leaves whole)."""
    size = rows.count(run.basis)
    values, vectors = _ritz_pairs(run.projected, run.j)
    bottom = size - run.j  # the smallest active Ritz value's index (padding sorts first)
    kept = jnp.concatenate([jnp.flip(vectors, axis=1)[:, :keep], vectors[:, bottom, None]],
                           axis=1)  # [rows, keep + 1], zero past j
    kept_values = jnp.concatenate([jnp.flip(values)[:keep], values[bottom, None]])
    held = keep + 1
    index = jnp.arange(size)
    pending = (index >= run.j) & (index < run.filled)
    # Row held + t of the new basis is old row j + t (t < filled - j).
    moved = jnp.where(pending[None, :] & (index[None, :] - run.j == index[:, None] - held),
                      1.0, 0.0).astype(kept.dtype)  # [rows, rows]
    mixing = moved.at[:held].set(kept.T)
    coupling = moved @ (jnp.where(pending[:, None], run.projected, 0.0) @ kept)  # [rows, held]
    projected = jnp.zeros_like(run.projected).at[:, :held].set(coupling)
    projected = projected.at[:held].set(coupling.T)
    projected = projected.at[jnp.arange(held), jnp.arange(held)].set(kept_values)
    return run._replace(basis=rows.rotate(run.basis, mixing, shardings), projected=projected,
                        j=jnp.int32(held), filled=held + run.filled - run.j)


def solve(
    matvec: Callable[[PyTree], PyTree],
    start_block: PyTree,
    key: jax.Array,
    tolerance: jax.Array,
    noise_floor: jax.Array,
    start_noise: jax.Array,
    *,
    k: int,
    num_matvecs: int,
    block_size: int,
    basis_size: int | None = None,
    shardings: tuple | None = None,
    random_rows: int | None = None,
    threshold: jax.Array | float = -jnp.inf,
) -> EigenInfo:
    """The top-k eigenpairs of the symmetric operator `matvec` on R^n (trace inside a jit).

    It starts from one vector, the rows of `start_block` with random weights plus `start_noise`
    of a random vector (`start_vector`), and stops when the top k Ritz values have converged.

    Args:
      matvec: vector -> vector, the operator, on vectors of `start_block`'s row layout (a
        pytree of arrays; a flat [n] array is one).
      start_block: float, k' previous Ritz vectors (any k' >= 1), row-stacked (`sam_eos.rows`:
        each leaf [k', *leaf_shape]; flat: [k', n]); all-zero rows: a cold start. The basis and
        the Ritz vectors returned keep its layout.
      key: PRNG key of the random start component and of breakdown restarts.
      tolerance: relative error asked of the top-k Ritz values (of ||H||).
      noise_floor: the products' own relative error; steps stop once the bound is below
        max(tolerance, noise_floor), since the products cannot resolve less, and the bound
        reported is the solver's plus it.
      start_noise: weight of the unit random vector added to the warm combination (0: none).
      k: how many eigenpairs; num_matvecs: the products allowed, all restarts together.
      block_size: how many Ritz vectors to return (at least k; at most the products one basis
        holds), the next warm start's block: a couple more than k keep the directions that
        may overtake the top k by the next check.
      basis_size: vectors of n the basis holds, >= k + 3 (None: `default_basis_size`).
      random_rows: unit random start rows beside the warm vector (None: DEFAULT_RANDOM_ROWS);
        none where the basis has no room for them.
      threshold: the top k Ritz values must converge only down to the first one below it (the
        first always): an edge-following solve asks for k at its cap and converges only the
        eigenvalues above its line, and the first below, whose bound certifies the count.
        -inf (default): all k.
      shardings: static, per leaf of a vector, its `NamedSharding` or None
        (`rows.vector_shardings(params)`): the basis and Ritz vectors are constrained to it
        with the rows axis replicated, and a restart rotates each leaf in chunks along an axis
        it does not shard. None: XLA's propagation decides.
    """
    n = rows.size(start_block)
    block = max(block_size, k)
    if basis_size is None:
        basis_size = default_basis_size(block)
    check_options(k, num_matvecs, 0.0, n, basis_size=basis_size)
    size = basis_rows(n, num_matvecs, basis_size)
    block = min(block, size - 1)
    # Kept at a restart: the top `keep` and the bottom Ritz vectors, the row still to multiply,
    # and room for at least one new direction.
    random_rows = DEFAULT_RANDOM_ROWS if random_rows is None else random_rows
    if size > n or size - 3 - random_rows < block:
        # None where one basis holds the whole space (exact anyway), or where a restart could
        # not keep the block beside the bottom Ritz vector, the pending rows and a new one.
        random_rows = 0
    width = 1 + random_rows
    keep = min(max(block, int(KEEP_FRACTION * (size - 1))), size - 2 - width)
    stop_bound = jnp.maximum(tolerance, noise_floor)
    threshold = jnp.asarray(threshold, rows.dtype(start_block))
    first = start_rows(start_vector(start_block, key, start_noise), start_block, key,
                       start_noise, random_rows)

    def constrained(run: _Run) -> _Run:
        return run._replace(basis=rows.constrain(run.basis, shardings, stacked=True))

    def body(run: _Run) -> _Run:
        run = _step(matvec, run, key, stop_bound, threshold, k=k, block=block, estimate=True)
        full = (run.filled >= size) & ~run.converged & (run.used < num_matvecs)
        return constrained(jax.lax.cond(
            full, lambda run: _thick_restart(run, keep, shardings), lambda run: run, run))

    def cond(run: _Run):
        finite = (run.used == 0) | jnp.isfinite(run.estimates.bound)
        return (run.used < num_matvecs) & ~run.converged & finite

    run = jax.lax.while_loop(cond, body, constrained(_start(first, size, block)))
    estimates = run.estimates
    norms = jnp.linalg.norm(estimates.coordinates, axis=1, keepdims=True)
    vectors = rows.constrain(rows.combine(
        estimates.coordinates / jnp.where(norms > 0, norms, 1.0), run.basis), shardings,
        stacked=True)
    # The products' own error adds to the solver's.
    return EigenInfo(estimates.top[:k], vectors, estimates.bottom, run.used,
                     estimates.bound + noise_floor, run.converged)


# ---------------------------------------------------------------------------------------------
# The plain tridiagonalisation (spectral density by stochastic Lanczos quadrature)


def tridiagonal(
    matvec: Callable[[jax.Array], jax.Array], start: jax.Array, key: jax.Array, *, steps: int
) -> tuple[jax.Array, jax.Array]:
    """`(alpha [steps], beta [steps - 1])`: the Lanczos tridiagonal T of `matvec` after exactly
    `steps` products from the unit vector `start` [n] (trace inside a jit; steps <= n).

    The same steps as `solve` (full reorthogonalisation, a basis of steps + 1 vectors), from a
    single start row, with no stopping test and no restart. After a breakdown beta is 0 and the
    run continues from a random direction (`key`) orthogonal to the basis, so every eigenvalue
    of T still lies in the operator's spectrum's range and T's later blocks carry no weight of
    `start`.
    """
    n = start.shape[0]
    if not 1 <= steps <= n:
        raise ValueError(f"steps={steps} must be between 1 and the dimension {n}")
    never = jnp.asarray(-jnp.inf, start.dtype)
    run = jax.lax.fori_loop(
        0, steps,
        lambda _, run: _step(matvec, run, key, never, never, k=1, block=1, estimate=False),
        _start(start[None], steps + 1, 1))
    return jnp.diagonal(run.projected)[:steps], run.beta[: steps - 1]
