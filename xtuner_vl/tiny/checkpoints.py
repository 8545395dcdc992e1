"""Tiny random checkpoints in exactly the official InternVL on-disk format, one per release family.

Same config.json fields, key names, dtype (bf16) and tokenizer files as the real releases; only the
sizes are tiny (ViT hidden 32, LLM hidden 64, 2 layers each) and the tokenizer is trained locally.
Tiles stay 448px / patch 14, so every tile still gives 256 image tokens.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch

from xtuner_vl.model.configuration import InternVLConfig
from xtuner_vl.model.internvl import InternVLChatModel
from xtuner_vl.model.loader import build_empty_model, materialize_buffers
from xtuner_vl.model.saver import save_official
from xtuner_vl.model.tokenizer import img_context_token_id, load_tokenizer
from xtuner_vl.tiny.families import TINY_FAMILIES
from xtuner_vl.tiny.tokenizers import write_tiny_tokenizer

__all__ = ["TINY_FAMILIES", "make_tiny"]


def _top_level(vision: dict, llm: dict, overrides: dict) -> dict[str, Any]:
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": 448,
        "llm_config": llm,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "model_type": "internvl_chat",
        "pad2square": False,
        "select_layer": -1,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.37.2",
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
        "vision_config": vision,
        **overrides,
    }


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights with O(1) activations and logits, so a wrong wiring shows far above fp32 noise."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith(("ls1", "ls2")):
            p.copy_(0.5 + 0.1 * noise)
        elif p.dim() == 1 and ("norm" in name or name.startswith("mlp1.0")):
            p.copy_(1.0 + 0.1 * noise) if name.endswith("weight") else p.copy_(0.1 * noise)
        elif p.dim() == 1:
            p.copy_(0.05 * noise)
        elif "embed" in name or "embedding" in name:
            p.copy_(noise if p.dim() != 4 else noise / math.sqrt(p[0].numel()))
        else:
            p.copy_(noise / math.sqrt(p.shape[-1] if p.dim() == 2 else p[0].numel()))


def _special_ids(tokenizer, llm: dict) -> dict[str, int]:
    """bos/eos/pad ids of the real config, re-pointed at the same tokens of the tiny vocabulary."""
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if llm["architectures"][0] in (
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
    ):  # bos <|endoftext|>, eos <|im_end|>
        ids["bos_token_id"] = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        ids["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return {k: v for k, v in ids.items() if k in llm and v is not None}


def make_tiny(
    family: str,
    out_dir: str | Path,
    seed: int = 0,
    logit_scale: float = 1.0,
    llm_overrides: dict[str, Any] | None = None,
    **overrides: Any,
) -> Path:
    """Write a tiny random checkpoint of ``family`` (a key of :data:`TINY_FAMILIES`) to ``out_dir``.

    ``overrides`` replace top-level config.json fields (e.g. ``ps_version="v1"``, ``select_layer=-2``),
    ``llm_overrides`` fields of ``llm_config`` (e.g. ``tie_word_embeddings=True``).
    ``logit_scale`` multiplies the LLM's final norm weight. At 1 the logits are O(1), which is what the
    equivalence tests want; but then a frozen norm and head cap the probability of any token well
    below 1 (a logit range of about 8 against a vocabulary of ~650), so LoRA, which leaves both frozen,
    learns slowly. Real checkpoints have logits spanning tens; the demo uses 8.
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(TINY_FAMILIES)}")
    tok_family, vision, llm, top = TINY_FAMILIES[family]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tiny_tokenizer(tok_family, out)
    tokenizer = load_tokenizer(out)
    llm = {**copy.deepcopy(llm), "vocab_size": vocab_size, **_special_ids(tokenizer, llm), **(llm_overrides or {})}
    raw = _top_level(copy.deepcopy(vision), llm, {**top, **overrides})
    config = InternVLConfig.from_dict(raw)
    model = InternVLChatModel.from_config(config, img_context_token_id(tokenizer))
    _randomize(model, seed)
    with torch.no_grad():
        model.language_model.model.norm.weight.mul_(logit_scale)
    save_official(model, out, dtype=torch.bfloat16)
    eos = [llm["eos_token_id"]] + [
        i for i in [tokenizer.convert_tokens_to_ids("<|im_end|>")] if i != tokenizer.unk_token_id
    ]
    generation = {"eos_token_id": sorted(set(eos)), "transformers_version": "4.37.2"}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out


def random_model(
    config: InternVLConfig,
    context_token_id: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    attn_implementation: str | None = None,
) -> InternVLChatModel:
    """Any architecture (e.g. a shipped release config) with random weights straight on ``device``: for
    benchmarks that need a real model's shape and no checkpoint. Same initialisation as :func:`make_tiny`."""
    model = build_empty_model(config, context_token_id, attn_implementation).to_empty(device=device)
    _randomize(model, seed)
    materialize_buffers(model)
    return model.to(dtype=dtype)
