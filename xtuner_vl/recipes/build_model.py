"""Load the model for training and apply the method: freezing, LoRA, QLoRA, checkpointing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from xtuner_vl.adapters import apply_freeze, apply_lora
from xtuner_vl.adapters.qlora import nf4_loader, quantize_llm_nf4
from xtuner_vl.engine.deepspeed_config import zero_stage
from xtuner_vl.model import InternVLChatModel, load_internvl
from xtuner_vl.model.intern_vit import set_drop_path_rate
from xtuner_vl.model.loader import open_checkpoint, stream_into
from xtuner_vl.recipes.settings import ModelSettings

__all__ = ["resolve_dtype", "build_train_model", "apply_method"]

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` = bf16 on CUDA, fp32 on CPU (the dtype of weights, autocast and DeepSpeed alike)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"model.dtype must be auto, bf16 or fp32, got {name!r}")
    return _DTYPES[name]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _check_method(s: ModelSettings) -> None:
    """Refuse contradictory method settings before anything is loaded or changed."""
    if s.unfreeze_vit_layers and s.vit_lora_rank:
        raise ValueError(
            "unfreeze_vit_layers and vit_lora_rank: those layers' linears would train both fully and "
            "through LoRA; use one of them"
        )
    if s.quantize_llm and not s.llm_lora_rank:
        raise ValueError("quantize_llm (QLoRA) needs llm_lora_rank > 0: 4-bit weights cannot be trained")


def build_train_model(
    s: ModelSettings, device: torch.device, ds_config: Mapping[str, Any] | None = None
) -> InternVLChatModel:
    """The model ready for the optimizer: frozen weights in the load dtype (bf16 stays bf16);
    trainable full weights in fp32 when training without DeepSpeed bf16 (see the backends).

    How the weights arrive depends on the run: with a ZeRO-3 ``ds_config`` (the completed DeepSpeed config)
    each parameter is partitioned across the ranks as it is read (``engine/zero3_load.py``); with QLoRA each
    LLM linear is quantized to nf4 on ``device`` as it is read; otherwise the whole model is loaded on
    ``device``. All three give the same model.
    """
    _check_method(s)
    dtype = resolve_dtype(s.dtype, device)
    if ds_config is not None and zero_stage(dict(ds_config)) == 3:
        from xtuner_vl.engine.zero3_load import load_partitioned, prepare_for_engine

        stream = open_checkpoint(s.path, attn_implementation=s.attn_implementation)
        model = load_partitioned(stream, ds_config, dtype, device)
        model = apply_method(model, s, dtype)
        prepare_for_engine(model, ds_config)
        return model
    if s.quantize_llm:
        stream = open_checkpoint(s.path, attn_implementation=s.attn_implementation)
        place = nf4_loader(stream.model.language_model, _compute_dtype(dtype), device)
        return apply_method(stream_into(stream, dtype, device, place), s, dtype)
    model = load_internvl(s.path, dtype=dtype, attn_implementation=s.attn_implementation, device=device)
    return apply_method(model, s, dtype)


def apply_method(
    model: InternVLChatModel, s: ModelSettings, dtype: torch.dtype, quantize: bool = True
) -> InternVLChatModel:
    """Apply the training method of ``s`` to ``model``: drop path, freezing, QLoRA, LoRA, checkpointing.

    ``quantize=False`` skips the nf4 quantization (bitsandbytes cannot quantize meta tensors) but keeps
    every other step, so ``xtuner-vl estimate`` sees the same trainable parameters as training.
    """
    _check_method(s)
    if s.drop_path_rate is not None:
        set_drop_path_rate(model.vision_model, s.drop_path_rate)
    apply_freeze(model, s.freeze_vit, s.freeze_mlp, s.freeze_llm, s.unfreeze_vit_layers, s.unfreeze_lm_head)
    if s.quantize_llm:
        if quantize:  # a no-op where the loader already quantized the layers (build_train_model)
            quantize_llm_nf4(model.language_model, compute_dtype=_compute_dtype(dtype))
    if s.llm_lora_rank or s.vit_lora_rank:
        apply_lora(model, s.llm_lora_rank, s.vit_lora_rank, s.lora_alpha, s.lora_dropout, s.llm_lora_targets)
        # peft freezes everything it wraps but the adapters; an explicit unfreeze_lm_head still holds (the
        # official script sets `lm_head.requires_grad` before wrapping, where it has no effect).
        if s.unfreeze_lm_head:
            model.language_model.get_output_embeddings().requires_grad_(True)
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(vit=not s.freeze_vit or bool(s.vit_lora_rank) or s.unfreeze_vit_layers > 0)
    return model.train()
