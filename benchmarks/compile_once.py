"""Where the time goes: the transformer program's step rate against a bare jitted SAM loop, and
its time to the first step with a cold and a warm compilation cache.

    python3 -m benchmarks.compile_once [--corpus PATH] [--seconds 60] [--repeats 1]

1. Step rate, side by side: `python3 -m transformer` (the README's CPU-sized model, no checks)
   for `--seconds` of training time, steps / training seconds from its log; then, in this
   process, a bare loop of `jax.jit(sam_update)` on the same model and batches already on the
   device, for the same seconds. Ratio = program / bare (target >= 0.8).
2. Time to the first step: the same command with `--max_steps=1` and a check at step 0, run
   twice with one fresh `--compilation_cache_dir` (cold, then warm): seconds from launch until
   the run stops (its log's time of day), and the compile lines it logged.
Prints one JSON object (medians over `--repeats`).
"""

import argparse
import datetime
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
MODEL = {"num_layers": 2, "model_size": 64, "num_heads": 4, "key_size": 16,
         "sequence_length": 64}
BATCH_SIZE, STEP_SIZE, RHO = 32, 0.1, 0.1
COMMAND = ["-m", "transformer", "--rho=0.1", "--step_size=0.1", f"--batch_size={BATCH_SIZE}",
           *[f"--{name}={value}" for name, value in MODEL.items()],
           "--raw_data_output=", "--eigs_curve_output=", "--eigs_se_only_output=",
           "--alignment_curve_output=", "--loss_curve_output="]


def program_rate(corpus: str, seconds: float) -> dict:
    """Steps per second of training time of the program over its first `seconds`."""
    result = subprocess.run(
        [sys.executable, *COMMAND, f"--corpus={corpus}", "--hessian_check_gap=none",
         f"--time_limit_in_hours={seconds / 3600}", "--compilation_cache_dir="],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    steps, hours = re.search(r"after (\d+) steps and ([\d.]+) h of training",
                             result.stderr).groups()
    return {"steps": int(steps), "seconds": float(hours) * 3600,
            "rate": int(steps) / (float(hours) * 3600)}


def bare_rate(corpus: str, seconds: float) -> dict:
    """Steps per second of `jax.jit(sam_update)` called in a Python loop, batches on device."""
    import jax

    from sam_eos.sam import sam_update
    from transformer import dataset, model

    text = dataset.read_ascii_text(corpus)
    train_text, _ = dataset.split_corpus(text)
    stream = dataset.TrainBatches(train_text, batch_size=BATCH_SIZE,
                                  sequence_length=MODEL["sequence_length"], seed=0)
    network = model.make_network(**MODEL)
    loss_fn = model.make_loss_fn(network)
    batches = jax.device_put(stream.take(64))
    params = network.init(jax.random.PRNGKey(0), batches[0][0][:1])
    step = jax.jit(lambda p, b: sam_update(loss_fn, p, b, STEP_SIZE, RHO))
    batch = lambda i: jax.tree.map(lambda x: x[i % 64], batches)  # noqa: E731
    on_device = [batch(i) for i in range(64)]
    params = jax.block_until_ready(step(params, on_device[0]))  # compile
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(16):
            params = step(params, on_device[steps % 64])
            steps += 1
        jax.block_until_ready(params)
    elapsed = time.perf_counter() - start
    return {"steps": steps, "seconds": elapsed, "rate": steps / elapsed}


def time_to_first_step(corpus: str, cache_dir: str) -> dict:
    """Seconds from launch until a one-step run (a check at step 0) stops, and its compiles."""
    now = datetime.datetime.now()
    launch = now.hour * 3600 + now.minute * 60 + now.second + now.microsecond * 1e-6
    result = subprocess.run(
        [sys.executable, *COMMAND, f"--corpus={corpus}", "--max_steps=1",
         "--hessian_check_every_steps=1", "--hessian_check_gap=none",
         f"--compilation_cache_dir={cache_dir}"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    stopped = _log_seconds(result.stderr, "Stopped (")
    compiles = dict(re.findall(r"Compiled (.+?) in ([\d.]+) s\.", result.stderr))
    return {"seconds_to_first_step": stopped - launch,
            "compile_seconds": {k: float(v) for k, v in compiles.items()}}


def _log_seconds(log: str, text: str) -> float:
    """The time of day (seconds) of the first absl log line holding `text`."""
    for line in log.splitlines():
        if text in line:
            hours, minutes, seconds = re.search(r" (\d\d):(\d\d):(\d\d\.\d+) ", line).groups()
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    raise ValueError(f"no log line with {text!r}")


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", choices=("rate", "cache"), default=None,
                        help="measure only the step rate (1) or the cache (2)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    program, bare, cold, warm = [], [], [], []
    for _ in range(args.repeats if args.only != "cache" else 0):
        program.append(program_rate(args.corpus, args.seconds))
        bare.append(bare_rate(args.corpus, args.seconds))
    for _ in range(args.repeats if args.only != "rate" else 0):
        with tempfile.TemporaryDirectory() as cache_dir:
            cold.append(time_to_first_step(args.corpus, cache_dir))
            warm.append(time_to_first_step(args.corpus, cache_dir))
    out = {"date": datetime.date.today().isoformat(), "model": MODEL, "batch_size": BATCH_SIZE}
    if program:
        out["program_steps_per_second"] = _median(program, "rate")
        out["bare_steps_per_second"] = _median(bare, "rate")
        out["ratio_program_over_bare"] = out["program_steps_per_second"] / out[
            "bare_steps_per_second"]
    if cold:
        out["cold_seconds_to_first_step"] = _median(cold, "seconds_to_first_step")
        out["warm_seconds_to_first_step"] = _median(warm, "seconds_to_first_step")
    out["runs"] = {"program": program, "bare": bare, "cold": cold, "warm": warm}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
