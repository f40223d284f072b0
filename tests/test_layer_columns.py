"""The layers' columns in the loop (`--layer_sharpness`): values, shares, warm starts across a
resume, the layers plot, and what `replot` and TensorBoard make of them."""

import jax
import numpy as np
import pytest

from sam_eos.layers import group_indices
from sam_eos.loop import measurements, train
from sam_eos.reports import figures, raw_data
from tests.conftest import LAYERS, dense_hessian
from tests.conftest import layered_tanh_loss as tanh_mlp_loss
from tests.conftest import make_layered_problem as make_problem

STEP_SIZE = 0.2
LAYER_COLUMNS = measurements.layer_column_names(list(LAYERS))


def layer_config(tmp_path, max_steps=20, **config):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return train.TrainConfig(
        step_size=STEP_SIZE, rho=0.05, max_steps=max_steps, hessian_check_every_steps=10,
        eigensolver_tolerance=1e-6,
        outputs=train.Outputs(raw_data=str(tmp_path / "raw.txt"),
                              layers_curve=str(tmp_path / "layers.pdf")),
        spectrum=measurements.SpectrumOptions(layer_sharpness=True), **config)


def dense_blocks(params, batch):
    hessian = dense_hessian(tanh_mlp_loss, params, batch)
    values = {name: np.linalg.eigvalsh(hessian[np.ix_(index, index)])[-1]
              for name, index in group_indices(params).items()}
    top = np.linalg.eigh(hessian)[1][:, -1]
    shares = {name: np.sum(top[index] ** 2) for name, index in group_indices(params).items()}
    return values, shares


@pytest.fixture(scope="module")
def layer_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("layers")
    params, batch = make_problem()
    result = train.run(tanh_mlp_loss, params, train.FullBatch(batch), layer_config(tmp_path))
    return tmp_path, params, batch, result


def test_every_check_writes_each_layers_sharpness_and_share(layer_run):
    tmp_path, params, batch, result = layer_run
    assert result.status == "max_steps"
    _, columns, rows = raw_data.read_raw_data(result.raw_data)
    assert columns == raw_data.column_names(1, LAYER_COLUMNS)
    table = {name: rows[:, columns.index(name)] for name in columns}
    assert list(table["step"]) == [0, 10, 20]
    # The first check is at the initial params, the last at the final ones: both against the
    # dense Hessian's blocks and its top eigenvector.
    for row, at in ((0, params), (-1, result.params)):
        values, shares = dense_blocks(at, batch)
        for name in LAYERS:
            assert table[f"layer_sharpness/{name}"][row] == pytest.approx(values[name],
                                                                          rel=1e-4)
            assert table[f"layer_share/{name}"][row] == pytest.approx(shares[name], abs=1e-3)
    shares = np.stack([table[f"layer_share/{name}"] for name in LAYERS])
    np.testing.assert_allclose(shares.sum(axis=0), 1.0, atol=1e-5)
    assert np.all(table["layer_hessian_vector_products"] >= len(LAYERS))
    assert np.all(table["layer_error_bound"] <= 1e-6)
    # No block is sharper than the whole network (Cauchy interlacing).
    for name in LAYERS:
        assert np.all(table[f"layer_sharpness/{name}"] <= table["lambda_max"] * (1 + 1e-5))
    with open(result.raw_data) as file:
        assert file.readline().split() == columns  # the names line, as pandas reads it


def test_the_layers_plot_is_drawn_and_listed(layer_run):
    tmp_path, _, _, result = layer_run
    path = tmp_path / "layers.pdf"
    assert str(path) in result.files
    assert path.read_bytes().startswith(b"%PDF")
    figure = figures.make_layers_figure([figures.RunData({}, *raw_data.read_raw_data(
        result.raw_data)[1:])])
    top, bottom = figure.axes[:2]
    labels = [line.get_label() for line in top.lines]
    assert labels[:3] == list(LAYERS) and r"$2/\eta$" in labels and "SAM edge" in labels
    assert len(bottom.collections) == len(LAYERS)  # one stacked band per layer


def test_a_run_without_layer_columns_draws_no_layers_plot(tmp_path):
    run = figures.RunData({}, raw_data.column_names(1), np.zeros((2, len(raw_data.column_names(
        1)))))
    assert not figures.draw_layers([run], str(tmp_path / "layers.pdf"))
    assert not (tmp_path / "layers.pdf").exists()
    with pytest.raises(ValueError, match="--layer_sharpness"):
        figures.make_layers_figure([run])


def test_a_resumed_run_starts_each_layer_warm_and_matches_one_run(tmp_path):
    params, batch = make_problem()
    whole = train.run(tanh_mlp_loss, params, train.FullBatch(batch),
                      layer_config(tmp_path / "whole", max_steps=30))
    parts = tmp_path / "parts"
    config = layer_config(parts, max_steps=10, checkpoint_dir=str(parts / "ckpt"))
    train.run(tanh_mlp_loss, params, train.FullBatch(batch), config)
    resumed = train.run(tanh_mlp_loss, params, train.FullBatch(batch),
                        layer_config(parts, max_steps=30, checkpoint_dir=str(parts / "ckpt")))
    assert [row["step"] for row in resumed.rows] == [0, 10, 20, 30]
    for row, expected in zip(resumed.rows, whole.rows, strict=True):
        for name in LAYER_COLUMNS:
            assert row[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-9), name
    # Each check after the first starts from the previous one's vectors.
    products = [row["layer_hessian_vector_products"] for row in whole.rows]
    assert max(products[1:]) < products[0]


def test_the_layer_columns_reach_tensorboard_like_any_column(tmp_path):
    pytest.importorskip("tensorboardX")
    from sam_eos.reports.tensorboard_writer import read_layouts, read_scalars, tag_for

    params, batch = make_problem()
    config = layer_config(tmp_path, max_steps=10)
    config = train.TrainConfig(**{
        **{f: getattr(config, f) for f in config.__dataclass_fields__},
        "outputs": train.Outputs(tensorboard_dir=str(tmp_path / "tb"))})
    result = train.run(tanh_mlp_loss, params, train.FullBatch(batch), config)
    scalars = read_scalars(str(tmp_path / "tb"))
    for name in (f"layer_sharpness/{LAYERS[1]}", f"layer_share/{LAYERS[2]}"):
        steps, values = scalars[tag_for(name)]  # layers/layer_sharpness/<layer>, ...
        assert list(steps) == [0, 10]
        np.testing.assert_allclose(values, [row[name] for row in result.rows], rtol=1e-6)
    # The Custom Scalars page gets the layers' charts (and no method chart: a plain SGD run).
    (layout,) = read_layouts(str(tmp_path / "tb"))
    assert list(layout["layers"]) == ["each layer's sharpness",
                                      "each layer's share of the top eigenvector"]
    assert list(layout["edge of stability"]) == ["lambda_max, the SAM edge and 2/eta"]


def test_layer_names_with_blanks_become_one_column_each():
    params = {"first layer": {"w": np.zeros((2, 2))}, "second": np.zeros(3)}
    assert measurements.layer_names(jax.tree.map(np.asarray, params)) == [
        "first_layer", "second"]


def test_replot_draws_the_layers_plot_for_runs_that_have_layer_columns(layer_run, tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    _, _, _, result = layer_run
    plain = tmp_path / "plain.txt"
    columns = raw_data.column_names(1)
    writer = raw_data.RawDataWriter(str(plain), columns, {"rho": 0.0, "step_size": 0.5})
    writer.row(dict.fromkeys(columns, 1.0))
    writer.close()
    out = tmp_path / "both"
    done = subprocess.run([sys.executable, "-m", "sam_eos.cli.replot", result.raw_data,
                           str(plain), f"--output_dir={out}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"wrote {out / 'layers.pdf'}" in done.stdout
    assert (out / "layers.pdf").read_bytes().startswith(b"%PDF")
    alone = subprocess.run([sys.executable, "-m", "sam_eos.cli.replot", str(plain),
                            f"--output_dir={tmp_path / 'alone'}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0 and "layers.pdf" not in alone.stdout


def test_the_image_program_writes_layer_columns_and_layers_pdf_into_its_output_dir(tmp_path):
    import re
    import subprocess
    import sys

    from tests.conftest import ROOT, environment

    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "tests/tfds_mock.py", "64", "--rho=0.1", "--mlp_width=16",
         "--max_steps=8", "--hessian_check_every_steps=4", "--hessian_check_gap=none",
         "--layer_sharpness", f"--output_dir={run_dir}", "--compilation_cache_dir="],
        cwd=ROOT, env=dict(environment(), JAX_LOG_COMPILES="1"), text=True,
        capture_output=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    # Three checks, one compile of the layers' solve (ahead of time, logged).
    compiled = re.findall(r"Finished XLA compilation of (\S+) in", result.stderr)
    assert compiled.count("jit(layer_sharpness)") == 1, compiled
    assert len(re.findall(r"Compiled the layers' sharpness in \d+\.\d+ s\.", result.stderr)) == 1
    _, columns, rows = raw_data.read_raw_data(str(run_dir / "raw.txt"))
    names = [c[len("layer_sharpness/"):] for c in columns if c.startswith("layer_sharpness/")]
    assert names == ["hidden_0", "hidden_1", "hidden_2", "output"]  # the Haiku module names
    table = {name: rows[:, columns.index(name)] for name in columns}
    shares = np.stack([table[f"layer_share/{name}"] for name in names])
    np.testing.assert_allclose(shares.sum(axis=0), 1.0, atol=1e-5)
    for name in names:
        assert np.all((table[f"layer_sharpness/{name}"] > 0)
                      & (table[f"layer_sharpness/{name}"] <= table["lambda_max"] * (1 + 1e-4)))
    listed = result.stderr.split("Files written:")[1]
    assert str(run_dir / "layers.pdf") in listed
    assert (run_dir / "layers.pdf").read_bytes().startswith(b"%PDF")


def test_the_mnist_layers_experiment_reports_each_layer_at_the_edge(layer_run, capsys,
                                                                    tmp_path):
    from experiments import mnist_layers

    _, _, _, result = layer_run
    run = figures.RunData(*raw_data.read_raw_data(result.raw_data))
    edge = mnist_layers.at_the_edge(run)
    half = slice(len(run.rows) // 2, None)
    for name in LAYERS:
        assert edge[name]["share"] == pytest.approx(
            np.median(run.column(f"layer_share/{name}")[half]))
        assert edge[name]["sharpness / edge"] == pytest.approx(np.median(
            run.column(f"layer_sharpness/{name}")[half] / run.column("sam_edge")[half]))
    mnist_layers.report("SAM", run)
    printed = capsys.readouterr().out.splitlines()
    carrier = max(LAYERS, key=lambda name: edge[name]["share"])
    assert printed[0].endswith(f"the top eigenvector lies mostly in {carrier}")
    assert [line.split()[0] for line in printed[1:]] == list(LAYERS)
    mnist_layers.figures.make_layers_figure([run, run]).savefig(tmp_path / "both.png")
    assert (tmp_path / "both.png").read_bytes().startswith(b"\x89PNG")
