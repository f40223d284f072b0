"""Exclusive locks on a run's outputs: two runs never write one raw-data file or one checkpoint
directory at once (the second would silently splice its rows into the first's).

`flock` locks belong to an open file and vanish with the process, so a killed run never leaves
a stale lock behind. They hold on local file systems; on NFS they depend on the server.

The raw data is locked through an empty file beside it (`.raw.txt.lock` for `raw.txt`), not
the file itself: a run may move an earlier run's file aside
(`sam_eos.reports.paths.move_aside`), and a lock would move with it. The checkpoint directory
is locked through `.sam_eos.lock` inside.
"""

import fcntl
import os

from sam_eos.errors import InputError

CHECKPOINT_LOCK_NAME = ".sam_eos.lock"  # inside --checkpoint_dir; orbax ignores it


class OutputLock:
    """An exclusive lock on `path` (created if missing), held until `release()`.

    Raises InputError naming `what` when another process (or another open in this one) holds
    it. A file that the lock created and that is still empty when released is removed again;
    with `lock_file=True` the (empty) file is only a lock and is removed whoever created it.
    """

    def __init__(self, path: str, what: str, shown_path: str | None = None,
                 lock_file: bool = False):
        self.path = path
        self._remove = lock_file or not os.path.exists(path)
        self._fd: int | None = None
        for _ in range(3):  # a run ending now may remove the file between open and flock
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise InputError(
                    f"another run is writing {what} {shown_path or path}; wait for it to end, "
                    "or give this run its own output paths"
                ) from None
            if _still_at(path, fd):
                self._fd = fd
                return
            os.close(fd)
        raise InputError(f"could not lock {path}: it keeps being removed")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self._remove and os.fstat(self._fd).st_size == 0 and _still_at(self.path,
                                                                              self._fd):
                os.remove(self.path)
        finally:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _still_at(path: str, fd: int) -> bool:
    """Whether the file open at `fd` is still the one at `path`."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except FileNotFoundError:
        return False


def raw_data_lock_path(raw_data_path: str) -> str:
    """The lock file of a raw-data file: hidden, beside it."""
    directory, name = os.path.split(os.path.abspath(raw_data_path))
    return os.path.join(directory, f".{name}.lock")


def lock_run_outputs(raw_data_path: str, checkpoint_dir: str) -> list[OutputLock]:
    """Locks the raw-data file and the checkpoint directory of a run (empty paths: none).
    Release each when the run ends; on failure, those already taken are released."""
    locks: list[OutputLock] = []
    try:
        if raw_data_path:
            locks.append(OutputLock(raw_data_lock_path(raw_data_path), "the raw-data file",
                                    raw_data_path, lock_file=True))
        if checkpoint_dir:
            os.makedirs(checkpoint_dir, exist_ok=True)
            locks.append(OutputLock(os.path.join(checkpoint_dir, CHECKPOINT_LOCK_NAME),
                                    "the checkpoint directory", checkpoint_dir,
                                    lock_file=True))
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks
