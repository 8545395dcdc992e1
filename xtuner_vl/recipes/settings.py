"""Typed sections of a training config. Every default lives here, once; unknown keys are refused."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ConfigTypeError",
    "FreezeSettings",
    "LoraSettings",
    "QuantizationSettings",
    "OptimSettings",
    "ScheduleSettings",
    "DataLoaderSettings",
    "RuntimeSettings",
    "EvaluationSettings",
    "parse_section",
]


@dataclass
class FreezeSettings:
    """``model.freeze``: which parts keep their weights (the official ``--freeze_*`` switches)."""

    vit: bool = True
    mlp: bool = False
    llm: bool = False
    unfreeze_vit_layers: int = 0  # train the last N ViT layers even when vit is frozen (official --unfreeze_vit_layers)
    unfreeze_lm_head: bool = False  # train the output head even when llm is frozen or under LoRA


@dataclass
class LoraSettings:
    """``model.lora``: peft LoRA adapters on the LLM and/or the ViT (the official ``--use_llm_lora`` /
    ``--use_backbone_lora`` ranks)."""

    llm_rank: int = 0
    vit_rank: int = 0
    alpha: int | None = None  # None: 2 x rank (official)
    dropout: float = 0.05
    llm_targets: list[str] | None = None  # None: the official targets of the LLM family


@dataclass
class QuantizationSettings:
    """``model.quantization``: QLoRA's frozen 4-bit LLM (bitsandbytes)."""

    llm: str = "nf4"  # the LLM's linears in nf4 with double quantization, computed in the model dtype


@dataclass
class OptimSettings:
    lr: float = 4e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    lr_mult: dict[str, float] = field(default_factory=dict)  # per part: vision_model / mlp1 / language_model


@dataclass
class ScheduleSettings:
    global_batch_size: int = 128
    micro_batch_size: int = 4
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs when set
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    # Weight of each trained token in the step's loss (official --loss_reduction): token (1, the token mean),
    # sample (1 / n, n = trained tokens of its sample) or square (1 / sqrt(n), the InternVL 3.5 recipes).
    loss_reduction: str = "token"

    def __post_init__(self) -> None:
        if self.loss_reduction not in ("token", "sample", "square"):
            raise ValueError(f"schedule.loss_reduction must be token, sample or square, got {self.loss_reduction!r}")


@dataclass
class DataLoaderSettings:
    num_workers: int = 4
    group_by_length: bool = True  # ignored when packing (packs are already balanced)
    group_factor: int = 50
    pack: bool = False  # sequence packing: several samples per row of pack_length tokens
    # Tokens per packed row, apart from train_dataset.max_length (the per-sample limit, official 4096) and at least
    # as long. LLaVA-style samples are ~2k tokens (7 tiles = 1792 image tokens), half a 4096 row: two seldom fit
    # in one, so 4096 rows stay ~20% empty; 16384 holds ~8, which best-fit fills to ~99% (bench_packing). Memory
    # per row grows with it: micro_batch_size counts rows, so 1 row of 16384 costs about 4 unpacked 4096 samples.
    pack_length: int = 16384
    pack_max_tiles: int | None = None  # real tiles per row (bounds ViT memory); None: pack_length // tokens per tile
    pack_window: int = 4096  # samples per shuffled best-fit window: larger packs fuller, smaller mixes more
    pack_headroom: float = 0.04  # share of a row the plan leaves free for length estimates below the real length


@dataclass
class RuntimeSettings:
    seed: int = 42
    save_steps: int = 500
    keep_last: int = 2
    log_interval: int = 10
    max_skip_fraction: float = 0.01
    max_nonfinite_steps: int = 3  # a non-finite loss or gradient norm skips the update; more in a row stop the run
    deepspeed: str | None = None  # preset name or json path; None = plain PyTorch / DDP
    device: str | None = None  # None: cuda when available
    peak_tflops: float | None = None  # dense bf16 peak per GPU for the logged MFU; None: known GPUs by name
    # How long a collective waits for the slowest rank before the run is aborted (torch's NCCL default and
    # DeepSpeed's: 10 min). The longest legitimate wait is a checkpoint: a full fine-tune of InternVL2-26B
    # (20B trainable) on ZeRO-3 writes ~240 GB of fp32 master weights and Adam moments (12 bytes per parameter)
    # from 8 ranks, and the barrier after it waits for the last byte; 60 min still allows a slow shared file
    # system (~70 MB/s in all) while a real hang is reported within the hour.
    dist_timeout_minutes: float = 60.0


class ConfigTypeError(TypeError, ValueError):
    """A config value of the wrong type: a ``TypeError`` that the CLI reports in one line like other bad input."""


def parse_section(cls: type, values: dict[str, Any] | None, section: str) -> Any:
    """Build dataclass ``cls`` from a config section, refusing unknown keys and wrong basic types."""
    values = dict(values or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"config section {section!r}: unknown key(s) {unknown}; known: {sorted(names)}")
    for key, value in values.items():
        default = names[key].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigTypeError(f"config {section}.{key} must be true/false, got {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigTypeError(f"config {section}.{key} must be a number, got {value!r}")
    try:
        return cls(**values)
    except TypeError as e:
        raise ValueError(f"config section {section!r}: {e}") from None


@dataclass
class EvaluationSettings:
    """``evaluation``: the mean loss over ``eval_dataset`` and greedy answers to fixed prompts during training
    (xtuner's ``EvaluateChatHook`` habit); the section's presence turns it on."""

    interval: int = 500  # optimizer steps between evaluations; the last step is always evaluated
    max_samples: int | None = None  # the eval loss over the first N samples of eval_dataset; None: all of them
    # Fixed prompts answered greedily: dict(text='Describe the image.', image='path.jpg'); image: a path, a list of
    # paths or left out (text only). Images are tiled as the training data are.
    prompts: list[dict[str, Any]] = field(default_factory=list)
    max_new_tokens: int = 64  # longest answer; generation also stops at the template's separator and the EOS
    system: str | None = None  # system message of the prompts; None: the training template's
