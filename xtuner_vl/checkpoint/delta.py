"""What a training checkpoint changes in its base model, under the official key names.

Trainable names are those of the training model (``InternVLChatModel`` after peft's
``get_peft_model`` on ``language_model`` / ``vision_model``). Each becomes either a *replacement*
(full fine-tune, ``mlp1``, unfrozen heads: the tensor replaces the base tensor of the same official
name) or half of a *LoRA pair* (``W' = W + B @ A * alpha / r``, merged into the base weight).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from xtuner_vl.checkpoint.trained import CheckpointError, materialize

__all__ = ["LoraPair", "TrainedDelta", "official_name", "split_delta", "check_against_base", "merge_lora_weight"]

_PARTS = ("language_model", "vision_model")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")


@dataclass
class LoraPair:
    """One LoRA adapter of a linear layer: ``A`` [r, in], ``B`` [out, r], ``scale`` = alpha / r."""

    a: Any
    b: Any
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> torch.Tensor:
        """``B @ A * scale`` in fp32."""
        return (materialize(self.b).float() @ materialize(self.a).float()) * self.scale


@dataclass
class TrainedDelta:
    """Official key -> replacement tensor, and official weight key -> LoRA pair to merge into it.

    ``lora_names`` keeps each pair's training-model module path (for adapter export).
    """

    replacements: dict[str, Any] = field(default_factory=dict)
    loras: dict[str, LoraPair] = field(default_factory=dict)
    lora_names: dict[str, str] = field(default_factory=dict)

    def touched(self) -> set[str]:
        return set(self.replacements) | set(self.loras)


def official_name(name: str) -> str:
    """Training-model parameter name -> official key (peft wrappers and ``base_layer`` removed)."""
    for part in _PARTS:
        prefix = f"{part}.base_model.model."
        if name.startswith(prefix):
            name = f"{part}.{name[len(prefix) :]}"
    return name.replace(".base_layer.", ".")


def _part_of(name: str) -> str:
    part = name.split(".", 1)[0]
    if part not in _PARTS:
        raise CheckpointError(f"LoRA weight {name!r} is outside language_model / vision_model")
    return part


def split_delta(state: Mapping[str, Any], lora_alpha: Mapping[str, float]) -> TrainedDelta:
    """Sort a trainable state dict into replacements and LoRA pairs.

    Args:
        state: training-model name -> tensor (or DeepSpeed lazy tensor).
        lora_alpha: ``"language_model"`` / ``"vision_model"`` -> LoRA alpha of that part.

    Raises:
        CheckpointError: a LoRA weight without its partner, of an unknown kind (e.g. DoRA), or on a
            part the config trains without LoRA.
    """
    delta, halves = TrainedDelta(), {}
    for name, value in state.items():
        if "lora_" not in name:
            delta.replacements[official_name(name)] = value
            continue
        m = _LORA_KEY.match(name)
        if m is None:
            raise CheckpointError(f"unsupported adapter weight {name!r} (only LoRA A/B matrices are merged)")
        halves.setdefault(m["module"], {})[m["ab"]] = value
    for module, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"LoRA module {module!r} has only lora_{''.join(ab)} in the checkpoint")
        part = _part_of(module)
        if part not in lora_alpha:
            raise CheckpointError(f"checkpoint has LoRA weights on {part} but the config trains no LoRA there")
        rank = int(ab["A"].shape[0])
        key = official_name(module) + ".weight"
        delta.loras[key] = LoraPair(ab["A"], ab["B"], lora_alpha[part] / rank)
        delta.lora_names[key] = module
    return delta


def check_against_base(delta: TrainedDelta, base_shapes: Mapping[str, tuple[int, ...]], ckpt: str, base: str) -> None:
    """Refuse a delta whose keys or shapes are not those of the base model.

    Raises:
        CheckpointError: naming the checkpoint ``ckpt`` and the base directory ``base``.
    """
    problems = []
    for key, value in delta.replacements.items():
        if key not in base_shapes:
            problems.append(f"{key} is not a weight of the base")
        elif tuple(value.shape) != tuple(base_shapes[key]):
            problems.append(f"{key}: checkpoint {tuple(value.shape)} vs base {tuple(base_shapes[key])}")
    for key, pair in delta.loras.items():
        want = (int(pair.b.shape[0]), int(pair.a.shape[1]))
        if key not in base_shapes:
            problems.append(f"LoRA target {key} is not a weight of the base")
        elif want != tuple(base_shapes[key]):
            problems.append(f"LoRA on {key}: B @ A is {want} vs base {tuple(base_shapes[key])}")
    if problems:
        raise CheckpointError(
            f"checkpoint {ckpt} does not belong to base model {base}: {len(problems)} mismatch(es), e.g. "
            + "; ".join(problems[:5])
        )


def merge_lora_weight(weight: torch.Tensor, pair: LoraPair) -> torch.Tensor:
    """``weight + B @ A * scale`` computed in fp32 (cast back by the caller)."""
    return weight.float() + pair.delta()
