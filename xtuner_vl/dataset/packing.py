"""Sequence packing: several samples per row of ``pack_length`` tokens and ``max_tiles`` tiles.

Rows are planned once per run from the length estimates (:meth:`InternVLDataset.length_stats`): the
dataset indices are shuffled with the seed, cut into windows of ``window`` samples, and each window is
packed best-fit decreasing (longest sample first, into the open row it leaves the least room in). The
plan, hence the packed dataset's index -> samples mapping, is a pure function of the seed and the
estimates; the sampler shuffles the rows every epoch and resumes by position, so resuming mid-epoch
yields exactly the rows that were still due. Every sample of the dataset is in exactly one row.

A row is built in the worker from its real samples. Estimates can be short (text tokens are guessed
from bytes, image tiles too when a record has no ``width``/``height``), so the plan leaves ``headroom``
of every row free; a row whose real samples still do not fit yields one more row (nothing is cut or
dropped), counted in :attr:`PackedItem.overflow_rows`. Each row carries position ids restarting at 0
for every sample; the model turns them into block-diagonal attention (SDPA mask or flash-attention
varlen), so packed and unpacked training see exactly the same tokens.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from xtuner_vl.dataset.collate import PackedItem, SkippedSample
from xtuner_vl.structures import Sample

__all__ = ["plan_packs", "best_fit_decreasing", "PackedDataset", "PackPlanStats", "pack_rows"]


def best_fit_decreasing(
    indices: list[int], lengths: np.ndarray, tiles: np.ndarray, capacity: int, max_tiles: int
) -> list[list[int]]:
    """Pack ``indices`` longest first, each into the open row with the least token room that still
    holds it (tokens and tiles); a new row when none does. Returns the rows, fullest first.

    ``lengths`` and ``tiles`` are per dataset index; an item over a budget gets a row of its own.
    """
    order = sorted(indices, key=lambda i: -int(lengths[i]))  # stable: ties keep the shuffled order
    free: list[int] = []  # token room of each open row, ascending
    room: list[int] = []  # tile room, same order
    rows: list[list[int]] = []
    for i in order:
        need, n_tiles = int(lengths[i]), int(tiles[i])
        j = bisect_left(free, need)
        while j < len(free) and room[j] < n_tiles:  # the tile budget rarely binds: a short scan
            j += 1
        if j < len(free):
            left, tiles_left, row = free.pop(j), room.pop(j), rows.pop(j)
        else:
            left, tiles_left, row = capacity, max_tiles, []
        row.append(i)
        left, tiles_left = left - need, tiles_left - n_tiles
        k = bisect_left(free, left)
        free.insert(k, left)
        room.insert(k, tiles_left)
        rows.insert(k, row)
    return rows


def plan_packs(
    lengths: np.ndarray,
    tiles: np.ndarray,
    pack_length: int,
    max_tiles: int,
    seed: int,
    window: int | None = None,
    headroom: float = 0.0,
) -> list[list[int]]:
    """Rows of dataset indices: seeded shuffle, then best-fit decreasing per window of ``window`` samples.

    Args:
        lengths: estimated tokens per dataset index.
        tiles: estimated tiles per dataset index (0 for text-only samples).
        pack_length: tokens per row.
        max_tiles: tiles per row.
        seed: seed of the shuffle; the plan is a pure function of the arguments.
        window: samples packed together (None: all of them, one window).
        headroom: fraction of ``pack_length`` left free for estimates below the real length.

    Returns:
        The rows (lists of dataset indices); every index is in exactly one.
    """
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    capacity = max(1, int(pack_length * (1.0 - headroom)))
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64), capacity)
    tiles = np.minimum(np.asarray(tiles, dtype=np.int64), max_tiles)
    order = np.random.default_rng(seed).permutation(len(lengths)).tolist()
    step = window or max(1, len(order))
    packs: list[list[int]] = []
    for start in range(0, len(order), step):
        packs += best_fit_decreasing(order[start : start + step], lengths, tiles, capacity, max_tiles)
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
        packed_indices=tuple(i for s in samples for i in s.indices),
    )


def _real_tiles(sample: Sample) -> int:
    # Dummy tiles of text-only samples never reach the ViT when the batch has real tiles (collate keeps
    # at most one), so only real tiles count against a row's tile budget.
    return int((sample.image_flags == 1).sum())


def pack_rows(samples: list[Sample], pack_length: int, max_tiles: int) -> list[Sample]:
    """Concatenate ``samples`` in order into rows of at most ``pack_length`` tokens and ``max_tiles`` real
    tiles (a row always takes at least one sample)."""
    rows, current, tokens, tiles = [], [], 0, 0
    for s in samples:
        n_tiles = _real_tiles(s)
        if current and (tokens + s.num_tokens > pack_length or tiles + n_tiles > max_tiles):
            rows.append(_concat(current))
            current, tokens, tiles = [], 0, 0
        current.append(s)
        tokens, tiles = tokens + s.num_tokens, tiles + n_tiles
    if current:
        rows.append(_concat(current))
    return rows


@dataclass(frozen=True)
class PackPlanStats:
    """How the plan fills rows, from the length estimates (real lengths are known only per row built)."""

    rows: int
    samples: int
    samples_per_row: float
    fill: float  # mean estimated tokens per row / pack_length

    def __str__(self) -> str:
        return (
            f"{self.rows} rows for {self.samples} samples ({self.samples_per_row:.1f} per row, "
            f"estimated fill {self.fill:.1%})"
        )


class PackedDataset(Dataset):
    """Index ``p`` -> :class:`PackedItem` of planned row ``p`` (one row, more if the estimates were short).

    Args:
        dataset: the sample dataset (``length_stats()``, ``max_length``, ``num_image_token``, indexing).
        pack_length: tokens per row (None: the dataset's ``max_length``); at least ``max_length``.
        max_tiles: real tiles per row (None: ``pack_length // num_image_token``, as many as its tokens hold).
        seed: seed of the plan.
        window: samples per best-fit window (None: the whole dataset).
        headroom: fraction of each row the plan leaves free for short estimates.
    """

    def __init__(
        self,
        dataset,
        pack_length: int | None = None,
        max_tiles: int | None = None,
        seed: int = 0,
        window: int | None = None,
        headroom: float = 0.0,
    ) -> None:
        self.dataset = dataset
        self.pack_length = pack_length or dataset.max_length
        if self.pack_length < dataset.max_length:
            raise ValueError(
                f"dataloader.pack_length={self.pack_length} is below train_dataset.max_length={dataset.max_length}: "
                f"a sample could not fit a packed row; raise pack_length (or lower max_length)"
            )
        if max_tiles is not None and max_tiles < 1:
            raise ValueError(f"dataloader.pack_max_tiles must be >= 1 or None, got {max_tiles}")
        self.max_tiles = max_tiles or max(1, self.pack_length // dataset.num_image_token)
        lengths, multimodal = dataset.length_stats()
        self.lengths = np.minimum(np.asarray(lengths, dtype=np.int64), dataset.max_length)
        # Image tokens dominate multimodal lengths: tiles ~ length / tokens-per-tile; text-only samples have
        # only a dummy tile, which does not count against the budget (see pack_rows).
        self.tiles = np.where(np.asarray(multimodal, dtype=bool), self.lengths // dataset.num_image_token, 0)
        self.packs = plan_packs(self.lengths, self.tiles, self.pack_length, self.max_tiles, seed, window, headroom)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, p: int) -> PackedItem:
        items = [self.dataset[i] for i in self.packs[p]]
        samples = [s for s in items if isinstance(s, Sample)]
        skipped = [s for s in items if isinstance(s, SkippedSample)]
        rows = pack_rows(samples, self.pack_length, self.max_tiles)
        return PackedItem(rows, skipped, overflow_rows=max(0, len(rows) - 1))

    def stats(self) -> PackPlanStats:
        """Rows, samples per row and estimated fill of the plan."""
        per_row = np.array([int(self.lengths[p].sum()) for p in self.packs], dtype=np.float64)
        n = len(self.lengths)
        return PackPlanStats(
            len(self.packs), n, n / max(1, len(self.packs)), float(per_row.mean() / self.pack_length) if n else 0.0
        )
