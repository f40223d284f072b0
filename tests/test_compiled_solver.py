"""Properties of the compiled programs: the Lanczos basis is never transposed, and a run sends
its full batch to the device once."""

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
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
    assert not re.search(rf"f32\[[\d,]*\b{size}\b", text), "no flat vector of all params"
    for leaf in jax.tree.leaves(params):  # the basis is row-stacked leaf by leaf
        dims = ",".join(str(d) for d in leaf.shape)
        assert re.search(rf"f32\[{rows},{dims}\]", text), f"the basis of a {dims} leaf"
        transposed = re.compile(rf"= f32\[{dims},{rows}\]\{{[\d,]+\}} (?:copy|transpose)\(")
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


def test_a_tracker_update_holds_a_bounded_number_of_parameter_sized_vectors():
    # XLA's memory analysis of the compiled update on a quadratic, whose own products need no
    # temporaries: beyond the parameters it holds the basis, the donated state, the direction
    # and a few work vectors, whatever the budget, and one vector less per basis row less.
    import sam_eos

    size = 200_000
    params = {"w": jax.ShapeDtypeStruct((size,), jnp.float32)}
    curvature = jax.ShapeDtypeStruct((size,), jnp.float32)

    def beyond_params(**options) -> float:
        tracker = sam_eos.SharpnessTracker(quadratic, **options)
        state = jax.eval_shape(lambda p: tracker.init(p, jax.random.key(0)), params)
        memory = tracker._update.lower(state, params, curvature, None, None, ()).compile(
        ).memory_analysis()
        total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                 - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
        return total / (4 * size) - 2  # less the parameters and the curvature (the batch)

    default = beyond_params()
    rows = lanczos.default_basis_size(eigensolver.warm_block_size(1))
    assert default <= rows + 3 + 1 + 3  # basis, state (donated), direction, work vectors
    assert beyond_params(num_matvecs=10_000) == default
    assert beyond_params(basis_size=rows - 4) == pytest.approx(default - 4, abs=0.01)


def quadratic(params, curvature):
    return 0.5 * jnp.sum(curvature * params["w"] ** 2)
