"""Benchmarks of sam_eos, printed as one markdown table: `python3 -m benchmarks.run [--quick]`.

1. Eigensolver accuracy and cost: `sam_eos.hessian.top_eigenvalues` (default Lanczos, and the
   original's finite-difference power iteration, `method="power"`) on the 239k-parameter MLP
   (3 hidden layers of 200 units) on 2000 MNIST images, full batch, after GD training at step
   size 0.05. Reference: an independent Lanczos written here (float64 NumPy, full
   reorthogonalisation, exact float64 HVPs from JAX), run until the residual of every top
   Ritz pair is below 1e-10 ||H||; its residuals are then recomputed with one more HVP each.
   The library's own long run (`max_iterations=300, tolerance=1e-10`) is compared with it too.
2. No recompilation: a short `sam_eos.loop.train.run` with step-based checks; the times of its
   checks come from its log lines and a trace counter (a Python side effect in `loss_fn`).
3. One jitted SAM step (rho = 0.05) vs one GD step, on the MLP and the default transformer.
4. Loop overhead: `sam_eos.loop.train.run` (full batch, no checks) vs a bare jitted `fori_loop` of
   `sam_eos.sam.sam_update` on a tiny model; host-to-device transfers of the batch counted.
5. Memory: peak host RSS (VmHWM, else `ru_maxrss`, of a child process) of one
   `top_eigenvalues` call on the 2.8M-parameter MNIST MLP and on the transformer, vs a child
   that stops just before it.
6. Fidelity: `method="power"` against the original's power-iteration loop (written out here)
   and the exact lambda_max, on the MLP (3 hidden layers of 100 units) at initialisation on
   1000 MNIST images, over 7 start keys.

Every time is the median of several calls of already compiled code (interleaved between the
cases compared, so a change in machine load hits all of them alike) unless it says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging as std_logging
import pathlib
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging as absl_logging
from jax.flatten_util import ravel_pytree

from benchmarks import problems
from sam_eos import hessian, power_iteration, sam
from sam_eos.loop import train
from sam_eos.loop.feed import FullBatchFeed
from sam_eos.loop.steps import make_train_steps
from sam_eos.types import LossFn, PyTree

STEP_SIZE = 0.05
RHO = 0.05
MLP_WIDTH, MLP_DEPTH = 200, 4  # 3 hidden layers of 200 units
NUM_IMAGES = 2000
MEMORY_MLP_WIDTH = 1000  # the image program's default MLP
MEMORY_NUM_IMAGES = 256
TEXT_BATCH_SIZE = 32
REFERENCE_TOLERANCE = 1e-10
TIGHT_POWER_TOLERANCE = hessian.DEFAULT_TOLERANCE["lanczos"]
TARGET_RELATIVE_ERROR = 1e-4
TARGET_TIME_RATIO = 0.5
TARGET_SAM_RATIO = 2.1
TARGET_LOOP_OVERHEAD = 0.15
TARGET_MEMORY_BYTES = 4 * 2**30
GIB = 2**30


# ---------------------------------------------------------------------------------------------
# Settings, timing and the table


@dataclasses.dataclass(frozen=True)
class Settings:
    """How long and how often to measure (`--quick` shortens everything)."""

    data_dir: pathlib.Path
    quick: bool
    repeats: int  # timed eigensolver calls per case
    step_repeats: int  # timed single steps per case
    train_steps: int  # GD steps before the MLP's Hessian is measured
    reference_iterations: int  # max_iterations of the library's long Lanczos run
    check_every: int  # steps between checks in benchmark 2
    num_checks: int
    loop_seconds: float  # about how long the longest loop of benchmark 4 runs
    float64: bool  # the reference in float64 (else float32 HVPs)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        quick = args.quick
        return cls(
            data_dir=pathlib.Path(args.data_dir),
            quick=quick,
            repeats=args.repeats or (3 if quick else 5),
            step_repeats=8 if quick else 20,
            train_steps=200 if quick else 400,
            reference_iterations=150 if quick else 300,
            check_every=10,
            num_checks=3 if quick else 5,
            loop_seconds=0.5 if quick else 1.5,
            float64=not args.no_float64,
        )


@dataclasses.dataclass
class Row:
    """One line of the results table."""

    benchmark: str
    case: str
    time: str
    details: str
    target: str = ""
    met: str = ""


def yes_no(condition: bool) -> str:
    return "yes" if condition else "**no**"


def format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def markdown_table(rows: list[Row]) -> str:
    header = ["Benchmark", "Case", "Time", "Details", "Target", "Met"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    previous = None
    for row in rows:
        benchmark = row.benchmark if row.benchmark != previous else ""
        previous = row.benchmark
        cells = [benchmark, row.case, row.time, row.details, row.target, row.met]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of `fn()`, waiting for every array in the result."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    return time.perf_counter() - start, result


def interleaved(
    cases: dict[str, Callable[[int], Any]], repeats: int
) -> dict[str, list[tuple[float, Any]]]:
    """Calls every case once per round (`case(round)`), `repeats` rounds: (seconds, result)."""
    results: dict[str, list[tuple[float, Any]]] = {name: [] for name in cases}
    for i in range(repeats):
        for name, case in cases.items():
            results[name].append(timed(functools.partial(case, i)))
    return results


def median_seconds(results: list[tuple[float, Any]]) -> float:
    return statistics.median(seconds for seconds, _ in results)


def cast_floats(tree: PyTree, dtype: Any) -> PyTree:
    """The pytree with its floating leaves cast to `dtype` (integer leaves kept)."""
    return jax.tree.map(
        lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating)
        else jnp.asarray(x),
        tree,
    )


# ---------------------------------------------------------------------------------------------
# The trained MLP shared by benchmarks 1-3


@dataclasses.dataclass
class TrainedMlp:
    loss_fn: LossFn
    params: PyTree
    batch: PyTree  # on the device
    source: str
    train_steps: int
    train_loss: float
    num_params: int

    def label(self) -> str:
        return (
            f"MLP {MLP_DEPTH - 1}x{MLP_WIDTH} ReLU ({self.num_params:,} params), "
            f"{NUM_IMAGES} images, after {self.train_steps} GD steps (eta {STEP_SIZE}, "
            f"loss {self.train_loss:.4f})"
        )


def trained_mlp(settings: Settings) -> TrainedMlp:
    """The 3x200 MLP trained by full-batch GD (step size 0.05) on 2000 MNIST images."""
    (images, labels), source = problems.mnist_batch(settings.data_dir, NUM_IMAGES)
    network, loss_fn = problems.make_mlp(MLP_WIDTH, MLP_DEPTH)
    batch = jax.device_put((images, labels))
    params = network.init(jax.random.PRNGKey(0), images[:1])
    optimizer = optax.sgd(STEP_SIZE)
    steps = make_train_steps(loss_fn, optimizer, 0.0, FullBatchFeed.select)
    taken, params, _, loss, _ = steps(
        params, optimizer.init(params), batch, 0, settings.train_steps
    )
    return TrainedMlp(loss_fn, params, batch, source, int(taken), float(loss),
                      problems.num_params(params))


# ---------------------------------------------------------------------------------------------
# 1. Eigensolver accuracy and cost


@dataclasses.dataclass
class Reference:
    """The reference top eigenvalues and how well they are known."""

    eigenvalues: np.ndarray  # float64 [k], descending
    steps: int  # Lanczos steps (one HVP each)
    residuals: np.ndarray  # ||H y - theta y|| of each top Ritz pair, recomputed with an HVP
    seconds: float
    dtype: str


def lanczos_reference(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    k: int,
    *,
    max_steps: int,
    tolerance: float,
    float64: bool,
    seed: int = 0,
) -> Reference:
    """Independent reference: Lanczos with full (twice repeated) reorthogonalisation in float64
    NumPy on exact HVPs (`sam_eos.hessian.hvp`, in float64 when `float64`), stopping when the
    residual estimate |beta_j s_ji| of each of the top k Ritz pairs is below `tolerance` times
    the largest Ritz value's magnitude. |lambda - theta| <= residual for a symmetric matrix."""
    dtype = jnp.float64 if float64 else jnp.float32
    start = time.perf_counter()
    with jax.enable_x64(float64):
        p, b = cast_floats(params, dtype), cast_floats(batch, dtype)
        flat, unravel = ravel_pytree(p)

        @jax.jit
        def product(p, b, v):
            return ravel_pytree(hessian.hvp(loss_fn, p, b, unravel(v)))[0]

        def matvec(v: np.ndarray) -> np.ndarray:
            return np.array(product(p, b, jnp.asarray(v, dtype)), np.float64)

        n = flat.size
        basis = np.empty((max_steps + 1, n))
        start_vector = np.random.default_rng(seed).standard_normal(n)
        basis[0] = start_vector / np.linalg.norm(start_vector)
        alpha: list[float] = []
        beta: list[float] = []
        for j in range(max_steps):
            w = matvec(basis[j])
            alpha.append(float(basis[j] @ w))
            w -= alpha[-1] * basis[j] + (beta[-1] * basis[j - 1] if j else 0.0)
            for _ in range(2):
                w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
            beta.append(float(np.linalg.norm(w)))
            tridiagonal = np.diag(alpha) + np.diag(beta[:-1], 1) + np.diag(beta[:-1], -1)
            theta, s = np.linalg.eigh(tridiagonal)
            estimates = beta[-1] * np.abs(s[-1, ::-1][:k])
            if j + 1 >= k and np.max(estimates) <= tolerance * np.max(np.abs(theta)):
                break
            basis[j + 1] = w / beta[-1]
        steps = len(alpha)
        top = theta[::-1][:k]
        ritz_vectors = basis[:steps].T @ s[:, ::-1][:, :k]  # [n, k]
        residuals = np.array([
            np.linalg.norm(matvec(ritz_vectors[:, i]) - top[i] * ritz_vectors[:, i])
            for i in range(k)
        ])
    return Reference(top, steps, residuals, time.perf_counter() - start,
                     "float64" if float64 else "float32")


def relative_error(values: Any, reference: np.ndarray) -> float:
    """max_i |values_i - reference_i| / |reference_i| over the first len(values) entries."""
    values = np.asarray(values, np.float64)
    reference = reference[: len(values)]
    return float(np.max(np.abs(values - reference) / np.abs(reference)))


def unit_costs(loss_fn: LossFn, params: PyTree, batch: PyTree, repeats: int) -> dict[str, float]:
    """Median seconds of one exact HVP and one central finite-difference product (2 gradients),
    each alone in its own jit."""
    flat, unravel = ravel_pytree(params)

    @jax.jit
    def exact(p, b, v):
        return ravel_pytree(hessian.hvp(loss_fn, p, b, unravel(v)))[0]

    @jax.jit
    def finite_difference(p, b, v):
        product = power_iteration.finite_difference_hvp(loss_fn, p, b, unravel(v))
        return ravel_pytree(product)[0]

    v = jax.random.normal(jax.random.PRNGKey(0), flat.shape, flat.dtype)
    v = v / jnp.linalg.norm(v)
    cases = {"exact": lambda i: exact(params, batch, v),
             "finite_difference": lambda i: finite_difference(params, batch, v)}
    for case in cases.values():
        timed(lambda case=case: case(0))  # compile
    results = interleaved(cases, repeats)
    return {name: median_seconds(r) for name, r in results.items()}


def basis_transposes(loss_fn: LossFn, params: PyTree, batch: PyTree) -> int | None:
    """How many transposes (copies into the other layout) of the whole Lanczos basis,
    f32[max_iterations + 1, params], the compiled default solver holds; None if the backend
    shows no HLO text."""
    rows = hessian.DEFAULT_MAX_ITERATIONS["lanczos"] + 1
    size = problems.num_params(params)
    solver = jax.jit(lambda p, b, key: hessian.top_eigenvalues(loss_fn, p, b, key=key)[0])
    text = solver.lower(params, batch, jax.random.PRNGKey(0)).compile().as_text()
    if not text:
        return None
    pattern = re.compile(rf"= f32\[{size},{rows}\]\{{1,0\}} (?:copy|transpose)\(")
    return len(pattern.findall(text))


def eigensolver_rows(setup: TrainedMlp, settings: Settings) -> list[Row]:
    """Benchmark 1: accuracy, HVPs and time of Lanczos vs power iteration."""
    name = f"1. Eigensolver: {setup.label()}, data: {setup.source}"
    loss_fn, params, batch = setup.loss_fn, setup.params, setup.batch
    reference = lanczos_reference(
        loss_fn, params, batch, 3, max_steps=settings.reference_iterations,
        tolerance=REFERENCE_TOLERANCE, float64=settings.float64,
    )
    eigenvalues = reference.eigenvalues
    rows = [Row(
        name, f"reference: independent Lanczos, {reference.dtype} HVPs",
        f"{reference.seconds:.1f} s (once)",
        f"lambda_1..3 = {', '.join(f'{x:.7g}' for x in eigenvalues)}; {reference.steps} steps;"
        f" recomputed residuals / lambda_1 <= {np.max(reference.residuals) / eigenvalues[0]:.1e}",
    )]

    library_seconds, (library_values, _, library_info) = timed(lambda: hessian.top_eigenvalues(
        loss_fn, params, batch, 3, max_iterations=settings.reference_iterations,
        tolerance=REFERENCE_TOLERANCE, return_info=True,
    ))
    rows.append(Row(
        name, f"long run: top_eigenvalues(k=3, max_iterations={settings.reference_iterations},"
        f" tolerance={REFERENCE_TOLERANCE:g})",
        f"{library_seconds:.1f} s (once, incl. compile)",
        f"{int(library_info.matrix_vector_products)} HVPs; converged "
        f"{bool(library_info.converged)}; error bound {float(library_info.error_bound):.1e}; "
        f"rel. error vs reference {relative_error(library_values, eigenvalues):.1e}",
    ))

    units = unit_costs(loss_fn, params, batch, settings.repeats * 2)
    rows.append(Row(
        name, "one product alone (jit)",
        f"{format_seconds(units['exact'])} / {format_seconds(units['finite_difference'])}",
        "exact HVP (forward-over-reverse) / central finite difference (2 gradients)",
    ))

    transposes = basis_transposes(loss_fn, params, batch)
    if transposes is not None:
        basis_bytes = (hessian.DEFAULT_MAX_ITERATIONS["lanczos"] + 1) * setup.num_params * 4
        rows.append(Row(
            name, "compiled default Lanczos: transposes of the basis", f"{transposes}",
            f"transpose-copies of the whole {basis_bytes / 2**20:.0f} MB basis (basis.T @ c) "
            "in the compiled HLO; like every pass over the basis, they cost the same at "
            "every step, however few steps have been taken",
        ))

    def solve(method: str, k: int, tolerance: float | None = None) -> Callable[[int], Any]:
        return lambda i: hessian.top_eigenvalues(
            loss_fn, params, batch, k, method=method, tolerance=tolerance,
            key=jax.random.PRNGKey(i + 1), return_info=True,
        )

    cases = {"lanczos": solve("lanczos", 1), "power": solve("power", 1),
             "lanczos_k3": solve("lanczos", 3),
             "power_tight": solve("power", 1, TIGHT_POWER_TOLERANCE)}
    first = {case_name: timed(lambda case=case: case(-1))[0] for case_name, case in cases.items()}
    results = interleaved(cases, settings.repeats)
    medians = {case_name: median_seconds(r) for case_name, r in results.items()}

    def summary(case_name: str, k: int) -> tuple[float, float, str]:
        products = [int(info.matrix_vector_products) for _, (_, _, info) in results[case_name]]
        errors = [relative_error(values, eigenvalues) for _, (values, _, _) in results[case_name]]
        converged = all(bool(info.converged) for _, (_, _, info) in results[case_name])
        median_products = statistics.median(products)
        text = (
            f"{'HVPs' if case_name.startswith('lanczos') else 'FD products (2 gradients each)'} "
            f"{min(products)}-{max(products)} (median {median_products:g}); "
            f"{format_seconds(medians[case_name] / median_products)} per product; "
            f"max rel. error{' over the 3' if k == 3 else ''} {max(errors):.1e}; "
            f"all converged {converged}; first call (compile) "
            f"{format_seconds(first[case_name])}"
        )
        return max(errors), median_products, text

    lanczos_error, _, lanczos_text = summary("lanczos", 1)
    power_error, _, power_text = summary("power", 1)
    _, _, k3_text = summary("lanczos_k3", 3)
    _, _, tight_text = summary("power_tight", 1)
    ratio = medians["lanczos"] / medians["power"]
    repeats = f"median of {settings.repeats} keys"
    rows += [
        Row(name, "Lanczos k=1 (default)", f"{format_seconds(medians['lanczos'])} ({repeats})",
            lanczos_text, f"rel. error <= {TARGET_RELATIVE_ERROR:g}",
            yes_no(lanczos_error <= TARGET_RELATIVE_ERROR)),
        Row(name, "power k=1 (original: FD offset 1e-3, tol 1e-3, max 100)",
            f"{format_seconds(medians['power'])} ({repeats})", power_text),
        Row(name, "time Lanczos / power (k=1)", f"{ratio:.2f}",
            f"Lanczos is {1 / ratio:.2f}x the speed of power iteration; power's max rel. error "
            f"{power_error:.1e}", f"<= {TARGET_TIME_RATIO}", yes_no(ratio <= TARGET_TIME_RATIO)),
        Row(name, "Lanczos k=3", f"{format_seconds(medians['lanczos_k3'])} ({repeats})",
            k3_text),
        Row(name, f"power k=1, tolerance {TIGHT_POWER_TOLERANCE:g} (more accurate)",
            f"{format_seconds(medians['power_tight'])} ({repeats})", tight_text),
    ]
    return rows


# ---------------------------------------------------------------------------------------------
# 6. Fidelity of method="power" to the original's estimator

FIDELITY_WIDTH, FIDELITY_DEPTH = 100, 4  # 3 hidden layers of 100 units, at initialisation
FIDELITY_IMAGES = 1000
FIDELITY_KEYS = 7
TARGET_FIDELITY = 0.03  # |median power / median original - 1|


def original_power_iteration(
    loss_fn: LossFn, params: PyTree, batch: PyTree, key: jax.Array
) -> tuple[float, int]:
    """The original code's estimator, its loop written out here in Python from its
    description: (the norm of the last finite-difference product, iterations).

    Start: a Gaussian drawn with `key`, normalised (the same draw as `method="power"`). Each
    iteration: p = (g(theta + 1e-3 v) - g(theta - 1e-3 v)) / (2e-3 + 1e-5), v = p / ||p||;
    it goes on while ||p|| changed by more than 1e-3 ||p|| from the previous norm (1 before
    the first) and ||p|| > 1e-3, for at most 100 iterations.
    """
    flat, unravel = ravel_pytree(params)
    gradient = jax.jit(lambda f: ravel_pytree(jax.grad(loss_fn)(unravel(f), batch))[0])
    v = jax.random.normal(key, (1, flat.size), flat.dtype)[0]
    v = v / jnp.linalg.norm(v)
    last, current, iterations = None, 1.0, 0
    while (last is None or (abs(current - last) > 1e-3 * current and current > 1e-3)) and (
            iterations < 100):
        last = current
        product = (gradient(flat + 1e-3 * v) - gradient(flat - 1e-3 * v)) / (2e-3 + 1e-5)
        current = float(jnp.linalg.norm(product))
        v = product / current
        iterations += 1
    return current, iterations


def fidelity_rows(settings: Settings) -> list[Row]:
    """Benchmark 6: method="power" against the original's loop and the exact lambda_max at
    the MLP's initialisation, over several start keys."""
    (images, labels), source = problems.mnist_batch(settings.data_dir, FIDELITY_IMAGES)
    network, loss_fn = problems.make_mlp(FIDELITY_WIDTH, FIDELITY_DEPTH)
    batch = jax.device_put((images, labels))
    params = network.init(jax.random.PRNGKey(0), images[:1])
    name = (f"6. Fidelity to the original's estimator: MLP {FIDELITY_DEPTH - 1}x{FIDELITY_WIDTH}"
            f" ReLU ({problems.num_params(params):,} params) at initialisation (PRNGKey(0)), "
            f"{FIDELITY_IMAGES} images, data: {source}")
    reference = lanczos_reference(
        loss_fn, params, batch, 1, max_steps=settings.reference_iterations,
        tolerance=REFERENCE_TOLERANCE, float64=settings.float64,
    )
    exact = float(reference.eigenvalues[0])
    start_keys = [jax.random.PRNGKey(i + 1) for i in range(FIDELITY_KEYS)]
    runs = {
        "original": [original_power_iteration(loss_fn, params, batch, key) for key in start_keys],
        "power": [], "lanczos": [],
    }
    bottoms = []  # Lanczos's smallest Ritz values: is lambda_max also the largest |lambda|?
    for method in ("power", "lanczos"):
        for key in start_keys:
            values, _, info = hessian.top_eigenvalues(loss_fn, params, batch, method=method,
                                                      key=key, return_info=True)
            runs[method].append((float(values[0]), int(info.matrix_vector_products)))
            bottoms.append(float(info.bottom_eigenvalue))
    medians = {case: statistics.median(v for v, _ in r) for case, r in runs.items()}

    def details(case: str) -> str:
        values = [v for v, _ in runs[case]]
        products = [n for _, n in runs[case]]
        return (f"median {medians[case]:.4f} (range {min(values):.4f}-{max(values):.4f}); "
                f"median rel. error vs exact {medians[case] / exact - 1:+.1e}, worst "
                f"{max(abs(v / exact - 1) for v in values):.1e}; products "
                f"{min(products)}-{max(products)}; {sum(n >= 100 for n in products)} of "
                f"{len(products)} ran to the cap of 100")

    keys_text = f"{FIDELITY_KEYS} start keys"
    difference = medians["power"] / medians["original"] - 1
    return [
        Row(name, f"exact lambda_max: reference Lanczos, {reference.dtype} HVPs", "-",
            f"{exact:.6f}; {reference.steps} steps; recomputed residual / lambda_max "
            f"{float(np.max(reference.residuals)) / exact:.1e}; Lanczos's bottom Ritz value "
            f"{np.nanmedian(bottoms):.4f} (median): lambda_max is the largest |eigenvalue|"),
        Row(name, "the original's loop (written out in benchmarks/run.py)", keys_text,
            details("original")),
        Row(name, 'method="power" (sam_eos.power_iteration)', keys_text, details("power")),
        Row(name, "Lanczos (default)", keys_text, details("lanczos")),
        Row(name, "median power / median original - 1", f"{difference:+.1e}",
            "same start vectors (same keys, same draw)", f"within {TARGET_FIDELITY:.0%}",
            yes_no(abs(difference) <= TARGET_FIDELITY)),
    ]


# ---------------------------------------------------------------------------------------------
# 2. No recompilation


class TraceCounter:
    """A loss function counting how often JAX traces it (a Python side effect)."""

    def __init__(self, loss_fn: LossFn):
        self.loss_fn = loss_fn
        self.count = 0

    def __call__(self, params: PyTree, batch: PyTree) -> jax.Array:
        self.count += 1
        return self.loss_fn(params, batch)


@contextlib.contextmanager
def captured_checks(counter: TraceCounter) -> Iterator[list[dict[str, float]]]:
    """Collects `train.run`'s "check at step ..." log lines: step, HVPs, seconds the check took,
    and the trace count when it was logged."""
    records: list[dict[str, float]] = []

    class Handler(std_logging.Handler):
        def emit(self, record: std_logging.LogRecord) -> None:
            if str(record.msg).startswith("check at step") and record.args:
                args = record.args
                records.append({"step": float(args[0]), "hvps": float(args[-2]),
                                "seconds": float(args[-1]), "traces": counter.count})

    logger = absl_logging.get_absl_logger()
    handler = Handler()
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        absl_logging.set_verbosity(verbosity)


def compile_seconds(loss_fn: LossFn, config: train.TrainConfig, params: PyTree,
                    batch: PyTree) -> float:
    """Seconds to trace, lower and compile a fresh `train.make_check` (not running it)."""
    chunk, measure = train.make_check(loss_fn, config)
    vectors = train.cold_ritz_block(params, config)
    start = time.perf_counter()
    chunk.lower(params, batch, jax.random.PRNGKey(0), np.int32(0), np.int32(0), vectors,
                np.float32(0), np.float32(0)).compile()
    measure.lower(params, batch, vectors).compile()
    return time.perf_counter() - start


def recompilation_rows(setup: TrainedMlp, settings: Settings) -> list[Row]:
    """Benchmark 2: the first check of a run compiles; later ones neither retrace nor compile."""
    every, num_checks = settings.check_every, settings.num_checks
    name = (f"2. No recompilation: train.run, SAM rho {RHO}, check every {every} steps, "
            f"{num_checks} checks, same MLP")
    config = train.TrainConfig(
        step_size=STEP_SIZE, rho=RHO, hessian_check_gap=None, hessian_check_every_steps=every,
        max_steps=every * num_checks,
    )
    counter = TraceCounter(setup.loss_fn)
    with captured_checks(counter) as checks:
        result = train.run(counter, setup.params, train.FullBatch(setup.batch), config)
    compile_time = compile_seconds(setup.loss_fn, config, setup.params, setup.batch)
    if len(checks) < 2:
        return [Row(name, "checks", "-", f"only {len(checks)} check log lines captured "
                    f"({result.steps} steps, status {result.status})", "no compile after "
                    "the first check", "not measured")]
    first, later = checks[0], checks[1:]
    later_seconds = statistics.median(c["seconds"] for c in later)
    retraced = later[-1]["traces"] - later[0]["traces"]
    later_hvps = ", ".join(f"{c['hvps']:g}" for c in later)
    later_traces = ", ".join(str(c["traces"]) for c in later)
    per_hvp_first = first["seconds"] / first["hvps"]
    per_hvp_later = statistics.median(c["seconds"] / c["hvps"] for c in later)
    return [
        Row(name, "first check (includes trace + compile)", format_seconds(first["seconds"]),
            f"{first['hvps']:g} HVPs ({format_seconds(per_hvp_first)} per HVP); "
            f"{first['traces']} loss_fn traces so far; trace + compile of make_check alone "
            f"(AOT): {format_seconds(compile_time)}"),
        Row(name, f"later checks (median of {len(later)})", format_seconds(later_seconds),
            f"HVPs {later_hvps} ({format_seconds(per_hvp_later)} per HVP); loss_fn traces "
            f"{later_traces} at these checks: {retraced} new "
            "(training steps trace once, before the 2nd check)",
            "no compile after the first check", yes_no(retraced == 0)),
    ]


# ---------------------------------------------------------------------------------------------
# 3. SAM step vs GD step


def step_times(loss_fn: LossFn, params: PyTree, batch: PyTree, repeats: int) -> dict[str, float]:
    """Median seconds of one jitted GD step and one SAM step (`make_train_steps`, 1 step)."""
    optimizer = optax.sgd(STEP_SIZE)
    opt_state = optimizer.init(params)
    steps = {"gd": make_train_steps(loss_fn, optimizer, 0.0, FullBatchFeed.select),
             "sam": make_train_steps(loss_fn, optimizer, RHO, FullBatchFeed.select)}
    cases = {name: functools.partial(lambda step, i: step(params, opt_state, batch, 0, 1), step)
             for name, step in steps.items()}
    for case in cases.values():
        timed(lambda case=case: case(0))  # compile
    results = interleaved(cases, repeats)
    return {name: median_seconds(r) for name, r in results.items()}


def sam_step_rows(setup: TrainedMlp, settings: Settings) -> list[Row]:
    """Benchmark 3: SAM (two gradients) vs GD (one) on the MLP and the transformer."""
    name = f"3. SAM step (rho {RHO}) vs GD step, jitted, 1 step per call"
    network, loss_fn = problems.make_transformer()
    text, text_source = problems.text_batch(settings.data_dir, TEXT_BATCH_SIZE)
    text_params = network.init(jax.random.PRNGKey(0), text[0])
    models = [
        (f"MLP 3x200, {NUM_IMAGES} images", setup.loss_fn, setup.params, setup.batch),
        (f"transformer 6x128 ({problems.num_params(text_params):,} params), batch "
         f"{TEXT_BATCH_SIZE}x{problems.SEQUENCE_LENGTH} ({text_source})",
         loss_fn, text_params, jax.device_put(text)),
    ]
    rows = []
    for label, model_loss, params, batch in models:
        times = step_times(model_loss, params, batch, settings.step_repeats)
        ratio = times["sam"] / times["gd"]
        rows.append(Row(
            name, label,
            f"GD {format_seconds(times['gd'])}, SAM {format_seconds(times['sam'])}",
            f"SAM / GD = {ratio:.2f} (medians of {settings.step_repeats} interleaved calls)",
            f"<= {TARGET_SAM_RATIO}", yes_no(ratio <= TARGET_SAM_RATIO),
        ))
    return rows


# ---------------------------------------------------------------------------------------------
# 4. Loop overhead


def run_seconds(loss_fn: LossFn, params: PyTree, batch: PyTree, num_steps: int) -> float:
    """Wall seconds of `train.run` for `num_steps` SAM steps, full batch, no checks, no files
    (it compiles its training steps anew each call: included)."""
    config = train.TrainConfig(
        step_size=STEP_SIZE, rho=RHO, time_limit_in_hours=1.0, hessian_check_gap=None,
        hessian_check_every_steps=None, max_steps=num_steps,
    )
    start = time.perf_counter()
    result = train.run(loss_fn, params, train.FullBatch(batch), config)
    jax.block_until_ready(result.params)
    seconds = time.perf_counter() - start
    if result.steps != num_steps:
        raise RuntimeError(f"train.run took {result.steps} steps, not {num_steps}")
    return seconds


def loop_overhead_rows(settings: Settings) -> list[Row]:
    """Benchmark 4: `train.run` steps per second vs a bare jitted fori_loop of the same step."""
    loss_fn, params, batch = problems.make_tiny_problem()
    params, batch = jax.device_put(params), jax.device_put(batch)
    name = (f"4. Loop overhead: 2-layer tanh net ({problems.num_params(params)} params), "
            f"{len(batch[0])} examples, SAM rho {RHO}, full batch, no checks")

    @jax.jit
    def bare(params, batch, num_steps):
        step = lambda _, p: sam.sam_update(loss_fn, p, batch, STEP_SIZE, RHO)  # noqa: E731
        return jax.lax.fori_loop(0, num_steps, step, params)

    timed(lambda: bare(params, batch, 10))  # compile
    probe_seconds, _ = timed(lambda: bare(params, batch, 20_000))
    long = int(np.clip(settings.loop_seconds / (probe_seconds / 20_000), 20_000, 5_000_000))
    long = (long // 1024) * 1024
    short = long // 4
    cases = {
        "bare": lambda i: bare(params, batch, long),
        "run_short": lambda i: run_seconds(loss_fn, params, batch, short),
        "run_long": lambda i: run_seconds(loss_fn, params, batch, long),
    }
    results = interleaved(cases, 3)
    bare_rate = long / median_seconds(results["bare"])
    short_seconds = statistics.median(r for _, r in results["run_short"])
    long_seconds = statistics.median(r for _, r in results["run_long"])
    steady_rate = (long - short) / (long_seconds - short_seconds)
    fixed_cost = long_seconds - long / steady_rate
    shortfall = 1 - steady_rate / bare_rate
    transfers = transfer_count_rows(settings, name)
    return [
        Row(name, f"bare jitted fori_loop of sam_update, {long:,} steps",
            f"{bare_rate:,.0f} steps/s", f"{format_seconds(1 / bare_rate)} per step; median "
            "of 3"),
        Row(name, f"train.run, {short:,} and {long:,} steps",
            f"{steady_rate:,.0f} steps/s",
            f"steady rate (steps difference / time difference): {100 * shortfall:+.1f} % "
            f"slower than bare; whole run of {long:,} steps {long / long_seconds:,.0f} steps/s "
            f"incl. {format_seconds(fixed_cost)} fixed cost (compile, first small dispatches)",
            "within 15 % of bare", yes_no(shortfall <= TARGET_LOOP_OVERHEAD)),
        *transfers,
    ]


TRANSFER_PATTERN = re.compile(r"host-to-device transfer: aval=ShapedArray\((\w+\[[\d,]*\])")


def transfer_count_rows(settings: Settings, name: str) -> list[Row]:
    """Counts host-to-device transfers of the batch in a child running `train.run` under
    `jax.transfer_guard_host_to_device("log_explicit")` (each transfer is logged to stderr)."""
    completed = run_probe("transfers", settings, timeout=300)
    if completed is None or completed[0] is None:
        reason = "child failed" if completed is None else completed[1][-300:]
        return [Row(name, "batch transfers", "-", f"not measured: {reason}", "once",
                    "not measured")]
    report, stderr = completed
    shapes = TRANSFER_PATTERN.findall(stderr)
    batch_shapes = report["batch_shapes"]
    counts = {shape: shapes.count(shape) for shape in batch_shapes}
    logged = len(re.findall(r"host-to-device transfer", stderr))
    once = bool(shapes) and all(count == 1 for count in counts.values())
    return [Row(
        name, f"batch transfers in a {report['steps']:,}-step run (numpy FullBatch)",
        f"{', '.join(f'{s}: {c}' for s, c in counts.items())}",
        f"transfer guard log: {logged} host-to-device transfers in all, the others scalars "
        "(step counts); run device_puts the full batch once",
        "once", yes_no(once),
    )]


def transfer_probe() -> dict[str, Any]:
    """Child: a `train.run` on a numpy full batch with every host-to-device transfer logged."""
    loss_fn, params, batch = problems.make_tiny_problem()
    params = jax.device_put(params)
    config = train.TrainConfig(step_size=STEP_SIZE, rho=RHO, hessian_check_gap=None,
                               hessian_check_every_steps=None, max_steps=50_000)
    with jax.transfer_guard_host_to_device("log_explicit"):
        result = train.run(loss_fn, params, train.FullBatch(batch), config)
    jax.block_until_ready(result.params)
    shapes = [f"{np.dtype(x.dtype).name}[{','.join(map(str, x.shape))}]" for x in batch]
    return {"steps": result.steps, "batch_shapes": shapes}


# ---------------------------------------------------------------------------------------------
# 5. Memory


def peak_rss_bytes() -> int:
    """This process's peak resident set size. Linux: VmHWM, which starts afresh at exec (the
    child's `ru_maxrss` would start at its parent's RSS, inherited through fork and exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, else KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def memory_probe(model: str, data_dir: pathlib.Path, baseline: bool) -> dict[str, Any]:
    """Child: one default `top_eigenvalues` call (none if `baseline`) after one gradient, on
    the 2.8M-parameter MLP (random images) or the transformer; reports peak RSS."""
    if model == "mlp":
        network, loss_fn = problems.make_mlp(MEMORY_MLP_WIDTH, 4)
        batch = problems.synthetic_mnist(MEMORY_NUM_IMAGES)
    else:
        network, loss_fn = problems.make_transformer()
        batch, _ = problems.text_batch(data_dir, TEXT_BATCH_SIZE)
    batch = jax.device_put(batch)
    params = network.init(jax.random.PRNGKey(0), batch[0][:1])
    jax.block_until_ready(jax.jit(jax.grad(loss_fn))(params, batch))
    report: dict[str, Any] = {"params": problems.num_params(params)}
    if not baseline:
        seconds, (values, _, info) = timed(
            lambda: hessian.top_eigenvalues(loss_fn, params, batch, return_info=True))
        report.update(seconds=seconds, hvps=int(info.matrix_vector_products),
                      converged=bool(info.converged), eigenvalue=float(values[0]))
    report["max_rss"] = peak_rss_bytes()
    stats = jax.devices()[0].memory_stats() or {}
    report["device_peak"] = stats.get("peak_bytes_in_use")
    return report


def memory_rows(settings: Settings) -> list[Row]:
    """Benchmark 5: peak host RSS of one top_eigenvalues call, in child processes."""
    name = "5. Memory: one top_eigenvalues call (default: Lanczos, max_iterations 100)"
    max_iterations = hessian.DEFAULT_MAX_ITERATIONS["lanczos"]
    rows = []
    for model, label in [
        ("mlp", f"MNIST MLP 3x{MEMORY_MLP_WIDTH}, {MEMORY_NUM_IMAGES} random images"),
        ("transformer", f"transformer 6x128, batch {TEXT_BATCH_SIZE}x{problems.SEQUENCE_LENGTH}"),
    ]:
        measured = run_probe(f"memory-{model}", settings, timeout=540)
        base = run_probe(f"memory-{model}-baseline", settings, timeout=240)
        if measured is None or measured[0] is None or base is None or base[0] is None:
            rows.append(Row(name, label, "-", "child process failed", "peak RSS <= 4 GiB",
                            "not measured"))
            continue
        report, baseline = measured[0], base[0]
        basis = (max_iterations + 1) * report["params"] * 4
        extra = report["max_rss"] - baseline["max_rss"]
        device = ("" if report["device_peak"] is None
                  else f"; device peak {report['device_peak'] / GIB:.2f} GiB")
        rows.append(Row(
            name, f"{label} ({report['params']:,} params)",
            f"{report['seconds']:.1f} s (1 call, incl. compile)",
            f"peak RSS {report['max_rss'] / GIB:.2f} GiB (child stopping before the call: "
            f"{baseline['max_rss'] / GIB:.2f} GiB, so +{extra / GIB:.2f} GiB); Lanczos basis "
            f"({max_iterations}+1) x params x 4 B = "
            f"{basis / GIB:.2f} GiB; {report['hvps']} HVPs, converged {report['converged']}"
            f"{device}",
            "peak RSS <= 4 GiB", yes_no(report["max_rss"] <= TARGET_MEMORY_BYTES),
        ))
    return rows


# ---------------------------------------------------------------------------------------------
# Child processes


def run_probe(
    probe: str, settings: Settings, timeout: float
) -> tuple[dict[str, Any] | None, str] | None:
    """Runs `python -m benchmarks.run --probe PROBE` in a child: (its JSON report or None,
    its stderr); None if it timed out."""
    command = [sys.executable, "-m", "benchmarks.run", "--probe", probe,
               "--data_dir", str(settings.data_dir)]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                   cwd=problems.REPO_ROOT)
    except subprocess.TimeoutExpired:
        return None
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        return None, completed.stderr
    return json.loads(lines[-1]), completed.stderr


def probe_main(probe: str, data_dir: pathlib.Path) -> None:
    if probe == "transfers":
        report = transfer_probe()
    else:
        _, model, *rest = probe.split("-")
        report = memory_probe(model, data_dir, baseline=rest == ["baseline"])
    print(json.dumps(report))


# ---------------------------------------------------------------------------------------------
# Main

BENCHMARKS = ("1", "2", "3", "4", "5", "6")
PROBES = ("transfers", "memory-mlp", "memory-mlp-baseline", "memory-transformer",
          "memory-transformer-baseline")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, shorter training and reference runs")
    parser.add_argument("--data_dir", default=str(problems.DEFAULT_DATA_DIR),
                        help="holds tfds/ and tinyshakespeare/; generated data if missing")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help="comma-separated benchmarks to run, e.g. 1,3")
    parser.add_argument("--repeats", type=int, default=0,
                        help="timed eigensolver calls per case (default 5, quick 3)")
    parser.add_argument("--no_float64", action="store_true",
                        help="float32 HVPs for the reference (for devices without float64)")
    parser.add_argument("--output", default="", help="also write the report to this file")
    parser.add_argument("--probe", choices=PROBES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.probe:
        probe_main(args.probe, pathlib.Path(args.data_dir))
        return
    settings = Settings.from_args(args)
    selected = set(args.only.split(","))
    started = time.perf_counter()
    command = ["python3", "-m", "benchmarks.run", *(sys.argv[1:] if argv is None else argv)]
    header = ["## Machine", "", *(f"- {line}" for line in problems.machine_description()),
              f"- Data: {problems.data_description(settings.data_dir)}",
              f"- Command: `{' '.join(command)}`"]
    print("\n".join(header), flush=True)

    rows: list[Row] = []
    setup = trained_mlp(settings) if selected & {"1", "2", "3"} else None
    steps: list[tuple[str, Callable[[], list[Row]]]] = [
        ("1", lambda: eigensolver_rows(setup, settings)),
        ("2", lambda: recompilation_rows(setup, settings)),
        ("3", lambda: sam_step_rows(setup, settings)),
        ("4", lambda: loop_overhead_rows(settings)),
        ("5", lambda: memory_rows(settings)),
        ("6", lambda: fidelity_rows(settings)),
    ]
    for number, benchmark in steps:
        if number in selected:
            benchmark_start = time.perf_counter()
            rows += benchmark()
            print(f"# benchmark {number} took {time.perf_counter() - benchmark_start:.0f} s",
                  file=sys.stderr, flush=True)
    total = time.perf_counter() - started
    report = "\n".join([
        *header, f"- Total time: {total:.0f} s{' (--quick)' if settings.quick else ''}", "",
        "## Results", "", markdown_table(rows), "",
    ])
    print("\n## Results\n\n" + markdown_table(rows) + f"\n\nTotal time: {total:.0f} s")
    if args.output:
        pathlib.Path(args.output).write_text(report)


if __name__ == "__main__":
    main()
