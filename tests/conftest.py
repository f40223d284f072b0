"""Shared test set-up: CPU only, the repository root importable, TensorFlow quiet."""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# One BLAS thread per process: two test workers on two cores, each with threaded LAPACK calls
# (Lanczos's small eigh every step), only contend.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Cheaper XLA CPU compiles for the tests' own processes and every subprocess they start (their
# environments copy this one): 2-3x less compile time on the tests' tiny models, for a small
# run-time cost. Only the tests use them; the programs keep full optimisation. No test compares
# numbers with ones made under the default flags.
# SAM_EOS_TEST_XLA_FLAGS replaces them ("" for XLA's defaults).
TEST_XLA_FLAGS = os.environ.setdefault(
    "SAM_EOS_TEST_XLA_FLAGS",
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
# The programs' compilation cache (--compilation_cache_dir, under $XDG_CACHE_HOME) goes to a
# folder of this test session, not the user's cache: one folder for every worker of the session
# (made by the main pytest process, whose environment the pytest-xdist workers inherit), so a
# program compiled by one test run is loaded, not compiled again, by the next run of the same
# program in any worker. Most of the suite's time is XLA compiling small models. The main
# process removes the folder at the end (`pytest_sessionfinish`).
if "SAM_EOS_TEST_CACHE_HOME" not in os.environ:
    os.environ["SAM_EOS_TEST_CACHE_HOME"] = tempfile.mkdtemp(prefix="sam_eos_test_cache_")
os.environ["XDG_CACHE_HOME"] = os.environ["SAM_EOS_TEST_CACHE_HOME"]
# The tests' own processes use that cache too, for every compile whatever its size or time:
# many tests run `train.run` more than once on one model (a resume, a rerun), and each run
# compiles fresh closures of the same programs.
if os.environ.get("SAM_EOS_TEST_IN_PROCESS_CACHE", "1") == "1":
    import jax  # noqa: E402 - after the XLA flags above

    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(os.environ["SAM_EOS_TEST_CACHE_HOME"], "in_process"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402 - after the XLA flags above
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sam_eos.loop import train  # noqa: E402


def pytest_sessionfinish(session):
    """The main process (not an xdist worker) removes the session's compilation cache."""
    if not hasattr(session.config, "workerinput"):
        shutil.rmtree(os.environ["SAM_EOS_TEST_CACHE_HOME"], ignore_errors=True)


def assert_tensorboard_equals_raw_data(log_dir, raw_path) -> None:
    """Every finite raw-data column is a TensorBoard scalar, tagged `tag_for` its name, whose
    points are the rows' (steps, values) to float32, each step once."""
    import numpy as np

    from sam_eos.reports.raw_data import read_raw_data
    from sam_eos.reports.tensorboard_writer import read_scalars, tag_for

    _, columns, rows = read_raw_data(str(raw_path))
    scalars = read_scalars(str(log_dir))
    steps = rows[:, columns.index("step")]
    for i, name in enumerate(columns):
        if name == "step":
            continue
        finite = np.isfinite(rows[:, i])
        assert tag_for(name) in scalars or not finite.any(), name
        if finite.any():
            written_steps, values = scalars[tag_for(name)]
            np.testing.assert_array_equal(written_steps, steps[finite], err_msg=name)
            np.testing.assert_array_equal(values, rows[finite, i].astype(np.float32),
                                          err_msg=name)


def dense_hessian(loss_fn, params, batch):
    """The Hessian of `loss_fn(params, batch)` in `ravel_pytree(params)` order, float64 [n, n]."""
    import jax
    import numpy as np
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat), np.float64)


# Problems and helpers that several test files share.


def mlp_loss(params, batch, activation=jax.nn.relu):
    x, y = batch
    h = x
    for i in range(len(params) - 1):
        h = activation(h @ params[i]["w"] + params[i]["b"])
    return jnp.mean((h @ params[-1]["w"] + params[-1]["b"] - y) ** 2)


def tanh_mlp_loss(params, batch):
    return mlp_loss(params, batch, jnp.tanh)


def make_mlp(sizes, num_examples=64, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes) + 1)
    params = [
        {"w": jax.random.normal(keys[i], (m, n)) / np.sqrt(m), "b": jnp.full((n,), 0.1)}
        for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    ]
    x = jax.random.normal(keys[-2], (num_examples, sizes[0]))
    y = jax.nn.one_hot(jax.random.randint(keys[-1], (num_examples,), 0, sizes[-1]), sizes[-1])
    return params, (x, y)


def two_layer_loss(params, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ params["w"]) @ params["v"] - y) ** 2)


def two_layer_problem(seed=0, num_examples=32):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = {"w": jax.random.normal(k[0], (6, 12)) / 3, "v": jax.random.normal(k[1], (12, 2))}
    x = jax.random.normal(k[2], (num_examples, 6))
    y = jax.random.normal(k[3], (num_examples, 2))
    return params, (x, y)


def outputs(directory, plots: bool = False) -> train.Outputs:
    """The raw data in `directory`, and with `plots` the four plots (drawing them costs a few
    seconds a run: only the tests that look at them ask)."""
    def plot(name):
        return str(directory / name) if plots else ""
    return train.Outputs(
        raw_data=str(directory / "raw.txt"),
        eigs_curve=plot("eigs.pdf"),
        eigs_se_only=plot("eigs_se_only.pdf"),
        alignment_curve=plot("a.pdf"),
        loss_curve=plot("ell.pdf"),
    )


def assert_valid_pdf(path):
    with open(path, "rb") as file:
        content = file.read()
    assert content.startswith(b"%PDF-")
    assert b"%%EOF" in content[-64:]
    assert len(content) > 1000


LAYERS = ("mlp/~/linear_0", "mlp/~/linear_1", "mlp/~/linear_2")


def layered_tanh_loss(params, batch):
    """A Haiku-shaped MLP: params keyed by module name, each {"w", "b"}."""
    x, y = batch
    h = x
    for name in LAYERS[:-1]:
        h = jnp.tanh(h @ params[name]["w"] + params[name]["b"])
    out = h @ params[LAYERS[-1]]["w"] + params[LAYERS[-1]]["b"]
    return jnp.mean((out - y) ** 2)


def make_layered_problem(sizes=(6, 12, 8, 3), num_examples=40, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes) + 1)
    params = {name: {"w": jax.random.normal(keys[i], (m, n)) / np.sqrt(m),
                     "b": jnp.full((n,), 0.1)}
              for i, (name, m, n) in enumerate(zip(LAYERS, sizes[:-1], sizes[1:], strict=False))}
    x = jax.random.normal(keys[-2], (num_examples, sizes[0]))
    y = jax.random.normal(keys[-1], (num_examples, sizes[-1]))
    return params, (x, y)


TINY_TRANSFORMER = [
    "--num_layers=1", "--model_size=32", "--num_heads=2", "--key_size=16",
    "--sequence_length=32", "--batch_size=16",
]


def environment() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TFDS_DATA_DIR", None)
    return env


def output_flags(directory: pathlib.Path, plots: bool = False) -> list[str]:
    """The programs' output flags: the raw data in `directory`, and with `plots` the four
    plots; without, the plots are switched off (empty paths), as `outputs`."""
    def plot(name):
        return directory / name if plots else ""
    return [
        f"--raw_data_output={directory / 'raw.txt'}",
        f"--eigs_curve_output={plot('eigs.pdf')}",
        f"--eigs_se_only_output={plot('eigs_se_only.pdf')}",
        f"--alignment_curve_output={plot('a.pdf')}",
        f"--loss_curve_output={plot('ell.pdf')}",
    ]


def shakespeare_like_text(num_lines: int = 600) -> str:
    rng = np.random.default_rng(0)
    words = ["the", "king", "and", "queen", "of", "rome", "shall", "speak", "to", "thee"]
    return "".join(" ".join(rng.choice(words, 8)) + ".\n" for _ in range(num_lines))


def run_program(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """`python <args>` from the repository root with the tests' environment."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=environment(), text=True,
                          capture_output=True, timeout=timeout)


def run_plot(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    """The plot program (`python -m sam_eos.cli.replot`) on `args`."""
    return subprocess.run([sys.executable, "-m", "sam_eos.cli.replot", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
