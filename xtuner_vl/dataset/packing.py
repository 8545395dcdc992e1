"""Sequence packing: several samples per row up to ``max_length`` tokens and a tile budget.

Packs are planned once from the length estimates (:meth:`InternVLDataset.length_stats`), greedily in a
seeded order; a pack is built in the worker from its real samples, and if the real lengths overflow a
row, the pack simply yields one more row (nothing is cut or dropped). Each row carries position ids
restarting at 0 for every sample; the model turns them into block-diagonal attention (SDPA mask or
flash-attention varlen), so packed and unpacked training see exactly the same tokens.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from xtuner_vl.dataset.collate import PackedItem, SkippedSample
from xtuner_vl.structures import Sample

__all__ = ["plan_packs", "PackedDataset", "pack_rows"]


def plan_packs(lengths: np.ndarray, tiles: np.ndarray, max_length: int, max_tiles: int, seed: int) -> list[list[int]]:
    """Greedy packs of dataset indices (seeded order) whose estimated tokens and tiles fit a row."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    packs, current, tokens, n_tiles = [], [], 0, 0
    for i in order.tolist():
        length, t = int(min(lengths[i], max_length)), int(min(tiles[i], max_tiles))
        if current and (tokens + length > max_length or n_tiles + t > max_tiles):
            packs.append(current)
            current, tokens, n_tiles = [], 0, 0
        current.append(i)
        tokens, n_tiles = tokens + length, n_tiles + t
    if current:
        packs.append(current)
    return packs


def _concat(samples: list[Sample]) -> Sample:
    return Sample(
        input_ids=torch.cat([s.input_ids for s in samples]),
        labels=torch.cat([s.labels for s in samples]),
        pixel_values=torch.cat([s.pixel_values for s in samples]),
        image_flags=torch.cat([s.image_flags for s in samples]),
        source=samples[0].source,
        index=samples[0].index,
        position_ids=torch.cat([torch.arange(s.num_tokens) for s in samples]),
        num_packed=len(samples),
    )


def pack_rows(samples: list[Sample], max_length: int, max_tiles: int) -> list[Sample]:
    """Concatenate ``samples`` in order into rows of at most ``max_length`` tokens and ``max_tiles`` tiles
    (a row always takes at least one sample)."""
    rows, current, tokens, tiles = [], [], 0, 0
    for s in samples:
        n_tiles = len(s.pixel_values)
        if current and (tokens + s.num_tokens > max_length or tiles + n_tiles > max_tiles):
            rows.append(_concat(current))
            current, tokens, tiles = [], 0, 0
        current.append(s)
        tokens, tiles = tokens + s.num_tokens, tiles + n_tiles
    if current:
        rows.append(_concat(current))
    return rows


class PackedDataset(Dataset):
    """Index ``p`` -> :class:`PackedItem` of pack ``p`` (rows of packed samples + skipped ones)."""

    def __init__(self, dataset, max_tiles: int = 64, seed: int = 0) -> None:
        self.dataset, self.max_tiles = dataset, max_tiles
        self.max_length = dataset.max_length
        lengths, _ = dataset.length_stats()
        tiles = np.asarray(self._tile_estimates(lengths))
        self.packs = plan_packs(lengths, tiles, self.max_length, max_tiles, seed)

    def _tile_estimates(self, lengths: np.ndarray) -> list[int]:
        # Image tokens dominate multimodal lengths: tiles ~ length / tokens-per-tile, at least the dummy tile.
        return [max(1, int(n) // self.dataset.num_image_token) for n in lengths]

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, p: int) -> PackedItem:
        items = [self.dataset[i] for i in self.packs[p]]
        samples = [s for s in items if isinstance(s, Sample)]
        skipped = [s for s in items if isinstance(s, SkippedSample)]
        return PackedItem(pack_rows(samples, self.max_length, self.max_tiles), skipped)

    def tokens_per_row(self) -> float:
        """Mean estimated tokens per planned row (how full packing makes the rows)."""
        lengths, _ = self.dataset.length_stats()
        return float(np.mean([min(self.max_length, sum(int(lengths[i]) for i in p)) for p in self.packs]))
