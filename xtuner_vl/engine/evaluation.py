"""Evaluation during training: the mean loss over a held-out set and greedy answers to a few fixed prompts.

The fixed prompts follow xtuner's ``EvaluateChatHook`` (InternLM/xtuner, ``xtuner/engine/hooks/
evaluate_chat_hook.py``: ``evaluation_inputs`` / ``evaluation_images`` answered every N iterations). Both run
every ``interval`` optimizer steps and at the last one, on the model as it trains (LoRA, QLoRA, gradient
checkpointing, any ZeRO stage), in eval mode and without gradients; each module's mode and every RNG state are
restored afterwards, so a run with evaluation trains exactly as one without.

The eval loss is the training loss (the model's ``loss_sum`` over the trained tokens, :mod:`xtuner_vl.model.loss`)
summed over the whole eval set and divided by its trained tokens, reduced over all ranks: each rank takes every
``world_size``-th sample (``DistributedSampler`` without shuffling) and every rank runs the same number of forward
passes (a short shard re-runs a usable sample with weight 0), which ZeRO-3's collective forward needs.
Generation runs the same prompts greedily on every rank with ``synced_gpus`` (transformers' rule for ZeRO-3:
every rank keeps stepping until all have stopped), so partitioned weights are gathered by all ranks alike.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from xtuner_vl.dataset.collate import CollatedBatch
from xtuner_vl.engine.backend import Backend
from xtuner_vl.engine.checkpoint_dir import rng_state, set_rng_state
from xtuner_vl.engine.dist import DistInfo, all_reduce_sum
from xtuner_vl.engine.preemption import ignore_stop_signals
from xtuner_vl.structures import Batch, Sample

__all__ = ["EvalChat", "EvalLossData", "EvalPrompt", "Evaluator", "eval_shard", "forward_inputs"]


def forward_inputs(batch: Batch) -> dict[str, Any]:
    """The model's training-form arguments for ``batch`` (already on the device): returns ``loss_sum`` only."""
    return dict(
        pixel_values=batch.pixel_values,
        input_ids=batch.input_ids,
        # packed rows: no padding mask; samples are kept apart by cu_seqlens (variable-length back-ends) or by
        # the restarting position ids (a block mask, CPU)
        attention_mask=None if batch.packed else batch.attention_mask,
        position_ids=batch.position_ids,
        image_flags=batch.image_flags,
        cu_seqlens=batch.cu_seqlens,
        max_seqlen=batch.max_seqlen,
        image_token_index=batch.image_token_index,
        loss_index=batch.loss_index,
        loss_targets=batch.loss_targets,
        token_mask=batch.attention_mask,  # real tokens, for a MoE router's load-balancing loss
        use_cache=False,
    )


def eval_shard(num_samples: int, rank: int, world_size: int) -> list[int | None]:
    """Rank ``rank``'s indices of ``range(num_samples)``: every ``world_size``-th from ``rank``, padded with None
    to ``ceil(num_samples / world_size)`` entries so that every rank has as many."""
    per_rank = math.ceil(num_samples / world_size)
    own: list[int | None] = list(range(rank, num_samples, world_size))
    return own + [None] * (per_rank - len(own))


@dataclass
class EvalLossData:
    """The held-out set of the eval loss and how to batch it.

    Attributes:
        dataset: returns a ``Sample`` (or a skipped-sample record, left out) per index.
        collate: the training collate (``collate_samples`` with the run's token ids and pixel dtype).
        micro_batch_size: samples per forward pass.
        max_samples: only the first N samples; None: all of them.
        num_workers: DataLoader worker processes (0: in the training process).
    """

    dataset: Dataset
    collate: Callable[[list[Any]], CollatedBatch]
    micro_batch_size: int
    max_samples: int | None = None
    num_workers: int = 0

    @property
    def num_samples(self) -> int:
        n = len(self.dataset)
        return n if self.max_samples is None else min(n, self.max_samples)


@dataclass(frozen=True)
class EvalPrompt:
    """One fixed prompt, ready to generate from: the full chat prompt's token ids and the images' tiles."""

    text: str  # the question as configured
    images: tuple[str, ...]  # image paths as configured
    input_ids: torch.Tensor  # [1, prompt length]
    pixel_values: torch.Tensor | None  # [tiles, 3, H, W]; None for a text-only prompt


@dataclass
class EvalChat:
    """Fixed prompts answered greedily.

    Attributes:
        prompts: the prepared prompts.
        stop_token_ids: generation ends at the first of these (the template's separator, the EOS).
        pad_token_id: what generate pads with.
        decode: token ids of an answer (the stop token excluded) -> its text.
        max_new_tokens: the longest answer, in tokens.
    """

    prompts: Sequence[EvalPrompt]
    stop_token_ids: Sequence[int]
    pad_token_id: int
    decode: Callable[[list[int]], str]
    max_new_tokens: int = 64


class Evaluator:
    """Runs the eval loss and/or the fixed prompts at ``interval`` steps and at the last step (all ranks)."""

    def __init__(
        self,
        backend: Backend,
        dist_info: DistInfo,
        interval: int,
        total_steps: int,
        loss_data: EvalLossData | None = None,
        chat: EvalChat | None = None,
    ) -> None:
        if interval < 1:
            raise ValueError(f"evaluation.interval must be at least 1 optimizer step, got {interval}")
        self.backend, self.dist = backend, dist_info
        self.interval, self.total_steps = interval, total_steps
        self.loss_data, self.chat = loss_data, chat
        self._fallback: Batch | None = None

    def should_run(self, step: int) -> bool:
        """Whether to evaluate after optimizer step ``step`` (1-based count of finished steps)."""
        return step % self.interval == 0 or step == self.total_steps

    def run(self, step: int) -> dict[str, Any]:
        """(all ranks) Evaluate the model as it is after step ``step``.

        Returns:
            ``eval_loss``, ``eval_tokens`` (trained tokens), ``eval_samples``, ``eval_skipped`` when there is an
            eval set; ``eval_chat``, a list of ``{"prompt", "image", "answer", "finish"}`` (``finish``: ``stop``
            at a stop token, ``length`` at ``max_new_tokens``), when there are prompts; ``eval_seconds``.
        """
        t0 = time.perf_counter()
        module = self.backend.module
        modes = [(m, m.training) for m in module.modules()]
        rng = rng_state()  # the data loader's and the model's draws must not shift training's random streams
        module.eval()
        out: dict[str, Any] = {}
        try:
            with torch.no_grad():
                if self.loss_data is not None:
                    out.update(self._loss(self.loss_data))
                if self.chat is not None:
                    out["eval_chat"] = [self._answer(module, self.chat, p) for p in self.chat.prompts]
        finally:
            for m, training in modes:
                m.training = training
            set_rng_state(rng)
        out["eval_seconds"] = time.perf_counter() - t0
        return out

    # -- the eval loss -------------------------------------------------------------------------
    def _batches(self, data: EvalLossData) -> list[list[int]]:
        """This rank's batches of dataset indices; padding (None) dropped, so the last one may be short or empty."""
        shard = eval_shard(data.num_samples, self.dist.rank, self.dist.world_size)
        size = data.micro_batch_size
        return [[i for i in shard[k : k + size] if i is not None] for k in range(0, len(shard), size)]

    def _first_usable(self, data: EvalLossData) -> Batch:
        """The first usable eval sample as a batch: the same on every rank (re-run with weight 0)."""
        if self._fallback is None:
            for i in range(data.num_samples):
                sample = data.dataset[i]
                if isinstance(sample, Sample):
                    self._fallback = data.collate([sample]).batch
                    break
            else:
                raise ValueError(
                    f"none of the {data.num_samples} eval samples is usable; check eval_dataset (xtuner-vl check-data)"
                )
        return self._fallback

    def _loss(self, data: EvalLossData) -> dict[str, float]:
        device = self.dist.device
        loader = DataLoader(
            data.dataset,
            batch_sampler=self._batches(data),
            collate_fn=data.collate,
            num_workers=data.num_workers,
            pin_memory=device.type == "cuda",
            multiprocessing_context="fork" if data.num_workers else None,
            worker_init_fn=ignore_stop_signals,  # the rank handles stop signals (engine/preemption.py)
        )
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        tokens = samples = skipped = 0
        for cb in loader:
            batch, weight = (cb.batch, 1.0) if cb.batch is not None else (self._first_usable(data), 0.0)
            out = self.backend.forward(**forward_inputs(batch.to(device, non_blocking=True)))
            loss_sum += out.loss_sum.double() * weight
            tokens += batch.num_trained if weight else 0
            samples += cb.num_samples
            skipped += len(cb.skipped)
        local = torch.tensor([float(tokens), float(samples), float(skipped)], dtype=torch.float64, device=device)
        totals = all_reduce_sum(torch.cat([loss_sum.reshape(1), local])).tolist()
        return {
            "eval_loss": totals[0] / totals[1] if totals[1] else float("nan"),
            "eval_tokens": int(totals[1]),
            "eval_samples": int(totals[2]),
            "eval_skipped": int(totals[3]),
        }

    # -- the fixed prompts ---------------------------------------------------------------------
    def _answer(self, module: nn.Module, chat: EvalChat, prompt: EvalPrompt) -> dict[str, Any]:
        device = self.dist.device
        ids = prompt.input_ids.to(device)
        vit_dtype = next(module.vision_model.parameters()).dtype  # the tiles' dtype where they enter the model
        pixels = None if prompt.pixel_values is None else prompt.pixel_values.to(device, vit_dtype)
        # The plain backend trains fp32 master weights beside bf16 frozen ones under autocast (CUDA); generation
        # needs the same context. DeepSpeed holds every weight in the compute dtype and has none.
        autocast = getattr(self.backend, "autocast", None) or contextlib.nullcontext()
        with autocast:
            new = module.generate(
                pixels,
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=chat.max_new_tokens,
                do_sample=False,
                use_cache=True,  # eval mode without gradients: checkpointed layers run plainly, with the cache
                eos_token_id=list(chat.stop_token_ids),
                pad_token_id=chat.pad_token_id,
                synced_gpus=self.dist.world_size > 1,
            )
        tokens = new[0].tolist()
        stop = next((k for k, t in enumerate(tokens) if t in chat.stop_token_ids), None)
        answer = chat.decode(tokens if stop is None else tokens[:stop])
        images = list(prompt.images)
        image = images if len(images) > 1 else (images[0] if images else None)  # as configured: a path or a list
        return {"prompt": prompt.text, "image": image, "answer": answer, "finish": "length" if stop is None else "stop"}
