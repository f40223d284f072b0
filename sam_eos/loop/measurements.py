"""The optional curvature measurements of a Hessian check, taken after the main one.

Four, each off by default (`SpectrumOptions`), each a separate jitted function compiled ahead
of time once per run (`compile_spectrum_checks`) from `sam_eos.spectrum`'s pure core:

- the Hessian trace (XTrace, `hessian_trace_matvecs` products) on the check's batch: columns
  `trace`, `trace_standard_error`;
- the spectral density (SLQ, DENSITY_PROBES probes of DENSITY_LANCZOS_STEPS steps) on the
  check's batch, every `spectral_density_every_checks`-th check: nodes and weights, saved
  beside the raw data (`sam_eos.reports.raw_data.DensityWriter`), not a column;
- batch sharpness over the training minibatches of the current chunk, gathered on the device
  by the feed's `select`, BATCH_SHARPNESS_CHUNK at a time (one compiled shape) until the
  Monte-Carlo rule `spectrum.enough_batches` holds or MAX_BATCHES: columns `batch_sharpness`,
  `batch_sharpness_standard_error`, `batch_sharpness_batches`;
- the top eigenvalue at the SAM point on the check's batch (Lanczos, warm-started from the
  previous check's own Ritz vectors): columns `sam_point_sharpness`,
  `sam_point_hessian_vector_products`;
- each layer's sharpness (`sam_eos.layer_sharpness`: the top eigenvalue of its diagonal Hessian
  block, Lanczos warm-started per layer) on the check's batch, and the share of the check's top
  eigenvector in each layer: columns `layer_sharpness/<layer>`, `layer_share/<layer>` per layer
  (`layer_column_names`), then `layer_hessian_vector_products` and `layer_error_bound` (the
  largest of the layers' bounds).

The SAM point's and the layers' Ritz vectors are the state carried between checks: they live
in the loop's state (`sam_eos.loop.state.LoopState`), so checkpoints keep them and a resumed
run starts warm.
"""

import dataclasses
import math
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import logging

from sam_eos import eigensolver, hessian, layers, spectrum
from sam_eos.errors import InputError
from sam_eos.lanczos import EigenInfo
from sam_eos.loop import steps
from sam_eos.loop.feed import Feed
from sam_eos.types import LossFn, PyTree

DENSITY_PROBES = 4
DENSITY_LANCZOS_STEPS = 64  # at most the number of parameters
BATCH_SHARPNESS_CHUNK = 8  # minibatches per compiled call
MAX_BATCHES = 64  # the Monte-Carlo cap per check
TRACE_MIN_MATVECS = 4  # XTrace needs two probes of two products
# Salts folded into the check's key so the measurements draw independent randomness.
_TRACE_SALT, _DENSITY_SALT, _SAM_POINT_SALT, _LAYER_SALT = 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class SpectrumOptions:
    """Which optional measurements a check takes; validated on construction (InputError)."""

    hessian_trace_matvecs: int = 0  # 0: off
    spectral_density_every_checks: int = 0  # 0: off
    batch_sharpness: bool = False
    sam_point_sharpness: bool = False
    layer_sharpness: bool = False

    def __post_init__(self):
        matvecs, every = self.hessian_trace_matvecs, self.spectral_density_every_checks
        if not (matvecs == 0 or matvecs >= TRACE_MIN_MATVECS):
            raise InputError(
                f"--hessian_trace_matvecs must be 0 (off) or at least {TRACE_MIN_MATVECS} "
                f"(XTrace needs two probes of two products; got {matvecs})")
        if every < 0:
            raise InputError(f"--spectral_density_every_checks must be >= 0 (got {every}); 0 "
                             "turns the densities off")

    def enabled(self) -> bool:
        return bool(self.hessian_trace_matvecs or self.spectral_density_every_checks
                    or self.batch_sharpness or self.sam_point_sharpness
                    or self.layer_sharpness)


def layer_names(params: PyTree) -> list[str]:
    """The layers of `params` as the raw data names them: the first level's names
    (`sam_eos.layers.group_indices`), blanks replaced by "_" (columns are blank-separated)."""
    return ["_".join(name.split()) for name in layers.group_indices(params)]


def layer_column_names(names: list[str]) -> list[str]:
    """`layer_sharpness/<layer>` for each layer, then `layer_share/<layer>` for each, then
    the layers' products and largest error bound."""
    return ([f"layer_sharpness/{name}" for name in names]
            + [f"layer_share/{name}" for name in names]
            + ["layer_hessian_vector_products", "layer_error_bound"])


def extra_column_names(options: SpectrumOptions, layers_named: list[str] = ()) -> list[str]:
    """The raw-data columns the enabled measurements add (none by default); `layers_named`:
    the layers' names (`layer_names`), for `layer_sharpness`."""
    names = []
    if options.hessian_trace_matvecs:
        names += ["trace", "trace_standard_error"]
    if options.batch_sharpness:
        names += ["batch_sharpness", "batch_sharpness_standard_error", "batch_sharpness_batches"]
    if options.sam_point_sharpness:
        names += ["sam_point_sharpness", "sam_point_hessian_vector_products"]
    if options.layer_sharpness:
        names += layer_column_names(list(layers_named))
    return names


@dataclasses.dataclass
class SpectrumResult:
    """One check's extra columns, its density (nodes, weights [probes, steps]) when taken, the
    error message of a measurement that failed (its columns are then nan), and the SAM point's
    Ritz vectors for the next check's warm start (None: keep the previous ones)."""

    columns: dict[str, float]
    density: tuple[np.ndarray, np.ndarray] | None = None
    error: str | None = None
    sam_point_vectors: jax.Array | None = None
    layer_vectors: tuple[jax.Array, ...] | None = None  # the layers' Ritz vectors, likewise


# ---------------------------------------------------------------------------------------------
# The pure, jitted parts


def make_trace(loss_fn: LossFn, num_matvecs: int):
    """A jitted `(params, batch, key, step) -> (trace, standard_error)`."""
    def trace(params, batch, key, step):
        key = jax.random.fold_in(jax.random.fold_in(key, step), _TRACE_SALT)
        return spectrum.hessian_trace(loss_fn, params, batch, key, num_matvecs)
    return jax.jit(trace)


def make_density(loss_fn: LossFn, num_matvecs: int):
    """A jitted `(params, batch, key, step) -> (nodes, weights)`, each [DENSITY_PROBES,
    num_matvecs]."""
    def density(params, batch, key, step):
        key = jax.random.fold_in(jax.random.fold_in(key, step), _DENSITY_SALT)
        return spectrum.spectral_density(loss_fn, params, batch, key, DENSITY_PROBES,
                                         num_matvecs)
    return jax.jit(density)


def make_batch_sharpness_samples(loss_fn: LossFn, select: Callable):
    """A jitted `(params, arrays, rows int32 [C]) -> float [C]`: g^T H g / ||g||^2 of the
    minibatch `select(arrays, row)` of each row, gathered on the device."""
    def samples(params, arrays, rows):
        batches = jax.vmap(lambda row: select(arrays, row))(rows)  # [C, ...] minibatches
        return spectrum.batch_sharpness_samples(loss_fn, params, batches)
    return jax.jit(samples)


def make_sam_point_sharpness(loss_fn: LossFn, rho: float, num_matvecs: int,
                             tolerance: float, variant: str = "sam",
                             basis_size: int | None = None):
    """A jitted `(params, batch, key, step, start_vectors) -> EigenInfo` of the top eigenvalue
    at the SAM point (unconverged: its last estimate, as the main check's); `basis_size`: the
    Lanczos basis' vectors (None: the default)."""
    def sam_point_sharpness(params, batch, key, step, start_vectors):
        key = jax.random.fold_in(jax.random.fold_in(key, step), _SAM_POINT_SALT)
        return spectrum.sam_point_sharpness(
            loss_fn, params, batch, key, rho, variant, num_matvecs=num_matvecs,
            tolerance=tolerance, start_vectors=start_vectors, basis_size=basis_size)[1]
    return jax.jit(sam_point_sharpness)


def make_layer_sharpness(loss_fn: LossFn, num_matvecs: int, tolerance: float,
                         basis_size: int | None = None):
    """A jitted `(params, batch, key, step, blocks, start_vectors, direction, noise_floor) ->
    (infos, shares)`: each layer's `EigenInfo` (`sam_eos.layers.solve_blocks`, `blocks` its
    int32 positions, `start_vectors` its Ritz vectors, each a tuple in the layers' order) and
    the shares of the flat unit `direction` [n] (the check's top Ritz vector); `basis_size`:
    each layer's Lanczos basis (None: the default)."""
    def layer_sharpness(params, batch, key, step, blocks, start_vectors, direction,
                        noise_floor):
        key = jax.random.fold_in(jax.random.fold_in(key, step), _LAYER_SALT)
        infos = layers.solve_blocks(
            loss_fn, params, batch, key, jax.numpy.float32(tolerance),
            jax.numpy.float32(eigensolver.DEFAULT_START_NOISE), blocks, start_vectors,
            num_matvecs=num_matvecs, hvp_mode=hessian.resolve_hvp_mode("auto"),
            noise_floor=noise_floor, basis_size=basis_size)
        return infos, layers.block_shares(direction, blocks)
    return jax.jit(layer_sharpness)


# ---------------------------------------------------------------------------------------------
# The loop side


def batch_rows(start: int, available: int, chunk: int, index: int) -> np.ndarray:
    """int32 [chunk]: rows of the `index`-th chunk of minibatches from row `start`, wrapping
    round the `available` rows of the feed's current chunk."""
    return ((start + np.arange(index * chunk, (index + 1) * chunk)) % available).astype(np.int32)


@dataclasses.dataclass
class SpectrumChecks:
    """The compiled measurements of one run (None: off)."""

    options: SpectrumOptions
    trace: Callable | None = None
    density: Callable | None = None
    batch_samples: Callable | None = None
    sam_point: Callable | None = None
    layers: Callable | None = None
    layer_names: tuple[str, ...] = ()
    layer_blocks: tuple[jax.Array, ...] = ()  # int32 positions per layer, on the device
    chunk: int = 1
    noise_floor: float = 0.0  # the products' relative error (the main check's)

    def measure(self, params: PyTree, batch: PyTree, feed: Feed, key: jax.Array, step: int,
                check_index: int, sam_point_vectors: jax.Array | None = None,
                layer_vectors: tuple[jax.Array, ...] | None = None,
                direction: jax.Array | None = None) -> SpectrumResult:
        """The enabled measurements at this check (the run's `check_index`-th, from 0), the
        SAM point's warm-started from `sam_point_vectors`, the layers' from `layer_vectors`
        with the shares of `direction` (flat [n], the check's top Ritz vector); a measurement
        that raises gives nan columns and an error message, never an exception."""
        names = extra_column_names(self.options, list(self.layer_names))
        try:
            return self._measure(params, batch, feed, key, np.int32(step), check_index,
                                 sam_point_vectors, layer_vectors, direction)
        except Exception as error:  # noqa: BLE001 - an extra must not fail the check
            logging.exception("The spectrum measurements at step %d failed.", step)
            return SpectrumResult(dict.fromkeys(names, math.nan),
                                  error=f"{type(error).__name__}: {error}")

    def _measure(self, params, batch, feed, key, step, check_index, sam_point_vectors,
                 layer_vectors, direction) -> SpectrumResult:
        columns: dict[str, float] = {}
        density, vectors, next_layer_vectors = None, None, None
        seconds = {}  # measurement -> wall-clock seconds, logged
        started = time.perf_counter()
        if self.trace is not None:
            estimate, error = jax.device_get(self.trace(params, batch, key, step))
            columns.update(trace=float(estimate), trace_standard_error=float(error))
            seconds["trace"], started = time.perf_counter() - started, time.perf_counter()
        if self.batch_samples is not None:
            columns.update(self._batch_sharpness(params, feed))
            seconds["batch sharpness"], started = time.perf_counter() - started, time.perf_counter()
        if self.sam_point is not None:
            info = self.sam_point(params, batch, key, step, sam_point_vectors)
            # Kept where the compiled function expects its start (its output may sit elsewhere).
            vectors = jax.device_put(info.ritz_vectors, sam_point_vectors.sharding)
            columns.update(sam_point_sharpness=float(info.eigenvalues[0]),
                           sam_point_hessian_vector_products=float(
                               info.hessian_vector_products))
            seconds["SAM point"], started = time.perf_counter() - started, time.perf_counter()
        if self.layers is not None:
            infos, shares = self.layers(params, batch, key, step, self.layer_blocks,
                                        layer_vectors, direction, np.float32(self.noise_floor))
            next_layer_vectors = tuple(
                jax.device_put(info.ritz_vectors, old.sharding)
                for info, old in zip(infos, layer_vectors, strict=True))
            columns.update(self._layer_columns(infos, shares))
            seconds["layers"], started = time.perf_counter() - started, time.perf_counter()
        every = self.options.spectral_density_every_checks
        if self.density is not None and check_index % every == 0:
            nodes, weights = jax.device_get(self.density(params, batch, key, step))
            density = (np.asarray(nodes), np.asarray(weights))
            seconds["density"] = time.perf_counter() - started
        logging.info("spectrum at step %d: %s | %s", step,
                     ", ".join(f"{name} {value:.6g}" for name, value in columns.items()),
                     ", ".join(f"{name} {value:.2f} s" for name, value in seconds.items()))
        return SpectrumResult(columns, density, sam_point_vectors=vectors,
                              layer_vectors=next_layer_vectors)

    def _layer_columns(self, infos: tuple[EigenInfo, ...], shares: tuple[jax.Array, ...]
                       ) -> dict[str, float]:
        infos = [info._replace(ritz_vectors=None) for info in infos]  # only scalars to the host
        infos, shares = jax.device_get((infos, shares))
        columns = {f"layer_sharpness/{name}": float(info.eigenvalues[0])
                   for name, info in zip(self.layer_names, infos, strict=True)}
        columns.update({f"layer_share/{name}": float(share)
                        for name, share in zip(self.layer_names, shares, strict=True)})
        columns["layer_hessian_vector_products"] = float(
            sum(int(info.hessian_vector_products) for info in infos))
        columns["layer_error_bound"] = float(max(float(info.error_bound) for info in infos))
        return columns

    def _batch_sharpness(self, params: PyTree, feed: Feed) -> dict[str, float]:
        """Batch sharpness over the feed's current minibatches, chunk by chunk until the
        Monte-Carlo rule holds (`spectrum.enough_batches`)."""
        start, left = feed.row(), feed.rows_left()
        available = 1 if left is None else start + left
        cap = min(MAX_BATCHES, available)
        arrays, samples, index = feed.arrays(), np.zeros(0), 0
        while not spectrum.enough_batches(samples, cap):
            rows = batch_rows(start, available, self.chunk, index)
            chunk = np.asarray(jax.device_get(self.batch_samples(params, arrays, rows)))
            samples, index = np.concatenate([samples, chunk])[:cap], index + 1
        mean, standard_error = spectrum.mean_and_standard_error(samples)
        return {"batch_sharpness": mean, "batch_sharpness_standard_error": standard_error,
                "batch_sharpness_batches": float(samples.size)}


def compile_spectrum_checks(loss_fn: LossFn, options: SpectrumOptions, *, rho: float,
                            num_matvecs: int, tolerance: float, feed: Feed,
                            params: PyTree, batch: PyTree, key: jax.Array,
                            sam_point_vectors: jax.Array | None = None,
                            layer_vectors: tuple[jax.Array, ...] | None = None,
                            direction: jax.Array | None = None,
                            variant: str = "sam",
                            basis_size: int | None = None) -> SpectrumChecks:
    """Compiles the enabled measurements for this run's shapes (`steps.compile_ahead`, each
    logged). `batch` is an example of the check's batch; `sam_point_vectors` of the SAM
    point's warm start (with `sam_point_sharpness`); `layer_vectors` of the layers' and
    `direction` of a flat top Ritz vector [n] (with `layer_sharpness`); `basis_size`: the
    Lanczos basis of the SAM-point and layer solves (None: the default)."""
    checks = SpectrumChecks(options)
    step = np.int32(0)
    if options.hessian_trace_matvecs:
        checks.trace = steps.compile_ahead(
            "the Hessian trace", make_trace(loss_fn, options.hessian_trace_matvecs),
            params, batch, key, step)
    if options.spectral_density_every_checks:
        num_params = sum(x.size for x in jax.tree.leaves(params))
        checks.density = steps.compile_ahead(
            "the spectral density",
            make_density(loss_fn, min(DENSITY_LANCZOS_STEPS, num_params)),
            params, batch, key, step)
    if options.batch_sharpness:
        checks.chunk = min(BATCH_SHARPNESS_CHUNK, feed.chunk_rows or 1)
        checks.batch_samples = steps.compile_ahead(
            "the batch sharpness", make_batch_sharpness_samples(loss_fn, feed.select),
            params, feed.arrays(), np.zeros(checks.chunk, np.int32))
    if options.sam_point_sharpness:
        checks.sam_point = steps.compile_ahead(
            "the SAM-point sharpness",
            make_sam_point_sharpness(loss_fn, rho, num_matvecs, tolerance, variant,
                                     basis_size),
            params, batch, key, step, sam_point_vectors)
    if options.layer_sharpness:
        checks.layer_names = tuple(layer_names(params))
        checks.layer_blocks = layers.block_arrays(layers.group_indices(params))
        checks.layers = steps.compile_ahead(
            "the layers' sharpness",
            make_layer_sharpness(loss_fn, num_matvecs, tolerance, basis_size),
            params, batch, key, step, checks.layer_blocks, layer_vectors, direction,
            np.float32(0))
    return checks
