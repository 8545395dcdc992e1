"""Batch collation: right padding, concatenated tiles, skipped samples passed on for counting.

Dummy tiles (flag 0, text-only samples) are dropped from a batch that has real tiles, and reduced to
one when it has none: the ViT only runs on real tiles plus at most one dummy, which still keeps every
rank running the ViT (ZeRO-3 / DDP need that).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xtuner_vl.structures import IGNORE_INDEX, Batch, Sample

__all__ = ["SkippedSample", "PackedItem", "CollatedBatch", "collate_samples"]


@dataclass(frozen=True)
class SkippedSample:
    """A sample the dataset could not use, with where it came from and why (logged and counted)."""

    source: str
    line: int
    reason: str


@dataclass
class PackedItem:
    """What a packed dataset returns: rows of concatenated samples, and the samples it had to skip."""

    rows: list[Sample]
    skipped: list[SkippedSample]
    overflow_rows: int = 0  # rows beyond the planned one: the real lengths overflowed the estimates


@dataclass
class CollatedBatch:
    """``batch`` is None when every sample of the step was skipped."""

    batch: Batch | None
    skipped: list[SkippedSample] = field(default_factory=list)
    num_samples: int = 0
    overflow_rows: int = 0  # packed rows beyond the plan (see PackedItem)


def _tiles(rows: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.cat([r.pixel_values for r in rows])
    flags = torch.cat([r.image_flags for r in rows])
    real = flags == 1
    if real.any():
        return pixels[real], flags[real]
    return pixels[:1], flags[:1]


def _padded_positions(rows: list[Sample], length: int) -> torch.Tensor:
    """Each row's position ids, its padding numbered as one more sequence (0, 1, ...) of its own."""
    out = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = r.num_tokens
        out[i, :n] = r.position_ids if r.position_ids is not None else torch.arange(n)
        out[i, n:] = torch.arange(length - n)
    return out


def collate_samples(items: list[Sample | SkippedSample | PackedItem], pad_token_id: int = 0) -> CollatedBatch:
    """Right-pad ``input_ids`` with ``pad_token_id`` and ``labels`` with IGNORE_INDEX; concatenate tiles.

    ``PackedItem`` rows become batch rows with ``position_ids`` (restarting per sample), which makes the
    model attend within each packed sample only.
    """
    rows, skipped, overflow = [], [], 0
    for item in items:
        if isinstance(item, PackedItem):
            rows += item.rows
            skipped += item.skipped
            overflow += item.overflow_rows
        elif isinstance(item, SkippedSample):
            skipped.append(item)
        else:
            rows.append(item)
    if not rows:
        return CollatedBatch(None, skipped, 0, overflow)
    length = max(r.num_tokens for r in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = r.num_tokens
        ids[i, :n], labels[i, :n], mask[i, :n] = r.input_ids, r.labels, 1
    packed = any(r.position_ids is not None for r in rows)
    pixels, flags = _tiles(rows)
    batch = Batch(input_ids=ids, labels=labels, attention_mask=mask, pixel_values=pixels, image_flags=flags,
                  position_ids=_padded_positions(rows, length) if packed else None)
    return CollatedBatch(batch, skipped, sum(r.num_packed for r in rows), overflow)
