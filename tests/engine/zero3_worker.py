"""Two-rank ZeRO-3 checks, run under torchrun by ``tests/engine/test_zero3.py`` (one launch for all).

``python -m torch.distributed.run --nproc_per_node 2 tests/engine/zero3_worker.py ASSETS_JSON OUT_JSON``.
ASSETS_JSON names the tiny checkpoints, the data and a work dir; rank 0 writes what it found to OUT_JSON and
the test asserts on it, so a failure shows every mismatch at once. The MoE, packed and evaluation runs leave their
work dirs (logs, checkpoints) for the tests to read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import xtuner_vl.recipes.train as train_recipe
from xtuner_vl.engine.deepspeed_backend import import_deepspeed
from xtuner_vl.engine.deepspeed_config import CONFIG_ROOT, complete_deepspeed_config, load_deepspeed_config
from xtuner_vl.engine.dist import init_distributed
from xtuner_vl.engine.flops import TrainingFlops
from xtuner_vl.engine.param_groups import param_groups
from xtuner_vl.engine.seed import seed_everything
from xtuner_vl.engine.zero3_load import full_numel, is_partitioned, load_partitioned
from xtuner_vl.model import load_internvl
from xtuner_vl.model.loader import open_checkpoint
from xtuner_vl.recipes.model_wrapper import InternVLChat

REPO = Path(__file__).resolve().parents[2]


def ds_config(world: int, hidden: int, bf16: bool = False) -> dict:
    return complete_deepspeed_config(load_deepspeed_config("zero3"), 2, 1, world, 1.0, bf16, hidden)


def weight_mismatches(path: str, dtype: torch.dtype, d) -> list[str]:
    """Gather every partitioned parameter and compare it, its dtype and the buffers with the plain load."""
    deepspeed = import_deepspeed(d.device)
    ref = load_internvl(path, dtype=dtype)
    config = ds_config(d.world_size, ref.language_model.config.hidden_size)
    before = json.dumps(config, sort_keys=True)
    model = load_partitioned(open_checkpoint(path), config, dtype, d.device)
    expected = dict(ref.named_parameters())
    bad = [] if set(expected) == {n for n, _ in model.named_parameters()} else ["parameter names"]
    if json.dumps(config, sort_keys=True) != before:
        bad.append("the DeepSpeed config was changed")
    for name, p in model.named_parameters():
        if not is_partitioned(p) or p.numel() == full_numel(p):
            bad.append(f"{name}: not partitioned")
        with deepspeed.zero.GatheredParameters([p]):
            if p.dtype != dtype or not torch.equal(p.data, expected[name].data):
                bad.append(f"{name}: {p.dtype}")
    ref_buffers = dict(ref.named_buffers())
    for name, b in model.named_buffers():
        if b.dtype != ref_buffers[name].dtype or not torch.equal(b, ref_buffers[name]):
            bad.append(f"buffer {name}")
    if model.training or model.img_context_token_id != ref.img_context_token_id:
        bad.append("mode or img_context_token_id")
    if model.language_model.generation_config.to_dict() != ref.language_model.generation_config.to_dict():
        bad.append("generation_config")
    return bad


def method_mismatches(path: str, d, **method) -> list[str]:
    """The method applied after a partitioned load: freezing, LoRA, FLOPs and the optimizer's groups."""
    s = InternVLChat(path=path, gradient_checkpointing=True, **method)
    seed_everything(42)
    old = s.build(d.device)
    seed_everything(42)
    new = s.build(d.device, ds_config(d.world_size, old.language_model.config.hidden_size))
    bad = []
    grads = [(n, p.requires_grad, p.numel()) for n, p in old.named_parameters()]
    if grads != [(n, p.requires_grad, full_numel(p)) for n, p in new.named_parameters()]:
        bad.append("names, requires_grad or full sizes")
    added = [(n, p) for n, p in new.named_parameters() if not is_partitioned(p)]  # LoRA, partitioned by the engine
    old_params = dict(old.named_parameters())
    if any(not torch.equal(p, old_params[n]) for n, p in added):
        bad.append("LoRA initialisation")
    if TrainingFlops(new).walk != TrainingFlops(old).walk:
        bad.append("TrainingFlops")

    def groups(model):
        return [
            (g["name"], g["weight_decay"], sum(full_numel(p) for p in g["params"]))
            for g in param_groups(model, 1e-3, 0.05)
        ]

    if groups(new) != groups(old):
        bad.append(f"param groups {groups(new)} != {groups(old)}")
    return bad


def data_options(assets: dict, model: str) -> dict:
    return {
        "model.path": model,
        "train_dataset.data_paths": [assets["data"]],
        "train_dataset.image_folders": [assets["images"]],
    }


def train_losses(config: str, assets: dict, work: Path, partitioned: bool) -> dict[int, float]:
    """Three ZeRO-3 steps of ``config`` through the real ``train``; the unpartitioned load where not asked."""
    build = InternVLChat.build
    if not partitioned:
        InternVLChat.build = lambda s, device, ds_config=None: build(s, device)
    options = {
        **data_options(assets, assets["model"]),
        "schedule.max_steps": 3,
        "runtime.save_steps": 100,
        "optim.weight_decay": 0.05,  # weight decay applies to 2-D weights only: partitioned ones must count
    }
    try:
        train_recipe.train(str(CONFIG_ROOT / "tiny" / f"{config}.py"), "zero3", str(work), cfg_options=options)
    finally:
        InternVLChat.build = build
    if torch.distributed.get_rank() != 0:  # rank 0 writes the log
        return {}
    records = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: [r["loss"], r["grad_norm"]] for r in records}


def main(assets_json: str, out_json: str) -> None:
    assets = json.loads(Path(assets_json).read_text())
    d = init_distributed("cpu")
    out: dict = {"weights": {}, "methods": {}, "losses": {}}
    for family, path in assets["families"].items():
        out["weights"][family] = weight_mismatches(path, torch.float32, d)
    out["weights"]["internvl2-2b bf16"] = weight_mismatches(assets["families"]["internvl2-2b"], torch.bfloat16, d)
    out["methods"]["lora"] = method_mismatches(assets["model"], d, lora=dict(llm_rank=8))
    out["methods"]["full"] = method_mismatches(assets["model"], d, drop_path_rate=0.1)
    out["methods"]["vit lora"] = method_mismatches(assets["model"], d, lora=dict(llm_rank=4, vit_rank=4))
    work = Path(assets["work"])
    for config in ("tiny_internvl2_lora", "tiny_internvl2_full"):
        out["losses"][config] = {
            kind: train_losses(config, assets, work / f"{config}-{kind}", kind == "partitioned")
            for kind in ("unpartitioned", "partitioned")
        }
    lora = str(CONFIG_ROOT / "tiny" / "tiny_internvl2_lora.py")
    # Qwen3-MoE with LoRA on every expert, one epoch: 24 samples / (2 ranks x 2) = 6 steps. Length grouping puts the
    # text-only samples in batches of their own, so every epoch has text-only micro-batches.
    moe = {**data_options(assets, assets["moe"]), "schedule.epochs": 1, "runtime.save_steps": 100}
    train_recipe.train(lora, "zero3", str(work / "moe"), cfg_options=moe)
    # Full fine-tuning with packing (rows of several samples) and gradient accumulation 2: 24 samples in packs of at
    # most 1024 tokens and 6 tiles, one pack per micro-batch, 3 epochs; the given peak makes the MFU checkable.
    packed = {
        **data_options(assets, assets["model"]),
        "dataloader.pack": True,
        "dataloader.pack_max_tiles": 6,
        "train_dataset.max_length": 1024,
        "schedule.global_batch_size": 4,
        "schedule.micro_batch_size": 1,
        "schedule.epochs": 3,
        "runtime.save_steps": 1000,
        "runtime.peak_tflops": 0.01,
    }
    full = str(CONFIG_ROOT / "tiny" / "tiny_internvl2_full.py")
    train_recipe.train(full, "zero3", str(work / "packed"), cfg_options=packed)
    # One step at lr 0, then the evaluation of the (unchanged) weights.
    evaluation = {
        **data_options(assets, assets["model"]),
        "eval_dataset": dict(data_paths=[assets["eval"]], image_folders=[assets["images"]]),
        "evaluation": dict(interval=1, prompts=assets["prompts"], max_new_tokens=assets["max_new_tokens"]),
        "optim.lr": 0.0,
        "schedule.max_steps": 1,
        "runtime.save_steps": 100,
    }
    train_recipe.train(lora, "zero3", str(work / "eval"), cfg_options=evaluation)
    if d.is_main:
        Path(out_json).write_text(json.dumps(out, indent=1))
    train_recipe.exit_after_distributed_run()


if __name__ == "__main__":
    main(*sys.argv[1:])
