"""``xtuner-vl train``: build everything from the config, then run the trainer."""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from xtuner_vl.dataset.collate import collate_samples
from xtuner_vl.dataset.packing import PackedDataset
from xtuner_vl.dataset.samplers import DistributedRandomSampler, LengthGroupedSampler
from xtuner_vl.engine.deepspeed_config import complete_deepspeed_config, load_deepspeed_config, zero_stage
from xtuner_vl.engine.dist import DistInfo, destroy_distributed, init_distributed
from xtuner_vl.engine.flops import TrainingFlops, peak_bf16_flops
from xtuner_vl.engine.lock import hold_work_dir
from xtuner_vl.engine.optimizer import build_optimizer
from xtuner_vl.engine.param_groups import param_groups
from xtuner_vl.engine.preemption import ignore_stop_signals
from xtuner_vl.engine.schedule import warmup_steps_for
from xtuner_vl.engine.seed import rank_seed, seed_everything
from xtuner_vl.engine.torch_backend import TorchBackend
from xtuner_vl.engine.trainer import Trainer, TrainerSettings
from xtuner_vl.engine.zero3_load import full_numel
from xtuner_vl.model import load_tokenizer
from xtuner_vl.model.attention import resolve_attn_implementation
from xtuner_vl.model.configuration import read_config
from xtuner_vl.model.tokenizer import img_context_token_id
from xtuner_vl.recipes.build_evaluation import build_evaluator, check_evaluation, eval_dataset_args
from xtuner_vl.recipes.config import dump_config, find_config, load_config
from xtuner_vl.recipes.model_wrapper import InternVLChat, build_model_wrapper, resolve_dtype
from xtuner_vl.recipes.settings import (
    DataLoaderSettings,
    EvaluationSettings,
    OptimSettings,
    RuntimeSettings,
    ScheduleSettings,
    parse_section,
)
from xtuner_vl.registry import DATASETS
from xtuner_vl.structures import Sample

__all__ = ["train"]


def _grad_accum(sched: ScheduleSettings, world: int) -> int:
    per_step = sched.micro_batch_size * world
    if sched.global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size {sched.global_batch_size} is not a multiple of micro_batch_size "
            f"{sched.micro_batch_size} x {world} processes"
        )
    return sched.global_batch_size // per_step


def _sampler(dataset, loader: DataLoaderSettings, sched: ScheduleSettings, d: DistInfo, seed: int):
    if loader.group_by_length and not loader.pack:
        lengths, multimodal = dataset.length_stats()
        return LengthGroupedSampler(
            lengths, multimodal, sched.micro_batch_size * d.world_size, d.rank, d.world_size, seed, loader.group_factor
        )
    return DistributedRandomSampler(len(dataset), d.rank, d.world_size, seed)


def _peak_flops(runtime: RuntimeSettings, d: DistInfo, bf16: bool) -> float | None:
    """One device's dense peak FLOP/s for the logged MFU: ``runtime.peak_tflops``, else a known bf16 GPU's."""
    if runtime.peak_tflops is not None:
        return runtime.peak_tflops * 1e12
    if d.device.type == "cuda" and bf16:
        return peak_bf16_flops(torch.cuda.get_device_name(d.device))
    return None


def train(
    config: str,
    deepspeed: str | None = None,
    work_dir: str | None = None,
    resume: str | None = None,
    cfg_options: dict | None = None,
    seed: int | None = None,
    allow_data_change: bool = False,
) -> Path:
    """Train as ``config`` says; returns the work dir. ``allow_data_change``: resume although the content of
    an annotation file differs from the checkpoint's run."""
    cfg = load_config(config, cfg_options)
    model_s = build_model_wrapper(cfg.get("model"))
    optim_s = parse_section(OptimSettings, cfg.get("optim"), "optim")
    sched = parse_section(ScheduleSettings, cfg.get("schedule"), "schedule")
    loader_s = parse_section(DataLoaderSettings, cfg.get("dataloader"), "dataloader")
    runtime = parse_section(RuntimeSettings, cfg.get("runtime"), "runtime")
    # Evaluation during training: on when the config has an `evaluation` section (recipes/build_evaluation.py).
    has_eval = cfg.get("evaluation") is not None
    eval_s = parse_section(EvaluationSettings, cfg.get("evaluation"), "evaluation") if has_eval else None
    check_evaluation(eval_s, cfg.get("eval_dataset"))
    runtime.deepspeed = deepspeed or runtime.deepspeed
    runtime.seed = seed if seed is not None else runtime.seed
    ds_preset = load_deepspeed_config(runtime.deepspeed) if runtime.deepspeed else None
    _refuse_impossible_setup(config, model_s, runtime, ds_preset)
    d = init_distributed(runtime.device, runtime.dist_timeout_minutes)
    # The attention back-end, decided by a real import before anything is loaded (see model.attention).
    model_s.attn_implementation = resolve_attn_implementation(model_s.attn_implementation, d.device, loader_s.pack)
    seed_everything(runtime.seed)  # the same on every rank: the model (LoRA init is random) must be identical
    work = Path(work_dir or Path("work_dirs") / find_config(config).stem)
    lock = hold_work_dir(work, d)  # held to the end of the process; a second run here stops now
    if d.is_main:
        # The copy the run really used: the command line's --seed / --deepspeed written into it too.
        cfg.runtime = {**cfg.get("runtime", {}), "seed": runtime.seed, "deepspeed": runtime.deepspeed}
        dump_config(cfg, work / f"{find_config(config).stem}.py")

    tokenizer = load_tokenizer(model_s.path)
    dataset = DATASETS.build({"model_path": model_s.path, **cfg.train_dataset, "tokenizer": tokenizer})
    accum = _grad_accum(sched, d.world_size)
    bf16 = resolve_dtype(model_s.dtype, d.device) == torch.bfloat16
    ds_cfg = None
    if ds_preset is not None:
        # Completed before the model exists: a ZeRO-3 run partitions each weight as it is read (InternVLChat.build).
        hidden_size = read_config(model_s.path).llm_config["hidden_size"]
        ds_cfg = complete_deepspeed_config(
            ds_preset, sched.micro_batch_size, accum, d.world_size, optim_s.max_grad_norm, bf16, hidden_size
        )
    model = model_s.build(d.device, ds_cfg)
    flops = TrainingFlops(model)  # before DeepSpeed wraps it (it reads module shapes, never weights)
    base_dataset = dataset
    if loader_s.pack:  # micro_batch_size then counts packs (rows of several samples) per step
        dataset = PackedDataset(
            base_dataset,
            pack_length=loader_s.pack_length,
            max_tiles=loader_s.pack_max_tiles,
            seed=runtime.seed,
            window=loader_s.pack_window,
            headroom=loader_s.pack_headroom,
        )
    sampler = _sampler(dataset, loader_s, sched, d, runtime.seed)
    steps_per_epoch = len(sampler) // (sched.micro_batch_size * accum)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} samples give no full optimizer step of {sched.global_batch_size}")
    total = sched.max_steps or steps_per_epoch * sched.epochs
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Collate computes every count and index the step needs on the host, and casts the tiles to the compute dtype.
    collate = partial(
        collate_samples,
        pad_token_id=pad_id,
        img_context_token_id=img_context_token_id(tokenizer),
        pixel_dtype=resolve_dtype(model_s.dtype, d.device),
        loss_reduction=sched.loss_reduction,  # the per-token weights; the eval loss stays the token mean
    )

    def make_loader():
        return DataLoader(
            dataset,
            batch_size=sched.micro_batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=loader_s.num_workers,
            collate_fn=collate,
            pin_memory=d.device.type == "cuda",  # page-locked batches: the step's copies run asynchronously
            generator=torch.Generator().manual_seed(runtime.seed),  # keeps the global RNG untouched
            persistent_workers=False,
            multiprocessing_context="fork" if loader_s.num_workers else None,
            worker_init_fn=ignore_stop_signals,  # the rank handles stop signals (engine/preemption.py)
        )

    groups = param_groups(model, optim_s.lr, optim_s.weight_decay, optim_s.lr_mult)
    # DeepSpeed's CPU Adam when the DeepSpeed config offloads the optimizer, torch's AdamW otherwise.
    optimizer = build_optimizer(groups, optim_s.lr, tuple(optim_s.betas), optim_s.eps, d.device, ds_preset)
    if ds_cfg is not None:
        from xtuner_vl.engine.deepspeed_backend import DeepSpeedBackend

        backend = DeepSpeedBackend(model, optimizer, ds_cfg, d)
    else:
        backend = TorchBackend(model, optimizer, d, optim_s.max_grad_norm, bf16)
    evaluator = None
    if eval_s is not None:  # the eval set is built as train_dataset is, through the DATASETS registry
        eval_set = None
        if cfg.get("eval_dataset") is not None:
            eval_args = eval_dataset_args(cfg.train_dataset, cfg.eval_dataset)
            eval_set = DATASETS.build({"model_path": model_s.path, **eval_args, "tokenizer": tokenizer})
        evaluator = build_evaluator(
            eval_s, eval_set, base_dataset, collate, backend, d, total, sched.micro_batch_size, loader_s.num_workers
        )

    settings = TrainerSettings(
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        grad_accum=accum,
        micro_batch_size=sched.micro_batch_size,
        lr=optim_s.lr,
        warmup_steps=warmup_steps_for(total, sched.warmup_ratio),
        min_lr_ratio=sched.min_lr_ratio,
        save_steps=runtime.save_steps,
        keep_last=runtime.keep_last,
        log_interval=runtime.log_interval,
        max_skip_fraction=runtime.max_skip_fraction,
        max_nonfinite_steps=runtime.max_nonfinite_steps,
        allow_data_change=allow_data_change,
        data_signature=_data_signature(base_dataset, dataset, sampler, loader_s, sched),
        meta={
            "config": find_config(config).stem,
            "model_path": model_s.path,
            "deepspeed": runtime.deepspeed,
            "method": model_s.method,
        },
    )

    def first_usable_batch():
        for i in range(len(base_dataset)):  # deterministic: the same sample on every rank and every run
            sample = base_dataset[i]
            if isinstance(sample, Sample):
                return collate([sample]).batch
        raise RuntimeError(f"none of the {len(base_dataset)} samples is usable; run `xtuner-vl check-data`")

    def describe_sample(index: int) -> str:
        source, record = base_dataset.locate(index)
        return f"{source.annotations.path}:{source.annotations.line_of(record)}"

    trainer = Trainer(
        backend,
        make_loader,
        sampler,
        settings,
        d,
        work,
        first_usable_batch,
        flops,
        _peak_flops(runtime, d, bf16),
        describe_sample=describe_sample,
        evaluator=evaluator,
    )
    resume_path = _resume_path(resume, trainer)
    # From here on each rank draws its own dropout / drop-path masks (alike they would repeat one mask per
    # rank). The data order does not move: samplers, packing and the DataLoader take runtime.seed explicitly.
    # A resume restores each rank's saved RNG state over this (Trainer.resume).
    seed_everything(rank_seed(runtime.seed, d.rank))
    if d.is_main:
        _print_plan(model, dataset, settings, d, accum, runtime, resume_path)
    png = trainer.fit(resume_path)
    lock.release()
    if d.is_main and png is not None:
        print(f"loss curve: {png}", flush=True)
    return work


def _refuse_impossible_setup(config: str, model: InternVLChat, runtime: RuntimeSettings, ds: dict | None) -> None:
    """Stop, before anything is loaded, on a method the DeepSpeed config cannot train."""
    if model.quantization is not None and ds is not None and zero_stage(ds) == 3:
        raise ValueError(
            f"{config}: QLoRA (model.quantization) cannot train with DeepSpeed {runtime.deepspeed!r} (ZeRO-3): "
            "ZeRO-3 partitions every weight across ranks and bitsandbytes 4-bit weights cannot be partitioned; "
            "use zero1, zero2 or zero2_offload"
        )


def _data_signature(base_dataset, dataset, sampler, loader: DataLoaderSettings, sched: ScheduleSettings) -> dict:
    """What the order of the data depends on, beyond the seed and world size the sampler checks itself."""
    signature = {
        "samples": len(base_dataset),
        "items": len(dataset),
        "sampler": type(sampler).__name__,
        "micro_batch_size": sched.micro_batch_size,
        "pack": loader.pack,
    }
    if isinstance(sampler, LengthGroupedSampler):
        signature["group_factor"] = loader.group_factor
    # The content of every annotation file: the same records in another order, or rewritten answers, would
    # otherwise resume silently into another run.
    for path, digest in getattr(base_dataset, "source_fingerprints", dict)().items():
        signature[f"source {path}"] = digest[:16]
    if isinstance(dataset, PackedDataset):
        signature.update(
            pack_length=dataset.pack_length,
            pack_max_tiles=dataset.max_tiles,
            pack_window=loader.pack_window,
            pack_headroom=loader.pack_headroom,
        )
    return signature


def _resume_path(resume: str | None, trainer: Trainer) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        return trainer.newest_verified()  # None when nothing complete and verified yet: a fresh start
    path = Path(resume)
    if not (path / "COMPLETE").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint directory")
    if (reason := trainer.verify(path)) is not None:
        raise ValueError(f"--resume {resume}: the checkpoint fails verification ({reason}); use --resume auto")
    return path


def _print_plan(
    model, dataset, s: TrainerSettings, d: DistInfo, accum: int, runtime: RuntimeSettings, resume: Path | None
) -> None:
    # Under ZeRO-3 a rank holds a slice of each weight: count the full ones.
    total = sum(full_numel(p) for p in model.parameters())
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    per_step = s.micro_batch_size * accum * d.world_size
    unit = "packs" if isinstance(dataset, PackedDataset) else "samples"
    print(
        f"{unit} {len(dataset)} | world {d.world_size} x micro-batch {s.micro_batch_size} x accum {accum} = "
        f"{per_step} {unit}/step | {s.steps_per_epoch} steps/epoch, {s.total_steps} total, warmup {s.warmup_steps}"
        f" | params {total / 1e6:.1f}M, trainable {trainable / 1e6:.2f}M ({100 * trainable / max(total, 1):.2f}%)"
        f" | backend {runtime.deepspeed or 'torch'} on {d.device}" + (f" | resume {resume}" if resume else ""),
        flush=True,
    )
    if isinstance(dataset, PackedDataset):
        budget = f"rows of {dataset.pack_length} tokens and {dataset.max_tiles} tiles"
        print(f"packing: {dataset.stats()}, {budget}", flush=True)


def exit_after_distributed_run(status: int = 0) -> None:
    """End a run that used a process group: leave it (NCCL frees its communicators). With gloo, ZeRO-3
    teardown occasionally aborts the interpreter after all work is done; every rank synchronises, flushes
    and exits directly instead."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "gloo":
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    destroy_distributed()
