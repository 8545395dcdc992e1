"""The training loop, in one fixed visible order per optimizer step:

lr -> micro-steps (forward, weighted loss sum / global weight sum, backward, backend step) ->
log -> skip check -> evaluation (every ``evaluation.interval`` steps and at the last one) -> checkpoint.

The loss of a step is ``sum_t w(t) * CE(t) / sum_t w(t)`` over every trained token ``t`` of the whole
accumulation window on all ranks, with ``w(t)`` set by ``schedule.loss_reduction`` (computed in collate):
1 (``token``: the global token mean), ``1 / n`` (``sample``: every sample counts the same) or ``1 / sqrt(n)``
(``square``, the InternVL 3.5 recipes), ``n`` being the trained tokens of ``t``'s sample, packed or not. The
official code (OpenGVLab/InternVL internvl_chat_gpt_oss/internvl/model/internvl_chat/modeling_internvl_chat.py)
divides each micro-batch by its own weight sum, averaged over the data-parallel ranks (in internvl_chat/ only
with ``--loss_reduction_all_gather``), and the micro-steps are then averaged; here the normalisation is
global, hence exact whatever the packing, the micro-batch split or the world size.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xtuner_vl.dataset.collate import CollatedBatch, SkippedSample
from xtuner_vl.engine.backend import Backend, set_group_lrs
from xtuner_vl.engine.checkpoint_dir import (
    CheckpointDir,
    checkpoint_files,
    hash_files,
    rng_state,
    set_rng_state,
    verify_checkpoint,
)
from xtuner_vl.engine.dist import DistInfo, all_gather_objects, all_reduce_sum, barrier, merge
from xtuner_vl.engine.evaluation import Evaluator, forward_inputs
from xtuner_vl.engine.flops import TrainingFlops
from xtuner_vl.engine.io_errors import io_errors_named
from xtuner_vl.engine.metrics import MetricsLogger, peak_memory_gib
from xtuner_vl.engine.preemption import STOP_FILE_ENV, StopSignals, TrainingAborted, TrainingStopped
from xtuner_vl.structures import Batch

__all__ = ["Trainer", "TrainerSettings"]


@dataclass
class TrainerSettings:
    total_steps: int
    steps_per_epoch: int
    grad_accum: int
    micro_batch_size: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float = 0.0
    save_steps: int = 500
    keep_last: int = 2
    log_interval: int = 10
    max_skip_fraction: float = 0.01
    max_nonfinite_steps: int = 3  # consecutive steps whose loss or gradient norm is not finite, then stop
    allow_data_change: bool = False  # resume although an annotation file's content changed
    meta: dict[str, Any] = field(default_factory=dict)  # written into each checkpoint's meta.json
    # What the data order depends on (sizes, sampler, packing): a resume must find the same.
    data_signature: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Progress:
    step: int = 0
    epoch: int = 0
    consumed: int = 0  # samples of this epoch this rank has trained on (resumes the sampler)
    seen: int = 0  # samples seen, all ranks, whole run
    skipped: int = 0  # samples skipped, all ranks, whole run
    overflow_rows: int = 0  # packed rows beyond the plan (estimates short), all ranks, whole run
    nonfinite: int = 0  # optimizer updates skipped for a non-finite loss or gradient norm, whole run
    nonfinite_run: int = 0  # ... of them in a row, up to now


class Trainer:
    """Runs ``settings.total_steps`` optimizer steps of ``backend`` over ``make_loader()`` batches."""

    def __init__(
        self,
        backend: Backend,
        make_loader: Callable[[], Iterator[CollatedBatch]],
        sampler: Any,
        settings: TrainerSettings,
        dist_info: DistInfo,
        work_dir: str | Path,
        first_usable_batch: Callable[[], Batch] | None = None,
        flops: TrainingFlops | None = None,
        peak_flops: float | None = None,
        describe_sample: Callable[[int], str] | None = None,
        evaluator: Evaluator | None = None,
    ) -> None:
        self.backend, self.make_loader, self.sampler = backend, make_loader, sampler
        self.s, self.dist = settings, dist_info
        self.work_dir = Path(work_dir)
        self.ckpt = CheckpointDir(self.work_dir, settings.keep_last)
        self.progress = _Progress()
        self._fallback: Batch | None = None
        self._first_usable_batch = first_usable_batch
        # FLOPs of the real samples (TrainingFlops) and one device's peak: tflops_per_gpu and mfu in the log.
        self.flops, self.peak_flops = flops, peak_flops
        self.describe_sample = describe_sample or str  # dataset index -> "file:line" for messages
        self.signals = StopSignals()
        self.evaluator = evaluator  # eval loss / fixed prompts at its interval and the last step; None: none

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self) -> Path:
        p = self.progress
        if not self.backend.weights_finite():  # never let a diverged model replace the last good checkpoint
            last = self.ckpt.latest()
            raise TrainingAborted(
                f"step {p.step}: the trained weights hold inf/NaN; not saved (the last checkpoint, "
                f"{last or 'none'}, is kept). Lower optim.lr or check the data, then resume from it"
            )
        tmp = self.ckpt.tmp_path(p.step)
        with io_errors_named(tmp):
            if self.dist.is_main:
                self.ckpt.begin(p.step)
            barrier()
            self.backend.save(tmp)
            state = {
                "step": p.step,
                "epoch": p.epoch,
                "consumed": p.consumed,
                "seen": p.seen,
                "skipped": p.skipped,
                "overflow_rows": p.overflow_rows,
                "nonfinite": p.nonfinite,
                "nonfinite_run": p.nonfinite_run,
                "rng": rng_state(),
                "sampler": self.sampler.state_dict(p.consumed),
                "data_signature": self.s.data_signature,
            }
            torch.save(state, tmp / f"trainer_state_rank{self.dist.rank}.pt")
            if os.environ.get("XTUNER_VL_CRASH_IN_SAVE") == str(p.step):  # fault injection for the resume tests
                os.kill(os.getpid(), signal.SIGKILL)
            barrier()
            # Every rank hashes its share of the files just written (still in the page cache), rank 0 lists them.
            names = checkpoint_files(tmp)
            manifest = merge(all_gather_objects(hash_files(tmp, names[self.dist.rank :: self.dist.world_size])))
            final = self.ckpt.final_path(p.step)
            if self.dist.is_main:
                meta = {**self.s.meta, "step": p.step, "epoch": p.epoch, "world_size": self.dist.world_size}
                final = self.ckpt.commit(p.step, meta, manifest)
            barrier()
        return final

    def verify(self, path: Path) -> str | None:
        """(all ranks) None when every file of checkpoint ``path`` matches its manifest, else why not; each rank
        re-hashes its share. A checkpoint written before manifests existed passes (nothing to check)."""
        reasons = all_gather_objects(verify_checkpoint(path, self.dist.rank, self.dist.world_size))
        return next((r for r in reasons if r), None)

    def newest_verified(self) -> Path | None:
        """(all ranks) The newest complete checkpoint that verifies; newer ones that fail are moved aside to
        ``checkpoints/rejected/`` (so retention cannot keep them over good ones), each with a message."""
        for path in reversed(self.ckpt.complete()):
            reason = self.verify(path)
            if reason is None:
                return path
            if self.dist.is_main:
                moved = self.ckpt.reject(path, reason)
                print(f"checkpoint {path.name} fails verification ({reason}); moved to {moved}", flush=True)
            barrier()
        return None

    def resume(self, path: Path) -> None:
        with io_errors_named(path, writing=False):
            self.backend.load(path)
            state = torch.load(path / f"trainer_state_rank{self.dist.rank}.pt", weights_only=False)
        self._check_data_signature(path, state.get("data_signature"))
        keys = ("step", "epoch", "consumed", "seen", "skipped")
        optional = ("overflow_rows", "nonfinite", "nonfinite_run")  # absent from older checkpoints
        self.progress = _Progress(*(state[k] for k in keys), *(state.get(k, 0) for k in optional))
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])

    def _check_data_signature(self, path: Path, saved: dict[str, Any] | None) -> None:
        """Refuse to resume when the data order would differ from the checkpoint's run."""
        now = self.s.data_signature
        if not saved or saved == now:  # checkpoints from before signatures were saved carry none
            return
        keys = [k for k in sorted({*saved, *now}) if saved.get(k) != now.get(k)]
        if not any(k.startswith("source ") for k in saved):  # saved before fingerprints existed
            keys = [k for k in keys if not k.startswith("source ")]
        if self.s.allow_data_change:  # content only: sizes and order settings must still agree
            if changed := [k for k in keys if k.startswith("source ")]:
                print(f"resuming with changed data (--allow-data-change): {', '.join(changed)}", flush=True)
            keys = [k for k in keys if not k.startswith("source ")]
        if not keys:
            return
        changes = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys]
        raise ValueError(
            f"{path}: cannot resume exactly, the data order of this run differs from the checkpoint's "
            f"({'; '.join(changes)}). Restore those settings or files, or start a new run without --resume"
            + (" (--allow-data-change accepts changed file contents)." if "source " in " ".join(keys) else ".")
        )

    # -- one optimizer step --------------------------------------------------------------------
    def _next_batches(self, it: Iterator[CollatedBatch]) -> list[CollatedBatch]:
        return [next(it) for _ in range(self.s.grad_accum)]

    def _micro_inputs(self, cb: CollatedBatch) -> tuple[Batch, float]:
        """The batch to run and its loss weight; an all-skipped micro-batch re-runs the last good
        batch (or the data set's first usable sample) with weight 0, so every rank still takes part in
        the collective forward/backward."""
        if cb.batch is not None:
            self._fallback = cb.batch
            return cb.batch, 1.0
        if self._fallback is None:
            if self._first_usable_batch is None:
                raise RuntimeError("the first micro-batch of the run has no usable sample; check the data")
            self._fallback = self._first_usable_batch()
        return self._fallback, 0.0

    def _step(self, micro: list[CollatedBatch]) -> dict[str, float]:
        """One optimizer step. Every count comes from collate (host side); the device is read once, after the
        last backward: the global loss, whose finiteness decides (on every rank alike) whether to update."""
        device = self.dist.device
        inputs = [self._micro_inputs(cb) for cb in micro]
        used = [b for b, w in inputs if w]
        local = [float(sum(b.num_trained for b in used)), sum(b.loss_weight_sum for b in used)]
        n_global, w_global = all_reduce_sum(torch.tensor(local, device=device, dtype=torch.float64)).unbind()
        # Every sample's weights sum to 1 (sample), sqrt(n) or n: a step that trains anything weighs at least 1.
        w_global = w_global.clamp(min=1.0)
        loss_total, tokens = torch.zeros((), device=device, dtype=torch.float64), 0
        aux_total, aux_count, moe = torch.zeros((), device=device, dtype=torch.float64), 0.0, False
        model_flops = 0.0
        for i, (batch, weight) in enumerate(inputs):
            boundary = i == len(micro) - 1
            self.backend.prepare_micro_step(boundary)
            if self.flops is not None and weight:
                model_flops += self.flops.of_batch(batch)  # from the CPU tensors: no device sync
            tokens += batch.num_tokens if weight else 0
            batch = batch.to(device, non_blocking=True)
            out = self.backend.forward(**forward_inputs(batch), loss_weights=batch.loss_weights)
            loss_sum = out.loss_sum * weight
            # Backends average gradients over ranks; multiplying by world size makes it a global sum.
            objective = (loss_sum * self.dist.world_size / w_global).float()
            if out.aux_loss is not None:
                # MoE router loss: per micro-batch, averaged over the window and the ranks (as the official
                # DeepSpeed run averages it), logged on its own
                objective = objective + out.aux_loss_coef * out.aux_loss.float() * weight / len(micro)
                aux_total += out.aux_loss.detach().double() * weight
                aux_count, moe = aux_count + weight, True
            self.backend.backward(objective)
            loss_total += loss_sum.detach()
            if not boundary:
                self.backend.step(False)
        loss = float((all_reduce_sum(loss_total) / w_global).float())  # reported in float32
        aux = {}
        if moe:
            summed = all_reduce_sum(
                torch.stack([aux_total, torch.tensor(aux_count, device=device, dtype=torch.float64)])
            )
            aux = {"router_aux_loss": float(summed[0] / summed[1].clamp(min=1.0))}
        # A non-finite loss skips the update; so does a non-finite gradient norm (the backends check it).
        grad_norm = self.backend.step(True, skip=not math.isfinite(loss))
        return {
            **aux,
            "loss": loss,
            "grad_norm": grad_norm,
            "updated": math.isfinite(loss) and grad_norm is not None and math.isfinite(grad_norm),
            "tokens": float(all_reduce_sum(torch.tensor(float(tokens), device=device))),
            "trained_tokens": float(n_global),
            "flops": float(all_reduce_sum(torch.tensor(model_flops, device=device, dtype=torch.float64))),
        }

    def _account(self, micro: list[CollatedBatch]) -> bool:
        """Count the step's samples, skipped samples and overflow rows over all ranks, log the skipped ones,
        and share whether any rank received a stop signal (one collective per step). Returns that."""
        local = [s for cb in micro for s in cb.skipped]
        counts = all_reduce_sum(
            torch.tensor(
                [
                    float(sum(cb.num_samples for cb in micro) + len(local)),
                    float(len(local)),
                    float(sum(cb.overflow_rows for cb in micro)),
                    float(self.signals.received is not None),
                ],
                device=self.dist.device,
            )
        )
        self.progress.seen += int(counts[0])
        self.progress.skipped += int(counts[1])
        self.progress.overflow_rows += int(counts[2])
        reasons: list[list[SkippedSample]] = all_gather_objects(local)
        if self.dist.is_main:
            for s in (s for rank_skips in reasons for s in rank_skips):
                self.logger.message(f"skipped sample {s.source}:{s.line}: {s.reason}")
        p = self.progress
        if p.skipped > self.s.max_skip_fraction * p.seen and p.skipped > 0 and p.seen >= 100:
            raise TrainingAborted(
                f"{p.skipped} of {p.seen} samples skipped ({p.skipped / p.seen:.1%} > max_skip_fraction="
                f"{self.s.max_skip_fraction:.1%}); fix the data (run `xtuner-vl check-data`) or raise the limit"
            )
        return bool(counts[3])

    def _count_nonfinite(self, stats: dict[str, float]) -> None:
        p = self.progress
        p.nonfinite_run = 0 if stats["updated"] else p.nonfinite_run + 1
        p.nonfinite += 0 if stats["updated"] else 1

    def _guard_nonfinite(self, stats: dict[str, float], micro: list[CollatedBatch]) -> None:
        """After a skipped update: a message, or past ``max_nonfinite_steps`` in a row a stop naming the samples."""
        p = self.progress
        if stats["updated"]:
            return
        if p.nonfinite_run <= self.s.max_nonfinite_steps:
            self.logger.message(
                f"step {p.step}: loss {stats['loss']}, gradient norm {stats['grad_norm']}: update skipped"
            )
            return
        local = [self.describe_sample(i) for cb in micro for i in cb.sample_indices]
        names = [name for rank in all_gather_objects(local) for name in rank]
        raise TrainingAborted(
            f"step {p.step}: {p.nonfinite_run} steps in a row with a non-finite loss or gradient norm (loss "
            f"{stats['loss']}, gradient norm {stats['grad_norm']}; runtime.max_nonfinite_steps="
            f"{self.s.max_nonfinite_steps}; last checkpoint {self.ckpt.latest() or 'none'}). Samples of this step: "
            f"{', '.join(names[:16])}{' ...' if len(names) > 16 else ''}. Lower optim.lr or check these samples"
        )

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, resume_from: Path | None = None) -> Path | None:
        """Train to ``total_steps``; returns the loss-curve PNG path (rank 0).

        A stop signal (SIGTERM, SIGINT, SIGUSR1) finishes the current step on every rank, saves it and
        raises :class:`TrainingStopped`.
        """
        if resume_from is not None:
            self.resume(resume_from)
        p, s = self.progress, self.s
        self.logger = MetricsLogger(self.work_dir, s.total_steps, p.step, self.dist.is_main)
        if self.dist.is_main and resume_from is not None:
            self.logger.message(f"resumed from {resume_from} at step {p.step}")
        self.sampler.resume(p.epoch, p.consumed)
        it = iter(self.make_loader())
        with self.signals:
            while p.step < s.total_steps:
                t0 = time.perf_counter()
                set_group_lrs(self.backend.optimizer, p.step, s.lr, s.total_steps, s.warmup_steps, s.min_lr_ratio)
                micro = self._next_batches(it)
                stats = self._step(micro)
                stop = self._account(micro)
                p.step += 1
                p.consumed += s.micro_batch_size * s.grad_accum
                self._count_nonfinite(stats)
                if p.step % s.steps_per_epoch == 0:  # epoch done: the next one starts a fresh order
                    p.epoch, p.consumed = p.epoch + 1, 0
                    self.sampler.resume(p.epoch, 0)
                    it = iter(self.make_loader())
                # Every step goes to train_log.jsonl / TensorBoard; the console gets every log_interval-th.
                self._log(stats, time.perf_counter() - t0, p.step % s.log_interval == 0 or p.step == s.total_steps)
                self._guard_nonfinite(stats, micro)
                # Before the checkpoint of the same step; a stop signal saves at once instead.
                if self.evaluator is not None and not stop and self.evaluator.should_run(p.step):
                    self.logger.log_eval(p.step, self.evaluator.run(p.step))
                if stop or p.step % s.save_steps == 0 or p.step == s.total_steps:
                    path = self.save()
                    self.logger.message(f"checkpoint: {path}")
                if stop:
                    self._stop(path)
        return self.logger.close()

    def _stop(self, path: Path) -> None:
        received = self.signals.received or "a stop signal on another rank"
        self.logger.message(
            f"{received} received: stopped after step {self.progress.step}, saved {path}; "
            f"resume with --resume auto (exit status {TrainingStopped.exit_code})"
        )
        self.logger.close()
        if self.dist.is_main and (marker := os.environ.get(STOP_FILE_ENV)):
            Path(marker).write_text(f"{received}\n{path}\n")  # the launcher's sign that the workers saved
        raise TrainingStopped(str(path))

    def _log(self, last: dict[str, float], seconds: float, console: bool) -> None:
        p, s = self.progress, self.s
        group_lr = self.backend.optimizer.param_groups[0]
        metrics = {
            "loss": last["loss"],
            "lr": group_lr["lr"] / group_lr.get("lr_scale", 1.0),
            "grad_norm": last["grad_norm"] if last["grad_norm"] is not None else float("nan"),
            "tokens_per_s": last["tokens"] / seconds,
            "samples_per_s": s.micro_batch_size * s.grad_accum * self.dist.world_size / seconds,
            "peak_mem_gib": peak_memory_gib(self.dist.device),
            "skipped": float(p.skipped),
            "overflow_rows": float(p.overflow_rows),
            "nonfinite_steps": float(p.nonfinite),
            **({"router_aux_loss": last["router_aux_loss"]} if "router_aux_loss" in last else {}),
        }
        if self.flops is not None:
            per_gpu = last["flops"] / seconds / self.dist.world_size
            metrics["tflops_per_gpu"] = per_gpu / 1e12
            if self.peak_flops:
                metrics["mfu"] = per_gpu / self.peak_flops
        self.logger.log(p.step, metrics, console=console)
