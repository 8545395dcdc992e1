"""ZeRO-3 on two ranks. Loading straight into partitioned parameters: the same weights as the plain load, the same
errors, the method applied after it, and training that matches the unpartitioned load step for step. Training the
Qwen3-MoE family with LoRA on every expert, a packed full fine-tune with accumulation that converts, and evaluation
with every rank in every forward.

The two-rank checks share one torchrun launch of ``zero3_worker.py``, which runs the real ``train`` in each rank: a
launch costs each rank about 10 s of CPU importing torch, transformers, peft and DeepSpeed before any work. The
launcher path itself (``xtuner-vl train`` under torchrun) is tested by test_resume.py and test_reliability.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from tests.checkpoint.conftest import assert_converts_to_the_trained_model
from tests.engine.conftest import REPO, assert_two_rank_run_learned, free_port, logged_losses, loss_falls
from tests.engine.eval_reference import (
    ONE_RANK,
    eval_collate,
    eval_records,
    eval_set,
    naive_eval_loss,
    write_eval_assets,
)
from tests.model.test_streaming_load import corrupt_checkpoint
from xtuner_vl.engine.deepspeed_config import complete_deepspeed_config, load_deepspeed_config
from xtuner_vl.engine.torch_backend import TorchBackend
from xtuner_vl.engine.zero3_load import full_numel, full_shape, prepare_for_engine
from xtuner_vl.model import load_internvl
from xtuner_vl.recipes.build_evaluation import build_evaluator
from xtuner_vl.recipes.model_wrapper import InternVLChat
from xtuner_vl.recipes.settings import EvaluationSettings

FAMILIES = ("internvl2-2b", "internvl2-40b", "internvl2-4b", "internvl2-1b", "internvl3_5-1b")  # + Qwen3, tied head
MOE = "internvl3_5-30b-a3b"  # the Qwen3-MoE family
EVAL_NEW_TOKENS = 6  # the fixed prompts' answers


@pytest.fixture(scope="module")
def eval_assets(train_assets, tmp_path_factory) -> dict:
    return write_eval_assets(train_assets, tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="module")
def two_ranks(train_assets, eval_assets, tiny_ckpt, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("zero3")
    assets = {
        "families": {f: str(tiny_ckpt(f)) for f in FAMILIES},
        **{k: str(train_assets[k]) for k in ("model", "data", "images")},
        "moe": str(tiny_ckpt(MOE)),
        "eval": str(eval_assets["eval"]),
        "prompts": eval_assets["prompts"],
        "max_new_tokens": EVAL_NEW_TOKENS,
        "work": str(tmp / "work"),
    }
    (tmp / "assets.json").write_text(json.dumps(assets))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XTUNER_VL_CACHE": str(train_assets["cache"])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    cmd += [str(REPO / "tests" / "engine" / "zero3_worker.py"), str(tmp / "assets.json"), str(tmp / "out.json")]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {**json.loads((tmp / "out.json").read_text()), "work": tmp / "work", "output": proc.stdout + proc.stderr}


@pytest.mark.slow
def test_partitioned_load_gathers_to_the_plain_load(two_ranks):
    """Every parameter partitioned, gathered equal in value and dtype; buffers, generation config, eval mode."""
    assert two_ranks["weights"] == {f: [] for f in [*FAMILIES, "internvl2-2b bf16"]}


@pytest.mark.slow
def test_method_after_partitioned_load(two_ranks):
    """Freezing, LoRA (same initial adapters), TrainingFlops and the optimizer's groups (weight decay decided on
    full shapes) as after the plain load, for LoRA, full and ViT + LLM LoRA."""
    assert two_ranks["methods"] == {"lora": [], "full": [], "vit lora": []}


@pytest.mark.slow
@pytest.mark.parametrize("config", ["tiny_internvl2_lora", "tiny_internvl2_full"])
def test_training_matches_the_unpartitioned_load(two_ranks, config):
    """Three ZeRO-3 steps through the real train(): losses and gradient norms equal to the bit (same weights,
    same adapters, same RNG state when training starts, same reductions)."""
    runs = two_ranks["losses"][config]
    assert sorted(runs["partitioned"]) == ["1", "2", "3"]
    assert runs["partitioned"] == runs["unpartitioned"]


@pytest.mark.slow
def test_moe_lora_run_learns(two_ranks):
    """Two ranks under ZeRO-3 with mixed single-image, multi-image and text-only batches, on the Qwen3-MoE family
    (InternVL3.5-30B-A3B): the ranks route their tokens to different experts, text-only micro-batches included,
    with LoRA on every expert; no hang, and the run learns (:func:`assert_two_rank_run_learned`). The ZeRO-2 run of
    the InternVL2 family is test_resume.py's uninterrupted reference run."""
    assert_two_rank_run_learned(two_ranks["work"] / "moe", "zero3", 6, moe=True)  # 24 samples / (2 ranks x 2)


@pytest.mark.slow
def test_packed_full_run_with_accumulation_converts(two_ranks, tmp_path):
    """Full fine-tuning with packing under ZeRO-3 and gradient accumulation on two ranks: rows of several samples,
    loss still falls; the partitioned DeepSpeed checkpoint converts to the official format with the trained model's
    logits."""
    work, out = two_ranks["work"] / "packed", two_ranks["output"]
    assert "packs" in out and "accum 2" in out
    losses = logged_losses(work)
    assert len(losses) >= 6 and loss_falls(losses), losses
    # Model FLOPs of the real samples per second and GPU, and the MFU against the given peak (10 GFLOP/s).
    records = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
    assert all(r["tflops_per_gpu"] > 0 and r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 0.01) for r in records)
    assert " mfu " in out
    assert (max(work.glob("checkpoints/step-*")) / "engine").is_dir()  # a DeepSpeed checkpoint
    assert_converts_to_the_trained_model(work, tmp_path / "official")


@pytest.mark.slow
def test_two_ranks_evaluate_as_one(two_ranks, eval_assets):
    """Two ranks under ZeRO-3 (partitioned weights, every rank in every forward; 7 samples split 4 + 3): the eval
    loss of the checkpoint's weights (lr 0) equals the naive one-rank reference, the answers the one-rank ones."""
    dataset = eval_set(eval_assets)
    model = load_internvl(eval_assets["model"], dtype=torch.float32)
    reference = naive_eval_loss(model, dataset, 7)
    s = EvaluationSettings(interval=1, prompts=eval_assets["prompts"], max_new_tokens=EVAL_NEW_TOKENS)
    backend = TorchBackend(model, torch.optim.SGD(model.parameters(), lr=0.0), ONE_RANK, 1.0, bf16=False)
    answers = build_evaluator(s, None, dataset, eval_collate(dataset), backend, ONE_RANK, 1, 2, 0).run(1)["eval_chat"]
    (rec,) = eval_records(two_ranks["work"] / "eval")[1].values()
    assert rec["step"] == 1 and (rec["eval_samples"], rec["eval_skipped"]) == (5, 2)
    assert rec["eval_loss"] == pytest.approx(reference, rel=1e-5)
    assert rec["eval_chat"] == answers


def _zero3(hidden: int = 64) -> dict:
    return complete_deepspeed_config(load_deepspeed_config("zero3"), 2, 1, 2, 1.0, False, hidden)


@pytest.mark.parametrize("how", ["missing", "shape", "lora"])
def test_bad_checkpoint_fails_before_deepspeed_with_the_plain_error(tiny_ckpt, tmp_path, how):
    bad = corrupt_checkpoint(tiny_ckpt("internvl2-2b"), tmp_path / how, how)
    with pytest.raises(ValueError) as plain:
        load_internvl(bad)
    s = InternVLChat(path=str(bad), lora=dict(llm_rank=8))
    with pytest.raises(ValueError) as partitioned:  # no process group exists: the headers are checked first
        s.build(torch.device("cpu"), _zero3())
    assert str(partitioned.value) == str(plain.value)


def test_full_sizes_and_the_bf16_cast_of_added_parameters():
    p, q = nn.Parameter(torch.zeros(0)), nn.Parameter(torch.zeros(3, 4))
    p.ds_id, p.ds_shape, p.ds_numel = 0, torch.Size([5, 6]), 30  # what ZeRO-3 leaves on a partitioned parameter
    assert (full_shape(p), full_numel(p), full_shape(q), full_numel(q)) == ((5, 6), 30, (3, 4), 12)
    model = nn.Module()
    model.p, model.q = p, q
    prepare_for_engine(model, {"bf16": {"enabled": False}})
    assert q.dtype == torch.float32
    prepare_for_engine(model, {"bf16": {"enabled": True}})
    assert q.dtype == torch.bfloat16 and p.dtype == torch.float32  # DeepSpeed already holds p in its dtype
