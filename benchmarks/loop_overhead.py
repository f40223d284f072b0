"""The training loop's overhead: `sam_eos.loop.train.run` (full batch, no checks) against a
bare jitted `fori_loop` of the same SAM step, on a tiny model where overhead shows most."""

import statistics
import time

import jax
import numpy as np

from benchmarks import problems
from benchmarks.harness import Context, timed
from sam_eos import sam
from sam_eos.loop import train

NAME = "loop_overhead"
TITLE = "Loop overhead against a bare jitted loop"
RHO, STEP_SIZE = 0.05, 0.05


def run_seconds(loss_fn, params, batch, num_steps: int) -> float:
    config = train.TrainConfig(step_size=STEP_SIZE, rho=RHO, max_steps=num_steps)
    start = time.perf_counter()
    result = train.run(loss_fn, params, train.FullBatch(batch), config)
    jax.block_until_ready(result.params)
    assert result.steps == num_steps, result.steps
    return time.perf_counter() - start


def run(context: Context) -> dict:
    loss_fn, params, batch = problems.make_tiny_problem()
    params, batch = jax.device_put(params), jax.device_put(batch)

    @jax.jit
    def bare(params, batch, num_steps):
        step = lambda _, p: sam.sam_update(loss_fn, p, batch, STEP_SIZE, RHO)  # noqa: E731
        return jax.lax.fori_loop(0, num_steps, step, params)

    timed(lambda: bare(params, batch, 10))
    probe, _ = timed(lambda: bare(params, batch, 20_000))
    seconds = 2.0 if context.quick else 5.0  # the bare loop's length: differences need it
    long = int(np.clip(seconds / (probe / 20_000), 20_000, 5_000_000)) // 1024 * 1024
    short = long // 4
    samples: dict[str, list[float]] = {"bare": [], "short": [], "long": []}
    for _ in range(3):
        samples["bare"].append(timed(lambda: bare(params, batch, long))[0])
        samples["short"].append(run_seconds(loss_fn, params, batch, short))
        samples["long"].append(run_seconds(loss_fn, params, batch, long))
    median = {name: statistics.median(values) for name, values in samples.items()}
    bare_rate = long / median["bare"]
    steady_rate = (long - short) / (median["long"] - median["short"])
    fixed = median["long"] - long / steady_rate
    overhead = bare_rate / steady_rate - 1
    return {
        "title": TITLE,
        "headline": [["Loop overhead: train.run / bare loop, time per step",
                      f"{1 + overhead:.3f}"]],
        "columns": ["case", "steps/s", "detail"],
        "rows": [
            [f"bare jitted fori_loop of sam_update, {long:,} steps", f"{bare_rate:,.0f}",
             "median of 3"],
            [f"train.run, {short:,} and {long:,} steps", f"{steady_rate:,.0f}",
             f"steady rate (difference of the two runs); {100 * overhead:+.1f} % time per "
             f"step against bare; fixed cost per run {fixed:.2f} s (compile, first dispatches)"],
        ],
        "notes": f"{problems.num_params(params)}-parameter tanh network, 64 examples, SAM rho "
                 f"{RHO}, full batch, no checks; the three cases interleaved.",
    }
