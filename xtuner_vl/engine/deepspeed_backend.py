"""DeepSpeed ZeRO 1/2/3 (+ offload) backend; the only module that imports deepspeed.

On CPU it runs DeepSpeed's CPU accelerator over gloo (the tests do). One narrow patch: DeepSpeed
JIT-compiles a shared-memory all-reduce op for CPU when it builds its comm backend (about a minute
on two cores, unused with gloo), so that build is skipped on CPU.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xtuner_vl.engine.backend import all_finite
from xtuner_vl.engine.dist import DistInfo

__all__ = ["DeepSpeedBackend", "import_deepspeed", "cpu_adam"]

_TAG = "engine"


def import_deepspeed(device: torch.device):
    """Import deepspeed for ``device`` (on CPU: the CPU accelerator, without the shm op build)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        importlib.import_module("deepspeed.comm.torch")
        # `deepspeed.comm` re-exports the name `torch`, so reach the submodule through sys.modules.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    import deepspeed

    # ZeRO's collectives call torch's deprecated `all_gather_into_tensor` / `reduce_scatter_tensor` every step,
    # and torch 2.14 warns on every call (a screen of FutureWarnings per training run); only those are hidden.
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=f".*{name}.* is deprecated", category=FutureWarning)
    return deepspeed


def cpu_adam(
    groups: list[dict[str, Any]], device: torch.device, lr: float, betas: tuple[float, float], eps: float
) -> torch.optim.Optimizer:
    """DeepSpeed's CPU Adam in AdamW mode (decoupled decay, as torch's AdamW) over ``groups``, whose own
    ``weight_decay`` applies per group; ``device`` is the training device (it picks DeepSpeed's accelerator).
    Its C++ op is JIT-compiled with ninja on first use into the torch extensions dir (``TORCH_EXTENSIONS_DIR``,
    default ~/.cache/torch_extensions), about a minute; later runs load it."""
    import_deepspeed(device)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0, adamw_mode=True)


class DeepSpeedBackend:
    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any], dist_info: DistInfo
    ) -> None:
        self.deepspeed = import_deepspeed(dist_info.device)
        # With several ranks the group exists already (init_distributed); alone, DeepSpeed creates it from the
        # environment init_distributed filled. Either way with the run's timeout.
        timeout = {} if dist_info.timeout is None else {"timeout": dist_info.timeout}
        self.deepspeed.init_distributed(dist_backend="nccl" if dist_info.device.type == "cuda" else "gloo", **timeout)
        self.stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        if self.stage == 3:
            # Modules that ask for it (MoE expert lists, xtuner_vl.model.moe) are gathered whole: one all-gather
            # for all their experts instead of one per expert, and no per-expert hooks.
            leaves = sorted({type(m) for m in model.modules() if getattr(m, "zero3_leaf", False)}, key=str)
            if leaves:
                from deepspeed.utils import set_z3_leaf_modules

                set_z3_leaf_modules(model, leaves)
        self.engine, _, _, _ = self.deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.module = self.engine.module
        self.optimizer = optimizer  # our object: its param_groups carry the lr we set

    def forward(self, **inputs: Any) -> Any:
        return self.engine(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        # Our loss is already normalised over the accumulation window; no extra 1/gas.
        self.engine.backward(loss, scale_wrt_gas=False)

    def prepare_micro_step(self, boundary: bool) -> None:
        if boundary != self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("trainer and DeepSpeed disagree on the gradient accumulation boundary")

    def step(self, boundary: bool, skip: bool = False) -> float | None:
        if boundary and skip:
            # A non-finite loss with finite gradients (non-finite gradients DeepSpeed's ZeRO optimizers skip by
            # themselves): a zero learning rate for this step leaves every weight where it is (the trainer sets
            # the next step's rates anew). Adam's moments still take these finite gradients in.
            for group in self.optimizer.param_groups:
                group["lr"] = 0.0
        self.engine.step()
        if not boundary:
            return None
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def weights_finite(self) -> bool:
        # ZeRO-3 keeps this rank's slice in ds_tensor (the parameter itself is empty); checking each rank's slice
        # covers every weight once. ZeRO-1/2 parameters are whole on every rank.
        local = [getattr(p, "ds_tensor", p).detach() for p in self.module.parameters() if p.requires_grad]
        return all_finite(local, self.engine.device)

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=_TAG, exclude_frozen_parameters=True)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory),
            tag=_TAG,
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint under tag {_TAG!r}")

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.module.named_parameters():
            if p.requires_grad:
                with self.deepspeed.zero.GatheredParameters([p], enabled=self.stage == 3):
                    out[name] = p.detach().clone().cpu()
        return out
