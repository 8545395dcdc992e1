"""Fixtures for training runs: a tiny checkpoint, a synthetic data set and a runner of the real CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

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


# What only a separate process can run: a launcher (torchrun), DeepSpeed (its gloo group ends the process), the
# crash hooks that kill the process, and the commands that start worker processes (check-data, unless --workers 1).
_SUBPROCESS_ENV = ("NPROC_PER_NODE", "NNODES", "XTUNER_VL_CRASH_IN_SAVE")


def _needs_subprocess(args: list[str], env: dict[str, str]) -> bool:
    one_worker = args[0] == "check-data" and "--workers" in args and args[args.index("--workers") + 1] == "1"
    return (
        (args[0] not in ("train", "convert", "chat", "preview-data") and not one_worker)
        or "--deepspeed" in args
        or any(k in env for k in _SUBPROCESS_ENV)
    )


def _run_in_process(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``xtuner-vl <args>`` through the CLI's own ``main`` in this process (``run_captured``): the same code without
    the seconds a fresh interpreter spends importing torch, transformers and peft. The environment and working
    directory are the subprocess's, restored afterwards."""
    from xtuner_vl.cli.main import run_captured

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(REPO)
    try:
        return run_captured(args)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def run_cli(
    args: list[str],
    env: dict[str, str] | None = None,
    timeout: int = 300,
    check: bool = True,
    cache: Path | None = None,
    subprocess_only: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``xtuner-vl <args>``: one-process trainings and converts in this process (see :func:`_run_in_process`),
    launchers, DeepSpeed and fault injection in a fresh interpreter (or any run with ``subprocess_only``)."""
    # A fresh command: no launcher variables from this process (a launcher is asked for through ``env``).
    inherited = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    full_env = {**inherited, "OMP_NUM_THREADS": "1", **(env or {})}
    if cache is not None:
        full_env["XTUNER_VL_CACHE"] = str(cache)
    if subprocess_only or _needs_subprocess(args, env or {}):
        proc = subprocess.run(
            [sys.executable, "-m", "xtuner_vl.cli.main", *args],
            env=full_env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    else:
        proc = _run_in_process(args, full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


def run_two_nodes(args: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> list[str]:
    """``xtuner-vl <args>`` as two nodes on this machine (NNODES=2, NODE_RANK 0 and 1, one process each, ADDR
    127.0.0.1), as a user starts it on each node; returns each node's output, after both exit with status 0."""
    port = free_port()
    procs = []
    for node in (0, 1):
        node_env = {
            **{k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV},
            "OMP_NUM_THREADS": "1",
            **(env or {}),
            "NNODES": "2",
            "NODE_RANK": str(node),
            "NPROC_PER_NODE": "1",
            "ADDR": "127.0.0.1",
            "PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "xtuner_vl.cli.main", *args],
                env=node_env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    return outs


def loss_falls(losses: dict[int, float]) -> bool:
    """The mean of the last two logged losses is clearly below that of the first two."""
    steps = sorted(losses)
    first, last = steps[:2], steps[-2:]
    return sum(losses[s] for s in last) < sum(losses[s] for s in first) - 0.3


def logged_losses(work_dir: Path) -> dict[int, float]:
    """step -> loss from train_log.jsonl (the last record of a step wins, as after a resume)."""
    out = {}
    for line in (work_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:  # evaluation records have none
            out[rec["step"]] = rec["loss"]
    return out


def assert_two_rank_run_learned(work: Path, stage: str, steps: int, moe: bool = False) -> None:
    """What every two-rank DeepSpeed run must show: each step logged, loss falls, the last checkpoint complete with
    its engine state, each rank's own RNG stream (dropout / drop-path masks, seeded once the model was built), the
    resolved config and the loss curve saved; the router's load-balancing loss logged on its own for MoE only."""
    records = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
    assert all((r["router_aux_loss"] > 0) if moe else ("router_aux_loss" not in r) for r in records)
    losses = logged_losses(work)
    assert sorted(losses) == list(range(1, steps + 1))
    assert loss_falls(losses), losses
    final = work / "checkpoints" / f"step-{steps:08d}"
    assert (final / "COMPLETE").is_file() and (final / "engine").is_dir()
    assert json.loads((final / "meta.json").read_text())["deepspeed"] == stage
    rng = [torch.load(final / f"trainer_state_rank{r}.pt", weights_only=False)["rng"] for r in (0, 1)]
    assert rng[0]["python"] != rng[1]["python"] and not np.array_equal(rng[0]["numpy"][1], rng[1]["numpy"][1])
    assert (work / "tiny_internvl2_lora.py").is_file() and (work / "loss_curve.png").is_file()
