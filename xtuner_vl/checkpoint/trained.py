"""Read what the trainer wrote: a checkpoint's ``meta.json`` and its trainable weights.

Accepted checkpoint paths: a work dir (its newest complete ``checkpoints/step-*``), a step directory
(``torch_backend.pt`` or a DeepSpeed ``engine/`` of any ZeRO stage), a DeepSpeed tag directory, or a
``torch_backend.pt`` file. DeepSpeed checkpoints are consolidated with DeepSpeed's own
``zero_to_fp32`` (fp32 master weights) in lazy mode, so a tensor is materialised only when used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xtuner_vl.engine.checkpoint_dir import MANIFEST, CheckpointDir, verify_checkpoint

__all__ = ["CheckpointError", "TrainedCheckpoint", "read_trained_checkpoint", "materialize", "nonfinite_tensors"]

_TORCH_FILE = "torch_backend.pt"
_DS_TAG = "engine"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not belong to the config / base model."""


@dataclass
class TrainedCheckpoint:
    """Trainable weights of one training checkpoint, under the training model's parameter names.

    Attributes:
        path: the step directory (or the file given).
        meta: ``meta.json`` (empty when the checkpoint has none, e.g. a bare ``torch_backend.pt``).
        state: name -> tensor, or a DeepSpeed lazy tensor (use :func:`materialize`).
        backend: ``torch`` or ``deepspeed``.
    """

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    state: Mapping[str, Any] = field(default_factory=dict)
    backend: str = "torch"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape, without materialising any tensor."""
        return {k: tuple(v.shape) for k, v in self.state.items()}


def materialize(value: Any) -> torch.Tensor:
    """A real CPU tensor from a state-dict value (DeepSpeed lazy tensors gather on ``contiguous()``)."""
    return value if isinstance(value, torch.Tensor) else value.contiguous()


def _step_dir(path: Path) -> Path:
    """The step directory behind ``path`` (work dir -> newest complete checkpoint)."""
    if path.is_dir() and (path / "checkpoints").is_dir():
        complete = CheckpointDir(path).complete()
        if not complete:
            raise CheckpointError(f"{path}: work dir without a complete checkpoint under checkpoints/")
        for step in reversed(complete):  # the newest that verifies
            if (reason := verify_checkpoint(step)) is None:
                return step
            print(f"skipping {step}: fails verification ({reason})", flush=True)
        raise CheckpointError(f"{path}: no checkpoint under checkpoints/ verifies against its {MANIFEST}")
    if path.is_dir() and path.name == _DS_TAG and (path.parent / "meta.json").is_file():
        return path.parent
    return path


def _load_deepspeed(step: Path) -> dict[str, Any]:
    from xtuner_vl.engine.deepspeed_backend import import_deepspeed

    import_deepspeed(torch.device("cpu"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # Frozen weights were excluded at save time; what remains is the trainable fp32 masters.
    return get_fp32_state_dict_from_zero_checkpoint(str(step), tag=_DS_TAG, lazy_mode=True)


def read_trained_checkpoint(path: str | os.PathLike) -> TrainedCheckpoint:
    """Open a training checkpoint (see the module docstring for the accepted paths).

    Raises:
        CheckpointError: nothing the trainer writes is found there, or the checkpoint is incomplete.
    """
    given = Path(path)
    if not given.exists():
        raise CheckpointError(f"{given}: no such checkpoint file or directory")
    step = _step_dir(given)
    if step.is_file():
        meta_file = step.parent / "meta.json"
        state = torch.load(step, map_location="cpu", weights_only=True, mmap=True)["model"]
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        return TrainedCheckpoint(step, meta, state, "torch")
    if (step / "meta.json").is_file() and not (step / "COMPLETE").is_file():
        raise CheckpointError(f"{step}: checkpoint has no COMPLETE marker (its save was interrupted)")
    if (step / "COMPLETE").is_file() and (reason := verify_checkpoint(step)) is not None:
        raise CheckpointError(f"{step}: the checkpoint fails verification ({reason})")
    meta = json.loads((step / "meta.json").read_text()) if (step / "meta.json").is_file() else {}
    if (step / _TORCH_FILE).is_file():
        state = torch.load(step / _TORCH_FILE, map_location="cpu", weights_only=True, mmap=True)["model"]
        return TrainedCheckpoint(step, meta, state, "torch")
    if (step / _DS_TAG).is_dir():
        return TrainedCheckpoint(step, meta, _load_deepspeed(step), "deepspeed")
    raise CheckpointError(
        f"{given}: not a training checkpoint (expected a work dir, a step-XXXXXXXX directory with "
        f"{_TORCH_FILE} or {_DS_TAG}/, or a {_TORCH_FILE} file)"
    )


def nonfinite_tensors(ckpt: TrainedCheckpoint) -> list[tuple[str, int]]:
    """``(name, count)`` of the trained tensors holding inf/NaN (each tensor read once)."""
    bad = []
    for name, value in ckpt.state.items():
        tensor = materialize(value)
        if tensor.is_floating_point() and (count := int((~torch.isfinite(tensor)).sum())):
            bad.append((name, count))
    return bad
