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
from xtuner_vl.tiny.tokenizers import write_tiny_tokenizer

__all__ = ["TINY_FAMILIES", "make_tiny"]

_VIT_300M = {  # InternViT-300M-448px shape: layer_norm, qkv bias, no qk-norm
    "architectures": ["InternVisionModel"],
    "model_type": "intern_vit_6b",
    "attention_dropout": 0.0,
    "drop_path_rate": 0.0,
    "dropout": 0.0,
    "hidden_act": "gelu",
    "hidden_size": 32,
    "image_size": 448,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-06,
    "norm_type": "layer_norm",
    "num_attention_heads": 2,
    "num_channels": 3,
    "num_hidden_layers": 2,
    "patch_size": 14,
    "qk_normalization": False,
    "qkv_bias": True,
    "torch_dtype": "bfloat16",
    "use_flash_attn": True,
}
_VIT_6B = {
    **_VIT_300M,
    "norm_type": "rms_norm",
    "qk_normalization": True,
    "qkv_bias": False,
    "initializer_factor": 0.1,
    "num_hidden_layers": 3,
}

_LLM_COMMON = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "initializer_range": 0.02,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.37.2",
    "use_cache": True,
    "tie_word_embeddings": False,
}
_INTERNLM2 = {
    **_LLM_COMMON,
    "architectures": ["InternLM2ForCausalLM"],
    "model_type": "internlm2",
    "auto_map": {
        "AutoConfig": "configuration_internlm2.InternLM2Config",
        "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
        "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
    },
    "attn_implementation": "eager",
    "bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 1000000,
}
_INTERNLM2_5 = {**_INTERNLM2, "max_position_embeddings": 256, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
_PHI3 = {
    **_LLM_COMMON,
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "num_key_value_heads": 4,
    "attention_dropout": 0.0,
    "embd_pdrop": 0.0,
    "resid_pdrop": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "original_max_position_embeddings": 256,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 262144,
    "rope_scaling": {
        "type": "su",
        "short_factor": [1.0 + 0.05 * i for i in range(8)],
        "long_factor": [1.0 + 1.5 * i for i in range(8)],
    },
}
_QWEN2 = {
    **_LLM_COMMON,
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "use_sliding_window": False,
}
# Qwen2.5-Instruct as InternVL2.5 / 3 store it: the official internvl_chat config class forces an untied head.
_QWEN2_5 = {**_QWEN2, "max_window_layers": 24}
# Qwen3 (InternVL3.5): q/k RMS norms, head_dim set apart from hidden / heads (here 32, not 16), tied head as in
# Qwen3-0.6B's own config (the 3.5 code reads tie_word_embeddings from llm_config).
_QWEN3 = {
    **_LLM_COMMON,
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "use_sliding_window": False,
    "tie_word_embeddings": True,
}
# Qwen3-MoE (InternVL3.5-30B-A3B / 241B-A28B): Qwen3 attention, every layer a sparse block of 4 experts (2 per
# token), the fields of Qwen3-30B-A3B's config (router_aux_loss_coef 0.001, output_router_logits false, untied).
_QWEN3_MOE = {
    **_QWEN3,
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "moe_intermediate_size": 48,
    "norm_topk_prob": True,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "tie_word_embeddings": False,
}
# GPT-OSS (InternVL3.5-GPT-OSS-20B-A4B): attention with biases and a learned sink per head, sliding-window layers
# alternating with full ones, yarn rope, 4 fused experts with biases (2 per token); the fields of gpt-oss-20b's config
# (https://huggingface.co/openai/gpt-oss-20b/blob/main/config.json) at toy sizes, the window shortened to 8 tokens
# so that it cuts into short test sequences.
_GPT_OSS = {
    **_LLM_COMMON,
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "eos_token_id": 0,  # re-pointed at the tiny vocabulary's <|return|> and <|endoftext|> (see _special_ids)
    "pad_token_id": 0,
    "attention_bias": True,
    "attention_dropout": 0.0,
    "experts_per_token": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "initial_context_length": 4096,
    "intermediate_size": 48,
    "layer_types": ["sliding_attention", "full_attention"],
    "max_position_embeddings": 131072,
    "num_experts_per_tok": 2,
    "num_local_experts": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 8,
    "swiglu_limit": 7.0,
}
_LLAMA = {
    **_LLM_COMMON,
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 7,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "rope_theta": 5000000.0,
    "rope_scaling": None,
    "pretraining_tp": 1,
}

# name -> (tokenizer family, vision config, llm config, top-level overrides); the releases' config.json files
# (model cards of OpenGVLab/InternVL2-*, Mini-InternVL-Chat-*-V1-5, InternVL-Chat-V1-5, InternVL2_5-1B,
# InternVL3_5-1B, InternVL3_5-30B-A3B, InternVL3_5-GPT-OSS-20B-A4B) at toy sizes.
TINY_FAMILIES: dict[str, tuple[str, dict, dict, dict]] = {
    "mini-internvl-chat-2b-v1-5": (
        "internlm2",
        _VIT_300M,
        _INTERNLM2,
        {"template": "internlm2-chat", "ps_version": "v2"},
    ),
    "mini-internvl-chat-4b-v1-5": ("phi3", _VIT_300M, _PHI3, {"template": "phi3-chat", "ps_version": "v2"}),
    "internvl-chat-v1-5": ("internlm2", _VIT_6B, _INTERNLM2, {"template": "internlm2-chat", "ps_version": "v1"}),
    "internvl2-1b": ("qwen2", _VIT_300M, _QWEN2, {"template": "Hermes-2", "ps_version": "v2"}),
    "internvl2-2b": ("internlm2", _VIT_300M, _INTERNLM2, {"template": "internlm2-chat", "ps_version": "v2"}),
    "internvl2-4b": ("phi3", _VIT_300M, _PHI3, {"template": "phi3-chat", "ps_version": "v2"}),
    "internvl2-8b": ("internlm2", _VIT_300M, _INTERNLM2_5, {"template": "internlm2-chat", "ps_version": "v2"}),
    "internvl2-26b": ("internlm2", _VIT_6B, _INTERNLM2, {"template": "internlm2-chat", "ps_version": "v2"}),
    "internvl2-40b": ("llama", _VIT_6B, _LLAMA, {"template": "Hermes-2", "ps_version": "v2"}),
    # InternViT-300M-448px-V2_5 has the 300M shape. Top-level tie_word_embeddings mirrors llm_config's, as the
    # official InternVLChatConfig of each release writes it.
    "internvl2_5-1b": (
        "qwen2",
        _VIT_300M,
        _QWEN2_5,
        {"template": "internvl2_5", "ps_version": "v2", "tie_word_embeddings": False},
    ),
    "internvl3_5-1b": (
        "qwen2",
        _VIT_300M,
        _QWEN3,
        {"template": "internvl2_5", "ps_version": "v2", "tie_word_embeddings": True},
    ),
    "internvl3_5-30b-a3b": (
        "qwen2",
        _VIT_300M,
        _QWEN3_MOE,
        {"template": "internvl2_5", "ps_version": "v2", "tie_word_embeddings": False},
    ),
    "internvl3_5-gpt-oss-20b-a4b": (
        "gpt_oss",
        _VIT_300M,
        _GPT_OSS,
        {"template": "internvl3_5_gpt_oss", "ps_version": "v2", "tie_word_embeddings": False},
    ),
}


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
