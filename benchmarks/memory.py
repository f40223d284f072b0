"""Peak host memory of one default `top_eigenvalues` call (Lanczos, 100 products at most) on
the image program's default MLP (3 x 1000, 2.8M parameters), against a process that stops
just before the call."""

import json

from benchmarks.harness import Context, child_python
from sam_eos import eigensolver, lanczos

NAME = "memory"
TITLE = "Memory of one Hessian check"
GIB = 2**30

PROBE = """
import json, sys
import jax
from benchmarks import problems
from sam_eos import top_eigenvalues
network, loss_fn = problems.make_mlp(1000, 4)
batch = jax.device_put(problems.synthetic_mnist(256))
params = network.init(jax.random.PRNGKey(0), batch[0][:1])
jax.block_until_ready(jax.jit(jax.grad(loss_fn))(params, batch))
report = {"params": problems.num_params(params)}
if sys.argv[1] == "call":
    values, _, info = top_eigenvalues(loss_fn, params, batch, jax.random.key(0))
    report.update(hvps=int(info.hessian_vector_products), converged=bool(info.converged))
with open("/proc/self/status") as f:
    report["peak_rss"] = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
print(json.dumps(report))
"""


def probe(kind: str) -> dict:
    finished = child_python(PROBE, kind)
    if finished.returncode:
        raise RuntimeError(finished.stderr[-2000:])
    return json.loads(finished.stdout.strip().splitlines()[-1])


def run(context: Context) -> dict:
    del context
    call, baseline = probe("call"), probe("baseline")
    extra = call["peak_rss"] - baseline["peak_rss"]
    rows = lanczos.default_basis_size(eigensolver.warm_block_size(1))
    basis = rows * call["params"] * 4
    return {
        "title": TITLE,
        "headline": [["Memory: one check on the MLP 3x1000 (2.8M params), peak RSS",
                      f"{call['peak_rss'] / GIB:.2f} GiB (+{extra / GIB:.2f} GiB for the check)"]],
        "columns": ["case", "peak RSS", "detail"],
        "rows": [
            [f"one top_eigenvalues call ({call['params']:,} params)",
             f"{call['peak_rss'] / GIB:.2f} GiB",
             f"{call['hvps']} HVPs, converged {call['converged']}"],
            ["the same process stopping before the call", f"{baseline['peak_rss'] / GIB:.2f} GiB",
             f"so the check adds {extra / GIB:.2f} GiB; the Lanczos basis alone is {rows} x "
             f"params x 4 B = {basis / GIB:.2f} GiB"],
        ],
        "notes": "VmHWM of child processes; 256 generated images.",
    }
