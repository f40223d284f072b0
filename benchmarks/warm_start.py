"""Warm-started Lanczos checks along a real SAM run, against cold checks and power iteration.

`python3 -m benchmarks.warm_start [--steps 1000] [--every 50] [--rho 0.1] [--defaults_only]`
trains the MNIST MLP 3 x 200 (`make_mlp(200, depth=4)`, squared loss) full batch on the first
2000 images of the MNIST stand-in with SAM (eta 0.5, rho 0.1; `--rho 0`: GD), and at step 0 and
every `--every` steps runs, interleaved:

- warm Lanczos checks (each starting from its own previous check's Ritz vector; the first is
  cold) for a few (tolerance, hvp_mode) settings;
- a cold Lanczos check with the library's defaults;
- the original's power iteration (`method="power"`, whatever `sam_eos.hessian` holds);
- untimed, a reference: a cold Lanczos solve at tolerance 1e-8 (up to 300 HVPs).

It prints one markdown table (medians of HVPs after the first check, worst relative error against
the reference, total check time, ratio to power) and the per-check numbers.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import problems
from sam_eos import hessian, sam

STEP_SIZE, RHO, NUM_IMAGES = 0.5, 0.1, 2000
REFERENCE_TOLERANCE, REFERENCE_ITERATIONS = 1e-8, 300


class Setting(NamedTuple):
    name: str
    method: str
    warm: bool
    tolerance: float | None
    hvp_mode: str
    block_size: int | None = None  # Ritz vectors kept for the next check (None: k + 2)


SETTINGS = (
    Setting("warm (block 3), tol 1e-5, forward-over-reverse", "lanczos", True, 1e-5,
            "forward_over_reverse"),
    Setting("warm (block 3), tol 1e-5, linearize", "lanczos", True, 1e-5, "linearize"),
    Setting("warm (block 1), tol 1e-5, forward-over-reverse", "lanczos", True, 1e-5,
            "forward_over_reverse", 1),
    Setting("warm (block 5), tol 1e-4, forward-over-reverse", "lanczos", True, 1e-4,
            "forward_over_reverse", 5),
    Setting("cold, tol 1e-5 (the defaults before)", "lanczos", False, 1e-5,
            "forward_over_reverse"),
    Setting("power (method='power', defaults)", "power", False, None, "auto"),
)


# The library's defaults (warm, linearize on this backend), a cold check, and power (last).
DEFAULTS_ONLY = (SETTINGS[1], SETTINGS[4], SETTINGS[5])


def timed_check(loss_fn, params, batch, setting: Setting, start, key):
    """`(seconds, eigenvalue, products, ritz block)` of one check, waited on."""
    begin = time.perf_counter()
    values, _, info = hessian.top_eigenvalues(
        loss_fn, params, batch, 1, method=setting.method, tolerance=setting.tolerance, key=key,
        return_info=True, start_vectors=start if setting.warm else None,
        hvp_mode=setting.hvp_mode, block_size=setting.block_size,
    )
    jax.block_until_ready((values, info))
    seconds = time.perf_counter() - begin
    return seconds, float(values[0]), int(info.matrix_vector_products), info.ritz_vectors


def make_train_chunk(loss_fn, rho: float = RHO):
    """A jitted `(params, batch, num_steps) -> params` of SAM steps (rho 0: GD)."""

    def chunk(params, batch, num_steps):
        step = lambda _, p: sam.sam_update(loss_fn, p, batch, STEP_SIZE, rho)  # noqa: E731
        return jax.lax.fori_loop(0, num_steps, step, params)

    return jax.jit(chunk)


class Training(NamedTuple):
    """The benchmark's training problem: loss, full batch, initial params, SAM chunks."""

    loss_fn: problems.LossFn
    batch: tuple[jax.Array, jax.Array]
    params: problems.PyTree
    train: object  # jitted (params, batch, num_steps) -> params
    source: str  # which data was used


def make_run(data_dir, rho: float = RHO) -> Training:
    """The MLP 3 x 200 on the first NUM_IMAGES images, its initial params and SAM chunks."""
    network, loss_fn = problems.make_mlp(200, 4)
    (images, labels), source = problems.mnist_batch(data_dir, NUM_IMAGES)
    batch = (jnp.asarray(images), jnp.asarray(labels))
    params = network.init(jax.random.PRNGKey(0), batch[0][:1])
    return Training(loss_fn, batch, params, make_train_chunk(loss_fn, rho), source)


def check_points(training: Training, num_steps: int, every: int):
    """Yields `(step, params)` at step 0 and every `every` SAM steps up to `num_steps`."""
    params = training.params
    for step in range(0, num_steps + 1, every):
        if step:
            params = jax.block_until_ready(training.train(params, training.batch, every))
        yield step, params


def run(num_steps: int, every: int, data_dir, rho: float = RHO,
        settings: tuple[Setting, ...] = SETTINGS) -> None:
    loss_fn, batch, params, _, source = setup = make_run(data_dir, rho)
    starts = {s.name: None for s in settings}
    records = {s.name: [] for s in settings}
    references = []
    # Compile every setting once, untimed (the first check of a real run pays this too).
    for setting in settings:
        timed_check(loss_fn, params, batch, setting,
                    hessian.cold_start_vectors(params, 1, setting.block_size),
                    jax.random.PRNGKey(0))
    for step, params in check_points(setup, num_steps, every):
        key = jax.random.PRNGKey(step)
        for setting in settings:
            seconds, value, products, block = timed_check(
                loss_fn, params, batch, setting, starts[setting.name], key)
            starts[setting.name] = block
            records[setting.name].append((seconds, value, products))
        reference, _, info = hessian.top_eigenvalues(
            loss_fn, params, batch, 1, tolerance=REFERENCE_TOLERANCE,
            max_iterations=REFERENCE_ITERATIONS, key=jax.random.PRNGKey(10**6 + step),
            return_info=True)
        references.append((float(reference[0]), float(info.error_bound),
                           float(loss_fn(params, batch))))
        print(f"step {step}: " + ", ".join(
            f"{records[s.name][-1][2]} ({abs(records[s.name][-1][1] / reference[0] - 1):.0e})"
            for s in settings), file=sys.stderr, flush=True)
    report(records, references, source, num_steps, every, rho, settings)


def report(records, references, source, num_steps, every, rho, settings) -> None:
    reference = np.array([r[0] for r in references])
    power_total = sum(r[0] for r in records[settings[-1].name])  # power comes last
    print(f"Data: {source}; {num_steps} steps of SAM rho {rho:g} (0: GD), a check every {every} "
          f"({len(reference)} checks); backend {jax.default_backend()}\n")
    print("| Setting | HVPs per check after the first: median (min-max) | first check HVPs"
          " | max rel. error vs reference | total check time | / power |")
    print("|---|---|---|---|---|---|")
    for setting in settings:
        seconds, values, products = (np.array(c) for c in zip(*records[setting.name],
                                                                strict=True))
        error = np.max(np.abs(values - reference) / np.abs(reference))
        later = products[1:]
        print(f"| {setting.name} | {np.median(later):g} ({later.min()}-{later.max()}) | "
              f"{products[0]} | {error:.1e} | {seconds.sum():.2f} s | "
              f"{seconds.sum() / power_total:.2f} |")
    print("\nPer check: step, reference lambda_1 (its bound), loss; then per setting "
          "HVPs/ms/rel. error")
    for i, (value, bound, loss) in enumerate(references):
        cells = []
        for setting in settings:
            seconds, estimate, products = records[setting.name][i]
            cells.append(f"{products}/{1e3 * seconds:.0f}/{abs(estimate - value) / value:.0e}")
        print(f"{i * every} {value:.5f} ({bound:.0e}) {loss:.4f} | " + " | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--data_dir", default=str(problems.DEFAULT_DATA_DIR))
    parser.add_argument("--rho", type=float, default=RHO, help="0: gradient descent")
    parser.add_argument("--defaults_only", action="store_true",
                        help="only the default warm check, a cold one and power")
    args = parser.parse_args()
    settings = DEFAULTS_ONLY if args.defaults_only else SETTINGS
    run(args.steps, args.every, pathlib.Path(args.data_dir), args.rho, settings)


if __name__ == "__main__":
    main()
