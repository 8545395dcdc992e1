"""ZeRO-3 loading: an official checkpoint read straight into partitioned parameters.

DeepSpeed's ``initialize`` moves a model built outside ``deepspeed.zero.Init`` to the device whole before
partitioning it, so each rank would first hold a full copy (a 76B model: 142 GiB). Here the model is built
on the meta device (no memory, no random init) and each parameter becomes real only when its tensor is
read: rank 0 reads it (one tensor in host memory at a time), every rank allocates it on its device, and
``deepspeed.zero.Init(module=...)`` (DeepSpeed's public way to partition an existing module) broadcasts
rank 0's values and keeps 1/N of them on each rank. A device so holds 1/N of the weights read so far plus
the one parameter being partitioned; the other ranks read nothing.

This differs from transformers' ZeRO-3 loading (build under ``zero.Init``, then fill each module inside
``zero.GatheredParameters(modifier_rank=0)``, ``transformers/integrations/deepspeed.py``) in three ways
that matter here: nothing is randomly initialised first (the global RNG, which LoRA's init draws from
next, is left as the unpartitioned load leaves it, so both train alike), each weight crosses the
network once instead of three times (init broadcast, gather, broadcast back), and the init code of
transformers' models never runs on partitioned tensors (their ``post_init`` indexes the padding row of an
embedding that ZeRO-3 has emptied).

``deepspeed.initialize`` accepts the result as a model "built under zero.Init": it does not move it and
partitions only what was added since (LoRA adapters), with the same broadcast from rank 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from xtuner_vl.engine.deepspeed_backend import import_deepspeed

if TYPE_CHECKING:  # the recipe opens the checkpoint (xtuner_vl.model.loader.open_checkpoint) and passes it in
    from xtuner_vl.model.loader import CheckpointStream

__all__ = ["load_partitioned", "prepare_for_engine", "full_numel", "full_shape", "is_partitioned"]


def is_partitioned(p: torch.Tensor) -> bool:
    """Whether ``p`` is a ZeRO-3 parameter (its ``data`` is this rank's slice, or empty)."""
    return hasattr(p, "ds_id")


def full_shape(p: torch.Tensor) -> torch.Size:
    """The shape of ``p`` before ZeRO-3 partitioned it (its own shape otherwise)."""
    return p.ds_shape if is_partitioned(p) else p.shape


def full_numel(p: torch.Tensor) -> int:
    """The element count of ``p`` before ZeRO-3 partitioned it (its own count otherwise)."""
    return p.ds_numel if is_partitioned(p) else p.numel()


def _init_comm(deepspeed: Any, device: torch.device) -> None:
    # With several ranks the process group exists (engine/dist.py) and DeepSpeed adopts it; alone, DeepSpeed
    # creates it from the environment init_distributed filled. DeepSpeedBackend makes the same call later.
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def _partition_tensor(
    deepspeed: Any,
    model: nn.Module,
    key: str,
    tensor: torch.Tensor | None,
    ds_config: Mapping[str, Any],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Replace the meta entry ``key`` of ``model`` by a partitioned parameter holding rank 0's ``tensor``
    (None on the other ranks), or by a full buffer broadcast from rank 0."""
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    meta = module._parameters[name] if name in module._parameters else module._buffers[name]
    target = dtype if meta.is_floating_point() else meta.dtype
    if tensor is not None:
        data = tensor.to(device=device, dtype=target)
    else:
        data = torch.empty(meta.shape, dtype=target, device=device)
    if name not in module._parameters:  # a buffer: replicated on every rank, as ZeRO-3 keeps buffers
        dist.broadcast(data, src=0)
        module._buffers[name] = data
        return
    param = module._parameters[name] = nn.Parameter(data, requires_grad=meta.requires_grad)
    holder = nn.Module()  # Init(module=...) partitions every parameter of the module it is given: only this one
    holder.register_parameter("weight", param)
    deepspeed.zero.Init(module=holder, config_dict_or_path=dict(ds_config), dtype=dtype)


def load_partitioned(
    stream: CheckpointStream, ds_config: Mapping[str, Any], dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """Load ``stream`` as a ZeRO-3 partitioned model (see the module docstring).

    Args:
        stream: the checkpoint opened by :func:`xtuner_vl.model.loader.open_checkpoint`, which has already
            refused a bad one (missing or unexpected keys, shapes) with the errors of ``load_internvl``.
        ds_config: the completed DeepSpeed config of the run (its ZeRO-3 settings place the partitions, e.g.
            ``offload_param`` on the CPU).
        dtype: dtype of every floating weight.
        device: this rank's training device.

    Returns:
        ``stream.model`` in eval mode, every checkpoint parameter partitioned, buffers full on ``device``.
    """
    deepspeed = import_deepspeed(device)
    _init_comm(deepspeed, device)
    reads = dist.get_rank() == 0
    for key, tensor in stream.tensors(dtype, read=reads):
        _partition_tensor(deepspeed, stream.model, key, tensor, ds_config, dtype, device)
    return stream.finish(device)


def prepare_for_engine(model: nn.Module, ds_config: Mapping[str, Any]) -> None:
    """Cast the parameters added after a partitioned load (LoRA adapters, which peft keeps in fp32) to bf16
    when the run trains in bf16: ``deepspeed.initialize`` does that cast only for a model it partitions
    itself (deepspeed/runtime/engine.py, ``_configure_distributed_model``), so the adapters would otherwise
    train in fp32 where the unpartitioned load trains them in bf16."""
    if (ds_config.get("bf16") or {}).get("enabled") is not True:
        return
    for p in model.parameters():
        if not is_partitioned(p) and p.is_floating_point() and p.dtype != torch.bfloat16:
            p.data = p.data.to(torch.bfloat16)
