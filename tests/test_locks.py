"""Exclusive locks on a run's outputs."""

import os

import pytest

from sam_eos.errors import InputError
from sam_eos.loop import locks


def test_a_second_lock_on_the_same_outputs_is_refused_until_the_first_is_released(tmp_path):
    raw = tmp_path / "raw.txt"
    raw.write_text("# a finished run's rows\n1 2\n")
    first = locks.lock_run_outputs(str(raw), str(tmp_path / "ckpt"))
    with pytest.raises(InputError, match=f"another run is writing the raw-data file {raw}"):
        locks.lock_run_outputs(str(raw), "")
    with pytest.raises(InputError, match="another run is writing the checkpoint directory"):
        locks.lock_run_outputs(str(tmp_path / "other.txt"), str(tmp_path / "ckpt"))
    assert not (tmp_path / "other.txt").exists()  # the refused run left nothing behind
    for lock in first:
        lock.release()
    assert raw.read_text() == "# a finished run's rows\n1 2\n"  # locking never writes
    again = locks.lock_run_outputs(str(raw), str(tmp_path / "ckpt"))
    for lock in again:
        lock.release()


def test_a_lock_that_created_an_empty_file_removes_it(tmp_path):
    path = tmp_path / "new.txt"
    with locks.OutputLock(str(path), "the raw-data file"):
        assert path.exists()
    assert not path.exists()
    with locks.OutputLock(str(path), "the raw-data file"):
        path.write_text("a row\n")
    assert path.read_text() == "a row\n"
    assert os.listdir(tmp_path) == ["new.txt"]


def test_the_raw_data_lock_is_a_file_beside_it_so_moving_the_raw_data_aside_keeps_it(tmp_path):
    raw = tmp_path / "raw.txt"
    raw.write_text("an earlier run's rows\n")
    held = locks.lock_run_outputs(str(raw), "")
    assert sorted(os.listdir(tmp_path)) == [".raw.txt.lock", "raw.txt"]
    os.rename(raw, tmp_path / "raw.1.txt")  # as a run moves an earlier file aside
    raw.write_text("this run's rows\n")
    with pytest.raises(InputError, match="another run is writing the raw-data file"):
        locks.lock_run_outputs(str(raw), "")
    for lock in held:
        lock.release()
    assert sorted(os.listdir(tmp_path)) == ["raw.1.txt", "raw.txt"]  # the lock file is gone


def test_a_stale_lock_file_of_a_killed_run_is_taken_and_removed(tmp_path):
    (tmp_path / ".raw.txt.lock").touch()  # left by a run killed with SIGKILL: no lock held
    for lock in locks.lock_run_outputs(str(tmp_path / "raw.txt"), ""):
        lock.release()
    assert os.listdir(tmp_path) == []
