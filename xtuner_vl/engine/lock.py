"""One run per work dir: rank 0 holds an advisory lock on ``<work_dir>/.lock`` for the whole run.

Two runs in one work dir would delete each other's temporary checkpoints, mix their checkpoints and
overwrite the saved config. ``flock`` is released by the kernel when the process dies (even by SIGKILL),
so a crashed run never leaves a stale lock; the file keeps the holder's pid and host for the message.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO

from xtuner_vl.engine.dist import DistInfo, broadcast_object

__all__ = ["WorkDirInUse", "WorkDirLock", "hold_work_dir"]


class WorkDirInUse(RuntimeError):
    """Another run holds the work dir."""


class WorkDirLock:
    """The held lock (rank 0), or nothing (other ranks)."""

    def __init__(self, handle: IO[str] | None = None) -> None:
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def _acquire(work: Path) -> tuple[IO[str] | None, str | None]:
    work.mkdir(parents=True, exist_ok=True)
    handle = open(work / ".lock", "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "an unknown process"
        handle.close()
        return None, holder
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle, None


def hold_work_dir(work: Path, d: DistInfo) -> WorkDirLock:
    """(all ranks) Lock ``work`` for this run, or raise :class:`WorkDirInUse` on every rank alike."""
    handle, holder = _acquire(work) if d.is_main else (None, None)
    holder = broadcast_object(holder)
    if holder is not None:
        raise WorkDirInUse(
            f"work dir {work} is in use by another training run ({holder}); wait for it or pick --work-dir"
        )
    return WorkDirLock(handle)
