"""Crash safety: SIGKILL during a checkpoint write and mid-training, then ``--resume auto``, must give
bitwise the losses of an uninterrupted run (CPU, fp32, ZeRO-2 on two ranks). The uninterrupted run is also the
suite's two-rank ZeRO-2 LoRA training run (mixed single-image, multi-image and text-only batches) and its two-node
run: started as two nodes on one machine, it must learn, its DeepSpeed checkpoint must convert to the trained model,
and the one-node runs resumed from the crashes must match it bitwise."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.checkpoint.conftest import assert_converts_to_the_trained_model
from tests.engine.conftest import (
    REPO,
    assert_two_rank_run_learned,
    cli_args,
    free_port,
    logged_losses,
    run_cli,
    run_two_nodes,
)

pytestmark = pytest.mark.slow


def _args(assets, work):
    return cli_args(assets, work, "--deepspeed", "zero2", "--resume", "auto") + [
        "schedule.epochs=2",
        "runtime.save_steps=3",
        "runtime.keep_last=2",
    ]


def _env(assets, **extra):
    return {"NPROC_PER_NODE": "2", "PORT": str(free_port()), "XTUNER_VL_CACHE": str(assets["cache"]), **extra}


def _kill_when_logged(assets, work, step: int) -> None:
    """Start the run and SIGKILL its whole process group once ``step`` appears in the log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **_env(assets)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "xtuner_vl.cli.main", *_args(assets, work)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    log = work / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and any(json.loads(x)["step"] >= step for x in log.read_text().splitlines()):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode != 0, "the run finished before it could be killed"


@pytest.fixture(scope="module")
def two_nodes(train_assets, tmp_path_factory) -> tuple[Path, list[str]]:
    """The uninterrupted run, as two nodes of one process each (NNODES=2): 24 samples / (2 ranks x 2) = 6 steps
    per epoch, 2 epochs, checkpoints every 3. Its work dir and each node's output."""
    work = tmp_path_factory.mktemp("resume") / "reference"
    outs = run_two_nodes(_args(train_assets, work), env={"XTUNER_VL_CACHE": str(train_assets["cache"])})
    return work, outs


@pytest.fixture(scope="module")
def uninterrupted(two_nodes) -> Path:
    return two_nodes[0]


def test_two_nodes_on_one_machine_train_together(two_nodes):
    """NNODES=2 with NODE_RANK 0 and 1, one process each, ADDR 127.0.0.1: one world of two ranks."""
    work, (node0, node1) = two_nodes
    assert "world 2 x micro-batch 2" in node0
    assert sorted(logged_losses(work)) == list(range(1, 13))


def test_two_process_zero2_run_learns(uninterrupted):
    assert_two_rank_run_learned(uninterrupted, "zero2", 12)


def test_zero2_lora_checkpoint_converts_to_the_trained_model(uninterrupted, tmp_path):
    """The DeepSpeed ZeRO-2 checkpoint of two ranks (frozen weights excluded, LoRA adapters merged)."""
    assert_converts_to_the_trained_model(uninterrupted, tmp_path / "official")


def test_sigkill_in_checkpoint_write_and_mid_run_then_resume(uninterrupted, train_assets, tmp_path):
    expected = logged_losses(uninterrupted)
    assert sorted(expected) == list(range(1, 13))

    work = tmp_path / "crashy"
    # 1) killed while writing the step-6 checkpoint: it must stay invisible, step 3 is the newest complete one.
    crashed = run_cli(_args(train_assets, work), env=_env(train_assets, XTUNER_VL_CRASH_IN_SAVE="6"), check=False)
    assert crashed.returncode != 0
    ckpts = work / "checkpoints"
    assert (ckpts / ".tmp-step-00000006").is_dir() and not (ckpts / "step-00000006").exists()
    assert (ckpts / "step-00000003" / "COMPLETE").is_file()
    # 2) resumed from step 3, then SIGKILLed mid-way once step 8 is logged.
    _kill_when_logged(train_assets, work, 8)
    assert (ckpts / "step-00000006" / "COMPLETE").is_file()
    # 3) resumed again to the end.
    out = run_cli(_args(train_assets, work), env=_env(train_assets))
    assert "resumed from" in out.stdout + out.stderr
    got = logged_losses(work)
    assert sorted(got) == list(range(1, 13))
    assert got == expected  # bitwise: same floats step by step
    assert [p.name for p in sorted(ckpts.iterdir())] == ["step-00000009", "step-00000012"]  # keep_last=2


def test_resume_refuses_a_changed_data_order(train_assets, tmp_path):
    """Packing settings (or sizes, sampler, micro batch) that would change the data order stop a resume
    with the differences named, instead of silently training on another order."""
    work = tmp_path / "packed"
    base = cli_args(train_assets, work, "--resume", "auto") + [
        "runtime.deepspeed=None",
        "dataloader.pack=True",
        "train_dataset.max_length=1536",
        "schedule.global_batch_size=1",
        "schedule.micro_batch_size=1",
        "schedule.max_steps=2",
        "runtime.save_steps=2",
    ]
    run_cli(base + ["dataloader.pack_length=2048"], cache=train_assets["cache"])
    proc = run_cli(
        base + ["dataloader.pack_length=3072", "schedule.max_steps=4"], check=False, cache=train_assets["cache"]
    )
    assert proc.returncode != 0
    assert "cannot resume exactly" in proc.stderr and "pack_length: 2048 -> 3072" in proc.stderr, proc.stderr[-3000:]
    # (Unchanged settings resume: test_sigkill_in_checkpoint_write_and_mid_run_then_resume goes through the
    # same check with the signature its checkpoints saved.)
