"""Exit codes of both programs' command lines (help 0, unparsable flags 2), and the settings'
flags: the project's own only."""

import os
import subprocess
import sys

import pytest
from absl import flags

from sam_eos.cli.parsing import is_project_module, project_flag_values
from sam_eos.errors import EXIT_BAD_INPUT, EXIT_OK
from tests.conftest import ROOT


def test_project_flags_only():
    values = flags.FlagValues()
    defined = {
        "rho": "sam_eos.cli.flags",
        "num_layers": str(ROOT / "transformer" / "__main__.py"),
        "nn_architecture": "image_classification.__main__",
        "hbm_oom_exit": "jax._src.config",
        "tfds_debug": "tensorflow_datasets.core.flags",
        "only_check_args": "absl.app",
        "checkpoint_threads": "orbax.checkpoint._src.multihost.multihost",
        "elsewhere": "/home/user/other/__main__.py",
    }
    for name, module in defined.items():
        flags.DEFINE_integer(name, 1, "help", flag_values=values, module_name=module)
    values(["program", "--rho=3"])
    assert project_flag_values(values) == {"rho": 3, "num_layers": 1, "nn_architecture": 1}


def test_project_modules_by_name_and_by_main_path():
    assert is_project_module("sam_eos.cli.flags") and is_project_module("experiments.mnist_edge")
    assert is_project_module("/x/y/transformer/__main__.py")
    assert is_project_module("/x/sam_eos/cli/replot.py")
    assert not is_project_module("sam_eos_fork.flags") and not is_project_module("absl.app")
    assert not is_project_module("/x/y/other/__main__.py")


@pytest.mark.parametrize("program", ["image_classification", "transformer"])
@pytest.mark.parametrize(("args", "code", "message"), [
    (["--help"], EXIT_OK, "--rho"),
    (["--no_such_flag=1"], EXIT_BAD_INPUT,
     "FATAL Flags parsing error: Unknown command line flag 'no_such_flag'"),
    (["--max_steps=ten"], EXIT_BAD_INPUT, "FATAL Flags parsing error: flag --max_steps=ten"),
])
def test_help_exits_0_and_flag_parsing_errors_exit_2(program, args, code, message):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-m", program, *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == code, result.stderr[-2000:]
    assert message in (result.stdout if code == EXIT_OK else result.stderr)
