"""Distributed, seeded, resumable samplers: random and modality-aware length-grouped.

Each epoch's order is a pure function of (seed, epoch), so resuming only needs the epoch and how many
samples this rank already trained on in it. The trainer counts those (a DataLoader prefetches ahead
of training, so the sampler cannot) and calls :meth:`resume`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["DistributedRandomSampler", "LengthGroupedSampler"]


class _ResumableSampler(Sampler[int]):
    def __init__(self, num_items: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.num_items, self.rank, self.world_size, self.seed = num_items, rank, world_size, seed
        self.epoch = 0
        self.start = 0  # position in this rank's order of the epoch where the next iteration starts
        self.num_per_rank = math.ceil(num_items / world_size)

    def _global_order(self) -> list[int]:
        raise NotImplementedError

    def _rank_order(self) -> list[int]:
        order = self._global_order()
        total = self.num_per_rank * self.world_size
        order = order + order[: total - len(order)]  # pad by wrapping so every rank gets as many
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0  # only the first iteration after resume() skips
        yield from self._rank_order()[start:]

    def __len__(self) -> int:
        return self.num_per_rank

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` (the trainer calls this before iterating each epoch)."""
        self.epoch = epoch

    def resume(self, epoch: int, consumed: int) -> None:
        """Continue ``epoch`` after the ``consumed`` samples this rank already trained on."""
        if not 0 <= consumed <= self.num_per_rank:
            raise ValueError(f"consumed={consumed} is outside this rank's epoch of {self.num_per_rank} samples")
        self.epoch, self.start = epoch, consumed

    def state_dict(self, consumed: int) -> dict[str, int]:
        """What :meth:`load_state_dict` needs, given the samples of this epoch already trained on."""
        return {"epoch": self.epoch, "consumed": consumed, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed or state["world_size"] != self.world_size:
            raise ValueError(
                f"sampler state was saved with seed={state['seed']}, world_size={state['world_size']}; "
                f"this run has seed={self.seed}, world_size={self.world_size}"
            )
        self.resume(state["epoch"], state["consumed"])

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)


class DistributedRandomSampler(_ResumableSampler):
    """A seeded permutation per epoch, split round-robin across ranks."""

    def _global_order(self) -> list[int]:
        return torch.randperm(self.num_items, generator=self._generator()).tolist()


class LengthGroupedSampler(_ResumableSampler):
    """Groups samples of similar length and the same modality into the same global batch.

    Following LLaVA's modality grouping: multimodal and text-only samples are shuffled separately, cut
    into mega-batches of ``global_batch * group_factor``, sorted by length inside each mega-batch and
    cut into global batches; the global batches are then shuffled. Padding per batch drops sharply.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        is_multimodal: Sequence[bool],
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        group_factor: int = 50,
    ) -> None:
        super().__init__(len(lengths), rank, world_size, seed)
        if len(is_multimodal) != len(lengths):
            raise ValueError("lengths and is_multimodal must have one entry per sample")
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} is not a multiple of world size {world_size}")
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        self.is_multimodal = torch.as_tensor(is_multimodal, dtype=torch.bool)
        self.global_batch_size, self.group_factor = global_batch_size, group_factor

    def _batches(self, indices: torch.Tensor, gen: torch.Generator) -> list[list[int]]:
        indices = indices[torch.randperm(len(indices), generator=gen)]
        mega = self.global_batch_size * self.group_factor
        batches = []
        for start in range(0, len(indices), mega):
            chunk = indices[start : start + mega]
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches += [
                chunk[i : i + self.global_batch_size].tolist() for i in range(0, len(chunk), self.global_batch_size)
            ]
        return batches

    def _global_order(self) -> list[int]:
        gen = self._generator()
        all_idx = torch.arange(self.num_items)
        batches = self._batches(all_idx[self.is_multimodal], gen) + self._batches(all_idx[~self.is_multimodal], gen)
        full = [b for b in batches if len(b) == self.global_batch_size]
        partial = [b for b in batches if len(b) != self.global_batch_size]
        # Full batches shuffled, the (at most two) partial ones last, so every step but the final ones
        # holds one modality; rank r takes positions r, r + world, ... of each batch (_rank_order).
        order = [full[j] for j in torch.randperm(len(full), generator=gen).tolist()] + partial
        return [i for b in order for i in b]
