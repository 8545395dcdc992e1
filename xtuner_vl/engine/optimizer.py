"""The optimizer of a run: torch AdamW, or DeepSpeed's CPU Adam where ZeRO offloads the optimizer to the CPU."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["offloads_optimizer", "offload_cpu_threads", "build_optimizer"]


def offloads_optimizer(ds_config: Mapping[str, Any] | None) -> bool:
    """True when the DeepSpeed config runs the optimizer step on the CPU (``offload_optimizer.device`` cpu or nvme,
    as DeepSpeed's own ``zero_use_cpu_optimizer`` decides in deepspeed/runtime/engine.py)."""
    offload = ((ds_config or {}).get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def offload_cpu_threads(env: Mapping[str, str], cores: int) -> int | None:
    """Threads for the CPU optimizer step of one process, or None to keep the process's setting.

    An ``OMP_NUM_THREADS`` the user chose is kept. torchrun, though, sets ``OMP_NUM_THREADS=1`` in every
    worker when it was unset (torch/distributed/run.py), which leaves ZeRO-Offload's Adam, the step's
    bottleneck, on one core per GPU; that blanket 1 is replaced by an even share of this process's cores
    among the machine's ranks (``LOCAL_WORLD_SIZE``). Under srun alone, ``SLURM_CPUS_PER_TASK`` is the share.
    """
    under_torchrun = "TORCHELASTIC_RUN_ID" in env
    if "OMP_NUM_THREADS" in env and not (under_torchrun and env["OMP_NUM_THREADS"] == "1"):
        return None
    if not under_torchrun and "SLURM_CPUS_PER_TASK" in env:
        return max(1, int(env["SLURM_CPUS_PER_TASK"]))
    return max(1, cores // int(env.get("LOCAL_WORLD_SIZE", "1")))


def build_optimizer(
    groups: list[dict[str, Any]],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    device: torch.device,
    ds_config: Mapping[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (each with its own lr and weight decay); DeepSpeed's CPU Adam in AdamW mode when
    ``ds_config`` offloads the optimizer: the vectorised C++ step DeepSpeed built ZeRO-Offload around
    (https://www.deepspeed.ai/tutorials/zero-offload/), several times faster on the CPU than torch's AdamW."""
    if not offloads_optimizer(ds_config):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    from xtuner_vl.engine.deepspeed_backend import cpu_adam

    threads = offload_cpu_threads(os.environ, len(os.sched_getaffinity(0)))
    if threads is not None:
        # The op's OpenMP loop runs in torch's OpenMP runtime (the same libgomp), so this sets its threads.
        torch.set_num_threads(threads)
    return cpu_adam(groups, device, lr=lr, betas=betas, eps=eps)
