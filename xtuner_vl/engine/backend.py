"""What the trainer needs from an execution backend (DeepSpeed or plain PyTorch / DDP)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from xtuner_vl.engine.schedule import lr_at

__all__ = ["Backend", "set_group_lrs", "all_finite"]


class Backend(Protocol):
    module: nn.Module  # the unwrapped InternVLChatModel
    optimizer: torch.optim.Optimizer

    def forward(self, **inputs: Any) -> Any: ...

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of ``loss``; gradients are summed over micro-steps, averaged over ranks."""

    def step(self, boundary: bool, skip: bool = False) -> float | None:
        """Called after every micro-step; on the accumulation ``boundary`` it clips, steps and zeroes
        the gradients and returns the global gradient norm before clipping. The update is not applied
        (on every rank alike) when ``skip`` or when that norm is not finite."""

    def weights_finite(self) -> bool:
        """(all ranks) Whether every trainable weight is finite, on every rank."""

    def save(self, directory: Path) -> None:
        """(all ranks) Write model, optimizer and backend state into ``directory``."""

    def load(self, directory: Path) -> None:
        """(all ranks) Restore what :meth:`save` wrote."""

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """(all ranks call; rank 0 gets it) full trainable weights, gathered across ZeRO shards."""


def set_group_lrs(
    optimizer: torch.optim.Optimizer, step: int, base_lr: float, total: int, warmup: int, min_lr_ratio: float
) -> float:
    """Set every group's lr for optimizer step ``step`` (groups carry ``lr_scale``); returns the base lr."""
    lr = lr_at(step, base_lr, total, warmup, min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def all_finite(tensors: list[torch.Tensor], device: torch.device) -> bool:
    """Whether every element of ``tensors`` is finite on every rank (one flag reduced across ranks)."""
    bad = torch.zeros((), device=device)
    for t in tensors:
        if t.numel():
            bad += (~torch.isfinite(t)).any().to(bad.dtype)
    if dist.is_initialized():
        dist.all_reduce(bad)
    return not bool(bad)
