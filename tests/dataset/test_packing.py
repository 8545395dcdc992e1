"""Packing: packed and unpacked batches give the same loss and gradients (fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xtuner_vl.dataset import InternVLDataset, collate_samples
from xtuner_vl.dataset.packing import PackedDataset, pack_rows, plan_packs
from xtuner_vl.engine.trainer import token_loss_sum
from xtuner_vl.model import load_internvl, load_tokenizer
from xtuner_vl.structures import Sample
from xtuner_vl.tiny.data import make_synthetic_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("pack"), num_samples=10, seed=4)


def _loss_and_grads(model, cb):
    model.zero_grad(set_to_none=True)
    b = cb.batch
    out = model(b.pixel_values, b.input_ids, attention_mask=None if b.packed else b.attention_mask,
                image_flags=b.image_flags, position_ids=b.position_ids, use_cache=False)
    n = int((b.labels[:, 1:] != -100).sum())
    loss = token_loss_sum(out.logits, b.labels).float() / n
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["internvl2-2b", "internvl2-1b", "internvl2-26b"])
def test_packed_equals_unpacked_loss_and_grads(tiny_ckpt, data, family):
    path = tiny_ckpt(family)
    model = load_internvl(path, dtype=torch.float32).train()
    model.vision_model.requires_grad_(False)
    ds = InternVLDataset(data_paths=[str(data[0])], tokenizer=load_tokenizer(path), image_folders=[str(data[1])],
                         model_path=path, max_dynamic_patch=2)
    samples = [ds[i] for i in range(6)]
    assert all(isinstance(s, Sample) for s in samples)
    unpacked = collate_samples(samples)
    rows = pack_rows(samples, max_length=1400, max_tiles=8)
    packed = collate_samples(rows)
    assert packed.batch.packed and len(rows) < len(samples) and packed.num_samples == 6
    assert packed.batch.input_ids.numel() < unpacked.batch.input_ids.numel()  # less padding
    loss_u, grads_u = _loss_and_grads(model, unpacked)
    loss_p, grads_p = _loss_and_grads(model, packed)
    torch.testing.assert_close(loss_p, loss_u, atol=1e-5, rtol=1e-5)
    assert grads_u.keys() == grads_p.keys() and "mlp1.1.weight" in grads_u
    for k in grads_u:
        torch.testing.assert_close(grads_p[k], grads_u[k], atol=1e-5, rtol=1e-4, msg=k)


def test_plan_packs_fills_rows_within_budgets():
    lengths = np.array([300, 700, 100, 900, 50, 400, 1000, 20])
    tiles = np.array([1, 3, 1, 4, 1, 2, 4, 1])
    packs = plan_packs(lengths, tiles, max_length=1024, max_tiles=5, seed=0)
    assert sorted(i for p in packs for i in p) == list(range(8))
    for p in packs:
        assert sum(lengths[p]) <= 1024 or len(p) == 1
        assert sum(tiles[p]) <= 5 or len(p) == 1
    assert len(packs) < 8


def test_packed_dataset_items_and_collate(tiny_ckpt, data, monkeypatch, tmp_path):
    monkeypatch.setenv("XTUNER_VL_CACHE", str(tmp_path))
    path = tiny_ckpt("internvl2-2b")
    ds = InternVLDataset(data_paths=[str(data[0])], tokenizer=load_tokenizer(path), image_folders=[str(data[1])],
                         model_path=path, max_length=2048, max_dynamic_patch=2)
    packed = PackedDataset(ds, max_tiles=16, seed=0)
    assert len(packed) < len(ds)
    seen = []
    for p in range(len(packed)):
        item = packed[p]
        for row in item.rows:
            assert row.num_tokens <= 2048 and len(row.pixel_values) <= 16
            starts = (row.position_ids == 0).nonzero().flatten().tolist()
            assert len(starts) == row.num_packed
        seen += packed.packs[p]
    assert sorted(seen) == list(range(len(ds)))
    cb = collate_samples([packed[0], packed[1]])
    assert cb.num_samples == len(packed.packs[0]) + len(packed.packs[1])
    flags = cb.batch.image_flags
    assert (flags == 1).all() or len(flags) == 1  # dummies dropped, at most one kept
