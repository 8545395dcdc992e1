"""Plain PyTorch backend: one process or DDP, AdamW, clipping; bf16 autocast on CUDA."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from xtuner_vl.engine.backend import all_finite
from xtuner_vl.engine.dist import DistInfo

__all__ = ["TorchBackend"]


class TorchBackend:
    """Trainable parameters are fp32 masters; frozen ones keep their (bf16) dtype."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, dist_info: DistInfo, max_grad_norm: float, bf16: bool
    ) -> None:
        self.module, self.optimizer, self.max_grad_norm = model, optimizer, max_grad_norm
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # fp32 master weights for what trains; frozen weights keep their dtype
        self.device = dist_info.device
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and self.device.type == "cuda" else None
        self.wrapped = DistributedDataParallel(model) if dist_info.world_size > 1 else model
        self._boundary_next = True

    def forward(self, **inputs: Any) -> Any:
        ctx = self.autocast or contextlib.nullcontext()
        sync = contextlib.nullcontext()
        if isinstance(self.wrapped, DistributedDataParallel) and not self._boundary_next:
            sync = self.wrapped.no_sync()  # all-reduce only on the accumulation boundary
        with ctx, sync:  # DDP decides in forward whether this backward all-reduces
            return self.wrapped(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def prepare_micro_step(self, boundary: bool) -> None:
        """Tell the backend whether the coming micro-step ends an accumulation cycle."""
        self._boundary_next = boundary

    def step(self, boundary: bool, skip: bool = False) -> float | None:
        if not boundary:
            return None
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))  # all-reduced grads: global
        if not skip and math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def weights_finite(self) -> bool:
        return all_finite([p.detach() for p in self.module.parameters() if p.requires_grad], self.device)

    def save(self, directory: Path) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            state = {"model": self.trainable_state_dict(), "optimizer": self.optimizer.state_dict()}
            torch.save(state, directory / "torch_backend.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "torch_backend.pt", map_location=self.device, weights_only=False)
        missing = set(self.trainable_state_dict()) - set(state["model"])
        if missing:
            raise ValueError(f"{directory}: checkpoint lacks trainable weights {sorted(missing)[:5]}")
        self.module.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.module.named_parameters() if p.requires_grad}
        return {k: v.detach().clone() for k, v in self.module.state_dict().items() if k in names}
