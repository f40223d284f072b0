"""How a run ends: its time split, its summary (log lines and the raw data's last line), the
files it wrote; and where --output_dir puts the outputs."""

import logging
import math

import jax.numpy as jnp
import numpy as np
import pandas as pd

from sam_eos.cli import flags, program
from sam_eos.loop import train
from sam_eos.reports.raw_data import read_raw_data, read_summary


def quadratic(w, a):
    return 0.5 * w @ (a @ w)


def outputs(directory) -> train.Outputs:
    return train.Outputs(raw_data=str(directory / "raw.txt"),
                         eigs_curve=str(directory / "eigs.pdf"),
                         loss_curve=str(directory / "loss.pdf"))


def test_a_run_ends_with_its_summary_time_split_and_files(tmp_path, caplog):
    hessian = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
    config = train.TrainConfig(step_size=0.1, rho=0.05, max_steps=20,
                               hessian_check_every_steps=5, outputs=outputs(tmp_path),
                               plot_x="hours")
    result = train.run(quadratic, jnp.ones(3), train.FullBatch(hessian), config)
    assert result.raw_data == str(tmp_path / "raw.txt")
    assert result.files == [str(tmp_path / name) for name in ("raw.txt", "eigs.pdf",
                                                              "loss.pdf")]
    assert set(result.seconds) == {"compile", "steps", "checks"}
    assert result.seconds["compile"] > 0 and result.seconds["checks"] > 0
    assert math.isclose(result.seconds["steps"] + result.seconds["checks"],
                        result.training_seconds)
    with caplog.at_level(logging.INFO):
        summary = program.end_run(result, "error", 0.25)
    written = read_summary(str(tmp_path / "raw.txt"))
    assert written == summary
    assert (written["checks"], written["steps"]) == (5, 20)
    assert written["test"] == {"name": "error", "value": 0.25}
    # The top eigenvalue of the quadratic is 3 everywhere: 3 / (2/eta) = 0.15.
    assert math.isclose(written["median_sharpness_over_two_over_eta"], 0.15, rel_tol=1e-5)
    assert written["seconds"] == result.seconds
    messages = [r.getMessage() for r in caplog.records]
    assert "Summary: 5 checks in 20 steps." in messages
    assert messages[-4:] == ["Files written:", *(f"  {path}" for path in result.files)]
    # The summary is a comment: both loaders still read the rows by name.
    table = pd.read_csv(tmp_path / "raw.txt", sep=r"\s+", comment="#")
    assert table["step"].tolist() == [0, 5, 10, 15, 20]
    assert np.genfromtxt(tmp_path / "raw.txt", names=True)["step"].tolist() == [0, 5, 10, 15,
                                                                                20]


def test_a_diverged_run_still_gets_a_summary_without_a_test_value(tmp_path, capsys):
    hessian = jnp.diag(jnp.array([1.0, 50.0]))
    config = train.TrainConfig(step_size=1.0, max_steps=200, hessian_check_every_steps=1,
                               outputs=outputs(tmp_path))
    result = train.run(quadratic, jnp.ones(2), train.FullBatch(hessian), config)
    assert result.status == "diverged"
    code = program.report_test_value("error", result, lambda params: 1 / 0)  # never evaluated
    assert code == result.exit_code
    assert "Test error: not computed" in capsys.readouterr().out
    summary = read_summary(str(tmp_path / "raw.txt"))
    assert summary["test"] == {"name": "error", "value": None}
    assert summary["steps"] == result.steps and summary["checks"] == len(result.rows)
    _, _, rows = read_raw_data(str(tmp_path / "raw.txt"))
    assert len(rows) == len(result.rows)


def test_no_raw_data_no_summary_line_but_still_the_log(tmp_path, caplog):
    config = train.TrainConfig(step_size=0.1, max_steps=3, hessian_check_every_steps=3)
    result = train.run(quadratic, jnp.ones(2), train.FullBatch(jnp.eye(2)), config)
    assert (result.raw_data, result.files) == ("", [])
    with caplog.at_level(logging.INFO):
        program.end_run(result, "loss", None)
    messages = [r.getMessage() for r in caplog.records]
    assert "Summary: 2 checks in 3 steps." in messages
    assert messages[-1] == "No output files were written."


FLAG_DEFAULTS = {"raw_data": "/tmp/raw.txt", "eigs_curve": "/tmp/eigs.pdf",
                 "eigs_se_only": "/tmp/eigs_se_only.pdf", "alignment_curve": "/tmp/a.pdf",
                 "loss_curve": "/tmp/ell.pdf"}


def test_output_dir_gives_standard_names_and_explicit_flags_win():
    chosen = flags.choose_output_paths({**FLAG_DEFAULTS, "loss_curve": "mine/loss.png"},
                                       {"loss_curve"}, "runs/gd")
    assert chosen == {
        "raw_data": ("output_dir", "runs/gd/raw.txt"),
        "eigs_curve": ("output_dir", "runs/gd/eigs.pdf"),
        "eigs_se_only": ("output_dir", "runs/gd/eigs_se_only.pdf"),
        "alignment_curve": ("output_dir", "runs/gd/alignment.pdf"),
        "loss_curve": ("loss_curve_output", "mine/loss.png"),
    }
    # An explicit empty path still skips that output.
    assert flags.choose_output_paths({**FLAG_DEFAULTS, "raw_data": ""}, {"raw_data"},
                                     "runs/gd")["raw_data"] == ("raw_data_output", "")


def test_without_output_dir_the_original_tmp_names():
    chosen = flags.choose_output_paths(FLAG_DEFAULTS, set(), None)
    assert {field: path for field, (_, path) in chosen.items()} == FLAG_DEFAULTS
    assert chosen["alignment_curve"][0] == "alignment_curve_output"
