"""QLoRA: the LLM's linear layers quantized in place to bitsandbytes nf4 with double quantization.

The ViT, ``mlp1`` and the output head stay unquantized (official xtuner recipe). Quantization works
on an already loaded model (our loader), without transformers' ``from_pretrained`` path.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["nf4_targets", "quantize_llm_nf4"]


def nf4_targets(language_model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """``(parent, attribute, linear)`` for every layer QLoRA quantizes: each ``nn.Linear`` but the head."""
    head = language_model.get_output_embeddings()
    return [
        (module, name, child)
        for module in language_model.modules()
        for name, child in module.named_children()
        if type(child) is nn.Linear and child is not head
    ]


def quantize_llm_nf4(language_model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every ``nn.Linear`` of ``language_model`` but its output head by ``bnb.nn.Linear4bit``
    (nf4, double quant), quantizing the loaded weights on their device. Returns how many were replaced."""
    import bitsandbytes as bnb

    replaced = 0
    for module, name, child in nf4_targets(language_model):
        device = child.weight.device
        q = bnb.nn.Linear4bit(
            child.in_features,
            child.out_features,
            bias=child.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        # CPU quantization kernels take fp32 input; on CUDA the bf16 weight is quantized directly.
        weight = child.weight.data.to(torch.float32) if device.type == "cpu" else child.weight.data
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q)
        if child.bias is not None:
            q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
        q.weight = q.weight._quantize(device)
        setattr(module, name, q)
        replaced += 1
    language_model.is_loaded_in_4bit = True  # peft picks its bnb LoRA layers for these modules
    return replaced
