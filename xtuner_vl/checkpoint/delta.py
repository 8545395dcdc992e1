"""What a training checkpoint changes in its base model, under the official key names.

Trainable names are those of the training model (``InternVLChatModel`` after peft's
``get_peft_model`` on ``language_model`` / ``vision_model``). Each becomes either a *replacement*
(full fine-tune, ``mlp1``, unfrozen heads: the tensor replaces the base tensor of the same official
name) or half of a *LoRA pair* (``W' = W + B @ A * alpha / r``, merged into the base weight).

A LoRA on a parameter rather than a linear (peft's ``target_parameters``, ``peft.tuners.lora.layer.ParamWrapper``:
GPT-OSS's fused experts) is stored under its module's path, one nested ``base_layer`` per further targeted parameter
of that module, so its keys do not name the parameter: :func:`lora_parameter_targets` reads that from the training
model. Merged exactly as peft's ``ParamWrapper.get_delta_weight`` computes it, for weights stored
``[experts, in, out]``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from xtuner_vl.checkpoint.trained import CheckpointError, materialize

__all__ = [
    "LoraPair",
    "TrainedDelta",
    "official_name",
    "lora_parameter_targets",
    "split_delta",
    "check_against_base",
    "merge_lora_weight",
]

_PARTS = ("language_model", "vision_model")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")
_WRAPPERS = re.compile(r"(\.base_layer)+$")


@dataclass
class LoraPair:
    """One LoRA adapter, ``scale`` = alpha / r. Of a linear: ``A`` [r, in], ``B`` [out, r]. Of a fused expert weight
    stored [experts, in, out] (``experts`` > 0, peft's ParamWrapper): ``A`` [experts * r, in] (rows expert-major),
    ``B`` [out, r * experts] (columns rank-major)."""

    a: Any
    b: Any
    scale: float
    experts: int = 0

    @property
    def rank(self) -> int:
        return int(self.a.shape[0]) // max(self.experts, 1)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight the delta is added to."""
        out, inp = int(self.b.shape[0]), int(self.a.shape[1])
        return (self.experts, inp, out) if self.experts else (out, inp)

    def delta(self) -> torch.Tensor:
        """``B @ A * scale`` in fp32; per expert ``(B_e @ A_e).T * scale`` for fused experts."""
        a, b = materialize(self.a).float(), materialize(self.b).float()
        if not self.experts:
            return (b @ a) * self.scale
        a = a.reshape(self.experts, self.rank, a.shape[-1])  # [experts, r, in]
        b = b.reshape(b.shape[0], self.rank, self.experts)  # [out, r, experts]
        return torch.einsum("ore,eri->eio", b, a) * self.scale


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


def lora_parameter_targets(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Training-model path of each LoRA on a parameter (peft ``ParamWrapper``) -> ``(parameter name, experts)``,
    ``experts`` 0 for a 2-D parameter (peft adapts it as a linear's weight).

    Raises:
        CheckpointError: a 3-D parameter not stored ``[experts, in, out]`` (peft swaps in and out where its module
            is not ``is_transposed``), which :class:`LoraPair` does not merge.
    """
    from peft.tuners.lora import ParamWrapper

    targets = {}
    for name, module in model.named_modules():
        if not isinstance(module, ParamWrapper):
            continue
        if module.num_experts > 1 and not getattr(module.get_base_layer(), "is_transposed", False):
            raise CheckpointError(
                f"LoRA on {name}.{module.parameter_name}: of 3-D weights, only fused experts stored "
                "[experts, in, out] are merged"
            )
        targets[name] = (module.parameter_name, module.num_experts if module.num_experts > 1 else 0)
    return targets


def _part_of(name: str) -> str:
    part = name.split(".", 1)[0]
    if part not in _PARTS:
        raise CheckpointError(f"LoRA weight {name!r} is outside language_model / vision_model")
    return part


def split_delta(
    state: Mapping[str, Any],
    lora_alpha: Mapping[str, float],
    lora_parameters: Mapping[str, tuple[str, int]] | None = None,
) -> TrainedDelta:
    """Sort a trainable state dict into replacements and LoRA pairs.

    Args:
        state: training-model name -> tensor (or DeepSpeed lazy tensor).
        lora_alpha: ``"language_model"`` / ``"vision_model"`` -> LoRA alpha of that part.
        lora_parameters: the training model's LoRAs on parameters (:func:`lora_parameter_targets`); any other
            LoRA is one of a linear.

    Raises:
        CheckpointError: a LoRA weight without its partner, of an unknown kind (e.g. DoRA), two LoRAs on one
            weight (LoRAs on parameters without ``lora_parameters``), or on a part the config trains without LoRA.
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
        param, experts = (lora_parameters or {}).get(module, ("weight", 0))
        key = f"{official_name(_WRAPPERS.sub('', module))}.{param}"
        if key in delta.loras:
            raise CheckpointError(f"two LoRA adapters on {key} ({delta.lora_names[key]!r} and {module!r})")
        rank = int(ab["A"].shape[0]) // max(experts, 1)
        delta.loras[key] = LoraPair(ab["A"], ab["B"], lora_alpha[part] / rank, experts)
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
        if key not in base_shapes:
            problems.append(f"LoRA target {key} is not a weight of the base")
        elif pair.shape != tuple(base_shapes[key]):
            problems.append(f"LoRA on {key}: B @ A is {pair.shape} vs base {tuple(base_shapes[key])}")
    if problems:
        raise CheckpointError(
            f"checkpoint {ckpt} does not belong to base model {base}: {len(problems)} mismatch(es), e.g. "
            + "; ".join(problems[:5])
        )


def merge_lora_weight(weight: torch.Tensor, pair: LoraPair) -> torch.Tensor:
    """``weight + pair.delta()`` computed in fp32 (cast back by the caller)."""
    return weight.float() + pair.delta()
