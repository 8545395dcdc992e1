"""Atomic, self-describing training checkpoints on disk.

A checkpoint is written into ``checkpoints/.tmp-step-XXXXXXXX`` by every rank, completed by a
``COMPLETE`` marker, and renamed to ``checkpoints/step-XXXXXXXX`` by rank 0. A crash at any moment
leaves either the previous complete checkpoints or a ``.tmp-*`` directory that is ignored (and
removed by the next save), never a half-written checkpoint under a final name.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointDir", "rng_state", "set_rng_state"]

_NAME = re.compile(r"^step-(\d{8})$")
MARKER = "COMPLETE"


class CheckpointDir:
    """Layout and bookkeeping of ``<work_dir>/checkpoints``."""

    def __init__(self, work_dir: str | Path, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        self.root = Path(work_dir) / "checkpoints"
        self.keep_last = keep_last

    def final_path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def tmp_path(self, step: int) -> Path:
        return self.root / f".tmp-step-{step:08d}"

    def begin(self, step: int) -> Path:
        """(rank 0) A fresh temporary directory for ``step``; stale temporaries are removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.tmp_path(step)
        tmp.mkdir()
        return tmp

    def commit(self, step: int, meta: dict[str, Any]) -> Path:
        """(rank 0, after every rank wrote its files) mark complete, rename into place, prune old ones."""
        tmp, final = self.tmp_path(step), self.final_path(step)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _fsync_dir(tmp)
        (tmp / MARKER).write_text("ok\n")
        if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _NAME.match(p.name) and (p / MARKER).is_file()]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None


def _fsync_dir(path: Path) -> None:
    """Flush a directory's entries so a rename survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from (python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
