"""Optimizer parameter groups with their own learning rate for the ViT, the projector and the LLM."""

from __future__ import annotations

from typing import Any

from torch import nn

from xtuner_vl.engine.zero3_load import full_shape

__all__ = ["module_of", "param_groups"]

_PARTS = ("vision_model", "mlp1", "language_model")


def module_of(name: str) -> str:
    """``vision_model`` / ``mlp1`` / ``language_model`` for a parameter name of InternVLChatModel."""
    head = name.split(".", 1)[0]
    if head not in _PARTS:
        raise ValueError(f"parameter {name} belongs to no known part ({', '.join(_PARTS)})")
    return head


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, lr_mult: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """Trainable parameters grouped by part and by decay (no weight decay for biases, norms, ls1/ls2).

    ``lr_mult`` scales the base lr per part, e.g. ``{"vision_model": 0.1}``. Each group records its
    ``lr_scale`` so the trainer can set ``group["lr"] = lr_at(step) * group["lr_scale"]``.
    """
    lr_mult = lr_mult or {}
    unknown = set(lr_mult) - set(_PARTS)
    if unknown:
        raise ValueError(f"lr_mult keys must be among {_PARTS}, got {sorted(unknown)}")
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # A ZeRO-3 parameter partitioned while loading is a flat slice by now: decide on its full shape.
        decay = len(full_shape(p)) >= 2 and not name.endswith(("ls1", "ls2"))
        groups.setdefault((module_of(name), decay), []).append(p)
    out = []
    for (part, decay), params in sorted(groups.items()):
        scale = lr_mult.get(part, 1.0)
        out.append(
            {
                "params": params,
                "name": f"{part}.{'decay' if decay else 'no_decay'}",
                "lr": lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay if decay else 0.0,
            }
        )
    if not out:
        raise ValueError("no trainable parameter: check freeze_* / LoRA settings")
    return out
