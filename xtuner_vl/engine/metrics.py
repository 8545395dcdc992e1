"""Rank-0 training log: console line + progress bar, JSON lines, TensorBoard, loss-curve PNG; evaluation records."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

__all__ = ["MetricsLogger", "peak_memory_gib"]


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated on ``device``, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsLogger:
    """Writes ``train_log.jsonl`` and TensorBoard scalars under ``work_dir``; no-op off rank 0."""

    def __init__(
        self, work_dir: Path, total_steps: int, start_step: int, enabled: bool, tensorboard: bool = True
    ) -> None:
        self.enabled, self.total, self.work_dir = enabled, total_steps, Path(work_dir)
        self.history: list[dict[str, Any]] = []
        self.eval_history: list[tuple[int, float]] = []  # (step, eval loss) of this run, for the loss curve
        self.t0, self.start_step = time.perf_counter(), start_step
        self.bar = self.writer = None
        if not enabled:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.work_dir / "train_log.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        # A progress bar only on a terminal: redirected to a file its carriage-return updates would fill the log;
        # there the plain `step ...` lines (every runtime.log_interval steps) report progress.
        self.bar = tqdm(
            total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, disable=not sys.stderr.isatty()
        )
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.work_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.writer = None

    def eta_seconds(self, step: int) -> float:
        done = step - self.start_step
        return (time.perf_counter() - self.t0) / done * (self.total - step) if done else float("nan")

    def log(self, step: int, metrics: dict[str, float], console: bool) -> None:
        """Record ``metrics`` for optimizer step ``step`` (1-based count of finished steps)."""
        if not self.enabled:
            return
        record = {"step": step, **metrics, "eta_s": round(self.eta_seconds(step), 1)}
        self.history.append(record)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, step)
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
        if console:
            eta = time.strftime("%H:%M:%S", time.gmtime(record["eta_s"])) if record["eta_s"] == record["eta_s"] else "-"
            mfu = f" tflops/gpu {metrics['tflops_per_gpu']:.1f} mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
            self.bar.write(
                f"step {step}/{self.total} loss {metrics['loss']:.4f} lr {metrics['lr']:.3e} "
                f"grad_norm {metrics.get('grad_norm', float('nan')):.3f} tokens/s {metrics['tokens_per_s']:.0f} "
                f"samples/s {metrics['samples_per_s']:.2f}{mfu} mem {metrics['peak_mem_gib']:.2f}GiB eta {eta}"
            )

    def log_eval(self, step: int, results: dict[str, Any]) -> None:
        """Record what ``Evaluator.run`` (:mod:`xtuner_vl.engine.evaluation`) returned after step ``step``: one
        ``train_log.jsonl`` line (``step`` and the ``eval_*`` keys), TensorBoard ``eval/loss`` and ``eval/tokens``
        scalars and an ``eval/chat`` text of the answers, and console lines."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **results}, ensure_ascii=False) + "\n")
        self.jsonl.flush()
        lines = []
        if "eval_loss" in results:
            loss = results["eval_loss"]
            self.eval_history.append((step, loss))
            if self.writer is not None:
                self.writer.add_scalar("eval/loss", loss, step)
                self.writer.add_scalar("eval/tokens", results["eval_tokens"], step)
            skipped = f", {results['eval_skipped']} skipped" if results.get("eval_skipped") else ""
            lines.append(
                f"eval step {step}: loss {loss:.4f} ({results['eval_samples']} samples, "
                f"{results['eval_tokens']} trained tokens{skipped}, {results['eval_seconds']:.1f}s)"
            )
        chat = results.get("eval_chat", [])
        for i, qa in enumerate(chat):
            image = f" [{qa['image']}]" if qa["image"] else ""
            lines.append(f"eval step {step} prompt {i}{image}: {qa['prompt']!r} -> {qa['answer']!r}")
        if self.writer is not None and chat:
            self.writer.add_text("eval/chat", "\n\n".join(_markdown(qa) for qa in chat), step)
        for line in lines:
            self.bar.write(line)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> Path | None:
        """Close files; write ``loss_curve.png`` from this run's history and return its path."""
        if not self.enabled:
            return None
        self.bar.close()
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
        return self._plot()

    def _plot(self) -> Path | None:
        if not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in self.history], [r["loss"] for r in self.history], label="train")
        if self.eval_history:
            steps, losses = zip(*self.eval_history, strict=True)
            ax.plot(steps, losses, "o-", label="eval")
            ax.legend()
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (mean over trained tokens)")
        ax.grid(alpha=0.3)
        path = self.work_dir / "loss_curve.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path


def _markdown(qa: dict[str, Any]) -> str:
    """One prompt and its answer for TensorBoard's text panel (markdown; the answer verbatim in a code block)."""
    image = f" ({qa['image']})" if qa["image"] else ""
    return f"**{qa['prompt']}**{image}\n\n```\n{qa['answer']}\n```"
