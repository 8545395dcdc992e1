"""Real training runs through the CLI on CPU: DeepSpeed ZeRO-3 over gloo with packing and accumulation, the other
methods in one process. (Two nodes on one machine and two-rank ZeRO-2: test_resume.py's uninterrupted run; the
Qwen3-MoE ZeRO-3 run: test_zero3.py's shared launch.)"""

from __future__ import annotations

import json

import pytest

from tests.checkpoint.conftest import assert_converts_to_the_trained_model
from tests.engine.conftest import cli_args, free_port, logged_losses, loss_falls, run_cli
from xtuner_vl.engine.deepspeed_config import CONFIG_ROOT

pytestmark = pytest.mark.slow


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
            "dataloader.pack_max_tiles=6",
            "train_dataset.max_length=1024",
            "schedule.global_batch_size=4",
            "schedule.micro_batch_size=1",
            "schedule.epochs=3",
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
