"""Load an official InternVL directory without importing or executing any file from it.

:func:`load_internvl` reads the whole state dict and assigns it. :func:`open_checkpoint` and
:func:`stream_into` load one tensor at a time into a meta-device skeleton instead, with a hook that
decides where each tensor goes; the training recipes use it to quantize QLoRA weights as they are read,
and the engine to partition ZeRO-3 weights as they are read (``xtuner_vl/engine/zero3_load.py``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig

from xtuner_vl.model.attention import default_attn_implementation
from xtuner_vl.model.configuration import InternVLConfig, read_config
from xtuner_vl.model.internvl import InternVLChatModel, official_state_dict
from xtuner_vl.model.tokenizer import img_context_token_id as tokenizer_img_context_id
from xtuner_vl.model.tokenizer import load_tokenizer
from xtuner_vl.model.weights import read_state_dict, read_tensors, tensor_shapes, weight_files

__all__ = [
    "load_internvl",
    "build_empty_model",
    "materialize_buffers",
    "CheckpointStream",
    "open_checkpoint",
    "stream_into",
    "PlaceTensor",
]

# Called with (module owning the tensor, its attribute name, the tensor as read and cast, on the CPU);
# returns True when it placed the tensor itself, False to let the loader assign it on the device.
PlaceTensor = Callable[[nn.Module, str, torch.Tensor], bool]

logger = logging.getLogger(__name__)

# Buffers some old checkpoints saved although current code recomputes them.
_RECOMPUTED_SUFFIXES = ("rotary_emb.inv_freq",)


def build_empty_model(
    config: InternVLConfig, img_context_token_id: int | None = None, attn_implementation: str | None = None
) -> InternVLChatModel:
    """The model skeleton on the meta device: no memory, no random init (8B builds instantly)."""
    with torch.device("meta"):
        return InternVLChatModel.from_config(
            config, img_context_token_id, attn_implementation or default_attn_implementation()
        )


def materialize_buffers(model: nn.Module) -> None:
    """Recreate modules whose non-persistent buffers (rotary tables) were left on the meta device."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if not name.endswith("rotary_emb") or not hasattr(module, "config"):
            raise RuntimeError(f"module {name} ({type(module).__name__}) has buffers no checkpoint provides")
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, type(module)(config=module.config))


def _check_weights(
    path: Path, config: InternVLConfig, expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]]
) -> None:
    """Refuse a checkpoint whose keys or shapes (``found``) differ from the model's (``expected``)."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match config.json "
            f"({config.llm_arch}, {config.vision.num_hidden_layers} ViT layers): "
            f"{len(missing)} missing (e.g. {missing[:5]}), {len(unexpected)} unexpected (e.g. {unexpected[:5]})"
        )
    shapes = [(k, tuple(found[k]), tuple(v)) for k, v in expected.items() if tuple(found[k]) != tuple(v)]
    if shapes:
        raise ValueError(f"{path}: weight shapes differ from config.json, e.g. (key, file, config) {shapes[:5]}")


def _read_config(path: Path) -> InternVLConfig:
    config = read_config(path)
    if config.use_backbone_lora or config.use_llm_lora:
        raise ValueError(
            f"{path / 'config.json'}: use_backbone_lora={config.use_backbone_lora}, "
            f"use_llm_lora={config.use_llm_lora}; "
            "this directory holds unmerged LoRA weights; merge them with `xtuner-vl convert` first"
        )
    return config


def _set_generation_config(model: InternVLChatModel, path: Path) -> None:
    if (path / "generation_config.json").is_file():
        model.language_model.generation_config = GenerationConfig.from_pretrained(str(path))


def load_internvl(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    img_context_token_id: int | None = None,
    attn_implementation: str | None = None,
    device: str | torch.device = "cpu",
) -> InternVLChatModel:
    """Load an official InternVL 1.5 / 2 release directory as an :class:`InternVLChatModel`.

    Args:
        path: directory holding config.json and the safetensors shards (or ``.bin`` files).
        dtype: dtype of every floating weight.
        img_context_token_id: id of ``<IMG_CONTEXT>``; read from the directory's tokenizer if None.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``; default: flash-attention 2
            on a GPU machine where it is installed, else SDPA.
        device: where the weights are placed.

    Returns:
        The model in eval mode. Nothing from the directory is imported or executed.
    """
    path = Path(path)
    config = _read_config(path)
    if img_context_token_id is None:
        img_context_token_id = tokenizer_img_context_id(load_tokenizer(path))
    model = build_empty_model(config, img_context_token_id, attn_implementation)
    state = read_state_dict(path, dtype)
    for key in [k for k in state if k.endswith(_RECOMPUTED_SUFFIXES)]:
        del state[key]
    expected = {k: v.shape for k, v in official_state_dict(model).items()}
    _check_weights(path, config, expected, {k: v.shape for k, v in state.items()})
    # Not strict: a tied head is not in the file (checked above); it becomes the loaded embedding again.
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    materialize_buffers(model)
    _set_generation_config(model, path)
    return model.to(device).eval()


@dataclass
class CheckpointStream:
    """An official checkpoint opened for loading one tensor at a time into ``model``, a meta-device skeleton
    whose keys and shapes were checked against the files' headers (:func:`open_checkpoint`)."""

    path: Path
    model: InternVLChatModel
    # (file, key) of every tensor to load, largest first: the largest tensors, which are held whole for a
    # moment (read, or broadcast to be partitioned), come while little else has been loaded yet.
    order: list[tuple[Path, str]]

    def tensors(self, dtype: torch.dtype, read: bool = True) -> Iterator[tuple[str, torch.Tensor | None]]:
        """``(key, tensor)`` in :attr:`order`, floating tensors cast to ``dtype``, one in memory at a time.

        ``read=False`` yields ``(key, None)`` in the same order without reading anything: ranks that only
        receive a broadcast still walk the keys in step with the rank that reads.
        """
        if not read:
            yield from ((key, None) for _, key in self.order)
            return
        for key, tensor in read_tensors(self.order):
            yield key, tensor.to(dtype) if tensor.is_floating_point() else tensor

    def finish(self, device: str | torch.device) -> InternVLChatModel:
        """Recompute the buffers no checkpoint holds (rotary tables) and place every buffer on ``device``;
        the generation config of the directory; eval mode. Parameters are left where they were put; a tied
        output head (never in the files) becomes the loaded embedding's Parameter."""
        self.model.tie_weights()
        materialize_buffers(self.model)
        for module in self.model.modules():
            for name, buf in list(module._buffers.items()):
                if buf is not None:
                    module._buffers[name] = buf.to(device)
        _set_generation_config(self.model, self.path)
        return self.model.eval()


def open_checkpoint(
    path: str | Path, img_context_token_id: int | None = None, attn_implementation: str | None = None
) -> CheckpointStream:
    """Open an official directory for :func:`stream_into` (or a partitioned load): its config, the meta
    skeleton, and the keys and shapes of its weight files checked from their headers before any tensor is
    read, with the errors of :func:`load_internvl`. Arguments as :func:`load_internvl`."""
    path = Path(path)
    config = _read_config(path)
    if img_context_token_id is None:
        img_context_token_id = tokenizer_img_context_id(load_tokenizer(path))
    model = build_empty_model(config, img_context_token_id, attn_implementation)
    found, order = {}, []
    for file in weight_files(path):
        shapes = {k: v for k, v in tensor_shapes(file).items() if not k.endswith(_RECOMPUTED_SUFFIXES)}
        twice = sorted(set(shapes) & set(found))
        if twice:
            raise ValueError(f"{file}: key {twice[0]!r} appears in two weight files")
        found.update(shapes)
        order += [(file, key) for key in shapes]
    _check_weights(path, config, {k: v.shape for k, v in official_state_dict(model).items()}, found)
    order.sort(key=lambda item: -math.prod(found[item[1]]))  # stable: file order among equal sizes
    return CheckpointStream(path, model, order)


def _owner_of(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    """The module holding state-dict entry ``key`` and the entry's attribute name in it."""
    module_name, _, name = key.rpartition(".")
    return model.get_submodule(module_name), name


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Make ``tensor`` the parameter (keeping its ``requires_grad``) or buffer ``name`` of ``module``, as
    ``load_state_dict(assign=True)`` does."""
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(tensor, requires_grad=module._parameters[name].requires_grad)
    else:
        module._buffers[name] = tensor


def stream_into(
    stream: CheckpointStream, dtype: torch.dtype, device: str | torch.device, place: PlaceTensor | None = None
) -> InternVLChatModel:
    """Load ``stream`` tensor by tensor onto ``device``: host memory holds one tensor at a time and the device
    only what has been placed. ``place`` may take over any tensor (see :data:`PlaceTensor`)."""
    for key, tensor in stream.tensors(dtype):
        module, name = _owner_of(stream.model, key)
        if place is None or not place(module, name, tensor):
            _assign(module, name, tensor.to(device))
    return stream.finish(device)
