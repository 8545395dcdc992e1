"""Samplers: distributed split, seeding, resume, modality-aware length grouping."""

from __future__ import annotations

import pytest
import torch

from xtuner_vl.dataset import DistributedRandomSampler, LengthGroupedSampler


def test_random_sampler_split_seed_and_resume():
    ranks = [DistributedRandomSampler(10, rank=r, world_size=3, seed=5) for r in range(3)]
    orders = [list(s) for s in ranks]
    assert all(len(o) == 4 for o in orders)  # ceil(10 / 3), padded by wrapping
    assert set(sum(orders, [])) == set(range(10))
    again = DistributedRandomSampler(10, rank=1, world_size=3, seed=5)
    assert list(again) == orders[1]
    again.set_epoch(1)
    assert list(again) != orders[1]  # a new order each epoch
    resumed = DistributedRandomSampler(10, rank=1, world_size=3, seed=5)
    resumed.load_state_dict(ranks[1].state_dict(consumed=2))
    assert list(resumed) == orders[1][2:]
    assert list(resumed) == orders[1]  # only the first iteration after resume skips
    with pytest.raises(ValueError, match="world_size"):
        DistributedRandomSampler(10, 0, 2, 5).load_state_dict(ranks[0].state_dict(0))


def test_length_grouped_sampler_groups_modality_and_length():
    torch.manual_seed(0)
    n, world, global_batch = 200, 2, 8
    lengths = torch.randint(10, 4000, (n,)).tolist()
    multimodal = [i % 3 != 0 for i in range(n)]
    samplers = [
        LengthGroupedSampler(lengths, multimodal, global_batch, r, world, seed=1, group_factor=4) for r in range(world)
    ]
    per_rank = [list(s) for s in samplers]
    per_step = global_batch // world
    steps = len(per_rank[0]) // per_step
    mixed = 0
    for k in range(steps):
        batch = [i for r in range(world) for i in per_rank[r][k * per_step : (k + 1) * per_step]]
        mixed += len({multimodal[i] for i in batch}) > 1
    assert mixed <= 2  # only the partial batches at the end may mix modalities
    assert sorted(set(per_rank[0]) | set(per_rank[1])) == list(range(n))

    # padding per global batch is far below a random order's
    def waste(order_pairs):
        total = 0
        for k in range(steps):
            batch = [lengths[i] for r in range(world) for i in order_pairs[r][k * per_step : (k + 1) * per_step]]
            total += max(batch) * len(batch) - sum(batch)
        return total

    from xtuner_vl.dataset import DistributedRandomSampler as R

    random_pairs = [list(R(n, r, world, 1)) for r in range(world)]
    assert waste(per_rank) < 0.5 * waste(random_pairs)
    resumed = LengthGroupedSampler(lengths, multimodal, global_batch, 1, world, seed=1, group_factor=4)
    resumed.resume(0, 7)
    assert list(resumed) == per_rank[1][7:]
