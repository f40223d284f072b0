"""Memory and time of a sharpness check beside a GPT-2-shaped decoder (`benchmarks.decoder`),
from 10M to 350M parameters, batch 4 x 128 tokens, float32.

Predicted: XLA's ahead-of-time memory analysis of each compiled function (arguments + outputs
- donated aliases + temporaries; nothing allocated), as a multiple of the parameters' bytes
beyond the parameters themselves. Measured, where the model runs on this machine: the time of
one tracker update against one training step, and the peak RSS of a process that makes one
tracker update, each in a child process of its own.
"""

from __future__ import annotations

import json

from benchmarks.harness import Context, child_python, format_seconds

NAME = "scale"
TITLE = "Memory and time of a check beside a GPT-2-shaped decoder"
GIB = 2**30
QUICK_PREDICTED = ("10M", "124M")
FULL_PREDICTED = ("10M", "30M", "124M", "350M")
CASES = ("gradient", "hvp", "power", "tracker", "top_eigenvalues")
LARGE_CASES = ("hvp", "power", "tracker")  # from 124M on (each compile takes minutes)
QUICK_RUN = ("tiny",)
FULL_RUN = ("tiny", "10M", "124M")
BASIS_SIZES = (4, 6, 8, 10, 12, 16)  # the knob's table, at KNOB_SIZE
KNOB_SIZE = "10M"

PREDICT = """
import json, sys
import jax, jax.numpy as jnp
import sam_eos
from benchmarks import decoder
from sam_eos.power_iteration import power_iteration
size = decoder.SIZES[sys.argv[1]]
case = sys.argv[2]
basis_size = int(sys.argv[3]) if len(sys.argv) > 3 else None
params, batch = decoder.abstract(size)
loss_fn = decoder.make_loss(size)
key = jax.random.key(0)
if case == "gradient":
    compiled = jax.jit(jax.grad(loss_fn)).lower(params, batch).compile()
elif case == "hvp":
    compiled = jax.jit(lambda p, b, v: sam_eos.hvp(loss_fn, p, b, v)).lower(
        params, batch, params).compile()
elif case == "power":
    compiled = jax.jit(lambda p, b: power_iteration(loss_fn, p, b, key)).lower(
        params, batch).compile()
elif case == "top_eigenvalues":
    compiled = jax.jit(lambda p, b: sam_eos.top_eigenvalues(
        loss_fn, p, b, key, basis_size=basis_size)).lower(params, batch).compile()
else:
    tracker = sam_eos.SharpnessTracker(loss_fn, basis_size=basis_size)
    state = jax.eval_shape(lambda p: tracker.init(p, key), params)
    compiled = tracker._update.lower(state, params, batch, None, None, ()).compile()
m = compiled.memory_analysis()
total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
         + m.temp_size_in_bytes)
print(json.dumps({"params": decoder.num_params(size), "total": total}))
"""

RUN = """
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
import optax
import sam_eos
from benchmarks import decoder
size = decoder.SIZES[sys.argv[1]]
what = sys.argv[2]
loss_fn = decoder.make_loss(size)
params = decoder.init(size, jax.random.key(0))
rng = np.random.default_rng(0)
tokens = jnp.asarray(rng.integers(0, size.vocab, decoder.BATCH, dtype=np.int32))
batch = (tokens, jnp.roll(tokens, -1, axis=1))
report = {"params": decoder.num_params(size)}
if what == "step":
    optimizer = optax.adamw(1e-4)
    opt_state = optimizer.init(params)
    @jax.jit
    def step(params, opt_state, batch):
        grads = jax.grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    params, opt_state = jax.block_until_ready(step(params, opt_state, batch))
    times = []
    for _ in range(5):
        began = time.perf_counter()
        params, opt_state = jax.block_until_ready(step(params, opt_state, batch))
        times.append(time.perf_counter() - began)
    report["seconds"] = float(np.median(times))
else:
    tracker = sam_eos.SharpnessTracker(loss_fn)
    state = tracker.init(params, jax.random.key(0))
    began = time.perf_counter()
    result, state = tracker.update(state, params, batch)
    jax.block_until_ready(result.eigenvalues)
    report["first_seconds"] = time.perf_counter() - began
    began = time.perf_counter()
    result, state = tracker.update(state, params, batch)
    jax.block_until_ready(result.eigenvalues)
    report.update(seconds=time.perf_counter() - began, hvps=int(result.hessian_vector_products),
                  eigenvalue=float(result.eigenvalues[0]), bound=float(result.error_bound))
with open("/proc/self/status") as f:
    report["peak_rss"] = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
print(json.dumps(report))
"""


def _child(code: str, *args: str) -> dict:
    finished = child_python(code, *args, timeout=3600)
    if finished.returncode:
        raise RuntimeError(finished.stderr[-3000:])
    return json.loads(finished.stdout.strip().splitlines()[-1])


def predicted(size: str, case: str, basis_size: int | None = None) -> tuple[int, float]:
    """`(num_params, memory beyond the parameters / the parameters' bytes)`."""
    args = (size, case) if basis_size is None else (size, case, str(basis_size))
    found = _child(PREDICT, *args)
    param_bytes = 4 * found["params"]
    return found["params"], (found["total"] - param_bytes) / param_bytes


def run(context: Context) -> dict:
    rows = []
    for size in QUICK_PREDICTED if context.quick else FULL_PREDICTED:
        large = size in ("124M", "350M")
        cases = {case: predicted(size, case) for case in (LARGE_CASES if large else CASES)}
        n = cases["hvp"][0]
        cells = [f"{cases[c][1]:.1f}x" if c in cases else "-" for c in CASES]
        rows.append([f"{size} ({n / 1e6:.1f}M)", *cells,
                     f"{(1 + cases['tracker'][1]) * 4 * n / GIB:.2f} GiB"])
    knob = [[str(b), f"{predicted(KNOB_SIZE, 'tracker', b)[1]:.1f}x"] for b in BASIS_SIZES]
    measured = []
    for size in QUICK_RUN if context.quick else FULL_RUN:
        step, update = _child(RUN, size, "step"), _child(RUN, size, "update")
        measured.append([
            f"{size} ({update['params'] / 1e6:.2f}M)", format_seconds(step["seconds"]),
            format_seconds(update["seconds"]), f"{update['seconds'] / step['seconds']:.1f}x",
            str(update["hvps"]), f"{update['peak_rss'] / GIB:.2f} GiB",
            f"{step['peak_rss'] / GIB:.2f} GiB"])
    return {
        "title": TITLE,
        "headline": [["Tracker update, memory beyond the parameters (predicted), "
                      f"{rows[-1][0]}", f"{rows[-1][4]} ({rows[-1][6]} in all)"]],
        "columns": ["params", "gradient", "one HVP", "original's power iteration",
                    "SharpnessTracker.update", "top_eigenvalues", "tracker update in all"],
        "rows": rows,
        "tables": [
            {"title": f"The knob: basis_size against a tracker update's memory ({KNOB_SIZE})",
             "columns": ["basis_size", "memory beyond the parameters"], "rows": knob},
            {"title": "Measured on this machine (second update: warm, compiled)",
             "columns": ["model", "training step (AdamW)", "tracker update", "update / step",
                         "HVPs", "peak RSS, update", "peak RSS, training"],
             "rows": measured},
        ],
        "notes": ("Memory beyond the parameters as a multiple of the parameters' bytes, from "
                  "XLA's memory analysis of each compiled function (arguments + outputs - "
                  "donated aliases + temporaries; the tracker's state is donated), batch 4 x "
                  "128 tokens, float32, defaults (k = 1; basis_size 14 for the tracker). "
                  "Measured: random tokens, one process per figure, times of the second call."),
    }
