"""Real training runs through the CLI on CPU: full fine-tuning and QLoRA in one process, and a run that stops on
too many unusable samples. (Two nodes on one machine and two-rank ZeRO-2: test_resume.py's uninterrupted run; the
Qwen3-MoE run and the packed full fine-tune with accumulation on two-rank ZeRO-3: test_zero3.py's shared launch.)"""

from __future__ import annotations

import pytest

from tests.engine.conftest import cli_args, logged_losses, loss_falls, run_cli
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
        "train_dataset.max_dynamic_patch=1",  # the skipping is under test, not the tiling: one tile per image
        "model.gradient_checkpointing=False",
    ]
    proc = run_cli(args, check=False, cache=train_assets["cache"])
    assert proc.returncode != 0
    assert "skipped sample" in proc.stdout + proc.stderr and "bad.jsonl:" in proc.stdout + proc.stderr
    assert "max_skip_fraction=10.0%" in proc.stderr
