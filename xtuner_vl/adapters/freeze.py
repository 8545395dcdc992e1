"""Which parts of InternVL train: the official ``freeze_*`` / ``unfreeze_vit_layers`` switches."""

from __future__ import annotations

from torch import nn

__all__ = ["apply_freeze"]


def apply_freeze(
    model: nn.Module,
    freeze_vit: bool = True,
    freeze_mlp: bool = False,
    freeze_llm: bool = False,
    unfreeze_vit_layers: int = 0,
    unfreeze_lm_head: bool = False,
) -> None:
    """Set ``requires_grad`` on ``model`` (an InternVLChatModel) as the official fine-tune script does.

    ``unfreeze_vit_layers`` > 0 trains the last N ViT layers even when ``freeze_vit``;
    ``unfreeze_lm_head`` trains the output head even when ``freeze_llm``.
    """
    _requires_grad(model.vision_model, not freeze_vit)
    _requires_grad(model.mlp1, not freeze_mlp)
    _requires_grad(model.language_model, not freeze_llm)
    if unfreeze_vit_layers:
        for layer in model.vision_model.encoder.layers[-unfreeze_vit_layers:]:
            _requires_grad(layer, True)
    if unfreeze_lm_head:
        _requires_grad(model.language_model.get_output_embeddings(), True)


def _requires_grad(module: nn.Module, flag: bool) -> None:
    # 4-bit weights quantized while loading (QLoRA) are integer tensors, which cannot require grad.
    for p in module.parameters():
        if p.is_floating_point():
            p.requires_grad_(flag)
