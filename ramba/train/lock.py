"""The run-folder lock: one training run per ``out_dir`` at a time (docs/design.md §8).

``out_dir/run.lock`` holds the holder's host, pid and start time (JSON) and is locked with ``flock``
while the run lives, so taking it is atomic and a run that dies (kill -9, power loss) releases it
with its process (forked children, such as DataLoader workers, close their copy of the descriptor). A second run on the same folder refuses at once naming the holder; a lock left by a
dead run is taken over with a warning naming it. Under torchrun rank 0 takes the lock for all ranks.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

from ramba.errors import CheckpointError

__all__ = ["RunLock"]

logger = logging.getLogger(__name__)
LOCK_FILE = "run.lock"
_HELD: set[int] = set()  # descriptors of the locks this process holds


def _close_inherited() -> None:
    """In a forked child (a DataLoader worker): close the copies of the parent's lock descriptors, so that the
    lock dies with the run's process and not with its last child."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited)


class RunLock:
    """``with RunLock(out_dir):`` holds the lock of ``out_dir`` (created if missing) for the block."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None
        self._created: list[Path] = []

    def acquire(self) -> RunLock:
        folder = self.path.parent
        self._created = [p for p in (folder, self.path) if not p.exists()]  # removed again if the run writes nothing
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise CheckpointError(
                f"out_dir {self.path.parent} is in use by another run ({holder}); wait for it to "
                "finish or stop it, or choose another out_dir"
            ) from None
        previous = os.pread(fd, 4096, 0)
        if previous.strip():
            logger.warning(
                "out_dir %s: taking over the lock left by a run that ended without releasing it (%s)",
                self.path.parent,
                _describe(previous),
            )
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        _HELD.add(fd)
        return self

    def release(self) -> None:
        """Empties the lock file (an empty file means: free) and unlocks it; a run that stopped before writing
        anything (bad input) leaves no lock file or folder it created behind."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        if self.path in self._created and [p.name for p in self.path.parent.iterdir()] == [LOCK_FILE]:
            self.path.unlink()
            if self.path.parent in self._created:
                self.path.parent.rmdir()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        _HELD.discard(self._fd)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw)
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
