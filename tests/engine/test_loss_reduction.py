"""``schedule.loss_reduction`` (token / sample / square): the gradient of one optimizer step of the trainer equals
a naive reference (each sample alone, full logits, float64 cross-entropy, weighted, divided by the weight sum of
the whole step) under packing, gradient accumulation and two data-parallel ranks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.engine.conftest import free_port
from xtuner_vl.dataset import InternVLDataset, collate_samples
from xtuner_vl.dataset.collate import CollatedBatch, loss_weights
from xtuner_vl.dataset.packing import pack_rows
from xtuner_vl.engine.dist import DistInfo
from xtuner_vl.engine.trainer import Trainer, TrainerSettings
from xtuner_vl.model import load_internvl, load_tokenizer
from xtuner_vl.model.loss import OutputHead
from xtuner_vl.recipes.settings import ScheduleSettings, parse_section
from xtuner_vl.structures import IGNORE_INDEX, Sample
from xtuner_vl.tiny.data import make_synthetic_dataset

REDUCTIONS = ("token", "sample", "square")
POWER = {"token": 0.0, "sample": 1.0, "square": 0.5}  # w = 1 / n ** power, n = trained tokens of the sample
NUM_SAMPLES = 6


class _GradBackend:
    """The Backend contract without an optimizer: gradients summed over micro-steps, averaged over ranks."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def prepare_micro_step(self, boundary: bool) -> None:
        pass

    def forward(self, **inputs):
        return self.model(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, boundary: bool, skip: bool = False) -> float:
        if boundary and dist.is_initialized():
            for p in self.model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
        return 0.0


def _setup(paths: dict[str, str]) -> tuple[torch.nn.Module, list[Sample]]:
    model = load_internvl(paths["model"], dtype=torch.float32).train()
    model.vision_model.requires_grad_(False)  # the ViT's gradient adds time, not coverage
    ds = InternVLDataset(
        data_paths=[paths["data"]],
        tokenizer=load_tokenizer(paths["model"]),
        image_folders=[paths["images"]],
        model_path=paths["model"],
        max_dynamic_patch=2,
    )
    samples = [ds[i] for i in range(NUM_SAMPLES)]
    assert all(isinstance(s, Sample) for s in samples)
    return model, samples


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _trainer_grads(
    model: torch.nn.Module, micro: list[CollatedBatch], dist_info: DistInfo, work_dir: Path
) -> dict[str, torch.Tensor]:
    """Gradients of one ``Trainer._step`` over the micro-batches ``micro`` (this rank's)."""
    settings = TrainerSettings(
        total_steps=1, steps_per_epoch=1, grad_accum=len(micro), micro_batch_size=1, lr=0.0, warmup_steps=0
    )
    trainer = Trainer(_GradBackend(model), lambda: iter(()), None, settings, dist_info, work_dir)
    model.zero_grad(set_to_none=True)
    stats = trainer._step(micro)
    assert math.isfinite(stats["loss"])
    return _grads(model)


def _trained(s: Sample) -> int:
    return int((s.labels[1:] != IGNORE_INDEX).sum())


def _reference_grads(model: torch.nn.Module, samples: list[Sample], reduction: str) -> dict[str, torch.Tensor]:
    """sum_i w_i * sum_t CE_i(t) / sum_i w_i * n_i, each sample alone with full logits, CE in float64."""
    model.zero_grad(set_to_none=True)
    total, weight_sum = torch.zeros((), dtype=torch.float64), 0.0
    for s in samples:
        logits = model(s.pixel_values, s.input_ids[None], image_flags=s.image_flags).logits[0, :-1].double()
        targets = s.labels[1:]
        keep = targets != IGNORE_INDEX
        w = 1.0 / _trained(s) ** POWER[reduction]
        total = total + w * F.cross_entropy(logits[keep], targets[keep], reduction="sum")
        weight_sum += w * _trained(s)
    (total / weight_sum).backward()
    return _grads(model)


def _assert_grads_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys() and "mlp1.1.weight" in expected
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def paths(tiny_ckpt, tmp_path_factory) -> dict[str, str]:
    data, images = make_synthetic_dataset(tmp_path_factory.mktemp("reduction"), num_samples=10, seed=4)
    return {"model": str(tiny_ckpt("internvl2-2b")), "data": str(data), "images": str(images)}


@pytest.fixture(scope="module")
def setup(paths) -> tuple[torch.nn.Module, list[Sample]]:
    return _setup(paths)


ONE_RANK = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_packed_and_accumulated_steps_equal_the_naive_reference(setup, reduction, tmp_path):
    model, samples = setup
    expected = _reference_grads(model, samples, reduction)
    unpacked = [collate_samples(samples, loss_reduction=reduction)]
    rows = pack_rows(samples, pack_length=1400, max_tiles=8)
    assert len(rows) < len(samples)  # several samples share a row
    packed = [collate_samples(rows, loss_reduction=reduction)]
    accumulated = [
        collate_samples(samples[:2], loss_reduction=reduction),
        collate_samples(samples[2:], loss_reduction=reduction),
    ]
    for micro in (unpacked, packed, accumulated):
        _assert_grads_close(_trainer_grads(model, micro, ONE_RANK, tmp_path), expected)


def test_packed_weights_count_each_sample_apart(setup):
    _, samples = setup
    rows = pack_rows(samples, pack_length=1400, max_tiles=8)
    b = collate_samples(rows, loss_reduction="square").batch
    expected = torch.cat([torch.full((_trained(s),), _trained(s) ** -0.5) for s in samples])
    torch.testing.assert_close(b.loss_weights, expected)
    assert b.loss_weight_sum == pytest.approx(sum(math.sqrt(_trained(s)) for s in samples))
    token = collate_samples(rows).batch
    assert token.loss_weights is None and token.loss_weight_sum == token.num_trained


def test_sample_reduction_differs_from_token_on_unequal_lengths(setup, tmp_path):
    model, samples = setup
    assert len({_trained(s) for s in samples}) > 1
    token = _trainer_grads(model, [collate_samples(samples)], ONE_RANK, tmp_path)
    sample = _trainer_grads(model, [collate_samples(samples, loss_reduction="sample")], ONE_RANK, tmp_path)
    assert not torch.allclose(token["mlp1.1.weight"], sample["mlp1.1.weight"], atol=1e-5, rtol=1e-3)


def test_unknown_reduction_is_refused_in_one_line():
    with pytest.raises(ValueError, match="loss_reduction must be token, sample or square, got 'mean'"):
        parse_section(ScheduleSettings, {"loss_reduction": "mean"}, "schedule")
    with pytest.raises(ValueError, match="loss_reduction must be one of"):
        loss_weights(torch.arange(3), torch.tensor([0, 5]), "mean")


def _rank_worker(rank: int, port: int, paths: dict[str, str], out: str) -> None:
    """Rank ``rank`` of 2: one step, 2 micro-batches of unequal samples per rank, every reduction."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model, samples = _setup(paths)
        mine = samples[:4] if rank == 0 else samples[4:]  # unequal shares: 4 samples on rank 0, 2 on rank 1
        info = DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        result = {}
        for reduction in REDUCTIONS:
            micro = [collate_samples(mine[: len(mine) // 2], loss_reduction=reduction)]
            micro.append(collate_samples(pack_rows(mine[len(mine) // 2 :], 1400, 8), loss_reduction=reduction))
            result[reduction] = _trainer_grads(model, micro, info, Path(out).parent / f"rank{rank}")
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_the_naive_reference(setup, paths, tmp_path):
    out = tmp_path / "grads.pt"
    # Forked ranks start with this process's imports (spawned ones spend about 8 s of CPU each re-importing). Safe
    # here: the test processes run one intra-op thread (tests/conftest.py), so no OpenMP pool is forked.
    mp.start_processes(_rank_worker, args=(free_port(), paths, str(out)), nprocs=2, join=True, start_method="fork")
    result = torch.load(out)
    model, samples = setup
    for reduction in REDUCTIONS:
        _assert_grads_close(result[reduction], _reference_grads(model, samples, reduction))


def test_weighted_chunked_loss_equals_the_weighted_full_logits_loss():
    torch.manual_seed(0)
    head = OutputHead.adopt(torch.nn.Linear(16, 50))
    hidden = torch.randn(11, 16, requires_grad=True)
    targets, weights = torch.randint(0, 50, (11,)), torch.rand(11)
    head.chunk_rows = 4  # three chunks, the last one short
    head(hidden, targets, weights).backward()
    actual = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    hidden.grad = head.weight.grad = head.bias.grad = None
    expected_loss = (F.cross_entropy(head(hidden).double(), targets, reduction="none") * weights.double()).sum()
    expected_loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(head(hidden, targets, weights), expected_loss)
    for a, e in zip(actual, [hidden.grad, head.weight.grad, head.bias.grad], strict=True):
        torch.testing.assert_close(a, e)
