"""Fixtures for training runs: a tiny checkpoint, a synthetic data set and a runner of the real CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from xtuner_vl.engine.deepspeed_config import CONFIG_ROOT
from xtuner_vl.tiny.data import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = CONFIG_ROOT / "tiny" / "tiny_internvl2_lora.py"
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def train_assets(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    data_dir = tmp_path_factory.mktemp("train-data")
    data, images = make_synthetic_dataset(data_dir, num_samples=24, seed=1)
    return {"model": tiny_ckpt("internvl2-2b"), "data": data, "images": images, "cache": data_dir / "cache"}


def cli_args(assets: dict[str, Path], work_dir: Path, *extra: str, config: Path = TINY_CONFIG) -> list[str]:
    options = [
        f"model.path={assets['model']}",
        f"train_dataset.data_paths=['{assets['data']}']",
        f"train_dataset.image_folders=['{assets['images']}']",
    ]
    return ["train", str(config), "--work-dir", str(work_dir), *extra, "--cfg-options", *options]


def run_cli(
    args: list[str],
    env: dict[str, str] | None = None,
    timeout: int = 300,
    check: bool = True,
    cache: Path | None = None,
) -> subprocess.CompletedProcess:
    # A fresh command: no launcher variables from this process (a launcher is asked for through ``env``).
    inherited = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    full_env = {**inherited, "OMP_NUM_THREADS": "1", **(env or {})}
    if cache is not None:
        full_env["XTUNER_VL_CACHE"] = str(cache)
    proc = subprocess.run(
        [sys.executable, "-m", "xtuner_vl.cli.main", *args],
        env=full_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


def logged_losses(work_dir: Path) -> dict[int, float]:
    """step -> loss from train_log.jsonl (the last record of a step wins, as after a resume)."""
    out = {}
    for line in (work_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out
