"""The optional curvature measurements in the loop: columns, densities, the plot."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_eos import spectrum
from sam_eos.loop import measurements, train
from sam_eos.reports import figures, raw_data
from sam_eos.reports.raw_data import density_data_path, read_density, read_raw_data
from tests.conftest import assert_valid_pdf, outputs
from tests.conftest import two_layer_loss as mlp_loss
from tests.conftest import two_layer_problem as mlp_problem

ALL_ON = measurements.SpectrumOptions(
    hessian_trace_matvecs=20, spectral_density_every_checks=2, batch_sharpness=True,
    sam_point_sharpness=True)
NEW_COLUMNS = ["trace", "trace_standard_error", "batch_sharpness",
               "batch_sharpness_standard_error", "batch_sharpness_batches",
               "sam_point_sharpness", "sam_point_hessian_vector_products"]


class SeededOrder:
    """Batches of `batch_size` rows drawn with a seeded generator (the programs' BatchOrder)."""

    def __init__(self, num_examples: int, batch_size: int, seed: int = 0):
        self._rng = np.random.default_rng(seed)
        self._n, self._b = num_examples, batch_size

    def take_indices(self, n: int) -> np.ndarray:
        rows = [self._rng.permutation(self._n)[:self._b] for _ in range(n)]
        return np.array(rows, np.int64).reshape(n, self._b)

    def skip(self, n: int) -> None:
        self.take_indices(n)


def minibatch_problem(num_examples=256, batch_size=8, seed=0):
    params, examples = mlp_problem(num_examples=num_examples)
    return params, examples, SeededOrder(num_examples, batch_size, seed)


def run_with(tmp_path, options, *, max_steps=30, every=10, rho=0.05, data=None, **config):
    params, examples, order = minibatch_problem()
    data = data or train.DeviceData(examples, order)
    paths = outputs(tmp_path)
    config = train.TrainConfig(
        step_size=0.1, rho=rho, max_steps=max_steps, hessian_check_every_steps=every,
        outputs=train.Outputs(**{**paths.__dict__, "density_curve": str(tmp_path / "d.pdf")}),
        spectrum=options, **config)
    return train.run(mlp_loss, params, data, config)


def test_options_off_keep_todays_columns_and_write_no_density(tmp_path):
    result = run_with(tmp_path, measurements.SpectrumOptions(), max_steps=10)
    _, columns, _ = read_raw_data(result.raw_data)
    assert columns == raw_data.column_names(1)
    assert not any(name in columns for name in NEW_COLUMNS)
    assert not (tmp_path / "raw_density.npz").exists() and not (tmp_path / "d.pdf").exists()


def test_every_option_writes_finite_columns_densities_and_the_fifth_plot(tmp_path):
    result = run_with(tmp_path, ALL_ON)
    assert result.status == "max_steps"
    _, columns, rows = read_raw_data(result.raw_data)
    assert columns == raw_data.column_names(1, NEW_COLUMNS)
    table = {name: rows[:, columns.index(name)] for name in columns}
    for name in NEW_COLUMNS:
        assert np.all(np.isfinite(table[name])), name
    assert np.all(table["trace_standard_error"] > 0)
    assert np.all((table["batch_sharpness_batches"] >= 2)
                  & (table["batch_sharpness_batches"] <= measurements.MAX_BATCHES))
    assert np.all(table["sam_point_hessian_vector_products"] >= 1)
    # rho = 0.05: the SAM point is near w, so its sharpness is near lambda_max (within 20 %).
    np.testing.assert_allclose(table["sam_point_sharpness"], table["lambda_max"], rtol=0.2)
    # Checks 0, 1, 2, 3 at steps 0, 10, 20, 30: densities at checks 0 and 2.
    densities = read_density(density_data_path(result.raw_data))
    assert list(densities) == [0, 20]
    steps = min(measurements.DENSITY_LANCZOS_STEPS, 6 * 12 + 12 * 2)
    for step, check in densities.items():
        shape = (measurements.DENSITY_PROBES, steps)
        assert check["nodes"].shape == shape and check["weights"].shape == shape
        np.testing.assert_allclose(check["weights"].sum(axis=1), 1.0, rtol=1e-5)
        row = list(table["step"]).index(step)
        np.testing.assert_allclose(check["marks"], [table["lambda_max"][row], 2 / 0.1,
                                                    table["sam_edge"][row]])
        # The top node approximates lambda_max (Lanczos from a random probe).
        assert np.max(check["nodes"]) <= table["lambda_max"][row] * (1 + 1e-3)
    assert_valid_pdf(tmp_path / "d.pdf")
    assert str(tmp_path / "d.pdf") in result.files
    assert density_data_path(result.raw_data) in result.files


def test_batch_sharpness_in_a_row_is_the_mean_over_the_batches_it_used(tmp_path):
    options = measurements.SpectrumOptions(batch_sharpness=True)
    result = run_with(tmp_path, options, max_steps=1, every=1)
    row = result.rows[0]
    params, examples, order = minibatch_problem()
    used = int(row["batch_sharpness_batches"])
    indices = order.take_indices(used)  # the first chunk's first rows: the same seeded order
    batches = jax.tree.map(lambda x: x[indices], examples)
    samples = spectrum.batch_sharpness_samples(mlp_loss, params, batches)
    np.testing.assert_allclose(row["batch_sharpness"],
                               float(spectrum.batch_sharpness(mlp_loss, params, batches)),
                               rtol=1e-5)
    mean, error = spectrum.mean_and_standard_error(samples)
    np.testing.assert_allclose(row["batch_sharpness_standard_error"], error, rtol=1e-5)
    # It stopped at the first chunk boundary where the rule held, or at the cap.
    assert spectrum.enough_batches(samples, measurements.MAX_BATCHES)
    chunk = measurements.BATCH_SHARPNESS_CHUNK
    assert used == measurements.MAX_BATCHES or not spectrum.enough_batches(
        samples[:used - chunk], measurements.MAX_BATCHES)


def test_a_full_batch_run_measures_the_one_batch(tmp_path):
    params, examples = mlp_problem()
    options = measurements.SpectrumOptions(batch_sharpness=True)
    result = run_with(tmp_path, options, max_steps=1, every=1,
                      data=train.FullBatch(examples))
    row = result.rows[0]
    assert row["batch_sharpness_batches"] == 1
    expected = spectrum.batch_sharpness(
        mlp_loss, params, jax.tree.map(lambda x: x[None], examples))
    np.testing.assert_allclose(row["batch_sharpness"], float(expected), rtol=1e-5)


def test_batch_rows_wrap_round_the_chunk():
    np.testing.assert_array_equal(measurements.batch_rows(6, 8, 4, 0), [6, 7, 0, 1])
    np.testing.assert_array_equal(measurements.batch_rows(6, 8, 4, 1), [2, 3, 4, 5])


def test_the_density_writer_keeps_what_it_wrote_and_a_resume_cuts_later_checks(tmp_path):
    path = str(tmp_path / "raw_density.npz")
    writer = raw_data.DensityWriter(path)
    marks = {"lambda_max": 3.0, "two_over_eta": 20.0, "sam_edge": 15.0}
    for step in (0, 10, 20):
        writer.add(step, np.full((2, 3), step, float), np.full((2, 3), 1 / 3), marks)
        assert list(read_density(path)) == list(range(0, step + 1, 10))  # on disk at once
    resumed = raw_data.DensityWriter(path, keep_up_to_step=10)
    assert list(resumed.checks) == [0, 10]
    np.testing.assert_array_equal(resumed.checks[10]["marks"], [3.0, 20.0, 15.0])


def fake_densities(num_checks: int) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    checks = {}
    for i in range(num_checks):
        nodes = np.sort(rng.uniform(-1, 2 + i, (4, 10)), axis=1)
        weights = rng.dirichlet(np.ones(10), 4)
        checks[10 * i] = {"nodes": nodes, "weights": weights,
                          "marks": np.array([2.0 + i, 20.0, 15.0 - i])}
    return checks


def test_the_density_plot_draws_five_checks_on_a_log_scale_with_the_marks():
    figure = figures.make_density_figure(fake_densities(9), "title")
    ax = figure.axes[0]
    assert ax.get_yscale() == "log"
    labels = [line.get_label() for line in ax.lines]
    curves = [label for label in labels if label.startswith("step ")]
    assert curves == ["step 0", "step 20", "step 40", "step 60", "step 80"]
    vertical = [line for line in ax.lines if len(set(line.get_xdata())) == 1]
    x_of = {float(line.get_xdata()[0]) for line in vertical}
    assert {2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 15.0, 13.0, 11.0, 9.0, 7.0} <= x_of
    assert sum(label == r"$2/\eta$" for label in labels) == 1
    density = ax.lines[0].get_ydata()
    assert np.all(density >= 0) and np.max(density) > 0
    bottom, top = ax.get_ylim()
    assert math.isclose(bottom, np.max([line.get_ydata().max() for line in ax.lines
                                        if line.get_label().startswith("step ")])
                        * figures.DENSITY_FLOOR_FRACTION, rel_tol=1e-9)


def test_evenly_spaced_picks_first_and_last():
    assert figures.evenly_spaced(3) == [0, 1, 2]
    assert figures.evenly_spaced(11) == [0, 2, 5, 8, 10]
    assert figures.evenly_spaced(0) == []


def test_the_smoothed_density_integrates_to_one():
    checks = fake_densities(1)
    grid, width = figures.density_grid(list(checks.values()))
    density = figures.smoothed_density(checks[0]["nodes"], checks[0]["weights"], grid, width)
    assert abs(np.trapezoid(density, grid) - 1) < 1e-2
    on_device = spectrum.density_on_grid(jnp.asarray(checks[0]["nodes"]),
                                         jnp.asarray(checks[0]["weights"]),
                                         jnp.asarray(grid), width)
    np.testing.assert_allclose(density, on_device, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("rho", [0.0, 0.05])
def test_the_sam_point_sharpness_is_warm_started_and_matches_a_cold_solve(tmp_path, rho):
    options = measurements.SpectrumOptions(sam_point_sharpness=True)
    result = run_with(tmp_path, options, rho=rho, max_steps=2, every=1)
    params, examples, order = minibatch_problem()
    first = order.take_indices(1)[0]
    batch = jax.tree.map(lambda x: x[first], examples)
    cold, _ = spectrum.sam_point_sharpness(mlp_loss, params, batch, jax.random.PRNGKey(0), rho)
    np.testing.assert_allclose(result.rows[0]["sam_point_sharpness"], float(cold), rtol=1e-4)
    if rho == 0:  # the SAM point is w: the same eigenvalue as the main check
        np.testing.assert_allclose(result.rows[0]["sam_point_sharpness"],
                                   result.rows[0]["lambda_max"], rtol=1e-4)


def test_sam_eos_plot_redraws_the_density_from_the_saved_file(tmp_path):
    from tests.conftest import run_plot

    raw = tmp_path / "raw.txt"
    columns = raw_data.column_names(1)
    writer = raw_data.RawDataWriter(str(raw), columns, {"run_name": "fake", "step_size": 0.1})
    writer.row(dict.fromkeys(columns, 1.0))
    writer.close()
    densities = raw_data.DensityWriter(density_data_path(str(raw)))
    for step, check in fake_densities(3).items():
        marks = dict(zip(raw_data.DENSITY_MARKS, check["marks"], strict=True))
        densities.add(step, check["nodes"], check["weights"], marks)
    result = run_plot(raw)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"wrote {tmp_path / 'density.pdf'}" in result.stdout
    assert_valid_pdf(tmp_path / "density.pdf")
    alone = tmp_path / "alone.png"
    result = run_plot(density_data_path(str(raw)), f"--density_output={alone}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert alone.read_bytes().startswith(b"\x89PNG")


def test_the_trace_flags_reject_a_negative_value_with_exit_code_2(tmp_path):
    from sam_eos import errors
    from tests.conftest import run_program, shakespeare_like_text

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_like_text())
    result = run_program(["-m", "transformer", f"--corpus={corpus}", "--test_lines=100",
                          "--hessian_trace_matvecs=-1", f"--output_dir={tmp_path}"], timeout=120)
    assert result.returncode == errors.EXIT_BAD_INPUT == 2
    assert "--hessian_trace_matvecs must be 0 (off) or at least 4 (XTrace" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "raw.txt").exists()
