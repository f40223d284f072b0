"""Shared test set-up: CPU only, the repository root importable, TensorFlow quiet."""

import os
import pathlib
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# One BLAS thread per process: two test workers on two cores, each with threaded LAPACK calls
# (Lanczos's small eigh every step), only contend.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# The programs' compilation cache (--compilation_cache_dir, under $XDG_CACHE_HOME) goes to a
# folder of this test session, not the user's cache: one folder for every worker of the session
# (pytest-xdist gives them one run id), so a program compiled by one test run is loaded, not
# compiled again, by the next run of the same program in any worker. Most of the suite's time
# is XLA compiling the same small models.
_SESSION = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
TEST_CACHE_HOME = pathlib.Path(tempfile.gettempdir()) / f"sam_eos_test_cache_{_SESSION}"
TEST_CACHE_HOME.mkdir(exist_ok=True)
os.environ["XDG_CACHE_HOME"] = str(TEST_CACHE_HOME)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
