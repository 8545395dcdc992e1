"""QLoRA: the LLM's linear layers quantized in place to bitsandbytes nf4 with double quantization.

The ViT, ``mlp1`` and the output head stay unquantized (official xtuner recipe). Quantization works
on an already loaded model (:func:`quantize_llm_nf4`), or layer by layer while the checkpoint is read
(:func:`nf4_loader`, for :func:`xtuner_vl.model.loader.stream_into`), so that no more than one bf16
linear of the LLM is ever on the device; both run the same steps and give the same weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["nf4_targets", "quantize_llm_nf4", "nf4_loader"]


def nf4_targets(language_model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """``(parent, attribute, linear)`` for every layer QLoRA quantizes: each ``nn.Linear`` but the head."""
    head = language_model.get_output_embeddings()
    return [
        (module, name, child)
        for module in language_model.modules()
        for name, child in module.named_children()
        if type(child) is nn.Linear and child is not head
    ]


def _linear4bit(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """An empty (meta) ``bnb.nn.Linear4bit`` (nf4, double quant) of ``linear``'s shape."""
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type="nf4",
        device="meta",
    )


def _set_nf4_weight(layer: nn.Module, weight: torch.Tensor, device: torch.device) -> None:
    """Quantize ``weight`` on ``device`` into ``layer`` (a ``Linear4bit``)."""
    import bitsandbytes as bnb

    # CPU quantization kernels take fp32 input; on CUDA the bf16 weight is quantized directly.
    weight = weight.to(torch.float32) if device.type == "cpu" else weight
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=True, quant_type="nf4", module=layer
    )
    layer.weight = layer.weight._quantize(device)


def quantize_llm_nf4(language_model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every ``nn.Linear`` of ``language_model`` but its output head by ``bnb.nn.Linear4bit``
    (nf4, double quant), quantizing the loaded weights on their device. Returns how many were replaced."""
    replaced = 0
    for module, name, child in nf4_targets(language_model):
        q = _linear4bit(child, compute_dtype)
        if child.bias is not None:
            q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
        _set_nf4_weight(q, child.weight.data, child.weight.device)
        setattr(module, name, q)
        replaced += 1
    language_model.is_loaded_in_4bit = True  # peft picks its bnb LoRA layers for these modules
    return replaced


def nf4_loader(
    language_model: nn.Module, compute_dtype: torch.dtype, device: str | torch.device
) -> Callable[[nn.Module, str, torch.Tensor], bool]:
    """Prepare the meta skeleton ``language_model`` for QLoRA while loading: each layer
    :func:`quantize_llm_nf4` would quantize becomes an empty ``Linear4bit`` now. Returns the ``place`` hook
    of :func:`xtuner_vl.model.loader.stream_into` that quantizes such a layer's weight on ``device`` the moment
    its tensor is read (and places its bias), and leaves every other tensor to the loader."""
    device = torch.device(device)
    quantized = set()
    for module, name, child in nf4_targets(language_model):
        q = _linear4bit(child, compute_dtype)
        setattr(module, name, q)
        quantized.add(id(q))
    language_model.is_loaded_in_4bit = True

    def place(module: nn.Module, name: str, tensor: torch.Tensor) -> bool:
        if id(module) not in quantized:
            return False
        if name == "weight":
            _set_nf4_weight(module, tensor, device)
        else:  # the bias stays in the load dtype, frozen (as quantize_llm_nf4 leaves it)
            module.bias = nn.Parameter(tensor.to(device), requires_grad=False)
        return True

    return place
