"""Qwen3-MoE experts as per-expert linear layers, and the router's load-balancing loss.

InternVL3.5-30B-A3B and 241B-A28B store each expert as three linears,
``language_model.model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight``, the layout of the transformers 4.55
``Qwen3MoeSparseMoeBlock`` their code runs on (OpenGVLab/InternVL ``internvl_chat_gpt_oss/``). transformers 5's
``Qwen3MoeForCausalLM`` keeps everything else (attention, router ``mlp.gate.weight``, dense layers) with the
same keys but fuses the experts into two 3-D tensors. :func:`use_expert_linears` puts the per-expert layout back
into transformers' own model (each expert computed as its ``Qwen3MoeMLP``), so that

- the checkpoint's keys are the model's keys: loading, streaming, ZeRO-3 partitioned loading and saving
  need no conversion, and a saved model is the official layout again;
- LoRA on experts is peft's ordinary ``nn.Linear`` LoRA per expert, which merges exactly (the fused weights
  would need peft's ``target_parameters`` wrapper), and QLoRA quantizes experts like any other linear;
- every expert runs on every forward, on an empty slice when no token is routed to it, so every rank calls
  the same modules in the same order (ZeRO-3 gathers cannot deadlock when ranks route differently) and every
  expert weight gets a gradient (zero when unused; DDP and ZeRO-1/2 see no unused parameter). Under ZeRO-3
  the expert list is also a DeepSpeed leaf module (``zero3_leaf``): its weights are gathered in one go.

The routed sum is the official one: softmax router, top-k, renormalised when ``norm_topk_prob``, each
expert's output scaled by its routing weight and added at its tokens.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock, load_balancing_loss_func

__all__ = [
    "ExpertLinears",
    "use_expert_linears",
    "is_moe",
    "expert_modules",
    "router_aux_loss",
    "expert_parameter_counts",
]


def _linear(fan_in: int, fan_out: int, device: torch.device, dtype: torch.dtype) -> nn.Linear:
    """``nn.Linear(fan_in, fan_out, bias=False)``; on the meta device without its random initialisation, which has
    no values to fill there and would take most of the time of building a 241B model's 108,288 expert linears."""
    if device.type != "meta":
        return nn.Linear(fan_in, fan_out, bias=False, device=device, dtype=dtype)
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = fan_in, fan_out
    layer.weight = nn.Parameter(torch.empty(fan_out, fan_in, device=device, dtype=dtype))
    layer.register_parameter("bias", None)
    return layer


class Expert(nn.Module):
    """One gated MLP, ``down_proj(act(gate_proj(x)) * up_proj(x))`` (transformers' ``Qwen3MoeMLP``), built with
    its device and dtype given: a 241B model has 36,096 of them, built in seconds on the meta device."""

    def __init__(self, hidden: int, intermediate: int, act: str, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = _linear(hidden, intermediate, device, dtype)
        self.up_proj = _linear(hidden, intermediate, device, dtype)
        self.down_proj = _linear(intermediate, hidden, device, dtype)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertLinears(nn.ModuleList):
    """``num_experts`` :class:`Expert` MLPs with the call signature of transformers' fused experts:
    ``(hidden [tokens, hidden], top_k_index [tokens, k], top_k_weights [tokens, k])``."""

    zero3_leaf = True  # gathered whole under ZeRO-3 (xtuner_vl.engine.deepspeed_backend)

    def __init__(self, config, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        dims = (config.hidden_size, config.moe_intermediate_size, config.hidden_act)
        super().__init__(Expert(*dims, device=torch.device(device), dtype=dtype) for _ in range(config.num_experts))

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        # [experts, k, tokens]: which (slot, token) pairs each expert serves
        routed = torch.nn.functional.one_hot(top_k_index, num_classes=len(self)).permute(2, 1, 0)
        for e, expert in enumerate(self):
            slot, token = torch.where(routed[e])
            y = expert(hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def use_expert_linears(llm: nn.Module) -> nn.Module:
    """Replace the fused experts of every sparse block of a transformers Qwen3-MoE model by
    :class:`ExpertLinears` (on the device and dtype the model was built with); returns ``llm``."""
    for module in llm.modules():
        if isinstance(module, Qwen3MoeSparseMoeBlock) and not isinstance(module.experts, ExpertLinears):
            old = next(module.experts.parameters())
            module.experts = ExpertLinears(llm.config, old.device, old.dtype)
    return llm


def is_moe(llm: nn.Module) -> bool:
    """Whether ``llm`` routes tokens to experts (has :func:`expert_modules`)."""
    return bool(expert_modules(llm))


def expert_modules(llm: nn.Module) -> list[nn.Module]:
    """The expert containers of ``llm``: Qwen3-MoE's :class:`ExpertLinears` (one module per expert) or GPT-OSS's fused
    experts (3-D weights, expert first), which every forward calls whole."""
    return [m for m in llm.modules() if isinstance(m, ExpertLinears | GptOssExperts)]


def router_aux_loss(
    router_logits: tuple[torch.Tensor, ...],
    num_experts: int,
    top_k: int,
    token_mask: torch.Tensor | None,
    scores_as_logits: bool = False,
) -> torch.Tensor:
    """The Switch-Transformer load-balancing loss over every layer's router logits, counting only the tokens
    ``token_mask`` marks (padding excluded), as the InternVL 3.5 forward computes it with transformers'
    ``load_balancing_loss_func`` (``internvl_chat_gpt_oss/internvl/model/internvl_chat/modeling_internvl_chat.py``).

    ``scores_as_logits`` (GPT-OSS) reproduces what that forward really receives from transformers 4.55, which its
    requirements pin: GPT-OSS's router there returns its routing scores (softmax over each token's top-k logits,
    zero elsewhere) where the logits are expected, and the loss takes a softmax of those again.
    """
    if scores_as_logits:
        router_logits = tuple(_routing_scores(layer, top_k) for layer in router_logits)
    return load_balancing_loss_func(router_logits, num_experts, top_k, token_mask)


def _routing_scores(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Softmax over each row's ``top_k`` logits, scattered into zeros: GPT-OSS's routing weights per expert."""
    top, index = logits.topk(top_k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, index, top.softmax(dim=-1))


def expert_parameter_counts(llm_config: dict) -> tuple[int, int]:
    """``(all routed-expert parameters, those active per token)`` of a Qwen3-MoE ``llm_config``: per sparse layer
    ``num_experts`` (active: ``num_experts_per_tok``) gated MLPs of ``moe_intermediate_size``."""
    layers = llm_config["num_hidden_layers"]
    sparse_step = llm_config.get("decoder_sparse_step", 1)
    dense = set(llm_config.get("mlp_only_layers") or [])
    n_sparse = sum(1 for i in range(layers) if i not in dense and (i + 1) % sparse_step == 0)
    per_expert = 3 * llm_config["hidden_size"] * llm_config["moe_intermediate_size"]
    return (
        n_sparse * llm_config["num_experts"] * per_expert,
        n_sparse * llm_config["num_experts_per_tok"] * per_expert,
    )
