"""Batch collation: right padding, concatenated tiles, skipped samples passed on for counting."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xtuner_vl.structures import IGNORE_INDEX, Batch, Sample

__all__ = ["SkippedSample", "CollatedBatch", "collate_samples"]


@dataclass(frozen=True)
class SkippedSample:
    """A sample the dataset could not use, with where it came from and why (logged and counted)."""

    source: str
    line: int
    reason: str


@dataclass
class CollatedBatch:
    """``batch`` is None when every sample of the step was skipped."""

    batch: Batch | None
    skipped: list[SkippedSample] = field(default_factory=list)
    num_samples: int = 0


def collate_samples(items: list[Sample | SkippedSample], pad_token_id: int = 0) -> CollatedBatch:
    """Right-pad ``input_ids`` with ``pad_token_id`` and ``labels`` with IGNORE_INDEX; concatenate tiles."""
    samples = [s for s in items if isinstance(s, Sample)]
    skipped = [s for s in items if isinstance(s, SkippedSample)]
    if not samples:
        return CollatedBatch(None, skipped, 0)
    length = max(s.num_tokens for s in samples)
    ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for i, s in enumerate(samples):
        n = s.num_tokens
        ids[i, :n], labels[i, :n], mask[i, :n] = s.input_ids, s.labels, 1
    batch = Batch(
        input_ids=ids,
        labels=labels,
        attention_mask=mask,
        pixel_values=torch.cat([s.pixel_values for s in samples]),
        image_flags=torch.cat([s.image_flags for s in samples]),
    )
    return CollatedBatch(batch, skipped, len(samples))
