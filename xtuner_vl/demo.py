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

Each command runs in this process, through the command line's own code.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import torch

from xtuner_vl.recipes.config import find_config
from xtuner_vl.tiny.checkpoints import make_tiny
from xtuner_vl.tiny.data import SMALL_SIZES, make_synthetic_dataset
from xtuner_vl.tiny.quiz import make_quiz, quiz_accuracy_of_dir

__all__ = ["DEMO_CONFIG", "PASS_ACCURACY", "run_demo"]

DEMO_CONFIG = "tiny_internvl2_demo_lora"
PASS_ACCURACY = 0.9  # the demo fails (exit code 1) below this held-out accuracy after training


def _run(args: list[str]) -> subprocess.CompletedProcess:
    """Run the ``xtuner-vl`` command ``args`` in this process (the command line's own code, without the seconds a
    fresh interpreter spends importing torch and transformers), its output captured and printed if it fails."""
    from xtuner_vl.cli.main import run_captured

    proc = run_captured(args)
    if proc.returncode:
        print(proc.stdout + proc.stderr)
    return proc


def _train(config: str, train_dir: Path, options: dict) -> int:
    """``xtuner-vl train config --deepspeed zero2`` as one process, this one (its checks, then ``train`` and the
    process group it joins as rank 0 of 1; the environment it fills for that group is restored afterwards); returns
    the command's exit status: 0, 2 on a failed check, or the stop signal's status after the clean save a SIGTERM or
    SIGINT asks for."""
    from xtuner_vl.cli.main import train_preflight_failed
    from xtuner_vl.engine.dist import destroy_distributed
    from xtuner_vl.engine.preemption import TrainingStopped
    from xtuner_vl.recipes.train import train

    if train_preflight_failed(config, str(train_dir), options):
        return 2
    saved = dict(os.environ)
    try:
        train(config, deepspeed="zero2", work_dir=str(train_dir), cfg_options=options)
        return 0
    except TrainingStopped as stopped:
        return stopped.exit_code
    finally:
        destroy_distributed()
        os.environ.clear()
        os.environ.update(saved)


def run_demo(work_dir: str | Path = "work_dirs/demo", steps: int = 700) -> int:
    """Run the demo; returns a process exit code (0 on success).

    ``steps`` optimizer steps of 4 samples each, on ``4 * steps`` freshly drawn training samples (one
    epoch): every scene is seen once, so what the quiz measures is generalisation to new scenes. Everything runs in
    this process on one thread: the tiny model costs per operation, not per multiply, so more threads would only
    make its numbers depend on the machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _demo(Path(work_dir).resolve(), steps)
    finally:
        torch.set_num_threads(threads)


def _demo(work: Path, steps: int) -> int:
    start = time.perf_counter()
    model = make_tiny("internvl2-2b", work / "internvl2-2b", logit_scale=8.0)
    num = 4 * steps
    data, images = make_synthetic_dataset(
        work / "data", num_samples=num, seed=0, multi_image=0.1, text_only=0.1, questions=(3, 3), sizes=SMALL_SIZES
    )
    quiz, quiz_images = make_quiz(work / "quiz", num_questions=60, seed=1234, sizes=SMALL_SIZES)
    print(f"[1/5] tiny InternVL2 checkpoint: {model}\n      training data: {data} ({num} samples)", flush=True)
    before = quiz_accuracy_of_dir(model, quiz, quiz_images, max_dynamic_patch=1)
    print(f"      held-out quiz ({quiz}), untrained model: {before.summary()}", flush=True)

    options = {
        "model.path": str(model),
        "train_dataset.data_paths": [str(data)],
        "train_dataset.image_folders": [str(images)],
        "schedule.max_steps": steps,
    }
    cli_options = ["--cfg-options", *(f"{k}={v}" for k, v in options.items())]
    config = str(find_config(DEMO_CONFIG))
    # One worker: the records are checked in this process, which forks nothing after torch and tokenizers ran.
    check = _run(["check-data", config, "--workers", "1", *cli_options])
    if check.returncode:
        return check.returncode
    print("[2/5] check-data: " + check.stdout.strip().splitlines()[-1], flush=True)

    print(f"[3/5] training LoRA (config {DEMO_CONFIG}), DeepSpeed ZeRO-2, one process, {steps} steps", flush=True)
    train_dir = work / "train"
    if status := _train(config, train_dir, options):
        return status
    records = [json.loads(x) for x in (train_dir / "train_log.jsonl").read_text().splitlines()]
    log = [r["loss"] for r in records if "loss" in r]  # evaluation records have none
    k = max(1, len(log) // 10)  # mean of the first and the last tenth of the steps
    print(f"      loss {sum(log[:k]) / k:.3f} (first {k} steps) -> {sum(log[-k:]) / k:.3f} (last {k})")

    official = work / "official"
    convert = _run(["convert", config, str(train_dir), str(official), *cli_options])
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
