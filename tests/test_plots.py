"""The plots, tested by what they draw (lines, labels, x data, y-range, scale), and
`python3 -m sam_eos.cli.replot` on our files, several files and the original program's files."""


import numpy as np
import pytest

from sam_eos.reports import figures, raw_data
from tests.conftest import run_plot

COLUMNS = ["time_hours", "hessian_norm", "two_over_eta", "sam_edge", "grad_norm", "loss",
           "g_alignment", "sg_alignment", "step", "lambda_max", "lambda_min",
           "hessian_vector_products"]


def run_data(rho=0.1, outlier=165.0, extra=None, n=10):
    """n checks every 10 steps, 2/eta = 20, SAM edge 10 (GD: 20); at step 0 |lambda_min| =
    `outlier` dominates lambda_max = 2."""
    steps = np.arange(n) * 10.0
    edge = 10.0 if rho else 20.0
    lambda_max = np.linspace(2.0, 0.95 * edge, n)
    lambda_min = np.full(n, -0.5)
    lambda_min[0] = -outlier
    table = {
        "time_hours": steps / 3600, "hessian_norm": np.maximum(lambda_max, -lambda_min),
        "two_over_eta": np.full(n, 20.0), "sam_edge": np.full(n, edge),
        "grad_norm": np.ones(n), "loss": np.linspace(2.3, 0.1, n),
        "g_alignment": np.full(n, 0.5), "sg_alignment": np.full(n, 0.4 if rho else 0.5),
        "step": steps, "lambda_max": lambda_max, "lambda_min": lambda_min,
        "hessian_vector_products": np.full(n, 30.0), **(extra or {}),
    }
    settings = {"rho": rho, "step_size": 0.1, "run_name": f"MLP: rho={rho:g}, eta=0.1"}
    return figures.RunData(settings, list(table), np.column_stack(list(table.values())))


@pytest.fixture
def figure_of():
    def make(name, runs, x_axis="steps"):
        return figures.make_figure(name, runs, x_axis).axes[0]

    return make


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.lines}


def test_eigenvalue_plot_against_steps_with_lambda_max_and_clipped_outlier(figure_of):
    ax = figure_of("eigs_curve", [run_data()])
    lines = lines_by_label(ax)
    assert {"sharpness (operator norm)", r"$\lambda_{\max}$", "SAM edge",
            r"$2/\eta$"} <= set(lines)
    assert ax.get_xlabel() == "step" and ax.get_yscale() == "linear"
    np.testing.assert_array_equal(lines["sharpness (operator norm)"].get_xdata(),
                                  np.arange(10) * 10)
    assert lines["sharpness (operator norm)"].get_ydata()[0] == 165.0  # drawn, off scale
    np.testing.assert_array_equal(lines[r"$\lambda_{\max}$"].get_ydata(),
                                  np.linspace(2.0, 9.5, 10))
    bottom, top = ax.get_ylim()
    # The scale is 2/eta = 20 (above the later checks): top = 2 x 20, 2/eta and the edge shown.
    assert (bottom, top) == (0.0, figures.OFF_SCALE_FACTOR * 20.0)
    assert "1 value above the axis (largest 165 at step 0)" in ax.get_title()
    marks = [line for line in ax.lines if line.get_label() == "_off scale"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [0.0]


def test_no_outlier_no_clipping_and_lambda_max_hidden_when_equal(figure_of):
    ax = figure_of("eigs_se_only", [run_data(outlier=0.1)])
    labels = set(lines_by_label(ax))
    assert r"$\lambda_{\max}$" not in labels and r"$2/\eta$" not in labels
    assert "SAM edge" in labels
    assert ax.get_ylim() == pytest.approx((0.0, 1.05 * 10.0))
    assert "above the axis" not in ax.get_title()


def test_hours_axis_and_extra_columns(figure_of):
    extra = {"batch_sharpness": np.full(10, 7.0), "sam_point_sharpness": np.full(10, 8.0),
             "check_seconds": np.full(10, 0.5), "error_bound": np.full(10, 1e-6)}
    ax = figure_of("eigs_curve", [run_data(extra=extra)], x_axis="hours")
    lines = lines_by_label(ax)
    assert ax.get_xlabel() == "training time (minutes)"  # 90 s: minutes read best
    np.testing.assert_allclose(lines["sharpness (operator norm)"].get_xdata(),
                               np.arange(10) * 10.0 / 60)
    assert list(lines["batch sharpness"].get_ydata()) == [7.0] * 10
    assert list(lines["sharpness at the SAM point"].get_ydata()) == [8.0] * 10


def test_several_runs_overlay_with_one_two_over_eta_and_gd_edge_folded_into_it(figure_of):
    runs = [run_data(rho=0.0, outlier=0.1), run_data(rho=0.1, outlier=0.1)]
    ax = figure_of("eigs_curve", runs)
    labels = [line.get_label() for line in ax.lines]
    assert "GD, eta=0.1: sharpness (operator norm)" in labels
    assert "SAM rho=0.1, eta=0.1: sharpness (operator norm)" in labels
    assert "SAM rho=0.1, eta=0.1: SAM edge" in labels
    assert "GD, eta=0.1: SAM edge" not in labels  # it is 2/eta
    assert labels.count(r"$2/\eta$") == 1
    assert ax.get_title() == "MLP"  # the run names' common part
    colours = {line.get_label(): line.get_color() for line in ax.lines}
    assert colours["GD, eta=0.1: sharpness (operator norm)"] != colours[
        "SAM rho=0.1, eta=0.1: sharpness (operator norm)"]
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend[0] == "GD, eta=0.1: sharpness (operator norm)"


def test_alignment_and_loss_plots(figure_of):
    ax = figure_of("alignment_curve", [run_data(rho=0.0), run_data(rho=0.1)])
    labels = [line.get_label() for line in ax.lines]
    assert labels == ["GD, eta=0.1: gradient", "SAM rho=0.1, eta=0.1: gradient",
                      "SAM rho=0.1, eta=0.1: SAM gradient"]  # GD's SAM gradient is its gradient
    assert ax.get_ylim() == (-0.02, 1.02)
    ax = figure_of("loss_curve", [run_data()])
    assert ax.get_yscale() == "log"
    np.testing.assert_allclose(ax.lines[0].get_ydata(), np.linspace(2.3, 0.1, 10))


def test_failed_checks_are_skipped_and_an_empty_run_still_draws(tmp_path):
    run = run_data()
    run.rows[3, 1] = np.nan
    figure = figures.make_figure("eigs_curve", [run])
    sharpness = lines_by_label(figure.axes[0])["sharpness (operator norm)"]
    assert len(sharpness.get_xdata()) == 9 and 30.0 not in sharpness.get_xdata()
    written = figures.draw_plots(np.zeros((0, 0)), COLUMNS, {"run_name": "empty"},
                               {"eigs_curve": str(tmp_path / "e.pdf"), "loss_curve": ""})
    assert written == [str(tmp_path / "e.pdf")]
    assert (tmp_path / "e.pdf").read_bytes().startswith(b"%PDF-")


def test_eigenvalue_limits_keep_references_in_view():
    late_high = [np.array([1.0, 2.0, 30.0, 31.0, 29.0, 30.0])]
    assert figures.eigenvalue_limits(late_high, [np.full(6, 20.0)]) == pytest.approx(
        (0.0, 1.05 * 31.0))
    spike = [np.array([500.0, 5.0, 6.0, 7.0])]
    assert figures.eigenvalue_limits(spike, [np.full(4, 10.0)]) == (0.0, 20.0)
    assert figures.eigenvalue_limits([np.array([np.nan])], []) is None


def test_eigenvalue_limits_clip_an_early_negative_outlier():
    # A batch sharpness of -39.6 at step 0 beside a sharpness near 8: the bottom stays near 0.
    early_negative = [np.array([-39.6, 5.0, 6.0, 7.0, 8.0, 7.0])]
    assert figures.eigenvalue_limits(early_negative, [np.full(6, 10.0)]) == pytest.approx(
        (-0.25 * 10.5, 10.5))
    # Values that stay negative are kept in view.
    negative = [np.array([-3.0, -3.0, -3.0, -3.0])]
    assert figures.eigenvalue_limits(negative, [np.full(4, 10.0)]) == pytest.approx(
        (-3.15, 10.5))


def test_figure_marks_values_below_the_axis():
    run = run_data(rho=0.1)
    rows = run.rows.copy()
    rows[0, run.columns.index("hessian_norm")] = -40.0
    figure = figures.make_figure("eigs_curve", [figures.RunData(run.settings, run.columns, rows)])
    title = figure.axes[0].get_title()
    assert "1 value below the axis (smallest -40 at step 0)" in title


def write_raw(path, run):
    writer = raw_data.RawDataWriter(str(path), run.columns, run.settings)
    for values in run.rows:
        writer.row(dict(zip(run.columns, values, strict=True)))
    writer.close()


def test_plot_program_overlays_runs_and_reads_original_files(tmp_path):
    (tmp_path / "gd").mkdir()
    write_raw(tmp_path / "gd" / "raw.txt", run_data(rho=0.0))
    write_raw(tmp_path / "sam.txt", run_data(rho=0.1))
    names = ["eigs.pdf", "eigs_se_only.pdf", "alignment.pdf", "loss.pdf"]

    one = run_plot(tmp_path / "gd" / "raw.txt")
    assert one.returncode == 0, one.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "gd").glob("*.pdf")) == sorted(names)

    several = run_plot(tmp_path / "gd" / "raw.txt", tmp_path / "sam.txt")
    assert several.returncode == 2 and "--output_dir" in several.stderr

    both = run_plot(tmp_path / "gd" / "raw.txt", tmp_path / "sam.txt", "--plot_x=hours",
                    f"--output_dir={tmp_path / 'both'}", "--output_prefix=gd_sam_",
                    "--loss_curve_output=")
    assert both.returncode == 0, both.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == [
        "gd_sam_alignment.pdf", "gd_sam_eigs.pdf", "gd_sam_eigs_se_only.pdf"]

    original = tmp_path / "original.txt"
    original.write_text("12.5 3.0 4.0 3.5 1.0 2.3 0.1 0.2\n3600.0 3.9 4.0 3.5 1.0 0.4 0.5 0.6\n")
    refused = run_plot(original)
    assert refused.returncode == 2 and "--original_format" in refused.stderr
    redrawn = run_plot("--original_format", original, f"--output_dir={tmp_path / 'old'}")
    assert redrawn.returncode == 0, redrawn.stderr[-2000:]
    for name in names:
        assert (tmp_path / "old" / name).read_bytes().startswith(b"%PDF-")


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--help"], 0, "--output_dir"),
    (["--nope"], 2, "FATAL Flags parsing error: Unknown command line flag 'nope'"),
    (["--plot_x=days"], 2, "FATAL Flags parsing error: flag --plot_x=days"),
    ([], 2, "error: give raw-data files"),
])
def test_plot_program_exit_codes(args, code, message):
    result = run_plot(*args)
    assert result.returncode == code
    assert message in result.stdout + result.stderr
