"""ZeRO-3 loading straight into partitioned parameters: the same weights as the plain load, the same errors,
the method applied after it, and training that matches the unpartitioned load step for step.

The two-rank checks share one torchrun launch of ``zero3_worker.py`` (about 45 s on two cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from tests.engine.conftest import REPO, free_port
from tests.model.test_streaming_load import corrupt_checkpoint
from xtuner_vl.engine.deepspeed_config import complete_deepspeed_config, load_deepspeed_config
from xtuner_vl.engine.zero3_load import full_numel, full_shape, prepare_for_engine
from xtuner_vl.model import load_internvl
from xtuner_vl.recipes.model_wrapper import InternVLChat

FAMILIES = ("internvl2-2b", "internvl2-40b", "internvl2-4b", "internvl2-1b", "internvl3_5-1b")  # + Qwen3, tied head


@pytest.fixture(scope="module")
def two_ranks(train_assets, tiny_ckpt, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("zero3-load")
    assets = {
        "families": {f: str(tiny_ckpt(f)) for f in FAMILIES},
        **{k: str(train_assets[k]) for k in ("model", "data", "images")},
        "work": str(tmp / "work"),
    }
    (tmp / "assets.json").write_text(json.dumps(assets))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XTUNER_VL_CACHE": str(train_assets["cache"])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    cmd += [str(REPO / "tests" / "engine" / "zero3_worker.py"), str(tmp / "assets.json"), str(tmp / "out.json")]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((tmp / "out.json").read_text())


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
