"""``xtuner-vl demo``: the main job end to end on a built-in tiny default, on CPU, in a few minutes.

1. writes a tiny official-format InternVL2-2B-shaped checkpoint (InternLM2 LLM), a synthetic training
   set of scenes (coloured squares: colour, count and position questions; some multi-image and some
   text-only samples) and a held-out multiple-choice quiz on new scenes, and measures the quiz accuracy
   of the untrained model (chance);
2. validates the training data with ``xtuner-vl check-data``;
3. trains LoRA with ``xtuner-vl train`` on DeepSpeed ZeRO-2, one process (4 samples per step);
4. merges the adapters into the official format with ``xtuner-vl convert``;
5. reloads the converted directory with our loader, measures the quiz accuracy again (it must rise
   above 90%), and asks it one question about a held-out scene with ``xtuner-vl chat``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from xtuner_vl.recipes.config import find_config
from xtuner_vl.tiny.checkpoints import make_tiny
from xtuner_vl.tiny.data import SMALL_SIZES, make_synthetic_dataset
from xtuner_vl.tiny.quiz import make_quiz, quiz_accuracy_of_dir

__all__ = ["DEMO_CONFIG", "PASS_ACCURACY", "run_demo"]

DEMO_CONFIG = "tiny_internvl2_demo_lora"
PASS_ACCURACY = 0.9  # the demo fails (exit code 1) below this held-out accuracy after training
_CLI = [sys.executable, "-m", "xtuner_vl.cli.main"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], fresh: bool = False) -> subprocess.CompletedProcess:
    """Run the ``xtuner-vl`` command ``args`` with its output captured (printed when it fails): in this process (the
    command line's own code, without the seconds a fresh interpreter spends importing torch and transformers), or
    in a fresh interpreter (``fresh``: check-data forks worker processes, which must not inherit this process's
    OpenMP threads)."""
    if fresh:
        proc = subprocess.run([*_CLI, *args], capture_output=True, text=True)
    else:
        from xtuner_vl.cli.main import run_captured

        proc = run_captured(args)
    if proc.returncode:
        print(proc.stdout + proc.stderr)
    return proc


def run_demo(work_dir: str | Path = "work_dirs/demo", steps: int = 700) -> int:
    """Run the demo; returns a process exit code (0 on success).

    ``steps`` optimizer steps of 4 samples each, on ``4 * steps`` freshly drawn training samples (one
    epoch): every scene is seen once, so what the quiz measures is generalisation to new scenes.
    """
    work, start = Path(work_dir).resolve(), time.perf_counter()
    model = make_tiny("internvl2-2b", work / "internvl2-2b", logit_scale=8.0)
    num = 4 * steps
    data, images = make_synthetic_dataset(
        work / "data", num_samples=num, seed=0, multi_image=0.1, text_only=0.1, questions=(3, 3), sizes=SMALL_SIZES
    )
    quiz, quiz_images = make_quiz(work / "quiz", num_questions=60, seed=1234, sizes=SMALL_SIZES)
    print(f"[1/5] tiny InternVL2 checkpoint: {model}\n      training data: {data} ({num} samples)", flush=True)
    before = quiz_accuracy_of_dir(model, quiz, quiz_images, max_dynamic_patch=1)
    print(f"      held-out quiz ({quiz}), untrained model: {before.summary()}", flush=True)

    options = [
        f"model.path={model}",
        f"train_dataset.data_paths=['{data}']",
        f"train_dataset.image_folders=['{images}']",
        f"schedule.max_steps={steps}",
    ]
    config = str(find_config(DEMO_CONFIG))
    check = _run(["check-data", config, "--cfg-options", *options], fresh=True)
    if check.returncode:
        return check.returncode
    print("[2/5] check-data: " + check.stdout.strip().splitlines()[-1], flush=True)

    env = {**os.environ, "NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1", "PORT": str(_free_port())}
    print(f"[3/5] training LoRA (config {DEMO_CONFIG}), DeepSpeed ZeRO-2, one process, {steps} steps", flush=True)
    train_dir = work / "train"
    train = subprocess.run(
        [*_CLI, "train", config, "--deepspeed", "zero2", "--work-dir", str(train_dir), "--cfg-options", *options],
        env=env,
    )
    if train.returncode:
        return train.returncode
    records = [json.loads(x) for x in (train_dir / "train_log.jsonl").read_text().splitlines()]
    log = [r["loss"] for r in records if "loss" in r]  # evaluation records have none
    k = max(1, len(log) // 10)  # mean of the first and the last tenth of the steps
    print(f"      loss {sum(log[:k]) / k:.3f} (first {k} steps) -> {sum(log[-k:]) / k:.3f} (last {k})")

    official = work / "official"
    convert = _run(["convert", config, str(train_dir), str(official), "--cfg-options", *options])
    if convert.returncode:
        return convert.returncode
    print(f"[4/5] merged into the official format: {official}", flush=True)

    after = quiz_accuracy_of_dir(official, quiz, quiz_images, max_dynamic_patch=1)
    print(f"[5/5] held-out quiz, converted model reloaded: {after.summary()}")
    print(f"      accuracy {before.accuracy:.1%} (untrained) -> {after.accuracy:.1%} (trained)", flush=True)
    question, image = "How many squares are there?", quiz_images / "q00001.png"
    chat = _run(["chat", str(official), "--image", str(image), "--prompt", question, "--max-new-tokens", "8"])
    if chat.returncode:
        return chat.returncode
    answer = chat.stdout.strip().splitlines()[-1].removeprefix("ASSISTANT:").strip() if chat.stdout.strip() else ""
    expected = json.loads(quiz.read_text().splitlines()[1])["conversations"][-1]["value"]
    print(f"      xtuner-vl chat {official.name} --image {image.name} --prompt {question!r}")
    print(f"      -> {answer!r} (truth: {expected!r})")
    print(f"done in {time.perf_counter() - start:.0f} s")
    if after.accuracy < PASS_ACCURACY:
        print(f"FAILED: held-out accuracy {after.accuracy:.1%} is below {PASS_ACCURACY:.0%}")
        return 1
    return 0
