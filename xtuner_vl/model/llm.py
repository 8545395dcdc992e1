"""Build the language model of an InternVL checkpoint from its ``llm_config`` dict.

Phi-3, Qwen2 and Llama run on transformers' own classes; InternLM2 on :mod:`xtuner_vl.model.internlm2`.
Only the in-memory config is translated (e.g. Phi-3's ``su`` rope to transformers' ``longrope``);
the on-disk dict is never rewritten.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from xtuner_vl.model.internlm2 import InternLM2ForCausalLM, internlm2_llama_config
from xtuner_vl.model.loss import OutputHead

__all__ = ["build_llm", "build_llm_config", "LORA_TARGETS"]

# Keys that describe how a config was produced or loaded, never the architecture.
_BOOKKEEPING = {
    "architectures",
    "auto_map",
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "attn_implementation",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "model_type",
    "tie_word_embeddings",
    "use_flash_attn",
}

# Official LoRA target modules per LLM architecture (InternVLChatModel.wrap_llm_lora).
LORA_TARGETS = {
    "InternLM2ForCausalLM": ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"],
    "Phi3ForCausalLM": ["mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj"],
    "Qwen2ForCausalLM": [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.down_proj",
        "mlp.up_proj",
    ],
}
LORA_TARGETS["LlamaForCausalLM"] = LORA_TARGETS["Qwen2ForCausalLM"]


def _phi3_config(d: dict[str, Any]) -> Phi3Config:
    rope = d.pop("rope_scaling", None)
    if rope is not None:
        rope = dict(rope)
        kind = rope.pop("type", rope.pop("rope_type", None))
        if kind not in ("su", "longrope"):
            # 'yarn' in the official Phi-3 code uses another attention factor than transformers' longrope.
            raise ValueError(f"Phi-3 rope_scaling type {kind!r} is not supported (supported: su / longrope)")
        rope["rope_type"] = "longrope"
        original = rope.setdefault("original_max_position_embeddings", d.get("original_max_position_embeddings", 4096))
        # The official attention factor uses max_position_embeddings / original (transformers' own default).
        rope.setdefault("factor", d.get("max_position_embeddings", original) / original)
        rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    return Phi3Config(**d, rope_parameters=rope, tie_word_embeddings=False)


def build_llm_config(llm_config: dict[str, Any], attn_implementation: str = "sdpa") -> PretrainedConfig:
    """The transformers config object for ``llm_config`` (an official ``llm_config`` dict)."""
    arch = llm_config["architectures"][0]
    if arch == "InternLM2ForCausalLM":
        cfg = internlm2_llama_config(llm_config)
    else:
        d = {k: v for k, v in copy.deepcopy(llm_config).items() if k not in _BOOKKEEPING}
        if arch == "Phi3ForCausalLM":
            cfg = _phi3_config(d)
        elif arch == "Qwen2ForCausalLM":
            cfg = Qwen2Config(**d, tie_word_embeddings=False)
        elif arch == "LlamaForCausalLM":
            cfg = LlamaConfig(**d, tie_word_embeddings=False)
        else:
            raise ValueError(f"unsupported LLM architecture {arch!r}")
        cfg.architectures = [arch]
    cfg._attn_implementation = attn_implementation
    return cfg


def build_llm(llm_config: dict[str, Any], attn_implementation: str = "sdpa") -> PreTrainedModel:
    """An untrained LLM of the architecture ``llm_config`` names (weights are loaded afterwards)."""
    cfg = build_llm_config(llm_config, attn_implementation)
    cls = {
        "InternLM2ForCausalLM": InternLM2ForCausalLM,
        "Phi3ForCausalLM": Phi3ForCausalLM,
        "Qwen2ForCausalLM": Qwen2ForCausalLM,
        "LlamaForCausalLM": LlamaForCausalLM,
    }[cfg.architectures[0]]
    model = cls(cfg)
    # The training loss runs inside the head's forward (see xtuner_vl.model.loss); same weights and keys.
    OutputHead.adopt(model.get_output_embeddings())
    return model
