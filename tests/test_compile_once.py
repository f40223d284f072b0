"""Each program compiles its step and its check once per run (JAX's compile log, not timing)."""

import collections
import re
import subprocess
import sys

from tests.conftest import ROOT, environment, shakespeare_like_text

NO_OUTPUTS = ["--raw_data_output=", "--eigs_curve_output=", "--eigs_se_only_output=",
              "--alignment_curve_output=", "--loss_curve_output="]
# 600 minibatch steps, a check every 100; no compilation cache, so every compile is logged.
LONG_RUN = ["--max_steps=600", "--hessian_check_every_steps=100", "--hessian_check_gap=none",
            "--compilation_cache_dir=", *NO_OUTPUTS]


def compiles(args: list[str]) -> tuple[collections.Counter, str]:
    """How often each jitted function was compiled in a run of `args` (JAX_LOG_COMPILES)."""
    result = subprocess.run([sys.executable, *args, *LONG_RUN], cwd=ROOT, text=True,
                            capture_output=True, timeout=600,
                            env=dict(environment(), JAX_LOG_COMPILES="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Stopped (max_steps) after 600 steps" in result.stderr
    names = re.findall(r"Finished XLA compilation of (\S+) in", result.stderr)
    return collections.Counter(names), result.stderr


SPECTRUM_FLAGS = ["--hessian_trace_matvecs=8", "--spectral_density_every_checks=4",
                  "--batch_sharpness", "--sam_point_sharpness", "--density_output="]


def assert_step_and_check_compile_once(counts: collections.Counter, log: str) -> None:
    assert "Training data on the device" in log
    assert counts["jit(train_steps)"] == 1  # every dispatch size runs one program
    assert counts["jit(measure)"] == 1  # 7 checks, one compile
    assert counts["jit(eigensolver_chunk)"] == 1  # cold, warm and every chunk: one compile
    assert max(counts.values()) <= 2, counts
    # Compiled ahead of time, each with its duration logged.
    for what in ("the SAM step", "the Hessian check"):
        assert len(re.findall(rf"Compiled {what} in \d+\.\d+ s\.", log)) == 1


def test_a_600_step_transformer_run_with_spectrum_measurements_compiles_each_once(tmp_path):
    # One run serves both the step and check and the four spectrum measurements.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_like_text())
    counts, log = compiles(["-m", "transformer", f"--corpus={corpus}", "--test_lines=100",
                            "--num_layers=1", "--model_size=16", "--num_heads=2",
                            "--key_size=8", "--sequence_length=16", "--batch_size=8",
                            *SPECTRUM_FLAGS])
    assert_step_and_check_compile_once(counts, log)
    for name in ("trace", "density", "samples", "sam_point_sharpness"):
        assert counts[f"jit({name})"] == 1, (name, counts)  # 7 checks, one compile each
    for what in ("the Hessian trace", "the spectral density", "the batch sharpness",
                 "the SAM-point sharpness"):
        assert len(re.findall(rf"Compiled {what} in \d+\.\d+ s\.", log)) == 1
    assert len(re.findall(r"spectrum at step \d+: trace", log)) == 7


def test_a_600_step_image_classification_run_compiles_no_function_more_than_twice():
    counts, log = compiles(["tests/tfds_mock.py", "64", "--mlp_width=8", "--batch_size=8",
                            "--shuffle"])
    assert_step_and_check_compile_once(counts, log)
