"""Training tokens/s and MFU of a real-shaped InternVL model with the trainer's own step, packed vs unpacked.

Model: the architecture of a shipped config's release (default ``internvl_v2_internlm2_2b_lora``: InternVL2-2B,
InternViT-300M + internlm2-chat-1.8B) with random weights built straight on the device
(``xtuner_vl.tiny.checkpoints.random_model``: no download, no checkpoint) and the config's method applied
by the trainer's own ``apply_method`` (for the default: LoRA r16 on the LLM, ViT frozen, mlp1 trained,
gradient checkpointing on). One process, ``TorchBackend`` (bf16 autocast on CUDA, fp32 master weights for
what trains), each step through ``Trainer._step``: exactly what ``xtuner-vl train`` runs per step without
DeepSpeed.

Data: samples with the token and tile counts of bench_packing's LLaVA-665K-like mix (``make_mix``; 94%
single-image, ``max_dynamic_patch`` 6 + thumbnail, 256 tokens per tile), random token ids with the image
context runs in place, random tiles, and half of each sample's text tokens trained. The same samples go
through both layouts of the trainer's data path:

- unpacked: ``LengthGroupedSampler`` (the default without packing), micro batches of ``--micro-batch``
  samples, right-padded by ``collate_samples``;
- packed: ``PackedDataset`` (``dataloader.pack=True`` with its defaults: rows of 16,384 tokens), one row
  per step by default (``--rows``).

Reported per layout: real tokens/s (padding excluded), processed tokens/s, median step time, model TFLOP/s
and MFU (``xtuner_vl.engine.flops.TrainingFlops``: the FLOPs the real samples need, forward and backward,
without checkpointing's recompute, over the GPU's dense bf16 peak; ``--peak-tflops`` for a GPU not in
its table), and peak memory. The first ``--warmup`` steps of each layout are not timed.

Run on a GPU: ``python benchmarks/bench_throughput.py``. ``--tiny`` runs the same code on a tiny
InternVL2-2B-shaped model (``make_tiny``), on CPU in well under a minute: a check of the script, not a
measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from bench_packing import LengthMix, make_mix
from torch.utils.data import DataLoader, Dataset

from xtuner_vl.dataset import LengthGroupedSampler, collate_samples
from xtuner_vl.dataset.packing import PackedDataset
from xtuner_vl.dataset.samplers import DistributedRandomSampler
from xtuner_vl.engine.dist import DistInfo
from xtuner_vl.engine.flops import TrainingFlops, peak_bf16_flops
from xtuner_vl.engine.param_groups import param_groups
from xtuner_vl.engine.torch_backend import TorchBackend
from xtuner_vl.engine.trainer import Trainer, TrainerSettings
from xtuner_vl.model import load_internvl
from xtuner_vl.model.attention import resolve_attn_implementation
from xtuner_vl.model.releases import resolve_model_config
from xtuner_vl.recipes.config import load_config
from xtuner_vl.recipes.model_wrapper import build_model_wrapper
from xtuner_vl.recipes.settings import DataLoaderSettings
from xtuner_vl.structures import IGNORE_INDEX, Sample
from xtuner_vl.tiny.checkpoints import make_tiny, random_model

LR = 4e-5


class SyntheticSamples(Dataset):
    """Samples with the mix's token and tile counts: random ids, image context runs, random tiles."""

    def __init__(self, mix: LengthMix, max_length: int, vocab: int, context_id: int, image_size: int, seed: int):
        self.mix, self.max_length, self.num_image_token = mix, max_length, 256
        self.vocab, self.context_id, self.seed = vocab, context_id, seed
        gen = torch.Generator().manual_seed(seed)
        self.tiles = torch.randn(int(mix.tiles.max()) or 1, 3, image_size, image_size, generator=gen)

    def __len__(self) -> int:
        return len(self.mix.real)

    def length_stats(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mix.estimate, self.mix.multimodal

    def __getitem__(self, i: int) -> Sample:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        n, tiles = int(self.mix.real[i]), int(self.mix.tiles[i])
        ids = torch.randint(0, self.vocab - 8, (n,), generator=gen)
        ids[ids == self.context_id] = 0  # context tokens only where the image is
        image = tiles * self.num_image_token
        if tiles:  # <img> at 40 (after the system prompt), then the context run, then </img>
            ids[41 : 41 + image] = self.context_id
        text = n - (image + 2 if tiles else 0)
        labels = ids.clone()
        labels[: n - max(1, text // 2)] = IGNORE_INDEX  # the answers: half the text, at the end
        flags = torch.ones(tiles, dtype=torch.long) if tiles else torch.zeros(1, dtype=torch.long)
        return Sample(ids, labels, self.tiles[: len(flags)].clone(), flags, "mix", i)


def build_model(args, device: torch.device, dtype: torch.dtype, tmp: Path):
    """The model with the config's method applied, and a short description."""
    cfg = load_config(args.config)
    settings = build_model_wrapper(cfg.get("model"))
    # The trainer's choice: a variable-length back-end on CUDA (flash-attn 2, else torch varlen_attn).
    settings = replace(settings, attn_implementation=resolve_attn_implementation(settings.attn_implementation, device))
    if args.tiny:
        ckpt = make_tiny("internvl2-2b", tmp / "tiny")
        settings = replace(settings, path=str(ckpt))
        model = load_internvl(ckpt, dtype=dtype, attn_implementation=settings.attn_implementation, device=device)
        name = "tiny InternVL2-2B shape"
    else:
        config, release = resolve_model_config(settings.path)
        vocab = config.llm_config["vocab_size"]
        model = random_model(config, vocab - 1, device, dtype, attn_implementation=settings.attn_implementation)
        name = release or settings.path
    model = settings.apply_method(model, dtype)
    return model, settings, name


def run_layout(trainer: Trainer, flops: TrainingFlops, loader: DataLoader, steps: int, warmup: int, device) -> dict:
    """Time ``steps`` optimizer steps (one micro batch each) after ``warmup`` untimed ones."""
    it = iter(loader)
    times, real, processed, samples, model_flops = [], 0, 0, 0, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup + steps):
        try:
            cb = next(it)
        except StopIteration:
            raise SystemExit(f"the data ran out after {step} steps; raise --samples") from None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        trainer._step([cb])  # ends with .item() of the loss: the step is finished when it returns
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            real += int(cb.batch.attention_mask.sum())
            processed += cb.batch.input_ids.numel()
            samples += cb.num_samples
            model_flops += flops.of_batch(cb.batch)
    seconds = sum(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {
        "tokens_per_s": real / seconds,
        "processed_per_s": processed / seconds,
        "samples_per_s": samples / seconds,
        "step_ms": statistics.median(times) * 1e3,
        "tflops": model_flops / seconds / 1e12,
        "real_fraction": real / processed,
        "peak_gib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="internvl_v2_internlm2_2b_lora", help="shipped config: shape + method")
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks the script, measures nothing")
    parser.add_argument("--samples", type=int, default=2000, help="samples drawn from the length mix")
    parser.add_argument("--micro-batch", type=int, default=4, help="samples per unpacked step (official: 4)")
    parser.add_argument("--rows", type=int, default=1, help="packed rows per step")
    parser.add_argument("--pack-length", type=int, default=None, help="tokens per packed row (default 16384)")
    parser.add_argument("--max-length", type=int, default=4096, help="max tokens per sample (official: 4096)")
    parser.add_argument("--max-patch", type=int, default=6, help="max_dynamic_patch (official fine-tune: 6)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per layout first")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.tiny:
        args.samples, args.max_patch, args.max_length = min(args.samples, 64), min(args.max_patch, 2), 1024
        args.pack_length = args.pack_length or 2048
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        model, settings, name = build_model(args, device, dtype, Path(tmp))
        flops = TrainingFlops(model)
        optimizer = torch.optim.AdamW(param_groups(model, LR, 0.0), lr=LR)
        dist_info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
        backend = TorchBackend(model, optimizer, dist_info, 1.0, bf16=dtype == torch.bfloat16)
        trainer_settings = TrainerSettings(
            total_steps=10**9, steps_per_epoch=10**9, grad_accum=1, micro_batch_size=1, lr=LR, warmup_steps=0
        )
        trainer = Trainer(backend, lambda: iter(()), None, trainer_settings, dist_info, Path(tmp) / "work")

        mix, _ = make_mix(args.samples, 0, args.max_patch, args.max_length, "sized")
        dataset = SyntheticSamples(
            mix,
            args.max_length,
            model.language_model.config.vocab_size,
            model.img_context_token_id,
            model.config.image_size,
            seed=0,
        )
        defaults = DataLoaderSettings()
        packed = PackedDataset(
            dataset,
            args.pack_length or defaults.pack_length,
            defaults.pack_max_tiles,
            0,
            defaults.pack_window,
            defaults.pack_headroom,
        )
        lengths, multimodal = dataset.length_stats()
        workers = 0 if args.tiny else 4
        # As `xtuner-vl train` collates: host-side indices, tiles in the compute dtype, pinned batches.
        collate = partial(collate_samples, img_context_token_id=model.img_context_token_id, pixel_dtype=dtype)
        pin = device.type == "cuda"
        grouped = LengthGroupedSampler(lengths, multimodal, args.micro_batch, 0, 1, 0, defaults.group_factor)
        loaders = {
            "unpacked": DataLoader(
                dataset,
                batch_size=args.micro_batch,
                sampler=grouped,
                drop_last=True,
                num_workers=workers,
                collate_fn=collate,
                pin_memory=pin,
            ),
            "packed": DataLoader(
                packed,
                batch_size=args.rows,
                sampler=DistributedRandomSampler(len(packed), 0, 1, 0),
                drop_last=True,
                num_workers=workers,
                collate_fn=collate,
                pin_memory=pin,
            ),
        }
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        peak = args.peak_tflops * 1e12 if args.peak_tflops else None
        peak = peak or (peak_bf16_flops(gpu) if dtype == torch.bfloat16 else None)
        attn = model.language_model.config._attn_implementation
        peak_text = f"peak {peak / 1e12:.1f} TFLOP/s" if peak else "peak unknown (no MFU)"
        print(
            f"{name}: {total:,} parameters, {trainable:,} trainable ({args.config}; gradient "
            f"checkpointing {settings.gradient_checkpointing}); {gpu}, {dtype}, attention {attn}; {peak_text}"
        )
        results = {
            layout: run_layout(trainer, flops, loader, args.steps, args.warmup, device)
            for layout, loader in loaders.items()
        }

    print(
        f"\n{'layout':<9} {'tokens/s':>9} {'processed/s':>11} {'real frac':>9} {'samples/s':>9} {'step ms':>8} "
        f"{'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}"
    )
    for layout, r in results.items():
        mfu = f"{r['tflops'] * 1e12 / peak:6.1%}" if peak else f"{'-':>6}"
        print(
            f"{layout:<9} {r['tokens_per_s']:>9.0f} {r['processed_per_s']:>11.0f} {r['real_fraction']:>9.3f} "
            f"{r['samples_per_s']:>9.2f} {r['step_ms']:>8.1f} {r['tflops']:>8.3g} {mfu} {r['peak_gib']:>8.2f}"
        )
    u, p = results["unpacked"], results["packed"]
    if args.json is not None:
        for r in results.values():
            r["mfu"] = r["tflops"] * 1e12 / peak if peak else None
            r["peak_gib"] = None if r["peak_gib"] != r["peak_gib"] else r["peak_gib"]  # NaN (CPU): unknown
        meta = {"model": name, "device": gpu, "dtype": str(dtype), "attention": attn, "config": args.config}
        args.json.write_text(json.dumps({**meta, "layouts": results}, indent=2))
    print(
        f"RATIO train_tokens_per_s packed/unpacked = {p['tokens_per_s'] / u['tokens_per_s']:.2f}x "
        f"(packed {p['tokens_per_s']:.0f}, unpacked {u['tokens_per_s']:.0f} real tokens/s"
        + (f"; MFU packed {p['tflops'] * 1e12 / peak:.1%}, unpacked {u['tflops'] * 1e12 / peak:.1%}" if peak else "")
        + f"; {gpu})"
    )


if __name__ == "__main__":
    main()
