"""Seeding of the global RNGs (Python, NumPy, torch CPU and CUDA): alike on every rank while the model is built,
one stream per rank while it trains."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_everything", "rank_seed"]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (``torch.manual_seed`` seeds every CUDA device too)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """The training seed of ``rank``: a hash of (seed, rank), so no two ranks and no nearby runs share dropout
    and drop-path masks (``seed + rank`` would give run ``seed=42`` rank 1 the stream of ``seed=43`` rank 0)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
