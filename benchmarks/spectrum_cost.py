"""What each `sam_eos.spectrum` measurement costs, in Hessian-vector products and seconds.

`python3 -m benchmarks.spectrum_cost` (from the repository root) trains the benchmarks' MLP
(3 hidden layers of 200 ReLU units, 239,410 parameters) on 2000 MNIST images by full-batch GD
for a few steps, then times each measurement on the full batch next to one `top_eigenvalues`
check: the first call (compiling) once, then the median of `--repeats` calls. It prints one
markdown table to stdout.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.flatten_util import ravel_pytree

from benchmarks import problems
from sam_eos import hessian, spectrum
from sam_eos.loop import train

WIDTH, DEPTH = 200, 4  # 3 hidden layers of 200 units, as benchmarks.run
NUM_IMAGES = 2000
STEP_SIZE = 0.05
TRACE_MATVECS = 30
SLQ_PROBES, SLQ_STEPS = 4, 30
SHARPNESS_BATCHES = 16  # batches of NUM_IMAGES / 16 = 125 images
RHO = 0.05


def seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """(first call's seconds, median of `repeats` later calls, last result)."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        result = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:]), result


def trained_mlp(data_dir, train_steps: int):
    (images, labels), source = problems.mnist_batch(data_dir, NUM_IMAGES)
    network, loss_fn = problems.make_mlp(WIDTH, DEPTH)
    batch = jax.device_put((images, labels))
    params = network.init(jax.random.PRNGKey(0), images[:1])
    optimizer = optax.sgd(STEP_SIZE)
    steps = train.make_train_steps(loss_fn, optimizer, 0.0)
    _, params, _, loss, _ = steps(params, optimizer.init(params), batch, train_steps, True)
    return loss_fn, params, batch, source, float(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(problems.DEFAULT_DATA_DIR))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train_steps", type=int, default=100)
    args = parser.parse_args()
    loss_fn, params, batch, source, loss = trained_mlp(
        pathlib.Path(args.data_dir), args.train_steps
    )
    batches = jax.tree.map(lambda x: x.reshape(SHARPNESS_BATCHES, -1, *x.shape[1:]), batch)
    key = jax.random.PRNGKey(0)
    flat, _ = ravel_pytree(params)
    one_hvp = jax.jit(lambda p, v: hessian.hessian_operator(loss_fn, p, batch)[2](v))

    def top_check():
        return hessian.top_eigenvalues(loss_fn, params, batch, 1, return_info=True)

    def sam_point_check():
        return spectrum.sam_point_sharpness(loss_fn, params, batch, RHO, return_info=True)

    cases = {
        "one HVP (full batch)": (lambda: one_hvp(params, flat), "1"),
        "top_eigenvalues(k=1), the existing check": (top_check, None),
        f"hessian_trace, XTrace, {TRACE_MATVECS} matvecs": (
            lambda: spectrum.hessian_trace(loss_fn, params, batch, key, TRACE_MATVECS),
            f"{TRACE_MATVECS}"),
        f"hessian_trace, Hutchinson, {TRACE_MATVECS} matvecs": (
            lambda: spectrum.hessian_trace(loss_fn, params, batch, key, TRACE_MATVECS,
                                           method="hutchinson"), f"{TRACE_MATVECS}"),
        f"spectral_density, {SLQ_PROBES} probes x {SLQ_STEPS} steps": (
            lambda: spectrum.spectral_density(loss_fn, params, batch, key, SLQ_PROBES,
                                              SLQ_STEPS), f"{SLQ_PROBES * SLQ_STEPS}"),
        f"batch_sharpness, {SHARPNESS_BATCHES} batches of {NUM_IMAGES // SHARPNESS_BATCHES}": (
            lambda: spectrum.batch_sharpness(loss_fn, params, batches),
            f"{SHARPNESS_BATCHES} (+{SHARPNESS_BATCHES} gradients), each on 1/16 of the batch"),
        f"sam_point_sharpness, rho {RHO}": (sam_point_check, None),
    }
    print(f"# {problems.num_params(params):,} parameters, {NUM_IMAGES} images ({source}), "
          f"after {args.train_steps} GD steps (eta {STEP_SIZE}, loss {loss:.4f}); "
          f"backend {jax.default_backend()}; median of {args.repeats}")
    print("| Measurement | HVPs | First call (compiles) | Per call | Value |")
    print("|---|---|---|---|---|")
    for name, (fn, hvps) in cases.items():
        first, median, result = seconds(fn, args.repeats)
        if hvps is None:  # a Lanczos check: its own count (+1 gradient at the SAM point)
            info = result[-1]
            hvps = f"{int(info.matrix_vector_products)}" + (" (+1 gradient)" if "sam" in name
                                                             else "")
        print(f"| {name} | {hvps} | {first:.2f} s | {median:.3f} s | {describe(result)} |")


def describe(result: Any) -> str:
    """A short text of a measurement's value."""
    if isinstance(result, tuple) and len(result) == 3:  # top_eigenvalues
        return f"lambda_max {float(result[0][0]):.4f}"
    if isinstance(result, tuple) and len(result) == 2 and hasattr(result[1], "converged"):
        return f"{float(result[0]):.4f}"
    if isinstance(result, tuple) and getattr(result[0], "ndim", 0) == 2:  # SLQ
        nodes, weights = result
        return f"nodes in [{float(nodes.min()):.3f}, {float(nodes.max()):.3f}]"
    if isinstance(result, tuple):
        return f"{float(result[0]):.2f} +- {float(result[1]):.2f}"
    if getattr(result, "ndim", 0) == 0:
        return f"{float(result):.4f}"
    return ""


if __name__ == "__main__":
    main()
