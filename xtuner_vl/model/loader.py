"""Load an official InternVL directory without importing or executing any file from it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig

from xtuner_vl.model.attention import default_attn_implementation
from xtuner_vl.model.configuration import InternVLConfig, read_config
from xtuner_vl.model.internvl import InternVLChatModel
from xtuner_vl.model.tokenizer import img_context_token_id as tokenizer_img_context_id
from xtuner_vl.model.tokenizer import load_tokenizer
from xtuner_vl.model.weights import read_state_dict

__all__ = ["load_internvl", "build_empty_model", "materialize_buffers"]

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
    config = read_config(path)
    if config.use_backbone_lora or config.use_llm_lora:
        raise ValueError(
            f"{path / 'config.json'}: use_backbone_lora={config.use_backbone_lora}, "
            f"use_llm_lora={config.use_llm_lora}; "
            "this directory holds unmerged LoRA weights; merge them with `xtuner-vl convert` first"
        )
    if img_context_token_id is None:
        img_context_token_id = tokenizer_img_context_id(load_tokenizer(path))
    model = build_empty_model(config, img_context_token_id, attn_implementation)
    state = read_state_dict(path, dtype)
    for key in [k for k in state if k.endswith(_RECOMPUTED_SUFFIXES)]:
        del state[key]
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match config.json "
            f"({config.llm_arch}, {config.vision.num_hidden_layers} ViT layers): "
            f"{len(missing)} missing (e.g. {missing[:5]}), {len(unexpected)} unexpected (e.g. {unexpected[:5]})"
        )
    shapes = [
        (k, tuple(state[k].shape), tuple(v.shape)) for k, v in model.state_dict().items() if state[k].shape != v.shape
    ]
    if shapes:
        raise ValueError(f"{path}: weight shapes differ from config.json, e.g. (key, file, config) {shapes[:5]}")
    model.load_state_dict(state, strict=True, assign=True)
    materialize_buffers(model)
    if (path / "generation_config.json").is_file():
        model.language_model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model.to(device).eval()
