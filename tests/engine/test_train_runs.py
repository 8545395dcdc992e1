"""Real training runs through the CLI on CPU: DeepSpeed ZeRO-2/3 over gloo, two nodes, methods."""

from __future__ import annotations

import json

import pytest

from tests.checkpoint.conftest import assert_converts_to_the_trained_model
from tests.engine.conftest import assert_two_rank_run_learned, cli_args, free_port, logged_losses, loss_falls, run_cli
from xtuner_vl.engine.deepspeed_config import CONFIG_ROOT

pytestmark = pytest.mark.slow


def test_two_process_zero3_moe_run_learns(train_assets, tiny_ckpt, tmp_path):
    """Two ranks on gloo under ZeRO-3 with mixed single-image, multi-image and text-only batches, on the Qwen3-MoE
    family (InternVL3.5-30B-A3B): the ranks route their tokens to different experts, text-only micro-batches
    included, with LoRA on every expert; no hang, and the run learns (:func:`assert_two_rank_run_learned`). The
    ZeRO-2 run of the InternVL2 family is test_resume.py's uninterrupted reference run."""
    work = tmp_path / "zero3"
    env = {"NPROC_PER_NODE": "2", "PORT": str(free_port())}
    run_cli(
        cli_args({**train_assets, "model": tiny_ckpt("internvl3_5-30b-a3b")}, work, "--deepspeed", "zero3")
        + ["schedule.epochs=3", "runtime.save_steps=100"],
        env=env,
        cache=train_assets["cache"],
    )
    assert_two_rank_run_learned(work, "zero3", 18, moe=True)  # 24 samples / (2 ranks x 2) = 6 steps per epoch


def test_two_nodes_on_one_machine(train_assets, tmp_path):
    """NNODES=2 with NODE_RANK 0 and 1, one process each, ADDR 127.0.0.1: both nodes train together."""
    import os
    import subprocess
    import sys

    from tests.engine.conftest import REPO

    port, work = free_port(), tmp_path / "nodes"
    procs = []
    for node in (0, 1):
        env = {
            **os.environ,
            "NNODES": "2",
            "NODE_RANK": str(node),
            "NPROC_PER_NODE": "1",
            "ADDR": "127.0.0.1",
            "PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "XTUNER_VL_CACHE": str(train_assets["cache"]),
        }
        args = cli_args(train_assets, work, "--deepspeed", "zero2") + ["runtime.save_steps=100"]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "xtuner_vl.cli.main", *args],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "world 2 x micro-batch 2" in outs[0]
    assert sorted(logged_losses(work)) == list(range(1, 13))


@pytest.mark.parametrize("config", ["tiny_internvl2_full", "tiny_internvl2_qlora"])
def test_full_and_qlora_single_process(train_assets, tmp_path, config):

    work = tmp_path / config
    run_cli(
        cli_args(train_assets, work, config=CONFIG_ROOT / "tiny" / f"{config}.py")
        + ["schedule.epochs=3", "runtime.save_steps=100"],
        cache=train_assets["cache"],
    )
    losses = logged_losses(work)
    assert len(losses) == 18 and loss_falls(losses), losses


def test_run_stops_when_too_many_samples_are_unusable(train_assets, tmp_path):
    """Bad records are skipped, logged with file:line, counted; past max_skip_fraction the run stops."""
    bad = tmp_path / "bad.jsonl"
    good = train_assets["data"].read_text().splitlines()
    lines = [ln if i % 4 else '{"conversations": []}' for i, ln in enumerate(good * 5)]  # 25% unusable
    bad.write_text("\n".join(lines) + "\n")
    args = cli_args(train_assets, tmp_path / "w") + [
        f"train_dataset.data_paths=['{bad}']",
        "runtime.max_skip_fraction=0.1",
    ]
    proc = run_cli(args, check=False, cache=train_assets["cache"])
    assert proc.returncode != 0
    assert "skipped sample" in proc.stdout + proc.stderr and "bad.jsonl:" in proc.stdout + proc.stderr
    assert "max_skip_fraction=10.0%" in proc.stderr


def test_packed_zero3_full_run_with_accumulation_converts(train_assets, tmp_path):
    """Full fine-tuning with packing under ZeRO-3 and gradient accumulation on two ranks: rows of several samples,
    loss still falls; the partitioned DeepSpeed checkpoint converts to the official format with the trained model's
    logits."""
    work = tmp_path / "packed"
    env = {"NPROC_PER_NODE": "2", "PORT": str(free_port())}
    out = run_cli(
        cli_args(train_assets, work, "--deepspeed", "zero3", config=CONFIG_ROOT / "tiny" / "tiny_internvl2_full.py")
        + [
            "dataloader.pack=True",
            "dataloader.pack_max_tiles=12",
            "train_dataset.max_length=1536",
            "schedule.global_batch_size=4",
            "schedule.micro_batch_size=1",
            "schedule.epochs=6",
            "runtime.save_steps=1000",
            "runtime.peak_tflops=0.01",
        ],
        env=env,
        cache=train_assets["cache"],
    )
    assert "packs" in out.stdout and "accum 2" in out.stdout
    losses = logged_losses(work)
    assert len(losses) >= 6 and loss_falls(losses), losses
    # Model FLOPs of the real samples per second and GPU, and the MFU against the given peak (10 GFLOP/s).
    records = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
    assert all(r["tflops_per_gpu"] > 0 and r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 0.01) for r in records)
    assert " mfu " in out.stdout + out.stderr
    assert (max(work.glob("checkpoints/step-*")) / "engine").is_dir()  # a DeepSpeed checkpoint
    assert_converts_to_the_trained_model(work, tmp_path / "official")
