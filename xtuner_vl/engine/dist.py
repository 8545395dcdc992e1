"""Process-group setup and the few collectives the trainer needs (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_objects",
    "merge",
    "DistInfo",
    "init_distributed",
    "fill_single_process_env",
    "destroy_distributed",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
]

# What torch's env:// rendezvous (and deepspeed.init_distributed) read; torchrun sets all five.
RENDEZVOUS_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# World sizes of MPI launchers: mpirun / mpiexec (Open MPI, MPICH / Intel MPI via PMI).
_MPI_SIZE_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    timeout: timedelta | None = None  # of every collective of the process group; None: torch's default

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # port 0: the kernel picks a free one
        return s.getsockname()[1]


def fill_single_process_env(env: MutableMapping[str, str] | None = None) -> bool:
    """Describe a lone process as rank 0 of 1 (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, a free
    ``MASTER_PORT``) where no launcher did; values already set are kept. True when something was filled.

    ``deepspeed.init_distributed`` falls back to MPI discovery (and needs mpi4py) when any of these is
    missing (deepspeed/comm/comm.py, ``init_distributed``), so one plain ``xtuner-vl train --deepspeed zero2``
    process would fail without them.
    """
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1")) != 1:
        return False  # a launcher's several processes: its rendezvous, right or wrong, is left alone
    mpi = [f"{k}={env[k]}" for k in _MPI_SIZE_ENV if int(env.get(k, "1")) > 1]
    if mpi:
        raise RuntimeError(
            f"started by an MPI launcher ({', '.join(mpi)}) without WORLD_SIZE / RANK: launch with "
            "NPROC_PER_NODE / NNODES, torchrun or srun (docs/en/training.md#launching)"
        )
    missing = [k for k in RENDEZVOUS_ENV if k not in env]
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for key in missing:
        env[key] = defaults[key] if key in defaults else str(_free_port())
    return bool(missing)


def init_distributed(device: str | None = None, timeout_minutes: float | None = None) -> DistInfo:
    """Join the process group torchrun / srun describe in the environment (or run alone as rank 0 of 1).

    ``device``: ``cuda`` or ``cpu``; default CUDA when available. CPU runs use gloo. ``timeout_minutes``:
    how long a collective may wait for the other ranks (``runtime.dist_timeout_minutes``); None: torch's default.
    A single process creates no process group here (DeepSpeed creates its own from the filled environment).
    """
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:  # srun without torchrun
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    fill_single_process_env()
    timeout = timedelta(minutes=timeout_minutes) if timeout_minutes is not None else None
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        kwargs = {} if timeout is None else {"timeout": timeout}
        if use_cuda:
            # Binds the group to this GPU: NCCL communicators are created eagerly for it and barrier() needs no
            # device guess (torch.distributed.init_process_group, ``device_id``). Only with several ranks, as
            # DeepSpeed does (deepspeed/comm/torch.py, TorchBackend.init_process_group): a bound single rank
            # builds every later new_group() with ncclCommSplit.
            kwargs["device_id"] = dev
        dist.init_process_group("nccl" if use_cuda else "gloo", **kwargs)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank, world, local_rank, dev, timeout)


def destroy_distributed() -> None:
    """Leave the process group at the normal end of a run (NCCL warns at exit about a group never destroyed,
    and frees its communicators only here)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` alone)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def merge(dicts: list[dict]) -> dict:
    """One dict of several (later ones win)."""
    return {k: v for d in dicts for k, v in d.items()}
