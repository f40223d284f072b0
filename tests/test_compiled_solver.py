"""Properties of the compiled programs: the Lanczos basis is never transposed, and a run sends
its full batch to the device once."""

import re
import subprocess
import sys

import jax
from jax.flatten_util import ravel_pytree

from sam_eos import eigensolver, lanczos
from tests.conftest import ROOT, environment, make_mlp, mlp_loss


def test_the_compiled_default_solver_never_transposes_its_basis():
    params, batch = make_mlp([12, 40, 30, 3], num_examples=32)
    size = ravel_pytree(params)[0].size
    basis_size = lanczos.default_basis_size(eigensolver.warm_block_size(1))
    rows = lanczos.basis_rows(size, eigensolver.DEFAULT_NUM_MATVECS, basis_size)
    solver = jax.jit(lambda p, b, key: eigensolver.top_eigenvalues(mlp_loss, p, b, key)[0])
    text = solver.lower(params, batch, jax.random.key(0)).compile().as_text()
    basis = re.compile(rf"f32\[{rows},{size}\]")
    assert basis.search(text), "the basis shape should appear in the HLO"
    transposed = re.compile(rf"= f32\[{size},{rows}\]\{{1,0\}} (?:copy|transpose)\(")
    assert transposed.findall(text) == []


TRANSFERS = """
import jax, numpy as np
from sam_eos.loop import train
rng = np.random.default_rng(0)
params = {"w": jax.device_put(rng.normal(size=(16, 4)).astype(np.float32))}
batch = (rng.normal(size=(64, 16)).astype(np.float32), rng.normal(size=(64, 4)).astype(np.float32))
loss = lambda p, b: ((b[0] @ p["w"] - b[1]) ** 2).mean()
config = train.TrainConfig(step_size=0.05, rho=0.05, max_steps=3000)
with jax.transfer_guard_host_to_device("log_explicit"):
    result = train.run(loss, params, train.FullBatch(batch), config)
print("steps", result.steps)
"""


def test_a_run_sends_its_full_batch_to_the_device_once():
    env = dict(environment(), TF_CPP_MIN_LOG_LEVEL="0")  # the guard logs as a warning
    finished = subprocess.run([sys.executable, "-c", TRANSFERS], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "steps 3000" in finished.stdout
    shapes = re.findall(r"host-to-device transfer: aval=ShapedArray\((\w+\[[\d,]*\])",
                        finished.stderr)
    assert shapes.count("float32[64,16]") == 1 and shapes.count("float32[64,4]") == 1
    assert all(shape in ("float32[64,16]", "float32[64,4]") or "[]" in shape
               for shape in shapes), sorted(set(shapes))  # the rest: scalar step counts
