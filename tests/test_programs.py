"""Both programs end to end through their command lines (subprocesses, as a user runs them)."""

import math
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sam_eos import errors
from sam_eos.reports.raw_data import TIMING_COLUMNS, read_raw_data, read_summary, untimed
from sam_eos.reports.tensorboard_writer import read_scalars
from tests import processes as processes_
from tests.conftest import (
    ROOT,
    TINY_TRANSFORMER,
    assert_tensorboard_equals_raw_data,
    environment,
    output_flags,
    shakespeare_like_text,
)
from tests.conftest import run_program as run

PDFS = ("eigs.pdf", "eigs_se_only.pdf", "a.pdf", "ell.pdf")


def assert_outputs(directory: pathlib.Path, min_rows: int, plots: bool = True) -> np.ndarray:
    """The raw data's rows, at least `min_rows`; with `plots`, the four plots are valid PDFs."""
    _, _, rows = read_raw_data(str(directory / "raw.txt"))
    assert len(rows) >= min_rows
    for name in PDFS if plots else ():
        content = (directory / name).read_bytes()
        assert content.startswith(b"%PDF-") and b"%%EOF" in content[-64:]
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(shakespeare_like_text())
    return path


def test_image_classification_mlp_end_to_end_on_mock_mnist(tmp_path):
    result = run(["tests/tfds_mock.py", "64", "--rho=0.1", "--mlp_width=32", "--max_steps=12",
                  "--hessian_check_every_steps=4", "--hessian_check_gap=none",
                  *output_flags(tmp_path, plots=True)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Full-batch training" in result.stderr
    error = float(result.stdout.split("Test error:")[1].split()[0])
    assert 0.0 <= error <= 1.0
    rows = assert_outputs(tmp_path, 3)
    np.testing.assert_array_equal(rows[:, 8], [0, 4, 8, 12])  # the final state is measured


def test_image_classification_with_adam_and_usam_writes_the_method_columns(tmp_path):
    result = run(["tests/tfds_mock.py", "32", "--rho=0.01", "--mlp_width=8", "--max_steps=8",
                  "--optimizer=adam", "--adam_b1=0.8", "--sam_variant=usam", "--step_size=0.01",
                  "--hessian_check_every_steps=4", "--hessian_check_gap=none",
                  f"--tensorboard_dir={tmp_path / 'tb'}", *output_flags(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    settings, columns, rows = read_raw_data(str(tmp_path / "raw.txt"))
    assert (settings["optimizer"], settings["sam_variant"]) == ("adam", "usam")
    assert_tensorboard_equals_raw_data(tmp_path / "tb", tmp_path / "raw.txt")
    assert {"sharpness/effective_sharpness", "edge/stability_threshold",
            "sharpness/lambda_max"} <= set(read_scalars(str(tmp_path / "tb")))
    assert columns[-3:] == ["converged", "stability_threshold", "effective_sharpness"]
    np.testing.assert_allclose(rows[:, -2], 3.6 / (0.2 * 0.01))  # (2 + 2 b1) / ((1 - b1) eta)
    assert np.all(np.isfinite(rows[1:, -1])) and np.all(rows[1:, -1] > 0)
    assert "effective sharpness" in result.stderr and "x the threshold." in result.stderr
    assert_outputs(tmp_path, 3, plots=False)


def test_output_dir_progress_summary_and_the_files_written(tmp_path):
    run_dir = tmp_path / "run"
    result = run(["tests/tfds_mock.py", "64", "--rho=0.1", "--mlp_width=32", "--max_steps=12",
                  "--hessian_check_every_steps=4", "--hessian_check_gap=none",
                  f"--output_dir={run_dir}", f"--loss_curve_output={tmp_path / 'mine.pdf'}",
                  "--progress_every_seconds=1e-6", "--plot_x=hours"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Progress: step 12 of 12 | " in result.stderr
    assert "Summary: 4 checks in 12 steps." in result.stderr
    written = [run_dir / name for name in ("raw.txt", "eigs.pdf", "eigs_se_only.pdf",
                                           "alignment.pdf")] + [tmp_path / "mine.pdf"]
    listed = result.stderr.split("Files written:")[1].strip().splitlines()
    assert [line.split()[-1] for line in listed] == [str(path) for path in written]
    assert all(path.exists() for path in written)
    assert not (run_dir / "loss.pdf").exists()
    error = float(result.stdout.split("Test error:")[1].split()[0])
    summary = read_summary(str(run_dir / "raw.txt"))
    assert summary["test"]["name"] == "error"
    assert round(summary["test"]["value"], 4) == error  # printed with 4 decimals
    assert (summary["checks"], summary["steps"]) == (4, 12)
    settings, _, _ = read_raw_data(str(run_dir / "raw.txt"))
    assert settings["plot_x"] == "hours" and settings["flags"]["output_dir"] == str(run_dir)
    assert "hbm_oom_exit" not in settings["flags"] and "data_dir" in settings["flags"]


def test_the_mnist_edge_experiment_writes_into_its_output_dir_with_progress(tmp_path):
    figure = ROOT / "docs" / "mnist_edge.png"
    before = figure.read_bytes()
    result = run(["tests/tfds_mock.py", "64", "--program=experiments.mnist_edge",
                  "--num_examples=64", "--mlp_width=16", "--steps=10", "--check_every=5",
                  "--progress_every_seconds=1e-6", f"--output_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Progress: step 10 of 10 | " in result.stderr
    assert "GD : median sharpness / (2/eta)" in result.stdout
    listed = result.stdout.split("files written:")[1].split()
    assert listed == [str(tmp_path / name) for name in ("raw_gd.txt", "raw_sam.txt",
                                                        "mnist_edge.png")]
    assert (tmp_path / "mnist_edge.png").read_bytes().startswith(b"\x89PNG")
    assert figure.read_bytes() == before  # the README's figure only when asked


def test_image_classification_cnn_end_to_end_on_mock_cifar10(tmp_path):
    result = run(["tests/tfds_mock.py", "24", "--dataset=cifar10", "--nn_architecture=CNN",
                  "--cnn_feature_multiplier=4", "--batch_size=8", "--rho=0.05",
                  "--max_steps=6", "--hessian_check_every_steps=3", "--hessian_check_gap=none",
                  *output_flags(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Minibatch training: 3 batches of 8" in result.stderr
    assert "Test error:" in result.stdout
    assert_outputs(tmp_path, 2, plots=False)


def test_transformer_learns_and_writes_everything(tmp_path, corpus):
    result = run(["-m", "transformer", f"--corpus={corpus}", "--test_lines=100", "--rho=0.05",
                  "--step_size=0.1", "--max_steps=60", "--hessian_check_every_steps=20",
                  *TINY_TRANSFORMER, f"--tensorboard_dir={tmp_path / 'tb'}",
                  *output_flags(tmp_path, plots=True)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Run 'Transformer (1 layer, width 32): rho=0.05" in result.stderr
    assert_tensorboard_equals_raw_data(tmp_path / "tb", tmp_path / "raw.txt")
    test_loss = float(result.stdout.split("Test loss:")[1].split()[0])
    assert test_loss < 0.6 * math.log(128)
    rows = assert_outputs(tmp_path, 3)
    losses = rows[:, 5]
    assert losses[0] > 0.9 * math.log(128) and losses[-1] < 0.6 * math.log(128)
    # The plots can be redrawn from the raw data alone.
    redraw = run(["-m", "sam_eos.cli.replot", f"--raw_data={tmp_path / 'raw.txt'}"], timeout=60)
    assert redraw.returncode == 0, redraw.stderr[-2000:]
    assert redraw.stdout.count("wrote ") == 4
    for name in ("eigs.pdf", "eigs_se_only.pdf", "alignment.pdf", "loss.pdf"):
        content = (tmp_path / name).read_bytes()
        assert content.startswith(b"%PDF-") and b"%%EOF" in content[-64:]


@pytest.mark.parametrize(("signal_number", "exit_code"), [
    (signal.SIGINT, errors.EXIT_INTERRUPTED_SIGINT),
    (signal.SIGTERM, errors.EXIT_INTERRUPTED_SIGTERM),
])
def test_an_interrupt_ends_the_run_cleanly(tmp_path, corpus, signal_number, exit_code):
    process = subprocess.Popen(
        [sys.executable, "-m", "transformer", f"--corpus={corpus}", "--test_lines=100",
         "--max_steps=100000", "--hessian_check_every_steps=5", *TINY_TRANSFORMER,
         *output_flags(tmp_path, plots=True)],
        cwd=ROOT, env=environment(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    raw = tmp_path / "raw.txt"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if raw.exists() and raw.read_text().count("\n") >= 5:  # 3 header lines, 2 rows
            break
        time.sleep(0.2)
    process.send_signal(signal_number)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == exit_code, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "Test loss:" in stdout
    rows = assert_outputs(tmp_path, 2)
    assert np.all(np.isfinite(rows[:, 5]))


def test_divergence_exits_with_its_code_and_keeps_the_rows(tmp_path, corpus):
    result = run(["-m", "transformer", f"--corpus={corpus}", "--test_lines=100",
                  "--step_size=1e6", "--max_steps=50", "--hessian_check_every_steps=10",
                  *TINY_TRANSFORMER, *output_flags(tmp_path, plots=True)])
    assert result.returncode == errors.EXIT_DIVERGED, result.stderr[-3000:]
    assert "Diverged" in result.stderr
    assert "not computed" in result.stdout
    rows = assert_outputs(tmp_path, 1)
    assert np.isfinite(rows[0, 5])


BAD_TRANSFORMER_INPUTS = [
    (["--rho=-0.1"], "--rho must be >= 0"),
    (["--step_size=0"], "--step_size must be > 0"),
    (["--batch_size=0"], "--batch_size must be at least 1"),
    (["--time_limit_in_hours=0"], "--time_limit_in_hours must be > 0"),
    (["--hessian_check_gap=-1"], "--hessian_check_gap must be >= 0"),
    (["--hessian_check_every_steps=0"], "--hessian_check_every_steps must be at least 1"),
    (["--num_principal_components=0"], "--num_principal_components must be at least 1"),
    (["--num_principal_components=101"], "exceeds the eigensolver's budget"),
    (["--eigensolver=arnoldi"], "--eigensolver must be one of"),
    (["--num_principal_components=2", "--eigensolver_basis_size=4"],
     "--eigensolver_basis_size must be an integer >= k + 3 = 5"),
    (["--eigensolver=power", "--eigensolver_basis_size=12"], "power iteration holds none"),
    (["--sequence_length=0"], "--sequence_length must be at least 1"),
    (["--num_heads=0"], "--num_heads must be at least 1"),
    (["--raw_data_output=/etc/hostname/raw.txt"], "--raw_data_output=/etc/hostname/raw.txt"),
    (["--eigs_curve_output=/proc/nope/e.pdf"], "cannot be written"),
    (["--eigs_curve_output=/tmp/sam_eos_plot.xyz"], "plots can be written as"),
    (["--eigs_curve_output=/tmp/same.pdf", "--loss_curve_output=/tmp/same.pdf"],
     "are the same file"),
    (["--seed=-1"], "--seed must be in [0, 2**32)"),
    (["--checkpoint_every_minutes=0"], "--checkpoint_every_minutes must be > 0"),
    (["--num_devices=5"], "cannot use 5 devices"),
    (["--raw_data_output=/dev/full"], "not a regular file"),
    (["--raw_data_output=/tmp/sam_eos_alias/r.pdf",
      "--eigs_curve_output=/tmp/sam_eos_alias/./r.pdf"], "are the same file"),
    (["--batch_size=10000000000000000000"], "beyond the largest supported integer"),
    (["--hessian_trace_matvecs=-1"], "--hessian_trace_matvecs must be 0 (off) or at least 4"),
    (["--hessian_trace_matvecs=3"], "--hessian_trace_matvecs must be 0 (off) or at least 4"),
    (["--spectral_density_every_checks=-2"], "--spectral_density_every_checks must be >= 0"),
    (["--optimizer=momentum", "--momentum=1.0"], "--momentum must be in [0, 1)"),
    (["--optimizer=nesterov", "--momentum=-0.1"], "--momentum must be in [0, 1)"),
    (["--adam_b1=0.5"], "--adam_b1 is not used by --optimizer=sgd"),
    (["--optimizer=adam", "--momentum=0.5"], "--momentum is not used by --optimizer=adam"),
    (["--optimizer=adam", "--adam_eps=0"], "--adam_eps must be > 0"),
    (["--optimizer=adam", "--adam_b2=1"], "--adam_b2 must be in [0, 1)"),
    (["--spectral_density_every_checks=1", "--density_output=/tmp/sam_eos_d.xyz"],
     "plots can be written as"),
    (["--spectral_density_every_checks=1", "--density_output=/tmp/same_d.pdf",
      "--loss_curve_output=/tmp/same_d.pdf"], "are the same file"),
    (["--layer_sharpness", "--layers_output=/tmp/sam_eos_l.xyz"], "plots can be written as"),
    (["--layer_sharpness", "--layers_output=/tmp/same_l.pdf",
      "--eigs_curve_output=/tmp/same_l.pdf"], "are the same file"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_TRANSFORMER_INPUTS[:3])
def test_bad_flags_fail_fast_through_the_command_line(tmp_path, corpus, flags, message):
    result = run(["-m", "transformer", f"--corpus={corpus}", "--test_lines=100", *flags,
                  *output_flags(tmp_path)], timeout=60)
    assert result.returncode == errors.EXIT_BAD_INPUT
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "raw.txt").exists()  # nothing trained, nothing written


def test_every_bad_input_has_its_message(tmp_path, corpus):
    """Many bad inputs in one process (tests/flag_cases.py re-parses the flags per case)."""
    bad_text = tmp_path / "bad.txt"
    bad_text.write_bytes(b"hello\nw\xc3\xb6rld\n")
    nul_text = tmp_path / "nul.txt"
    nul_text.write_bytes(b"abc\x00def\n")
    short_text = tmp_path / "short.txt"
    short_text.write_text("to be or not to be\n" * 3)
    corpus_flags = [f"--corpus={corpus}", "--test_lines=100"]
    cases = [(corpus_flags + flags, message) for flags, message in BAD_TRANSFORMER_INPUTS]
    cases += [
        (["--training_data=/nonexistent.txt", f"--test_data={corpus}"], "/nonexistent.txt"),
        ([f"--training_data={bad_text}", f"--test_data={corpus}"], "byte offset 7"),
        ([f"--training_data={nul_text}", f"--test_data={corpus}"], "byte offset 3"),
        ([f"--training_data={short_text}", f"--test_data={corpus}"], "whole batches"),
        ([f"--test_data={corpus}"], "--training_data and --test_data are required"),
        ([f"--corpus={corpus}", "--test_lines=100000"], "--test_lines"),
        (corpus_flags + [f"--raw_data_output={corpus}"], "would overwrite the input --corpus"),
        ([f"--training_data={corpus}", f"--test_data={short_text}",
          f"--raw_data_output={tmp_path}/./short.txt"], "would overwrite the input --test_data"),
    ]
    check_cases(tmp_path, "transformer", cases)


def test_every_bad_image_flag_has_its_message(tmp_path):
    empty = tmp_path / "empty_tfds"
    empty.mkdir()
    cases = [
        (["--mlp_depth=1"], "mlp_depth"),
        (["--mlp_width=0"], "mlp_width"),
        (["--nn_architecture=CNN", "--cnn_num_blocks=0"], "cnn_num_blocks"),
        (["--nn_architecture=CNN", "--cnn_layers_per_block=0"], "cnn_layers_per_block"),
        (["--nn_architecture=CNN", "--cnn_feature_multiplier=0"], "cnn_feature_multiplier"),
        (["--nn_architecture=RNN"], "MLP, CNN"),
        (["--mini_training_set_num_batches=0"], "--mini_training_set_num_batches must be"),
        (["--mini_test_set_num_batches=0"], "--mini_test_set_num_batches must be"),
        (["--rho=nan"], "--rho must be a finite number"),
        (["--batch_size=10000000000000000000"], "beyond the largest supported integer"),
        ([f"--data_dir={empty}", "--dataset=no_such_dataset"], "no_such_dataset"),
    ]
    check_cases(tmp_path, "image_classification", cases)


def check_cases(tmp_path, program: str, cases) -> None:
    import json

    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps([output_flags(tmp_path) + flags for flags, _ in cases]))
    result = run(["tests/flag_cases.py", program, str(spec)], timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    messages = json.loads(result.stdout.strip().splitlines()[-1])
    for (flags, expected), message in zip(cases, messages, strict=True):
        assert message is not None, f"{flags} was accepted"
        assert expected in message, (flags, message)
    assert not (tmp_path / "raw.txt").exists()


def run_on(args: list[str], *, processes: int, devices: int) -> processes_.Finished:
    """`args` run as one JAX run of `processes` processes with `devices` CPU devices each;
    checks every process succeeded and that only process 0 logged. Returns process 0's."""
    finished = processes_.run_processes(args, processes=processes, devices_per_process=devices,
                                        timeout=300)
    for result in finished:
        assert result.returncode == 0, result.stderr[-3000:]
    for other in finished[1:]:  # only warnings, and nothing on stdout but Gloo's lines
        assert "Run '" not in other.stderr and "check at step" not in other.stderr
        assert "Test " not in other.stdout
    return finished[0]


def printed_value(result: processes_.Finished, name: str) -> float:
    return float(result.stdout.split(f"Test {name}:")[1].split()[0])


# Data-parallel sums run in another order, so the products differ in their last bits, and the
# band Lanczos check may stop a few products earlier or later: what its stopping rule does not
# converge moves with that (the bottom Ritz value; the top eigenvector's alignment with the
# gradients, within about the square root of the bound). The eigenvalue it converges, and
# everything the training computes, must still equal one device's.
SOLVER_COLUMNS = {"lambda_min": dict(rtol=5e-2), "g_alignment": dict(atol=1e-3),
                  "sg_alignment": dict(atol=1e-3), "hessian_vector_products": dict(atol=6),
                  "error_bound": dict(atol=1e-5)}


def assert_rows_of_one(tables: list[tuple[list[str], np.ndarray]], results: list,
                       name: str) -> None:
    """Every run's raw data (untimed: `(columns, rows)`) and printed test `name` equal the
    first run's, the solver's unconverged columns within SOLVER_COLUMNS."""
    columns, one = tables[0]
    assert len(one) == 3
    strict = [i for i, c in enumerate(columns) if c not in SOLVER_COLUMNS]
    for other_columns, table in tables[1:]:
        assert other_columns == columns and table.shape == one.shape
        np.testing.assert_allclose(table[:, strict], one[:, strict], rtol=1e-4, atol=1e-6)
        for column, tolerance in SOLVER_COLUMNS.items():
            if column in columns:
                i = columns.index(column)
                np.testing.assert_allclose(table[:, i], one[:, i], err_msg=column, **tolerance)
    values = [printed_value(result, name) for result in results]
    np.testing.assert_allclose(values, values[0], rtol=1e-3)


def untimed_raw_data(directory: pathlib.Path) -> tuple[list[str], np.ndarray]:
    """`(column names, rows)` of a run's raw data without its timings."""
    _, columns, rows = read_raw_data(str(directory / "raw.txt"))
    return [c for c in columns if c not in TIMING_COLUMNS], untimed(columns, rows)


def test_image_classification_on_two_hosts_resumed_writes_the_rows_of_one(tmp_path):
    """Data parallel over 2 processes of 2 (simulated CPU) devices each (each loading only
    its rows of the data) that stop at step 4 with a checkpoint and resume with more steps
    give one device's measurements (minibatches of 16 in order). One process with four
    devices: tests/test_distributed.py."""
    args = ["tests/tfds_mock.py", "32", "--mlp_width=16", "--batch_size=16", "--rho=0.1",
            "--hessian_check_every_steps=4", "--hessian_check_gap=none"]
    one = run_on([*args, "--max_steps=8", *output_flags(tmp_path / "one")],
                 processes=1, devices=1)
    two = [*args, f"--checkpoint_dir={tmp_path / 'checkpoints'}",
           f"--tensorboard_dir={tmp_path / 'tb'}", *output_flags(tmp_path / "two")]
    first_half = run_on([*two, "--max_steps=4"], processes=2, devices=2)
    assert "Data parallel over 4 cpu devices over 2 processes" in first_half.stderr
    assert "this process holds 16 and 16" in first_half.stderr  # its half of 32 examples
    resumed = run_on([*two, "--max_steps=8"], processes=2, devices=2)
    assert "Resumed from the checkpoint at step 4" in resumed.stderr
    tables = [untimed_raw_data(tmp_path / name) for name in ("one", "two")]
    _, columns, rows = read_raw_data(str(tmp_path / "two" / "raw.txt"))
    np.testing.assert_array_equal(rows[:, columns.index("step")], [0, 4, 8])
    assert_rows_of_one(tables, [one, resumed], "error")
    # Only process 0 writes event files (one per run), and the resume repeats no point.
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2
    assert_tensorboard_equals_raw_data(tmp_path / "tb", tmp_path / "two" / "raw.txt")


def test_the_transformer_on_two_hosts_writes_the_rows_of_one(tmp_path, corpus):
    """The token stream over 2 processes of 2 devices each, checks on a fixed Hessian batch,
    gives one device's measurements."""
    args = ["-m", "transformer", f"--corpus={corpus}", "--test_lines=100", "--rho=0.05",
            "--hessian_batch_size=8", *TINY_TRANSFORMER, "--max_steps=8",
            "--hessian_check_every_steps=4", "--hessian_check_gap=none"]
    one = run_on([*args, *output_flags(tmp_path / "one")], processes=1, devices=1)
    assert "Data parallel" not in one.stderr
    two = run_on([*args, *output_flags(tmp_path / "two")], processes=2, devices=2)
    assert "Data parallel over 4 cpu devices over 2 processes" in two.stderr
    tables = [untimed_raw_data(tmp_path / name) for name in ("one", "two")]
    assert_rows_of_one(tables, [one, two], "loss")


def test_a_sigterm_to_one_host_stops_every_host_at_the_same_step(tmp_path, corpus):
    """Preemption may signal one host first: all stop together, with SIGTERM's exit code."""
    variables = {"JAX_COORDINATOR_ADDRESS": f"localhost:{processes_.free_port()}",
                 "JAX_NUM_PROCESSES": "2"}
    started = [
        subprocess.Popen(
            [sys.executable, "-m", "transformer", f"--corpus={corpus}", "--test_lines=100",
             "--max_steps=100000", "--hessian_check_every_steps=5", *TINY_TRANSFORMER,
             *output_flags(tmp_path, plots=True)],
            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=processes_.environment(1, **variables, JAX_PROCESS_ID=str(i)),
        )
        for i in range(2)
    ]
    try:
        raw = tmp_path / "raw.txt"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and all(p.poll() is None for p in started):
            if raw.exists() and raw.read_text().count("\n") >= 5:  # 3 header lines, 2 rows
                break
            time.sleep(0.2)
        started[1].send_signal(signal.SIGTERM)  # process 1 only
        outputs = [process.communicate(timeout=120) for process in started]
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
    assert [p.returncode for p in started] == [errors.EXIT_INTERRUPTED_SIGTERM] * 2, (
        outputs[0][1][-2000:]
    )
    assert "Stopped (interrupted)" in outputs[0][1]
    assert "Test loss:" in outputs[0][0]
    rows = assert_outputs(tmp_path, 2)
    assert np.all(np.isfinite(rows[:, 5]))
