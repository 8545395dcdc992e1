"""Atomic, verified, self-describing training checkpoints on disk.

A checkpoint is written into ``checkpoints/.tmp-step-XXXXXXXX`` by every rank, listed with each file's
size and SHA-256 in ``MANIFEST.json``, completed by a ``COMPLETE`` marker, and renamed to
``checkpoints/step-XXXXXXXX`` by rank 0. A crash at any moment leaves either the previous complete
checkpoints or a ``.tmp-*`` directory that is ignored (and removed by the next save), never a
half-written checkpoint under a final name. A complete checkpoint whose files no longer match its
manifest (truncated, emptied, deleted, bytes overwritten) fails :func:`verify_files`; the resume that
finds it moves it to ``checkpoints/rejected/`` and uses the newest one that verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointDir",
    "MANIFEST",
    "checkpoint_files",
    "hash_files",
    "verify_files",
    "verify_checkpoint",
    "manifest_of",
    "rng_state",
    "set_rng_state",
]

_NAME = re.compile(r"^step-(\d{8})$")
MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
_BOOKKEEPING = {MARKER, MANIFEST, "meta.json"}
_CHUNK = 8 << 20


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

    def commit(self, step: int, meta: dict[str, Any], manifest: dict[str, list]) -> Path:
        """(rank 0, after every rank wrote and hashed its files) write the manifest, mark complete, rename
        into place, prune old ones."""
        tmp, final = self.tmp_path(step), self.final_path(step)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
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

    def reject(self, path: Path, reason: str) -> Path:
        """(rank 0) Move a checkpoint that failed verification to ``checkpoints/rejected/`` with the reason, so
        neither resume nor retention counts it any more (retention would otherwise keep it over good ones)."""
        target = self.root / "rejected" / path.name
        target.parent.mkdir(exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(path, target)
        (target / "REJECTED").write_text(reason + "\n")
        return target


def checkpoint_files(directory: Path) -> list[str]:
    """The data files of a checkpoint directory (relative, sorted), without its bookkeeping files."""
    files = (p for p in directory.rglob("*") if p.is_file())
    return sorted(str(p.relative_to(directory)) for p in files if p.name not in _BOOKKEEPING)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(directory: Path, names: Iterable[str]) -> dict[str, list]:
    """``{name: [size, sha256]}`` of ``names`` under ``directory``."""
    return {n: [(directory / n).stat().st_size, _sha256(directory / n)] for n in names}


def manifest_of(directory: Path) -> dict[str, list] | None:
    """A checkpoint's manifest, or None when it has none (written before manifests existed)."""
    path = directory / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def verify_files(directory: Path, manifest: dict[str, list], names: Iterable[str]) -> str | None:
    """None when each of ``names`` exists with the manifest's size and hash; else the first difference."""
    for name in names:
        path = directory / name
        size, digest = manifest[name]
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
        if _sha256(path) != digest:
            return f"{name} does not match its SHA-256 in {MANIFEST} (bytes changed since it was written)"
    return None


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


def verify_checkpoint(directory: Path, share: int = 0, shares: int = 1) -> str | None:
    """None when share ``share`` of ``shares`` of the files of checkpoint ``directory`` match its manifest (all
    of them by default), else why not. A checkpoint written before manifests existed passes (nothing to check)."""
    try:
        manifest = manifest_of(directory)
    except (OSError, ValueError) as e:
        return f"unreadable {MANIFEST} ({e})"
    return None if manifest is None else verify_files(directory, manifest, sorted(manifest)[share::shares])
