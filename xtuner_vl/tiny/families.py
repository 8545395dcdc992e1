"""The tiny release families: official config.json fields of each InternVL release at toy sizes (ViT hidden 32,
LLM hidden 64, 2 layers each; tiles stay 448px / patch 14). Plain data, importable without torch (the CLI lists
the names in its help)."""

from __future__ import annotations

__all__ = ["TINY_FAMILIES"]

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
