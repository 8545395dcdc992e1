"""Build the language model of an InternVL checkpoint from its ``llm_config`` dict.

Phi-3, Qwen2 (Qwen2 and Qwen2.5), Qwen3, Qwen3-MoE, GPT-OSS and Llama run on transformers' own classes (Qwen3-MoE
with per-expert linears, :mod:`xtuner_vl.model.moe`); InternLM2 on :mod:`xtuner_vl.model.internlm2`. Only the
in-memory config is translated (e.g. Phi-3's ``su`` rope to transformers' ``longrope``); the on-disk dict is never
rewritten.

``tie_word_embeddings`` is read from ``llm_config`` for the transformers-native families, as the InternVL 3.5
code does (OpenGVLab/InternVL ``internvl_chat_gpt_oss/internvl/model/internvl_chat/configuration_internvl_chat.py``
builds ``Qwen3Config(**llm_config)``): a tied checkpoint stores no output head, and transformers' own tying
makes the head's weight the embedding's Parameter. The InternVL 1.5 / 2 / 2.5 / 3 code forces it off
(``internvl_chat/internvl/model/internvl_chat/configuration_internvl_chat.py``), and their config.json files
say so.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import (
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from xtuner_vl.model.internlm2 import InternLM2ForCausalLM, internlm2_llama_config
from xtuner_vl.model.loss import OutputHead
from xtuner_vl.model.moe import use_expert_linears

__all__ = ["build_llm", "build_llm_config", "is_tied", "LORA_TARGETS"]

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

# Official LoRA target modules per LLM architecture (InternVLChatModel.wrap_llm_lora,
# internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py). The InternVL 3.5 code has no
# wrap_llm_lora (its shell/internvl3_5_qwen3 scripts train everything); Qwen3 layers have Qwen2's module
# names, so Qwen3 takes Qwen2's list.
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
LORA_TARGETS["Qwen3ForCausalLM"] = LORA_TARGETS["Qwen2ForCausalLM"]
_ATTENTION_TARGETS = [t for t in LORA_TARGETS["Qwen2ForCausalLM"] if t.startswith("self_attn.")]
# Qwen3-MoE: attention, and every expert's linears ("gate_proj" matches mlp.experts.E.gate_proj, and the dense
# mlp.gate_proj of any mlp_only_layers); the router (mlp.gate) is a bare weight and stays out.
LORA_TARGETS["Qwen3MoeForCausalLM"] = [*_ATTENTION_TARGETS, "gate_proj", "up_proj", "down_proj"]

# GPT-OSS (InternVL3.5-GPT-OSS-20B-A4B): attention, and both fused 3-D expert weights (transformers 4.55 and 5 alike,
# as the checkpoint stores them), which are parameters, not linears: peft adapts them through its target_parameters
# (`peft.tuners.lora.layer.ParamWrapper`), and apply_lora sends every target that names a parameter there. The router
# (mlp.router) stays out, as Qwen3-MoE's does.
LORA_TARGETS["GptOssForCausalLM"] = [*_ATTENTION_TARGETS, "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

# GPT-OSS attention adds a learned sink logit per head to the softmax, which SDPA, flash-attention 2 and torch's varlen
# kernel do not compute; transformers' eager attention does (so does its flex attention, not offered here: it could
# not be checked on CPU), so GPT-OSS runs on eager attention whatever is asked for (build_llm_config).

# transformers-native families: architecture name -> (config class, model class).
_NATIVE = {
    "Qwen2ForCausalLM": (Qwen2Config, Qwen2ForCausalLM),
    "Qwen3ForCausalLM": (Qwen3Config, Qwen3ForCausalLM),
    "Qwen3MoeForCausalLM": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
    "GptOssForCausalLM": (GptOssConfig, GptOssForCausalLM),
    "LlamaForCausalLM": (LlamaConfig, LlamaForCausalLM),
}


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


def is_tied(llm_config: dict[str, Any]) -> bool:
    """Whether ``llm_config`` ties the output head to the input embedding (then no head is stored).

    Only the transformers-native families honour it; InternLM2 and Phi-3 releases are never tied.
    """
    return llm_config["architectures"][0] in _NATIVE and bool(llm_config.get("tie_word_embeddings", False))


def build_llm_config(llm_config: dict[str, Any], attn_implementation: str = "sdpa") -> PretrainedConfig:
    """The transformers config object for ``llm_config`` (an official ``llm_config`` dict)."""
    arch = llm_config["architectures"][0]
    if arch == "InternLM2ForCausalLM":
        cfg = internlm2_llama_config(llm_config)
    else:
        d = {k: v for k, v in copy.deepcopy(llm_config).items() if k not in _BOOKKEEPING}
        if arch == "Phi3ForCausalLM":
            cfg = _phi3_config(d)
        elif arch in _NATIVE:
            cfg = _NATIVE[arch][0](**d, tie_word_embeddings=is_tied(llm_config))
        else:
            raise ValueError(f"unsupported LLM architecture {arch!r}")
        cfg.architectures = [arch]
    if arch == "GptOssForCausalLM":  # the attention sinks (see above)
        attn_implementation = "eager"
    cfg._attn_implementation = attn_implementation
    return cfg


def build_llm(llm_config: dict[str, Any], attn_implementation: str = "sdpa") -> PreTrainedModel:
    """An untrained LLM of the architecture ``llm_config`` names (weights are loaded afterwards)."""
    cfg = build_llm_config(llm_config, attn_implementation)
    arch = cfg.architectures[0]
    cls = {"InternLM2ForCausalLM": InternLM2ForCausalLM, "Phi3ForCausalLM": Phi3ForCausalLM}.get(arch)
    model = (cls or _NATIVE[arch][1])(cfg)
    if arch == "Qwen3MoeForCausalLM":
        use_expert_linears(model)
    # The training loss runs inside the head's forward (see xtuner_vl.model.loss); same weights and keys. The
    # class changes in place, so a tied head keeps the embedding's Parameter.
    OutputHead.adopt(model.get_output_embeddings())
    return model
