"""Learning-rate schedule as a pure function of the optimizer step (nanoGPT style)."""

from __future__ import annotations

import math

__all__ = ["lr_at", "warmup_steps_for"]


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length for a ratio of the run (official recipes: 0.03), at least 0 and at most total."""
    return min(total_steps, max(0, math.ceil(total_steps * warmup_ratio)))


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warmup from 0 to ``base_lr`` over ``warmup_steps``, then cosine decay to
    ``base_lr * min_lr_ratio`` at ``total_steps`` (HF ``get_cosine_schedule_with_warmup`` for ratio 0).

    ``step`` counts optimizer steps from 0; the value is the lr used *for* that step.
    """
    if warmup_steps and step < warmup_steps:
        return base_lr * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)
