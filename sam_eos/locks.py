"""Exclusive locks on a run's outputs: two runs never write one raw-data file or one checkpoint
directory at once (the second would silently splice its rows into the first's).

`flock` locks belong to an open file and vanish with the process, so a killed run never leaves
a stale lock behind. They hold on local file systems; on NFS they depend on the server.
"""

import fcntl
import os

from sam_eos.errors import InputError

CHECKPOINT_LOCK_NAME = ".sam_eos.lock"  # inside --checkpoint_dir; orbax ignores it


class OutputLock:
    """An exclusive lock on `path` (created if missing), held until `release()`.

    Raises InputError naming `what` when another process (or another open in this one) holds
    it. A file that the lock created and that is still empty when released is removed again.
    """

    def __init__(self, path: str, what: str, shown_path: str | None = None):
        self.path = path
        created = not os.path.exists(path)
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self._created = created
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise InputError(
                f"another run is writing {what} {shown_path or path}; wait for it to end, or "
                "give this run its own output paths"
            ) from None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self._created and os.fstat(self._fd).st_size == 0 and os.path.exists(self.path):
                os.remove(self.path)
        finally:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_outputs(raw_data_path: str, checkpoint_dir: str) -> list[OutputLock]:
    """Locks the raw-data file and the checkpoint directory of a run (empty paths: none).
    Release each when the run ends; on failure, those already taken are released."""
    locks: list[OutputLock] = []
    try:
        if raw_data_path:
            locks.append(OutputLock(raw_data_path, "the raw-data file"))
        if checkpoint_dir:
            os.makedirs(checkpoint_dir, exist_ok=True)
            locks.append(OutputLock(os.path.join(checkpoint_dir, CHECKPOINT_LOCK_NAME),
                                    "the checkpoint directory", checkpoint_dir))
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks
