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
    model.vision_model.requires_grad_(not freeze_vit)
    model.mlp1.requires_grad_(not freeze_mlp)
    model.language_model.requires_grad_(not freeze_llm)
    if unfreeze_vit_layers:
        for layer in model.vision_model.encoder.layers[-unfreeze_vit_layers:]:
            layer.requires_grad_(True)
    if unfreeze_lm_head:
        model.language_model.get_output_embeddings().requires_grad_(True)
