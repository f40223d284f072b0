"""Warm-started sharpness tracking for any training loop, optax-style: `init`, then `update`.

    tracker = sam_eos.SharpnessTracker(loss_fn, k=1)
    state = tracker.init(params, jax.random.key(0))
    for step in range(num_steps):
        params, opt_state = train_step(params, opt_state, batch)
        if step % 10 == 0:
            result, state = tracker.update(state, params, batch)
            print(step, result.eigenvalues[0], sam_eos.stability_threshold("adam", 1e-3))

Each `update` runs Lanczos (`sam_eos.lanczos`) on exact Hessian-vector products, started from
the Ritz vectors the previous call left in `state`: along a training trajectory the top
directions move little between calls, so later calls need fewer products than the first.
`update` is one jit-compiled function per tracker: calling it every few steps compiles once per
(params, batch) shape. The state is a pytree of arrays, so it can be checkpointed with the
rest of a loop's state. `update` consumes it (its memory is donated to the next state): keep
the state it returns, as with an optax optimizer's.

The Hessian is taken in every leaf of `params`, so `params` holds the trained parameters and
nothing else: `init` and `update` refuse, naming the leaf's path, an integer, bool or key leaf,
and the state Flax NNX and Equinox keep beside the parameters (`sam_eos.trainable`). Anything
else the loss reads, such as BatchNorm's running statistics or a dropout key, goes in `batch`, so
that every update reads its current value (a loss that closes over it keeps the value it had
when `update` compiled). Flax NNX: `graphdef, params, rest = nnx.split(model, nnx.Param, ...)`,
`loss_fn = lambda p, b: loss(nnx.merge(graphdef, p, b[1], copy=True), b[0])` and
`update(state, params, (batch, rest))`. Equinox: `model, layer_state =
eqx.nn.make_with_state(Model)(...)`, `params, static = eqx.partition(model,
eqx.is_inexact_array)`, a loss over `eqx.combine(p, static)` and `(batch, layer_state)`. The
README's "Tracking your own model" has both recipes with BatchNorm and Dropout, and says what
is measured under them.

With `per_layer=True` each `update` also measures every layer's sharpness, the top eigenvalue
of its diagonal Hessian block (`sam_eos.layer_sharpness`, each layer warm-started from its own
previous Ritz vectors), and the top eigenvector's share per layer (`sam_eos.layer_shares`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from sam_eos import eigensolver, hessian, lanczos, layers, rows, trainable
from sam_eos.lanczos import EigenInfo
from sam_eos.layers import Grouping
from sam_eos.sam import is_static_zero
from sam_eos.types import LossFn, PyTree

_LAYER_SALT = 1  # folded into the check's key for the per-layer starts
# k="edge": eigenvalues above this fraction of the edge are tracked, up to DEFAULT_MAX_K.
DEFAULT_EDGE_FRACTION = 0.9
DEFAULT_MAX_K = 8


def check_edge_options(edge_fraction, max_k) -> None:
    """ValueError, naming the argument, unless `edge_fraction` is a number in (0, 1] and
    `max_k` an int >= 1."""
    if isinstance(edge_fraction, bool) or not isinstance(edge_fraction, int | float) or \
            not 0 < edge_fraction <= 1:
        raise ValueError(f"edge_fraction must be in (0, 1], not {edge_fraction!r}")
    if isinstance(max_k, bool) or not isinstance(max_k, int) or max_k < 1:
        raise ValueError(f"max_k (the edge-following k's cap) must be an int >= 1, not "
                         f"{max_k!r}")


def _is_prng_key(key) -> bool:
    """A typed key (jax.random.key) or a raw uint32 [2] one (jax.random.PRNGKey)."""
    if not hasattr(key, "dtype") or not hasattr(key, "shape"):
        return False
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.shape == ()
    return key.dtype == jnp.uint32 and key.shape == (2,)


class TrackerState(NamedTuple):
    """What one `update` leaves for the next: a pytree of arrays."""

    # float, k + extra_vectors rows in the layout of params (each leaf [rows, *leaf_shape],
    # sharded as its parameter with the rows axis replicated); zeros: a cold start
    ritz_vectors: PyTree
    key: jax.Array  # PRNG key of the next call's random start component
    # per_layer: each layer's Ritz vectors, float [rows, n_layer], in the layers' order; else ()
    layer_ritz_vectors: tuple[jax.Array, ...] = ()


class SharpnessResult(NamedTuple):
    """One measurement of the top of the spectrum."""

    eigenvalues: jax.Array  # float [k], the algebraically largest, descending (curvature units)
    hessian_vector_products: jax.Array  # int32 scalar: HVPs this call used
    # float scalar: estimated error of `eigenvalues`, relative to ||A||, with the promise of
    # `EigenInfo.error_bound`: near *an* eigenvalue each, not proof that none lies above.
    error_bound: jax.Array
    converged: jax.Array  # bool scalar: error_bound <= tolerance within num_matvecs
    direction: PyTree  # params-shaped unit eigenvector of the first eigenvalue
    # per_layer: layer name -> float scalar, the top eigenvalue of that layer's diagonal
    # Hessian block H_GG (curvature units, whatever `rho_eff` and `preconditioner`); else None
    layer_sharpness: dict[str, jax.Array] | None = None
    # per_layer: layer name -> float scalar, ||v_G||^2 of `direction` (they sum to 1); else None
    layer_shares: dict[str, jax.Array] | None = None
    # per_layer: layer name -> its solve's `EigenInfo` (bound relative to ||H_GG||)
    layer_info: dict[str, EigenInfo] | None = None
    # k="edge": int32 scalar, the eigenvalues at or above edge_fraction x edge (`eigenvalues`
    # holds them, the top one even below the line, then nan up to max_k); it equals max_k when
    # the cap is hit. Else None.
    edge_count: jax.Array | None = None

    def scalars(self, prefix: str = "sharpness") -> dict[str, float]:
        """A flat dict of Python scalars for any metric writer (CLU's `metric_writers`,
        tensorboardX, W&B, a print), fetched from the device in one transfer:
        `<prefix>/lambda_1` ... `<prefix>/lambda_k` (descending), `<prefix>/error_bound`,
        `<prefix>/hessian_vector_products` and `<prefix>/converged` (1.0 or 0.0). Name an
        effective-sharpness result's prefix for what it measures, e.g. "effective_sharpness".
        A per-layer result adds `<prefix>/layer_sharpness/<layer>` and
        `<prefix>/layer_share/<layer>`.
        """
        eigenvalues, products, bound, converged, per_layer, shares = jax.device_get(
            (self.eigenvalues, self.hessian_vector_products, self.error_bound, self.converged,
             self.layer_sharpness or {}, self.layer_shares or {}))
        values = {f"{prefix}/lambda_{i + 1}": float(v) for i, v in enumerate(eigenvalues)}
        values[f"{prefix}/error_bound"] = float(bound)
        values[f"{prefix}/hessian_vector_products"] = float(products)
        values[f"{prefix}/converged"] = float(converged)
        values.update({f"{prefix}/layer_sharpness/{name}": float(v)
                       for name, v in per_layer.items()})
        values.update({f"{prefix}/layer_share/{name}": float(v) for name, v in shares.items()})
        if self.edge_count is not None:
            values[f"{prefix}/edge_count"] = float(jax.device_get(self.edge_count))
        return values


class SharpnessTracker:
    """Tracks the top-k eigenvalues of the Hessian (or an effective-sharpness operator).

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`.
      k: how many eigenvalues (>= 1), or "edge": every eigenvalue at or above
        `edge_fraction` x the edge passed to `update` (2/eta for GD, `sam_eos.sam_edge`,
        an optimizer's `stability_threshold`), at most `max_k` of them. The solve holds a
        block for `max_k` (memory: `basis_size`, default for max_k), and converges only the
        eigenvalues above the line and the first below it, which certifies the count; the
        count follows the spectrum from one update to the next (`SharpnessResult.edge_count`).
      edge_fraction, max_k: k="edge"'s line and cap (0 < edge_fraction <= 1, max_k >= 1).
      num_matvecs: Lanczos products allowed per `update` (each one HVP, two with `rho_eff`).
      tolerance: stop when the estimated error of every top-k eigenvalue is below
        `tolerance * ||A||`.
      extra_vectors: Ritz vectors kept beyond k for the next warm start (directions next in
        line can overtake the top k between calls).
      start_noise: weight of the unit random vector added to each warm start, so that a
        direction that became the top one since the last call is still found.
      hvp_mode: "auto", "linearize" or "forward_over_reverse" (`sam_eos.hessian`).
      basis_size: vectors of num_params the Lanczos basis holds, >= k + 2 (None:
        `sam_eos.lanczos.default_basis_size`, 14 for k = 1): memory against products
        (README, "Memory").
      per_layer: False; True to also measure each layer (the first level of params, as
        `sam_eos.layer_sharpness`); or a grouping function `keystr(path) -> name | None` for
        other splits. Each layer costs one more Lanczos solve per `update`, with the same
        `num_matvecs` and `tolerance`; its products count in `hessian_vector_products`.
      reference_loss_fn: None, or `loss_fn` computing in float32, for mixed precision (float32
        params, a `loss_fn` that computes in bfloat16 inside): see below.

    Low precision: with bfloat16 or float16 leaves in `params` (decided from their dtypes when
    `update` compiles), or a `reference_loss_fn`, each `update` also measures the products'
    noise, `hessian.measured_noise_floor` on the top Ritz vector (the previous call's; on a cold
    start, this call's), 2 more products, and `error_bound` is at least it; the warm solves stop
    at it. Float32 params without `reference_loss_fn` measure nothing.
    """

    def __init__(self, loss_fn: LossFn, k: int = 1, *,
                 num_matvecs: int = eigensolver.DEFAULT_NUM_MATVECS,
                 tolerance: float = eigensolver.DEFAULT_TOLERANCE,
                 extra_vectors: int = eigensolver.DEFAULT_EXTRA_VECTORS,
                 start_noise: float = eigensolver.DEFAULT_START_NOISE, hvp_mode: str = "auto",
                 basis_size: int | None = None, per_layer: bool | Grouping = False,
                 reference_loss_fn: LossFn | None = None,
                 edge_fraction: float = DEFAULT_EDGE_FRACTION, max_k: int = DEFAULT_MAX_K):
        self.follows_edge = k == "edge"
        if self.follows_edge:
            check_edge_options(edge_fraction, max_k)
            k = max_k
        self.edge_fraction = edge_fraction
        lanczos.check_options(k, num_matvecs, tolerance, num_params=k, basis_size=basis_size)
        if isinstance(extra_vectors, bool) or not isinstance(extra_vectors, int) or \
                extra_vectors < 0:
            raise ValueError(f"extra_vectors must be an int >= 0, not {extra_vectors!r}")
        self.loss_fn, self.k, self.num_matvecs = loss_fn, k, num_matvecs
        self.basis_size = basis_size
        self.reference_loss_fn = reference_loss_fn
        self.tolerance, self.start_noise, self.hvp_mode = tolerance, start_noise, hvp_mode
        self.block_size = k + extra_vectors
        if not (isinstance(per_layer, bool) or callable(per_layer)):
            raise ValueError(f"per_layer must be a bool or a grouping function, not "
                             f"{per_layer!r}")
        self.per_layer = per_layer is not False
        self.grouping = per_layer if callable(per_layer) else None
        # The state is donated: its Ritz vectors' memory holds the next state's.
        self._update = jax.jit(self._measure, donate_argnums=0, static_argnames="shardings")
        self._blocks: dict = {}  # (treedef, leaf shapes) -> (names, indices, device positions)

    def init(self, params: PyTree, key: jax.Array) -> TrackerState:
        """The state before the first call: no Ritz vectors (a cold start) and `key`. The
        Ritz vectors' leaves are placed as the parameters' (`eigensolver.init`)."""
        if not _is_prng_key(key):
            raise ValueError(f"key must be a PRNG key (jax.random.key(0) or jax.random.PRNGKey(0)),"
                             f" not {key!r}")
        trainable.check_params(params)
        flat = jax.eval_shape(lambda p: ravel_pytree(p)[0], params)  # traced: nothing compiled
        lanczos.check_options(self.k, self.num_matvecs, self.tolerance, flat.size,
                              basis_size=self.basis_size)
        solver = eigensolver.init(params, self.k, self.block_size, self.num_matvecs,
                                  self.basis_size)
        layer_vectors = ()
        if self.per_layer:
            layer_vectors = tuple(layers.cold_start_vectors(
                params, self.grouping, self.num_matvecs).values())
        return TrackerState(solver.ritz_vectors, key, layer_vectors)

    def update(self, state: TrackerState, params: PyTree, batch: PyTree, *,
               rho_eff: float | jax.Array | None = None,
               preconditioner: PyTree | None = None,
               edge: float | jax.Array | None = None) -> tuple[SharpnessResult, TrackerState]:
        """Measures the top-k eigenvalues at `params` on `batch`, warm-started from `state`.

        Args:
          state: from `init` or the previous `update`.
          params, batch: the point and the data; the Hessian is taken in `params`.
          rho_eff: None for the Hessian H; else the operator H + rho_eff H^2 (a SAM
            perturbation's effective radius, `sam_eos.effective_radius`).
          preconditioner: None, or a positive diagonal P as a params pytree (e.g.
            `sam_eos.adam_preconditioner(opt_state)`): the operator becomes P^-1/2 A P^-1/2.
          edge: k="edge" only, and required there: the run's edge in the operator's units
            (2/eta; `sam_eos.sam_edge(...)`; `stability_threshold(...)` with a
            preconditioner), a float or a traced scalar (it may change every update).
        Returns:
          `(SharpnessResult, the next state)`. Compiled once per shape and per choice of
          None / not None for `rho_eff` and `preconditioner`.
        """
        trainable.check_params(params)
        if not rows.is_stacked(state.ritz_vectors, params):
            flat = jax.eval_shape(lambda p: ravel_pytree(p)[0], params)
            shapes = [tuple(jnp.shape(v)) for v in jax.tree.leaves(state.ritz_vectors)]
            raise ValueError(
                f"state holds Ritz vectors of shapes {shapes}, for other params: these have "
                f"{flat.size} entries; call tracker.init(params, key) for them")
        if rho_eff is not None and is_static_zero(rho_eff):
            rho_eff = None  # a Python 0: the Hessian itself, one HVP per product
        if self.follows_edge != (edge is not None):
            raise ValueError("edge is required with k='edge' (the run's edge: 2/eta, "
                             "sam_eos.sam_edge, stability_threshold) and only there"
                             if self.follows_edge else
                             "edge is only used with k='edge'; this tracker has k="
                             f"{self.k}")
        line = -jnp.inf if edge is None else self.edge_fraction * jnp.asarray(edge, jnp.float32)
        names, blocks = self._layers(params, state)
        result, state = self._update(state, params, batch, rho_eff, preconditioner, blocks,
                                     line, shardings=rows.vector_shardings(params))
        if not self.per_layer:
            return result, state
        values, shares, infos = result.layer_sharpness, result.layer_shares, result.layer_info
        return result._replace(layer_sharpness=dict(zip(names, values, strict=True)),
                               layer_shares=dict(zip(names, shares, strict=True)),
                               layer_info=dict(zip(names, infos, strict=True))), state

    def _layers(self, params: PyTree, state: TrackerState
                ) -> tuple[tuple[str, ...], tuple[jax.Array, ...]]:
        """The layers' names and positions (`layers.block_arrays`), checked against the
        state's per-layer Ritz vectors; ((), ()) without per_layer."""
        if not self.per_layer:
            return (), ()
        leaves, treedef = jax.tree.flatten(params)
        structure = (treedef, tuple(jnp.shape(leaf) for leaf in leaves))
        if structure not in self._blocks:  # found and put on the device once per structure
            indices = layers.group_indices(params, self.grouping)
            self._blocks[structure] = (indices, layers.block_arrays(indices))
        indices, blocks = self._blocks[structure]
        shapes = [tuple(v.shape) for v in state.layer_ritz_vectors]
        if len(shapes) != len(indices) or any(
                len(shape) != 2 or shape[1] != index.size
                for shape, index in zip(shapes, indices.values(), strict=False)):
            raise ValueError(
                f"state holds per-layer Ritz vectors of shapes {shapes}, for other params: "
                f"these have layers of {[int(i.size) for i in indices.values()]} entries; call"
                " tracker.init(params, key) for them")
        return tuple(indices), blocks

    def _noise_floor(self, params, batch, vector):
        """||H_low v - H_f32 v|| / ||H_f32 v|| at the unit `vector`, params-shaped
        (`hessian`)."""
        dtype = rows.dtype(jax.tree.map(lambda x: x[None], vector))
        vector = otu.tree_scale(1 / jnp.maximum(otu.tree_norm(vector), jnp.finfo(dtype).tiny),
                                vector)
        return hessian.measured_noise_floor(
            self.loss_fn, params, batch, vector,
            reference_loss_fn=self.reference_loss_fn).astype(dtype)

    def _measure(self, state, params, batch, rho_eff, preconditioner, blocks,
                 line=-float("inf"), shardings=None):
        key, next_key = jax.random.split(state.key)
        noisy = hessian.low_precision(params) or self.reference_loss_fn is not None  # static
        previous = rows.row(state.ritz_vectors, 0)
        warm = jnp.any(jnp.stack([jnp.any(x != 0) for x in jax.tree.leaves(previous)]))
        floor = 0.0
        if noisy:  # the products' noise on the previous top Ritz vector; 0 on a cold start
            floor = jax.lax.cond(warm, lambda: self._noise_floor(params, batch, previous),
                                 lambda: jnp.zeros((), rows.dtype(state.ritz_vectors)))
        found, _ = eigensolver.update(
            self.loss_fn, params, batch, key, eigensolver.SolverState(state.ritz_vectors),
            k=self.k, num_matvecs=self.num_matvecs, tolerance=self.tolerance,
            basis_size=self.basis_size,
            start_noise=self.start_noise, rho_eff=0.0 if rho_eff is None else rho_eff,
            preconditioner=preconditioner, hvp_mode=self.hvp_mode,
            noise_floor=floor, shardings=shardings, threshold=line)
        if noisy:  # a cold start measures it on the Ritz vector it found
            floor = jax.lax.cond(warm, lambda: floor, lambda: self._noise_floor(
                params, batch, rows.row(found.ritz_vectors, 0)))
            found = found._replace(
                error_bound=jnp.maximum(found.error_bound, floor),
                hessian_vector_products=found.hessian_vector_products + 2)
        products = found.hessian_vector_products
        direction = eigensolver.top_direction(found.ritz_vectors, params, shardings)
        eigenvalues, count = found.eigenvalues, None
        if self.follows_edge:
            above = eigenvalues >= line
            count = jnp.sum(above).astype(jnp.int32)
            # The top one always, as with any k; the rest above the line.
            kept = above | (jnp.arange(self.k) == 0)
            eigenvalues = jnp.where(kept, eigenvalues, jnp.nan)
        result = SharpnessResult(
            eigenvalues=eigenvalues,
            hessian_vector_products=products,
            error_bound=found.error_bound,
            converged=found.converged,
            direction=direction,
            edge_count=count,
        )
        if not blocks:
            return result, TrackerState(found.ritz_vectors, next_key)
        solved = layers.solve_blocks(
            self.loss_fn, params, batch, jax.random.fold_in(key, _LAYER_SALT),
            jnp.float32(self.tolerance), jnp.float32(self.start_noise), blocks,
            state.layer_ritz_vectors, num_matvecs=self.num_matvecs,
            hvp_mode=hessian.resolve_hvp_mode(self.hvp_mode), noise_floor=floor,
            basis_size=self.basis_size)
        result = result._replace(
            hessian_vector_products=products + sum(info.hessian_vector_products
                                                   for info in solved),
            layer_sharpness=tuple(info.eigenvalues[0] for info in solved),
            layer_shares=layers.block_shares(
                ravel_pytree(rows.row(found.ritz_vectors, 0))[0], blocks),
            layer_info=solved)
        return result, TrackerState(found.ritz_vectors, next_key,
                                    tuple(info.ritz_vectors for info in solved))
