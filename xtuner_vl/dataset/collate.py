"""Batch collation: right padding, concatenated tiles, skipped samples passed on for counting.

Dummy tiles (flag 0, text-only samples) are dropped from a batch that has real tiles, and reduced to
one when it has none: the ViT only runs on real tiles plus at most one dummy, which still keeps every
rank running the ViT (ZeRO-3 / DDP need that).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xtuner_vl.structures import IGNORE_INDEX, Batch, Sample

__all__ = ["LOSS_REDUCTIONS", "SkippedSample", "PackedItem", "CollatedBatch", "collate_samples", "loss_weights"]

LOSS_REDUCTIONS = ("token", "sample", "square")


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
    sample_indices: list[int] = field(default_factory=list)  # dataset indices of the batch's samples

    def pin_memory(self) -> CollatedBatch:
        """Called by the DataLoader's pin-memory thread (``pin_memory=True``)."""
        batch = self.batch.pin_memory() if self.batch is not None else None
        return CollatedBatch(batch, self.skipped, self.num_samples, self.overflow_rows, self.sample_indices)


def _tiles(rows: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.cat([r.pixel_values for r in rows])
    flags = torch.cat([r.image_flags for r in rows])
    real = flags == 1
    if real.all():  # no padding tiles: no copy
        return pixels, flags
    if real.any():
        return pixels[real], flags[real]
    return pixels[:1], flags[:1]


def _segment_lengths(row: Sample, length: int) -> list[int]:
    """Lengths of the attention segments of one padded row: each packed sample, then the padding tail."""
    n = row.num_tokens
    if row.position_ids is None:
        segments = [n]
    else:  # a packed sample starts where its position ids restart at 0
        starts = (row.position_ids == 0).nonzero().flatten().tolist()
        segments = [b - a for a, b in zip(starts, starts[1:] + [n], strict=True)]
    return segments + ([length - n] if length > n else [])


def _loss_index(labels: torch.Tensor, segment_starts: torch.Tensor) -> torch.Tensor:
    """Flat positions ``t`` of ``[rows * seq]`` whose token ``t + 1`` is trained and in the same segment."""
    flat = labels.reshape(-1)
    nxt = torch.cat([flat[1:], flat.new_full((1,), IGNORE_INDEX)])
    trained = nxt != IGNORE_INDEX
    trained[segment_starts[1:] - 1] = False  # the last token of a segment predicts nothing in it
    return trained.nonzero().flatten()


def loss_weights(
    loss_index: torch.Tensor, cu_seqlens: torch.Tensor, reduction: str
) -> tuple[torch.Tensor | None, float]:
    """Per trained position, the weight ``w = 1 / n ** p`` of ``loss_reduction`` (official ``len2weight`` in
    OpenGVLab/InternVL internvl_chat_gpt_oss/internvl/train/internvl_chat_finetune.py), with ``n`` the trained
    positions of the sample (segment of ``cu_seqlens``) it belongs to and ``p`` 0 (token), 1 (sample) or
    0.5 (square); and their float64 sum. Token weights are all 1: returned as None, their sum the count."""
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
    if reduction == "token":
        return None, float(loss_index.numel())
    segment = torch.searchsorted(cu_seqlens[1:].long(), loss_index, right=True)  # the sample of each position
    n = torch.bincount(segment)[segment].double()
    weights = (1.0 / n if reduction == "sample" else n.rsqrt()).float()
    return weights, float(weights.double().sum())


def _positions_of(ids: torch.Tensor, token_id: int | None) -> torch.Tensor | None:
    return None if token_id is None else (ids.view(-1) == token_id).nonzero()[:, 0]


def collate_samples(
    items: list[Sample | SkippedSample | PackedItem],
    pad_token_id: int = 0,
    img_context_token_id: int | None = None,
    pixel_dtype: torch.dtype | None = None,
    loss_reduction: str = "token",
) -> CollatedBatch:
    """Right-pad ``input_ids`` with ``pad_token_id`` and ``labels`` with IGNORE_INDEX; concatenate tiles.

    ``PackedItem`` rows become batch rows whose samples attend only within themselves. Everything the
    step needs to know about the batch (segment boundaries, trained positions and targets, image token
    positions when ``img_context_token_id`` is given, token counts) is computed here on the CPU, so
    the training step never reads a device tensor back. ``pixel_dtype`` casts the tiles (the compute
    dtype: half the bytes to copy in bf16). ``loss_reduction`` weights the trained positions
    (:func:`loss_weights`).
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
    segments = [s for r in rows for s in _segment_lengths(r, length)]
    cu_seqlens = torch.tensor([0, *segments], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    positions = torch.cat([torch.arange(s) for s in segments]).reshape(len(rows), length)
    loss_index = _loss_index(labels, cu_seqlens.long())
    weights, weight_sum = loss_weights(loss_index, cu_seqlens, loss_reduction)
    pixels, flags = _tiles(rows)
    if pixel_dtype is not None:
        pixels = pixels.to(pixel_dtype)
    batch = Batch(
        input_ids=ids,
        labels=labels,
        attention_mask=mask,
        pixel_values=pixels,
        image_flags=flags,
        position_ids=positions,
        packed=any(r.position_ids is not None for r in rows),
        cu_seqlens=cu_seqlens,
        max_seqlen=max(segments),
        loss_index=loss_index,
        loss_targets=labels.reshape(-1)[loss_index + 1],
        loss_weights=weights,
        image_token_index=_positions_of(ids, img_context_token_id),
        num_tokens=sum(r.num_tokens for r in rows),
        num_trained=int(loss_index.numel()),
        loss_weight_sum=weight_sum,
    )
    indices = [i for r in rows for i in r.indices]
    return CollatedBatch(batch, skipped, sum(r.num_packed for r in rows), overflow, indices)
