"""InternLM2 / InternLM2.5 on transformers 5, with the official parameter names (``wqkv``, ``w1``...).

transformers has no InternLM2; this module builds it from transformers' own pieces (LlamaConfig,
RMSNorm, attention back-ends, masks, caches, GenerationMixin) so no remote code is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb, eager_attention_forward

__all__ = [
    "LLAMA_SHARED_FIELDS",
    "InternLM2ForCausalLM",
    "InternLM2Model",
    "InternLM2RotaryEmbedding",
    "internlm2_llama_config",
]

# Fields of an official InternLM2 config that map one-to-one onto LlamaConfig.
LLAMA_SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


def internlm2_llama_config(llm_config: dict[str, Any]) -> LlamaConfig:
    """Translate an official InternLM2 ``llm_config`` into the LlamaConfig this module runs on.

    The rope settings stay in ``internlm2_rope_scaling`` / ``rope_theta`` and are applied by
    :class:`InternLM2RotaryEmbedding` with the official semantics.
    """
    kwargs = {k: llm_config[k] for k in LLAMA_SHARED_FIELDS if llm_config.get(k) is not None}
    cfg = LlamaConfig(
        **kwargs,
        attention_bias=bool(llm_config.get("bias", True)),
        rope_theta=float(llm_config.get("rope_theta", 10000)),
        tie_word_embeddings=False,
    )
    cfg.internlm2_rope_scaling = llm_config.get("rope_scaling")
    cfg.architectures = ["InternLM2ForCausalLM"]
    return cfg


class InternLM2RotaryEmbedding(nn.Module):
    """Rotary embedding with the official InternLM2 semantics, including its stateful dynamic NTK.

    The official dynamic variant rebuilds its table for the longest key length seen so far
    (``max_seq_len_cached``, starting at ``max_position_embeddings``) and never shrinks it; the
    NTK-scaled base is computed from that length. We keep the same state so logits match the
    official model call for call. ``linear`` divides positions by the factor.
    """

    def __init__(self, head_dim: int, max_position_embeddings: int, base: float, scaling: dict | None) -> None:
        super().__init__()
        self.dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        self.scaling_type = None
        self.factor = 1.0
        if scaling is not None:
            self.scaling_type = scaling.get("type", scaling.get("rope_type"))
            self.factor = float(scaling["factor"])
            if self.scaling_type not in ("dynamic", "linear"):
                raise ValueError(f"InternLM2 rope_scaling type must be 'dynamic' or 'linear', got {scaling}")
        self.max_seq_len_cached = max_position_embeddings

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        base = self.base
        if self.scaling_type == "dynamic" and self.max_seq_len_cached > self.max_position_embeddings:
            ratio = self.factor * self.max_seq_len_cached / self.max_position_embeddings - (self.factor - 1)
            base = self.base * ratio ** (self.dim / (self.dim - 2))
        return 1.0 / (base ** (torch.arange(0, self.dim, 2).float().to(device) / self.dim))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, kv_seq_len: int) -> tuple[torch.Tensor, ...]:
        self.max_seq_len_cached = max(self.max_seq_len_cached, kv_seq_len)
        t = position_ids.to(torch.float32)
        if self.scaling_type == "linear":
            t = t / self.factor
        freqs = t[..., None] * self._inv_freq(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class InternLM2Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        bias = config.attention_bias
        self.wqkv = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim, bias)
        self.wo = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        # wqkv rows are grouped per KV head: [q_0 .. q_{g-1}, k, v] for each of the KV heads.
        qkv = self.wqkv(hidden_states).view(batch, seq, self.num_key_value_heads, self.num_key_value_groups + 2, -1)
        query = qkv[..., : self.num_key_value_groups, :].reshape(batch, seq, self.num_heads, self.head_dim)
        query, key, value = query.transpose(1, 2), qkv[..., -2, :].transpose(1, 2), qkv[..., -1, :].transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, _ = interface(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.wo(out.reshape(batch, seq, -1).contiguous())


class InternLM2MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)  # down
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class InternLM2DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = InternLM2Attention(config, layer_idx)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        h = hidden_states + self.attention(
            self.attention_norm(hidden_states), position_embeddings, attention_mask, cache=cache, **kwargs
        )
        return h + self.feed_forward(self.ffn_norm(h))


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = LlamaConfig
    config: LlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternLM2DecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True


class InternLM2Model(InternLM2PreTrainedModel):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = InternLM2RotaryEmbedding(
            config.hidden_size // config.num_attention_heads,
            config.max_position_embeddings,
            config.rope_parameters["rope_theta"],
            getattr(config, "internlm2_rope_scaling", None),
        )
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.tok_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_values", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        # The official table length is the key length (past + current), not max(position_ids) + 1.
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids, past + inputs_embeds.shape[1])
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                cache=cache,
                position_ids=position_ids,
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), cache=cache)


class InternLM2ForCausalLM(InternLM2PreTrainedModel, GenerationMixin):
    """InternLM2 causal LM: ``model.*`` body and ``output`` head, as in the official checkpoints."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.vocab_size = config.vocab_size
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.output

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.output = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        kwargs.pop("labels", None)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor):  # positions to compute logits for (training loss)
            hidden = hidden[:, logits_to_keep]
        elif logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=self.output(hidden), cache=out.cache)
