"""``xtuner-vl demo``: the main job end to end on a built-in tiny default, on CPU, in a few minutes.

1. writes a tiny official-format InternVL2-2B-shaped checkpoint (InternLM2 LLM) and a synthetic image
   QA set (coloured shapes, counts, positions; some multi-image, some text-only samples);
2. validates the data with ``check-data``;
3. trains LoRA with ``xtuner-vl train`` on DeepSpeed ZeRO-2 (two processes where there are 2+ cores)
   and prints the loss before/after and the path of the loss-curve PNG;
4. merges the adapters into the official format with ``xtuner-vl convert`` and asks the converted
   model a question about a held-out image with ``xtuner-vl chat``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from xtuner_vl.recipes.config import find_config
from xtuner_vl.tiny.checkpoints import make_tiny
from xtuner_vl.tiny.data import make_synthetic_dataset

__all__ = ["run_demo"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(work_dir: str | Path = "work_dirs/demo", steps: int = 30) -> int:
    """Run the demo; returns a process exit code (0 on success)."""
    work = Path(work_dir).resolve()
    model = make_tiny("internvl2-2b", work / "internvl2-2b")
    data, images = make_synthetic_dataset(work / "data", num_samples=96, seed=0)
    print(f"[1/4] tiny checkpoint {model}\n      synthetic data {data} (96 samples)", flush=True)
    options = [f"model.path={model}", f"train_dataset.data_paths=['{data}']",
               f"train_dataset.image_folders=['{images}']", f"schedule.max_steps={steps}",
               "runtime.log_interval=5", f"runtime.save_steps={steps}"]
    config = str(find_config("tiny_internvl2_lora"))
    cli = [sys.executable, "-m", "xtuner_vl.cli.main"]
    check = subprocess.run([*cli, "check-data", config, "--cfg-options", *options], capture_output=True, text=True)
    print("[2/4] check-data: " + check.stdout.strip().splitlines()[-1], flush=True)
    if check.returncode:
        print(check.stdout + check.stderr)
        return check.returncode
    nproc = 2 if (os.cpu_count() or 1) >= 2 else 1
    env = {**os.environ, "NPROC_PER_NODE": str(nproc), "OMP_NUM_THREADS": "1", "PORT": str(_free_port())}
    print(f"[3/4] training LoRA, DeepSpeed ZeRO-2, {nproc} process(es), {steps} steps", flush=True)
    train = subprocess.run([*cli, "train", config, "--deepspeed", "zero2", "--work-dir", str(work / "train"),
                            "--cfg-options", *options], env=env)
    if train.returncode:
        return train.returncode
    log = [json.loads(x)["loss"] for x in (work / "train" / "train_log.jsonl").read_text().splitlines()]
    k = max(1, len(log) // 4)  # mean of the first and the last quarter of the steps
    first, last = sum(log[:k]) / k, sum(log[-k:]) / k
    print(f"loss {first:.3f} (first {k} steps) -> {last:.3f} (last {k})")
    print(f"loss curve: {work / 'train' / 'loss_curve.png'}")
    print(f"checkpoint: {sorted((work / 'train' / 'checkpoints').glob('step-*'))[-1]}")
    if last >= first:
        print("loss did not fall")
        return 1
    official = work / "official"
    convert = subprocess.run([*cli, "convert", config, str(work / "train"), str(official), "--cfg-options",
                              *options], capture_output=True, text=True)
    if convert.returncode:
        print(convert.stdout + convert.stderr)
        return convert.returncode
    print(f"[4/4] merged official-format model: {official}", flush=True)
    question = "What colour are the squares?"
    image = next(images.glob("*.png"))
    chat = subprocess.run([*cli, "chat", str(official), "--image", str(image), "--prompt", question,
                           "--max-new-tokens", "8"], capture_output=True, text=True)
    if chat.returncode:
        print(chat.stdout + chat.stderr)
        return chat.returncode
    print(f"      chat: {question} -> {chat.stdout.strip().splitlines()[-1] if chat.stdout.strip() else ''}")
    return 0
