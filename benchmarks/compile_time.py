"""Time to the first step: what `sam_eos.loop.train.run` spends compiling the SAM step and the
Hessian check before its clock starts, in fresh processes without a compilation cache."""

import json

from benchmarks.harness import Context, child_python

NAME = "compile_time"
TITLE = "Compile seconds (time to the first step)"

PROBE = """
import json, sys, time
import jax
from benchmarks import problems
from sam_eos.loop import train
started = time.perf_counter()
if sys.argv[1] == "mlp":
    network, loss_fn = problems.make_mlp(200, 4)
    batch = problems.synthetic_mnist(2000)
else:
    network, loss_fn = problems.make_transformer()
    import pathlib
    batch, _ = problems.text_batch(pathlib.Path(sys.argv[2]), 32)
params = network.init(jax.random.PRNGKey(0), batch[0][:1])
config = train.TrainConfig(step_size=0.05, rho=0.05, max_steps=1, hessian_check_every_steps=1)
result = train.run(loss_fn, params, train.FullBatch(batch), config)
print(json.dumps({"compile": result.seconds["compile"],
                  "first_step": time.perf_counter() - started,
                  "params": problems.num_params(params)}))
"""


def probe(model: str, context: Context) -> dict:
    finished = child_python(PROBE, model, str(context.data_dir))
    if finished.returncode:
        raise RuntimeError(finished.stderr[-2000:])
    return json.loads(finished.stdout.strip().splitlines()[-1])


def run(context: Context) -> dict:
    models = {"mlp": "MLP 3x200, 2000 images"}
    if not context.quick:
        models["transformer"] = "transformer 6x128, batch 32x64"
    rows, headline = [], []
    for model, label in models.items():
        measured = probe(model, context)
        rows.append([f"{label} ({measured['params']:,} params)",
                     f"{measured['compile']:.1f} s", f"{measured['first_step']:.1f} s"])
        headline.append([f"Compile: SAM step and check, {label.split(',')[0]}",
                         f"{measured['compile']:.1f} s"])
    return {"title": TITLE, "headline": headline,
            "columns": ["model", "compile (step + check + measurements)",
                        "process start to the end of a 1-step run"],
            "rows": rows,
            "notes": "One fresh process per model, no persistent compilation cache; SAM rho "
                     "0.05, one check."}
