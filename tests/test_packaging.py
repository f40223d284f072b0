"""The installed distribution: only `sam_eos`, importable without the programs' stack, with no
global state changed on import, and the tracker example running against it."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

IMPORT_EVERY_MODULE = """
import importlib, pkgutil, sys
import sam_eos
assert sam_eos.__file__.startswith(sys.argv[1]), sam_eos.__file__
for module in pkgutil.walk_packages(sam_eos.__path__, "sam_eos."):
    importlib.import_module(module.name)
import matplotlib
print("backend", matplotlib.get_backend())
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install --no-deps --target DIR` of a copy of the checkout's package files."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "sam_eos", source / "sam_eos",
                    ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(target), str(source)], check=True, timeout=300,
                   capture_output=True)
    return target


def run_python(args, target, cwd, **variables):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), JAX_PLATFORMS="cpu", **variables)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=300)


def test_installs_only_the_library(installed):
    top_level = {p.name for p in installed.iterdir() if not p.name.endswith(".dist-info")}
    assert top_level == {"sam_eos"}
    assert (installed / "sam_eos" / "loop" / "train.py").is_file()


def test_import_loads_no_tensorflow_haiku_or_matplotlib(installed, tmp_path):
    code = ("import sys, sam_eos; print(sorted(m for m in ('tensorflow', 'haiku', 'matplotlib')"
            " if m in sys.modules)); print(len(sam_eos.__all__))")
    finished = run_python(["-c", code], installed, tmp_path)
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.split()
    assert lines[0] == "[]" and int(lines[-1]) > 10


def test_importing_every_module_keeps_the_matplotlib_backend(installed, tmp_path):
    finished = run_python(["-c", IMPORT_EVERY_MODULE, str(installed)], installed, tmp_path,
                          MPLBACKEND="svg")
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip().endswith("backend svg")


def test_tracker_example_runs_against_the_installed_package(installed, tmp_path):
    example = ROOT / "examples" / "track_your_own_loop.py"
    finished = run_python([str(example), "--steps", "60", "--every", "20"], installed, tmp_path)
    assert finished.returncode == 0, finished.stderr
    lines = [line for line in finished.stdout.splitlines() if line.startswith("step")]
    assert [line.split()[1] for line in lines] == ["20", "40", "60"]
    ratios = [float(line.split("/ edge")[1].split()[0]) for line in lines]
    assert all(0 < r < 2 for r in ratios)  # a preconditioned sharpness on the edge's scale


def imported_modules(path) -> set[str]:
    """The modules a source file imports (at any depth: a deferred import counts too)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_reports_import_nothing_from_the_loop_or_the_command_line():
    # The reports are a sink fed rows; the loop and the programs use them, never the reverse.
    files = sorted((ROOT / "sam_eos" / "reports").glob("*.py"))
    assert len(files) >= 5
    for path in files:
        upward = {name for name in imported_modules(path)
                  if name.startswith(("sam_eos.loop", "sam_eos.cli"))}
        assert not upward, (path.name, upward)
    assert "sam_eos.loop.checkpoint" in imported_modules(ROOT / "sam_eos" / "loop" / "recorder.py")
