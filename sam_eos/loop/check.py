"""The main Hessian check of a run, as one unit: its compiled parts, its chunk plan, the
products' noise floor, and how one check is taken from the loop's state.

A check is the eigensolver in bounded chunks (the loop reads its stop flag between them), then
the measurements along the principal direction found, then, for Adam, the effective sharpness
(`sam_eos.loop.steps`). The Ritz vectors each solve starts warm from live in the loop's state
(`sam_eos.loop.state.LoopState`, built by `initial_state`), which checkpoints save with the
parameters.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sam_eos import eigensolver, hessian, layers
from sam_eos.lanczos import EigenInfo
from sam_eos.loop import distributed, steps
from sam_eos.loop.config import TrainConfig
from sam_eos.loop.feed import Placement
from sam_eos.loop.state import LoopState
from sam_eos.types import LossFn, PyTree


def initial_state(params: PyTree, opt_state: PyTree, config: TrainConfig) -> LoopState:
    """The loop's state before the first step: `params`, `opt_state` and every warm start
    cold (the Adam and spectrum ones only when the run measures them). The main Ritz block has
    k + 2 rows, fewer when one chunk's Lanczos steps cannot hold them (a tiny model or
    --eigensolver_max_iterations); the one-eigenvalue solves' have 3, fewer when their whole
    budget cannot."""
    budget = config.solver_budget("lanczos")
    chunk = steps.chunk_plan(config.eigensolver, config.solver_budget())[0]
    basis_size = config.eigensolver_basis_size
    main = eigensolver.init(params, config.num_principal_components,
                            num_matvecs=chunk if config.eigensolver == "lanczos" else None,
                            basis_size=basis_size, flat=True)
    single = eigensolver.init(params, 1, num_matvecs=budget, basis_size=basis_size,
                              flat=True).ritz_vectors
    return LoopState(
        params, opt_state, main.ritz_vectors,
        effective_ritz_vectors=single if config.optimizer == "adam" else None,
        sam_point_ritz_vectors=single if config.spectrum.sam_point_sharpness else None,
        layer_ritz_vectors=(tuple(layers.cold_start_vectors(params, num_matvecs=budget).values())
                            if config.spectrum.layer_sharpness else None))


def cold_like(vectors: PyTree) -> PyTree:
    """Zeros shaped and placed as `vectors` (an array, or a tuple of them): a cold start for
    the solve they warm-start."""
    return jax.tree.map(lambda v: jnp.zeros_like(v, device=v.sharding), vectors)


def start_block(state: LoopState, name: str, warm: bool) -> PyTree:
    """The state's warm start `name`, or zeros shaped like it when not `warm`
    (--eigensolver_warm_start=false)."""
    vectors = getattr(state, name)
    return vectors if warm else cold_like(vectors)


AUDIT_SALT = 7  # folded into the check's key for the audit's random start


def solver_columns(info: EigenInfo) -> dict[str, Any]:
    """A check's solve as the raw data's measurements: `eigenvalues` [k], `lambda_min` (the
    bottom Ritz value), `hessian_vector_products`, `error_bound` and `converged`."""
    return {"eigenvalues": info.eigenvalues, "lambda_min": info.bottom_eigenvalue,
            "hessian_vector_products": info.hessian_vector_products,
            "error_bound": info.error_bound, "converged": info.converged}


@dataclasses.dataclass
class Measurement:
    """One check's result on the host: its `columns` (`solver_columns`, `steps.make_measure`'s
    and, when audited, `audit_error`) and optional `extra` (`measurements.SpectrumResult`), or
    the `error` it raised; neither: interrupted between chunks (no row). `seconds`: its wall
    time; `products`: the HVPs of the main solve and its audit."""

    columns: dict[str, Any] | None = None
    extra: Any = None
    error: Exception | None = None
    seconds: float = math.nan
    products: int = 0

    @property
    def interrupted(self) -> bool:
        return self.columns is None and self.error is None


@dataclasses.dataclass
class HessianCheck:
    """A run's compiled check: `eigensolver_chunk(params, batch, key, step, chunk,
    start_vectors, start_noise, noise_floor)` run up to `max_chunks` times, then
    `measure(params, batch, ritz_vectors)`, then (Adam) `effective(params, opt_state, batch,
    key, step, start_vectors, rho_eff)`. `cold_start`: the zero Ritz block; `noise_floor`: the
    products' relative error (0 until measured); `audit_every`: every this many checks (from
    the run's `audit_every`-th) the warm solve is audited (`audit`)."""

    eigensolver_chunk: Callable
    measure: Callable
    cold_start: jax.Array
    max_chunks: int = 1
    warm_start: bool = True
    effective: Callable | None = None
    noise_floor: float = 0.0
    audit_every: int = 0  # audit every this many checks (0: never)

    def solve(self, params: PyTree, batch: PyTree, key: jax.Array, step: int,
              start: jax.Array, stop_requested: Callable[[], bool]
              ) -> tuple[EigenInfo | None, int]:
        """The eigensolver, chunk by chunk until converged or `max_chunks` (the first warm or
        cold from `start`, each later one continuing from the previous chunk's Ritz vectors):
        (the last chunk's `EigenInfo` with the products of all, or None when a stop was
        requested between chunks; the products used)."""
        vectors, noise, products = start, np.float32(eigensolver.DEFAULT_START_NOISE), 0
        for chunk in range(self.max_chunks):
            if chunk and stop_requested():
                return None, products
            solved = self.eigensolver_chunk(params, batch, key, np.int32(step), np.int32(chunk),
                                            vectors, noise, np.float32(self.noise_floor))
            products += int(solved.hessian_vector_products)
            vectors, noise = solved.ritz_vectors, np.float32(0)
            if bool(solved.converged):
                break
        return solved._replace(hessian_vector_products=np.int32(products)), products

    def audit(self, solved: EigenInfo, params: PyTree, batch: PyTree, key: jax.Array,
              step: int, stop_requested: Callable[[], bool]
              ) -> tuple[EigenInfo | None, float, int]:
        """The warm solve `solved` checked against a cold one from a fresh random vector (its
        key folded with AUDIT_SALT): (the one with the larger top eigenvalue, since a Ritz value
        never exceeds lambda_max, with the products of both; `audit_error` = (cold top - warm
        top) / |larger top|, > 0 when the warm solve missed; the audit's products). None and
        nan when interrupted.

        Two solves that disagree by more than 3 x their error bounds show that a bound was
        broken (a residual bound cannot see an eigenvalue its Krylov space barely holds): the
        row's `error_bound` is then at least the disagreement and `converged` is false, so the
        miss is reported, not hidden. It is logged."""
        cold, products = self.solve(params, batch, jax.random.fold_in(key, AUDIT_SALT), step,
                                    self.cold_start, stop_requested)
        if cold is None:
            return None, math.nan, products
        warm_top, cold_top = (float(np.asarray(s.eigenvalues)[0]) for s in (solved, cold))
        larger = max(warm_top, cold_top)
        error = (cold_top - warm_top) / abs(larger) if larger else 0.0
        chosen = cold if cold_top > warm_top else solved
        bounds = max(float(solved.error_bound), float(cold.error_bound))
        bound, converged = chosen.error_bound, chosen.converged
        if abs(error) > 3 * bounds:
            logging.warning("Audit at step %d: the warm check found %.6g, a cold solve %.6g "
                            "(%.2g relative, beyond their error bounds %.2g); the row keeps "
                            "%.6g, with the disagreement as its bound and converged 0.", step,
                            warm_top, cold_top, error, bounds, max(warm_top, cold_top))
            bound, converged = np.maximum(bound, abs(error)), np.bool_(False)
        chosen = chosen._replace(
            error_bound=bound, converged=converged,
            hessian_vector_products=np.int32(int(solved.hessian_vector_products) + products))
        return chosen, error, products

    def take(self, state: LoopState, batch: PyTree, key: jax.Array, step: int,
             stop_requested: Callable[[], bool], check_index: int = 0
             ) -> tuple[Measurement, LoopState]:
        """One check at `state`, the run's `check_index`-th (from 0): (its `Measurement`,
        without `extra` and `seconds`; the state with this check's Ritz vectors)."""
        start = start_block(state, "ritz_vectors", self.warm_start)
        solved, products = self.solve(state.params, batch, key, step, start, stop_requested)
        audit = {}
        if solved is not None and self.audit_every and check_index \
                and check_index % self.audit_every == 0:
            solved, error, audited = self.audit(solved, state.params, batch, key, step,
                                                stop_requested)
            products += audited
            audit = {"audit_error": error}
        if solved is None:
            return Measurement(products=products), state
        measured = jax.device_get({
            **self.measure(state.params, batch, solved.ritz_vectors),
            **solver_columns(solved), **audit})
        state = state._replace(ritz_vectors=solved.ritz_vectors)
        if self.effective is not None:
            out = self.effective(state.params, state.opt_state, batch, key,
                                 np.int32(step),
                                 start_block(state, "effective_ritz_vectors", self.warm_start),
                                 np.float32(measured["rho_eff"]), np.float32(self.noise_floor))
            measured["effective_sharpness"] = float(out.eigenvalues[0])
            measured["hessian_vector_products"] = (int(measured["hessian_vector_products"])
                                                   + int(out.hessian_vector_products))
            state = state._replace(effective_ritz_vectors=out.ritz_vectors)
        return Measurement(measured, products=products), state

    def measure_noise_floor(self, loss_fn: LossFn, config: TrainConfig,
                            state: LoopState, batch: PyTree, key: jax.Array,
                            note: Callable[[str], None]) -> None:
        """Sets `noise_floor`: the products' relative error at the default matmul precision
        against "highest" (`hessian.product_noise_floor`; 0 unmeasured on a CPU), once per
        run on the first check's batch along the restored top Ritz vector, or a random unit
        vector. Logged; a tolerance below it is noted (`note`) in the log and the raw data:
        the checks keep the default precision and report the floor in their error bound."""
        try:
            vector = _unit_or_random(state.ritz_vectors[0], key)
            floor = float(hessian.product_noise_floor(loss_fn, state.params, batch, vector))
        except Exception:  # noqa: BLE001 - without it, the bounds are the solver's own
            logging.exception("Measuring the products' noise floor failed; taking it as 0.")
            return
        self.noise_floor = floor if math.isfinite(floor) else 0.0
        if jax.default_backend() in hessian.EXACT_DEFAULT_PRECISION_BACKENDS:
            logging.info("Hessian-vector products: full float32 precision on %s (noise floor "
                         "%.2g).", jax.default_backend(), self.noise_floor)
        else:
            logging.info("Hessian-vector products: relative error %.2g at the default matmul "
                         "precision (against 'highest'); every check's error bound includes "
                         "it.", self.noise_floor)
        tolerance = config.solver_tolerance("lanczos")
        if tolerance < self.noise_floor:
            message = (f"the eigensolver tolerance {tolerance:.2g} is below the products' "
                       f"noise floor {self.noise_floor:.2g} (default matmul precision): checks "
                       "stop at the floor and add it to their error_bound; the tolerance "
                       "cannot be met")
            logging.warning(message[0].upper() + message[1:] + ".")
            note(message)


@jax.jit
def _unit_or_random(vector: jax.Array, key: jax.Array) -> jax.Array:
    """`vector` [n] scaled to unit length, or a unit random vector if it is zero."""
    norm = jnp.linalg.norm(vector)
    random = jax.random.normal(key, vector.shape, vector.dtype)
    chosen = jnp.where(norm > 0, vector, random)
    return chosen / jnp.linalg.norm(chosen)


def make_check(loss_fn: LossFn, config: TrainConfig, matvecs: int,
               place: Placement | None = None) -> tuple[Callable, Callable]:
    """The jitted parts of a check with `config`'s settings: `(eigensolver_chunk, measure)`
    (`sam_eos.loop.steps`), a chunk being `matvecs` products; on a mesh (`place`) the chunk's
    outputs are replicated, as the loop's state that holds its Ritz vectors."""
    chunk = steps.make_eigensolver_chunk(
        loss_fn, k=config.num_principal_components, method=config.eigensolver,
        num_matvecs=matvecs, tolerance=config.solver_tolerance(),
        basis_size=config.eigensolver_basis_size, out_sharding=_replicated(place))
    threshold = None if config.is_default_method() else config.stability_threshold()
    return chunk, steps.make_measure(loss_fn, rho=config.rho, step_size=config.step_size,
                                     variant=config.sam_variant, optimizer=config.optimizer,
                                     threshold=threshold)


def _replicated(place: Placement | None):
    return None if place is None or place.mesh is None else distributed.replicated_sharding(
        place.mesh)


def compile_check(loss_fn: LossFn, config: TrainConfig, state: LoopState,
                  batch: PyTree, key: jax.Array, place: Placement) -> HessianCheck:
    """The check compiled for this run's shapes (one executable for warm and cold starts and
    for every chunk). A part that cannot be compiled fails at every check instead (a nan row
    and a note), as a check that raises does; training goes on."""
    matvecs, chunks = steps.chunk_plan(config.eigensolver, config.solver_budget())
    try:
        chunk, measure = make_check(loss_fn, config, matvecs, place)
        chunk = steps.compile_ahead(
            "the Hessian check", chunk, state.params, batch, key, np.int32(0), np.int32(0),
            state.ritz_vectors, np.float32(0), np.float32(0))
        measure = steps.compile_ahead("the check's measurements", measure, state.params,
                                      batch, state.ritz_vectors)
    except Exception as error:  # noqa: BLE001 - reported at every check instead
        logging.exception("Compiling the Hessian check failed.")
        chunk = measure = steps.failing(error)
    effective = None
    if state.effective_ritz_vectors is not None:
        effective = _compile_effective(loss_fn, config, state, batch, key, place)
    return HessianCheck(chunk, measure, cold_start=cold_like(state.ritz_vectors),
                        max_chunks=chunks, warm_start=config.eigensolver_warm_start,
                        effective=effective,
                        audit_every=config.eigensolver_audit_every if config.audits() else 0)


def not_compiled(cold_start: jax.Array, reason: str) -> HessianCheck:
    """A check that fails whenever it is taken (none scheduled, or stopped while compiling)."""
    fail = steps.failing(RuntimeError(reason))
    return HessianCheck(fail, fail, cold_start=cold_start)


def _compile_effective(loss_fn: LossFn, config: TrainConfig, state: LoopState,
                       batch: PyTree, key: jax.Array, place: Placement) -> Callable:
    """Adam's effective-sharpness solve (`steps.make_effective_sharpness`), compiled."""
    try:
        effective = steps.make_effective_sharpness(
            loss_fn, b2=config.adam_b2, eps=config.adam_eps,
            num_matvecs=config.solver_budget("lanczos"),
            tolerance=config.solver_tolerance("lanczos"),
            perturbed=config.rho > 0, basis_size=config.eigensolver_basis_size,
            out_sharding=_replicated(place))
        return steps.compile_ahead(
            "the effective sharpness", effective, state.params, state.opt_state, batch,
            key, np.int32(0), state.effective_ritz_vectors, np.float32(0), np.float32(0))
    except Exception as error:  # noqa: BLE001 - reported at every check instead
        logging.exception("Compiling the effective sharpness failed.")
        return steps.failing(error)
