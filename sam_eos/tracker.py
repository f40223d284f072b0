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
rest of a loop's state.

Any params pytree works. Flax NNX and Equinox models hold their parameters in objects: split
them into a pytree and a static part and close `loss_fn` over the static part, e.g.
`graphdef, params = nnx.split(model)` with `loss_fn = lambda p, b: loss(nnx.merge(graphdef, p),
b)`, or `params, static = eqx.partition(model, eqx.is_inexact_array)` with
`loss_fn = lambda p, b: loss(eqx.combine(p, static), b)`. Pass the pytree part as `params`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sam_eos import hessian, lanczos
from sam_eos.effective_sharpness import solve_top
from sam_eos.sam import is_static_zero
from sam_eos.types import LossFn, PyTree

DEFAULT_NUM_MATVECS = hessian.DEFAULT_MAX_ITERATIONS["lanczos"]
DEFAULT_TOLERANCE = hessian.DEFAULT_TOLERANCE["lanczos"]
DEFAULT_EXTRA_VECTORS = hessian.DEFAULT_EXTRA_VECTORS
DEFAULT_START_NOISE = hessian.DEFAULT_START_NOISE


def _is_prng_key(key) -> bool:
    """A typed key (jax.random.key) or a raw uint32 [2] one (jax.random.PRNGKey)."""
    if not hasattr(key, "dtype") or not hasattr(key, "shape"):
        return False
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.shape == ()
    return key.dtype == jnp.uint32 and key.shape == (2,)


class TrackerState(NamedTuple):
    """What one `update` leaves for the next: a pytree of arrays."""

    ritz_vectors: jax.Array  # float [k + extra_vectors, num_params]; zeros: a cold start
    key: jax.Array  # PRNG key of the next call's random start component


class SharpnessResult(NamedTuple):
    """One measurement of the top of the spectrum."""

    eigenvalues: jax.Array  # float [k], the algebraically largest, descending (curvature units)
    hessian_vector_products: jax.Array  # int32 scalar: HVPs this call used
    # float scalar: estimated error of `eigenvalues`, relative to ||A||, with the promise of
    # `hessian.EigenInfo.error_bound`: near *an* eigenvalue each, not proof that none lies above.
    error_bound: jax.Array
    converged: jax.Array  # bool scalar: error_bound <= tolerance within num_matvecs
    direction: PyTree  # params-shaped unit eigenvector of the first eigenvalue

    def scalars(self, prefix: str = "sharpness") -> dict[str, float]:
        """A flat dict of Python scalars for any metric writer (CLU's `metric_writers`,
        tensorboardX, W&B, a print), fetched from the device in one transfer:
        `<prefix>/lambda_1` ... `<prefix>/lambda_k` (descending), `<prefix>/error_bound`,
        `<prefix>/hessian_vector_products` and `<prefix>/converged` (1.0 or 0.0). Name an
        effective-sharpness result's prefix for what it measures, e.g. "effective_sharpness".
        """
        eigenvalues, products, bound, converged = jax.device_get(
            (self.eigenvalues, self.hessian_vector_products, self.error_bound, self.converged))
        values = {f"{prefix}/lambda_{i + 1}": float(v) for i, v in enumerate(eigenvalues)}
        values[f"{prefix}/error_bound"] = float(bound)
        values[f"{prefix}/hessian_vector_products"] = float(products)
        values[f"{prefix}/converged"] = float(converged)
        return values


class SharpnessTracker:
    """Tracks the top-k eigenvalues of the Hessian (or an effective-sharpness operator).

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`.
      k: how many eigenvalues (>= 1).
      num_matvecs: Lanczos products allowed per `update` (each one HVP, two with `rho_eff`).
      tolerance: stop when the estimated error of every top-k eigenvalue is below
        `tolerance * ||A||`.
      extra_vectors: Ritz vectors kept beyond k for the next warm start (directions next in
        line can overtake the top k between calls).
      start_noise: weight of the unit random vector added to each warm start, so that a
        direction that became the top one since the last call is still found.
      hvp_mode: "auto", "linearize" or "forward_over_reverse" (`sam_eos.hessian`).
    """

    def __init__(self, loss_fn: LossFn, k: int = 1, *, num_matvecs: int = DEFAULT_NUM_MATVECS,
                 tolerance: float = DEFAULT_TOLERANCE,
                 extra_vectors: int = DEFAULT_EXTRA_VECTORS,
                 start_noise: float = DEFAULT_START_NOISE, hvp_mode: str = "auto"):
        lanczos.check_options(k, num_matvecs, tolerance, num_params=k)
        if isinstance(extra_vectors, bool) or not isinstance(extra_vectors, int) or \
                extra_vectors < 0:
            raise ValueError(f"extra_vectors must be an int >= 0, not {extra_vectors!r}")
        self.loss_fn, self.k, self.num_matvecs = loss_fn, k, num_matvecs
        self.tolerance, self.start_noise, self.hvp_mode = tolerance, start_noise, hvp_mode
        self.block_size = k + extra_vectors
        self._update = jax.jit(self._measure)

    def init(self, params: PyTree, key: jax.Array) -> TrackerState:
        """The state before the first call: no Ritz vectors (a cold start) and `key`."""
        if not _is_prng_key(key):
            raise ValueError(f"key must be a PRNG key (jax.random.key(0) or jax.random.PRNGKey(0)),"
                             f" not {key!r}")
        flat = jax.eval_shape(lambda p: ravel_pytree(p)[0], params)  # traced: nothing compiled
        lanczos.check_options(self.k, self.num_matvecs, self.tolerance, flat.size)
        # Lanczos returns at most as many Ritz vectors as one cycle holds steps.
        rows = min(self.block_size, lanczos.basis_steps(flat.size, self.num_matvecs))
        return TrackerState(jnp.zeros((rows, flat.size), flat.dtype), key)

    def update(self, state: TrackerState, params: PyTree, batch: PyTree, *,
               rho_eff: float | jax.Array | None = None,
               preconditioner: PyTree | None = None) -> tuple[SharpnessResult, TrackerState]:
        """Measures the top-k eigenvalues at `params` on `batch`, warm-started from `state`.

        Args:
          state: from `init` or the previous `update`.
          params, batch: the point and the data; the Hessian is taken in `params`.
          rho_eff: None for the Hessian H; else the operator H + rho_eff H^2 (a SAM
            perturbation's effective radius, `sam_eos.effective_radius`).
          preconditioner: None, or a positive diagonal P as a params pytree (e.g.
            `sam_eos.adam_preconditioner(opt_state)`): the operator becomes P^-1/2 A P^-1/2.
        Returns:
          `(SharpnessResult, the next state)`. Compiled once per shape and per choice of
          None / not None for `rho_eff` and `preconditioner`.
        """
        flat = jax.eval_shape(lambda p: ravel_pytree(p)[0], params)
        rows = state.ritz_vectors.shape
        if len(rows) != 2 or rows[1] != flat.size:
            raise ValueError(
                f"state holds Ritz vectors of shape {tuple(rows)}, for other params: these have "
                f"{flat.size} entries; call tracker.init(params, key) for them")
        if rho_eff is not None and is_static_zero(rho_eff):
            rho_eff = None  # a Python 0: the Hessian itself, one HVP per product
        return self._update(state, params, batch, rho_eff, preconditioner)

    def _measure(self, state, params, batch, rho_eff, preconditioner):
        key, next_key = jax.random.split(state.key)
        found, unravel, products = solve_top(
            self.loss_fn, params, batch, key, state.ritz_vectors, k=self.k,
            num_matvecs=self.num_matvecs, tolerance=self.tolerance, start_noise=self.start_noise,
            rho_eff=0.0 if rho_eff is None else rho_eff, preconditioner=preconditioner,
            hvp_mode=self.hvp_mode)
        result = SharpnessResult(
            eigenvalues=found.top,
            hessian_vector_products=products,
            error_bound=found.bound,
            converged=found.converged,
            direction=unravel(found.vectors[0]),
        )
        return result, TrackerState(found.vectors, next_key)
