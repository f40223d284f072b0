"""The small harness every benchmark shares: timing, the run's context, JSON results.

A benchmark is a module with `NAME`, `TITLE` and `run(context) -> dict`; the dict holds
`headline` (a list of [figure, value] pairs for BENCHMARKS.md's first table), `columns` and
`rows` (its own table) and optional `notes`. `write_result` stores it as JSON with the machine,
the commit, the date and the command, under `benchmarks/results/<backend>/<NAME>.json`.
"""

import dataclasses
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


@dataclasses.dataclass(frozen=True)
class Context:
    """What every benchmark is told: how long to measure, where the data is."""

    quick: bool
    data_dir: pathlib.Path
    command: str

    def repeats(self, quick: int, full: int) -> int:
        return quick if self.quick else full


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of `fn()`, waiting for every array in the result."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    return time.perf_counter() - start, result


def interleaved_medians(cases: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each case, called once per round for `repeats` rounds (a change in
    machine load hits every case alike); each case is called once first, untimed (compile)."""
    for case in cases.values():
        timed(case)
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            seconds[name].append(timed(case)[0])
    return {name: statistics.median(values) for name, values in seconds.items()}


def format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The host, JAX and the device the benchmarks run on."""
    device = jax.devices()[0]
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "backend": jax.default_backend(),
        "device": device.device_kind,
    }


# The code a result depends on: a change elsewhere (the results, the docs) does not count.
CODE_PATHS = ("sam_eos", "benchmarks", ":!benchmarks/results", "image_classification",
              "transformer", "pyproject.toml", "requirements.txt")


def commit() -> str:
    """The checked-out commit, with "+changes" when its code differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True,
                              text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS)
    return head + ("+changes" if changed else "")


def write_result(name: str, result: dict[str, Any], context: Context,
                 started: dict[str, Any]) -> pathlib.Path:
    """Stores one benchmark's result with its context; returns the file."""
    record = {
        "name": name,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "command": context.command,
        "quick": context.quick,
        "machine": started,
        **result,
    }
    directory = RESULTS_DIR / started["backend"]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(record, indent=1, default=float) + "\n")
    return path


def read_results(backend: str) -> list[dict[str, Any]]:
    """Every stored result of `backend`, by name."""
    directory = RESULTS_DIR / backend
    if not directory.is_dir():
        return []
    return [json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))]


def child_python(code: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -c code args` in a fresh process with this one's environment (memory probes)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, env=env,
                          text=True, capture_output=True, timeout=timeout)
