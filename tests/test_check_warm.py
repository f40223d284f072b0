"""Checks in the loop: warm starts (and their checkpoints), the products' noise floor, the
check_seconds and error_bound columns, chunks that keep a check interruptible."""

import functools
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from sam_eos import errors, hessian
from sam_eos.eigensolver import top_eigenvalues
from sam_eos.loop import check, checkpoint, measurements, schedule, steps, train
from sam_eos.reports.raw_data import read_raw_data
from tests.conftest import ROOT, TINY_TRANSFORMER, environment, output_flags, outputs
from tests.conftest import two_layer_loss as mlp_loss
from tests.conftest import two_layer_problem as mlp_problem


def run_mlp(tmp_path, name, max_steps=40, **changes):
    params, batch = mlp_problem()
    directory = tmp_path / name
    directory.mkdir(exist_ok=True)
    config = train.TrainConfig(**{
        "step_size": 0.2, "rho": 0.05, "max_steps": max_steps, "hessian_check_every_steps": 5,
        "num_principal_components": 2, "outputs": outputs(directory), **changes})
    result = train.run(mlp_loss, params, train.FullBatch(batch), config)
    _, columns, table = read_raw_data(str(directory / "raw.txt"))
    return result, {name: table[:, i] for i, name in enumerate(columns)}


def dense_top(params, batch, k=2):
    flat, unravel = ravel_pytree(params)
    matrix = jax.hessian(lambda f: mlp_loss(unravel(f), batch))(flat)
    return np.sort(np.linalg.eigvalsh(np.asarray(matrix, np.float64)))[::-1][:k]


def test_warm_checks_agree_with_cold_ones_in_fewer_products(tmp_path, monkeypatch):
    compiled = []
    compile_ahead = steps.compile_ahead
    monkeypatch.setattr(steps, "compile_ahead",
                        lambda name, *args: compiled.append(name) or compile_ahead(name, *args))
    _, warm = run_mlp(tmp_path, "warm", eigensolver_tolerance=1e-7)
    assert compiled.count("the Hessian check") == 1  # cold first check and warm ones: one
    _, cold = run_mlp(tmp_path, "cold", eigensolver_tolerance=1e-7,
                      eigensolver_warm_start=False)
    assert len(warm["step"]) == len(cold["step"]) == 9
    for name in ("lambda_max", "eig_2"):
        assert np.all(np.isfinite(warm[name]))
        np.testing.assert_allclose(warm[name], cold[name], rtol=1e-4)
    params, batch = mlp_problem()
    np.testing.assert_allclose([warm["lambda_max"][0], warm["eig_2"][0]],
                               dense_top(params, batch), rtol=1e-4)
    assert warm["hessian_vector_products"][0] == cold["hessian_vector_products"][0]
    assert (np.median(warm["hessian_vector_products"][1:])
            < np.median(cold["hessian_vector_products"][1:]))
    for table in (warm, cold):
        assert np.all(table["check_seconds"] > 0)
        assert np.all((table["error_bound"] >= 0) & (table["error_bound"] <= 1e-7))


def test_a_resumed_run_starts_warm_from_the_saved_ritz_vectors(tmp_path):
    _, whole = run_mlp(tmp_path, "whole", max_steps=30)
    changes = {"checkpoint_dir": str(tmp_path / "checkpoints")}
    run_mlp(tmp_path, "parts", max_steps=15, **changes)
    params, _ = mlp_problem()
    config = train.TrainConfig(step_size=0.2, num_principal_components=2)
    template = check.initial_state(params, optax.sgd(0.2).init(params),
                                   config).checkpoint_tree()
    saver = checkpoint.Checkpointer(changes["checkpoint_dir"], {})
    saved = saver._restore_state(15, template)["ritz_vectors"]
    saver.close()
    assert saved.shape == (4, 96) and np.all(np.linalg.norm(saved, axis=1) > 0.99)
    _, resumed = run_mlp(tmp_path, "parts", max_steps=30, **changes)
    assert list(resumed["step"]) == list(whole["step"])  # 0, 5, ..., 30
    # The check at step 20, the resumed run's first, took as many products as uninterrupted.
    np.testing.assert_array_equal(resumed["hessian_vector_products"],
                                  whole["hessian_vector_products"])
    np.testing.assert_allclose(resumed["lambda_max"], whole["lambda_max"], rtol=1e-5)


def test_a_checkpoint_without_ritz_vectors_restores_them_as_zeros(tmp_path):
    state = {"params": jnp.arange(3.0), "opt_state": ()}
    saver = checkpoint.Checkpointer(str(tmp_path), {})
    saver.save(state, schedule.Position(step=4))
    restored, position = saver.restore({**state, "ritz_vectors": jnp.zeros((2, 3))})
    saver.close()
    assert position.step == 4
    np.testing.assert_array_equal(restored["params"], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(restored["ritz_vectors"], np.zeros((2, 3)))


def perturbed(vector, product, size=1e-3):
    """`product` plus a deterministic perturbation of relative size `size`."""
    direction = jnp.roll(vector, 1)
    return product + size * jnp.linalg.norm(product) * direction / jnp.linalg.norm(direction)


def test_the_noise_floor_of_perturbed_products_bounds_every_check(tmp_path, monkeypatch):
    """The floor measured with products perturbed by 1e-3 (relative) reaches every check's
    bound, and a tolerance below it is noted in the raw data."""
    monkeypatch.setattr(hessian, "product_noise_floor", functools.partial(
        hessian.product_noise_floor, product_transform=perturbed))
    _, table = run_mlp(tmp_path, "floor", max_steps=10, eigensolver_tolerance=1e-5)
    assert np.all(table["error_bound"] >= 1e-3 * 0.99)
    # The bound is the solver's own estimate, at most the floor where it stops, plus the floor.
    assert np.all(table["error_bound"] <= 2e-3 * 1.01)
    text = (tmp_path / "floor" / "raw.txt").read_text()
    assert "# note: the eigensolver tolerance 1e-05 is below the products' noise floor" in text


def test_a_perturbed_product_is_covered_by_the_check_bound():
    """At the solver level: products perturbed by 1e-3, floor passed: the reported bound covers
    the true error against the dense Hessian."""
    params, batch = mlp_problem()
    flat, _ = ravel_pytree(params)
    floor = float(hessian.product_noise_floor(mlp_loss, params, batch, flat / jnp.linalg.norm(
        flat), product_transform=perturbed))
    top, _, info = top_eigenvalues(
        mlp_loss, params, batch, jax.random.PRNGKey(0), 2, tolerance=1e-6, noise_floor=floor,
        product_transform=perturbed)
    exact = dense_top(params, batch)
    assert 0.9e-3 < floor < 1.1e-3 and float(info.error_bound) >= floor
    assert abs(float(top[0]) - exact[0]) / exact[0] <= float(info.error_bound)


def test_an_interrupt_mid_check_ends_within_seconds_with_the_rows_so_far(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the king and queen of rome shall speak to thee.\n" * 300)
    process = subprocess.Popen(
        [sys.executable, "tests/slow_check.py", "transformer", f"--corpus={corpus}",
         "--test_lines=100", "--max_steps=100000", "--hessian_check_every_steps=5",
         "--hessian_check_gap=none", "--eigensolver_max_iterations=3200", *TINY_TRANSFORMER,
         *output_flags(tmp_path)],
        cwd=ROOT, env=environment(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    for line in process.stdout:  # each chunk of the check at step 10 sleeps 0.5 s
        if "slow chunk" in line:
            break
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == errors.EXIT_INTERRUPTED_SIGINT, stderr[-3000:]
    assert stdout.count("slow chunk") < 20  # of 64 chunks
    assert "Traceback" not in stderr
    assert "Test loss:" in stdout
    text = (tmp_path / "raw.txt").read_text()
    assert "# note: check at step 10 interrupted mid-check after" in text
    _, columns, rows = read_raw_data(str(tmp_path / "raw.txt"))
    assert list(rows[:, columns.index("step")]) == [0, 5]


def test_every_warm_start_is_checkpointed_and_a_resume_continues_warm(tmp_path):
    """The SAM point's and Adam's effective-sharpness Ritz vectors are loop state too."""
    changes = {"checkpoint_dir": str(tmp_path / "checkpoints"), "optimizer": "adam",
               "step_size": 0.01, "spectrum": measurements.SpectrumOptions(
                   sam_point_sharpness=True)}
    _, whole = run_mlp(tmp_path, "whole", max_steps=20, **{**changes, "checkpoint_dir": ""})
    run_mlp(tmp_path, "parts", max_steps=10, **changes)
    params, _ = mlp_problem()
    config = train.TrainConfig(step_size=0.01, num_principal_components=2, optimizer="adam",
                               spectrum=changes["spectrum"])
    template = check.initial_state(params, optax.adam(0.01).init(params),
                                   config).checkpoint_tree()
    assert set(template) == {"params", "opt_state", "ritz_vectors", "effective_ritz_vectors",
                             "sam_point_ritz_vectors"}
    saver = checkpoint.Checkpointer(changes["checkpoint_dir"], {})
    saved = saver._restore_state(10, template)
    saver.close()
    for name in ("ritz_vectors", "effective_ritz_vectors", "sam_point_ritz_vectors"):
        assert np.all(np.linalg.norm(saved[name], axis=1) > 0.99), name
    _, resumed = run_mlp(tmp_path, "parts", max_steps=20, **changes)
    assert list(resumed["step"]) == list(whole["step"])  # 0, 5, 10, 15, 20
    # After the resume, each warm-started solve costs what it cost uninterrupted.
    for column in ("hessian_vector_products", "sam_point_hessian_vector_products"):
        np.testing.assert_array_equal(resumed[column], whole[column])
    np.testing.assert_allclose(resumed["effective_sharpness"][1:],
                               whole["effective_sharpness"][1:], rtol=1e-4)


def test_the_basis_size_flag_sizes_every_checks_basis(tmp_path, monkeypatch):
    """--eigensolver_basis_size reaches the main, SAM-point and layer solves: their compiled
    programs hold a basis of that many rows (default for k = 2: 17), and the checks still
    find the dense Hessian's top pair."""
    compiled = {}
    compile_ahead = steps.compile_ahead

    def record(name, *args):
        compiled[name] = compile_ahead(name, *args)
        return compiled[name]

    monkeypatch.setattr(steps, "compile_ahead", record)
    spectrum = measurements.SpectrumOptions(sam_point_sharpness=True, layer_sharpness=True)
    result, table = run_mlp(tmp_path, "small", max_steps=10, eigensolver_basis_size=5,
                            eigensolver_tolerance=1e-7, spectrum=spectrum)
    n = ravel_pytree(result.params)[0].size
    main = compiled["the Hessian check"].as_text()
    assert f"f32[5,{n}]" in main and f"f32[17,{n}]" not in main
    assert f"f32[5,{n}]" in compiled["the SAM-point sharpness"].as_text()
    layer_text = compiled["the layers' sharpness"].as_text()
    assert "f32[5," in layer_text and "f32[10," not in layer_text
    np.testing.assert_allclose([table["lambda_max"][-1], table["eig_2"][-1]],
                               dense_top(result.params, mlp_problem()[1]), rtol=1e-4)
