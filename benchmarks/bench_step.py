"""Training-step time of the xtuner-vl trainer vs a bare PyTorch loop, same tiny model and same batch.

Ours: ``Trainer._step`` (per step also ``set_group_lrs``; with the FLOP count for the logged MFU, as
``xtuner-vl train`` runs it) through ``TorchBackend``: forward of the
``InternVLChatModel`` from ``load_internvl`` with the chunked loss on the trained positions (``OutputHead``),
normalised by the trained tokens, backward,
``clip_grad_norm_``, AdamW over the ``param_groups`` (per part, decay / no decay), ``zero_grad``.

Bare: ``model(...).logits`` -> ``F.cross_entropy(ignore_index=-100)`` -> ``backward`` -> ``clip_grad_norm_``
-> ``AdamW.step`` (one parameter group) -> ``zero_grad(set_to_none=True)``.

Two copies of a tiny InternVL2-2B-shaped checkpoint (``make_tiny``) are loaded in fp32 and fully trained
(no gradient checkpointing, weight decay 0 so both optimizers compute the same update); the batch is
built by ``InternVLDataset`` + ``collate_samples`` from the synthetic image QA set. The first step of
each side must give the same loss (a check that both do the same work). Then, after warm-up steps, the
two loops alternate step by step and the median step time of each is kept. The tiny model makes every
per-step overhead of ours as visible as it can be: on a real model the forward/backward dominates.

Run: ``python benchmarks/bench_step.py`` (``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from xtuner_vl.dataset import CollatedBatch, InternVLDataset, collate_samples
from xtuner_vl.engine.backend import set_group_lrs
from xtuner_vl.engine.dist import DistInfo
from xtuner_vl.engine.flops import TrainingFlops
from xtuner_vl.engine.param_groups import param_groups
from xtuner_vl.engine.torch_backend import TorchBackend
from xtuner_vl.engine.trainer import Trainer, TrainerSettings
from xtuner_vl.model import load_internvl, load_tokenizer
from xtuner_vl.structures import IGNORE_INDEX, Batch, Sample
from xtuner_vl.tiny.checkpoints import make_tiny
from xtuner_vl.tiny.data import make_synthetic_dataset

LR, MAX_GRAD_NORM = 1e-4, 1.0


def build_batch(ckpt: Path, data_dir: Path, batch_size: int, max_patch: int) -> Batch:
    """The first ``batch_size`` usable samples of the synthetic set, collated as the trainer does."""
    tokenizer = load_tokenizer(ckpt)
    data, images = make_synthetic_dataset(data_dir, num_samples=4 * batch_size + 8, seed=0)
    dataset = InternVLDataset(str(data), tokenizer, str(images), model_path=ckpt, max_dynamic_patch=max_patch)
    samples = [s for s in (dataset[i] for i in range(len(dataset))) if isinstance(s, Sample)][:batch_size]
    if len(samples) < batch_size:
        raise SystemExit(f"only {len(samples)} usable samples for a batch of {batch_size}")
    return collate_samples(samples, pad_token_id=tokenizer.pad_token_id).batch


def make_ours(ckpt: Path, work_dir: Path, batch: Batch):
    """A Trainer over TorchBackend, and a function running one optimizer step on ``batch``."""
    model = load_internvl(ckpt, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(param_groups(model, LR, 0.0), lr=LR)
    dist_info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    backend = TorchBackend(model, optimizer, dist_info, MAX_GRAD_NORM, bf16=False)
    settings = TrainerSettings(
        total_steps=10**9, steps_per_epoch=10**9, grad_accum=1, micro_batch_size=1, lr=LR, warmup_steps=0
    )
    trainer = Trainer(
        backend,
        lambda: iter(()),
        sampler=None,
        settings=settings,
        dist_info=dist_info,
        work_dir=work_dir,
        flops=TrainingFlops(model),  # as `xtuner-vl train` sets it: the step also counts its FLOPs (MFU)
    )
    micro = [CollatedBatch(batch, [], batch.input_ids.shape[0])]  # one micro-step per optimizer step
    step = {"n": 0}

    def run() -> float:
        set_group_lrs(optimizer, step["n"], LR, settings.total_steps, settings.warmup_steps, 0.0)
        step["n"] += 1
        return trainer._step(micro)["loss"]

    return run


def make_bare(ckpt: Path, batch: Batch):
    """The textbook loop on its own copy of the model: one function per optimizer step."""
    model = load_internvl(ckpt, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)

    def run() -> float:
        logits = model(
            batch.pixel_values, batch.input_ids, attention_mask=batch.attention_mask, image_flags=batch.image_flags
        ).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="internvl2-2b", help="tiny checkpoint family (make_tiny)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per step")
    parser.add_argument("--max-patch", type=int, default=6, help="max_dynamic_patch of the dataset")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each loop first")
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each loop; the median is kept")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = make_tiny(args.family, tmp / "ckpt")
        batch = build_batch(ckpt, tmp / "data", args.batch_size, args.max_patch)
        ours, bare = make_ours(ckpt, tmp / "work", batch), make_bare(ckpt, batch)
        trained = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
        print(
            f"tiny {args.family}: batch {tuple(batch.input_ids.shape)} tokens, {len(batch.pixel_values)} tiles, "
            f"{trained} trained tokens; {args.threads} thread(s)"
        )
        loss_ours, loss_bare = ours(), bare()
        if abs(loss_ours - loss_bare) > 1e-4 * max(1.0, abs(loss_bare)):
            raise SystemExit(f"first-step losses differ: ours {loss_ours} vs bare {loss_bare}")
        print(f"first-step loss: ours {loss_ours:.6f}, bare {loss_bare:.6f}")
        for _ in range(args.warmup - 1):
            ours(), bare()
        times: dict[str, list[float]] = {"ours": [], "bare": []}
        for i in range(args.steps):
            order = (("ours", ours), ("bare", bare)) if i % 2 == 0 else (("bare", bare), ("ours", ours))
            for name, fn in order:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    q = {k: statistics.quantiles(v, n=4) for k, v in times.items()}
    print(f"\n{'loop':<6} {'median ms':>10} {'p25 ms':>8} {'p75 ms':>8} {'steps':>6}")
    for name in ("bare", "ours"):
        print(
            f"{name:<6} {med[name] * 1e3:>10.2f} {q[name][0] * 1e3:>8.2f} {q[name][2] * 1e3:>8.2f} "
            f"{len(times[name]):>6}"
        )
    print(f"RATIO step_time ours/bare = {med['ours'] / med['bare']:.3f}x (target <= 1.05x)")


if __name__ == "__main__":
    main()
