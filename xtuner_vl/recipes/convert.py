"""``xtuner-vl convert``: a training checkpoint + its config -> official merged weights or peft adapters.

Before anything is written the checkpoint is checked against the config and the base release: the
base named in ``meta.json``, the training method, and the exact trainable names and shapes that the
config's method produces on the base (built on the meta device, no memory) must all agree.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xtuner_vl.checkpoint import (
    DTYPES,
    CheckpointError,
    TrainedCheckpoint,
    base_shapes,
    check_against_base,
    converted_config,
    export_adapters,
    export_official,
    read_trained_checkpoint,
    split_delta,
)
from xtuner_vl.checkpoint.delta import lora_parameter_targets
from xtuner_vl.checkpoint.hf_export import check_hf_exportable, official_to_hf
from xtuner_vl.checkpoint.hf_import import hf_to_official
from xtuner_vl.checkpoint.trained import nonfinite_tensors
from xtuner_vl.model import build_empty_model, read_config
from xtuner_vl.model.internvl import tied_keys
from xtuner_vl.recipes.config import find_config, load_config
from xtuner_vl.recipes.model_wrapper import InternVLChat, build_model_wrapper

__all__ = ["FORMATS", "convert", "convert_from_hf", "expected_trainable_model", "run_changes"]

FORMATS = ("official", "adapter", "hf")
_DATASET_FIELDS = ("template", "min_dynamic_patch", "max_dynamic_patch", "use_thumbnail")


def expected_trainable_model(s: InternVLChat) -> nn.Module:
    """The training model of ``s`` on the meta device (freezing and LoRA applied, no weights).

    QLoRA's nf4 layers are not built: peft gives their adapters the same names as on plain linears.
    """
    model = build_empty_model(read_config(s.path), img_context_token_id=0)
    return s.apply_method(model, torch.float32, quantize=False)  # the trainer's own method code


def _check_meta(ckpt: TrainedCheckpoint, s: InternVLChat, config: str, trust_base: bool) -> None:
    meta = ckpt.meta
    if meta.get("method") and meta["method"] != s.method:
        raise CheckpointError(
            f"checkpoint {ckpt.path} is a {meta['method']} run (meta.json) but config {config} trains {s.method}"
        )
    trained_base = meta.get("model_path")
    if trained_base and not trust_base and Path(trained_base).resolve() != Path(s.path).resolve():
        raise CheckpointError(
            f"checkpoint {ckpt.path} was trained from base {trained_base} (meta.json) but config {config} names "
            f"base {s.path}; set model.path with --cfg-options, or pass --trust-base if the base moved"
        )


def _check_trainable(ckpt: TrainedCheckpoint, model: nn.Module, config: str, base: str) -> None:
    want = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    got = ckpt.shapes()
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    shapes = [f"{k}: {got[k]} vs {want[k]}" for k in sorted(set(want) & set(got)) if got[k] != want[k]]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint {ckpt.path} does not match config {config} on base {base}: "
            f"{len(missing)} trainable weight(s) missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(shapes)} of another shape "
            f"(checkpoint vs config: {shapes[:3]})"
        )


def run_changes(cfg: Any, s: InternVLChat) -> tuple[dict[str, Any], dict[str, Any]]:
    """Top-level and ``vision_config`` fields of config.json that the run's config changed."""
    dataset = dict(cfg.get("train_dataset") or {})
    # A Template object (not a name) cannot go into config.json; the base's template stays then.
    changed = {k: dataset[k] for k in _DATASET_FIELDS if isinstance(dataset.get(k), (str, int))}
    vision = {"drop_path_rate": s.drop_path_rate} if s.drop_path_rate is not None else {}
    return changed, vision


def _lora_configs(model: nn.Module) -> dict[str, Any]:
    return {
        part: getattr(model, part).peft_config["default"]
        for part in ("language_model", "vision_model")
        if hasattr(getattr(model, part), "peft_config")
    }


def _output_dtype(dtype: str | None, base_raw: dict[str, Any]) -> torch.dtype:
    if dtype is None:
        return {"float16": torch.float16, "float32": torch.float32}.get(base_raw.get("torch_dtype"), torch.bfloat16)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def convert(
    config: str,
    ckpt: str,
    out: str,
    fmt: str = "official",
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    cfg_options: dict | None = None,
    trust_base: bool = False,
    allow_nonfinite: bool = False,
) -> Path:
    """Convert checkpoint ``ckpt`` of a run of ``config`` into ``out`` (see the module docstring).

    Args:
        config: the training config (the copy the trainer dumped into the work dir, or a shipped name).
        ckpt: a work dir, a ``step-XXXXXXXX`` directory, a DeepSpeed tag directory or ``torch_backend.pt``.
        out: output directory (created).
        fmt: ``official`` (merged weights, official layout), ``adapter`` (peft adapter directories) or ``hf``
            (merged weights as a transformers-native ``InternVLForConditionalGeneration`` directory).
        dtype: ``bf16`` / ``fp16`` / ``fp32``; None = the base release's ``torch_dtype``.
        max_shard_size: largest weight file of an ``official`` output.
        cfg_options: ``key=value`` overrides of the config.
        trust_base: accept a base path other than the one in ``meta.json`` (keys and shapes still checked).
        allow_nonfinite: export trained weights that hold inf/NaN (refused otherwise).

    Returns:
        ``out`` as a Path.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    cfg = load_config(config, cfg_options)
    s = build_model_wrapper(cfg.get("model"))
    trained = read_trained_checkpoint(ckpt)
    _check_meta(trained, s, str(find_config(config)), trust_base)
    model = expected_trainable_model(s)
    # A tied output head is the embedding's Parameter; DeepSpeed's consolidation names it under both keys.
    aliases = tied_keys(model)
    trained.state = {k: v for k, v in trained.state.items() if k not in aliases}
    _check_trainable(trained, model, str(find_config(config)), s.path)
    if not allow_nonfinite and (bad := nonfinite_tensors(trained)):
        total = sum(n for _, n in bad)
        raise CheckpointError(
            f"{trained.path}: {total} non-finite values in {len(bad)} trained tensors (e.g. {bad[0][0]}): the run "
            "diverged; convert an earlier checkpoint (a step-XXXXXXXX directory), or pass --allow-nonfinite"
        )
    delta = split_delta(trained.state, s.lora_alphas(), lora_parameter_targets(model))
    check_against_base(delta, base_shapes(s.path), str(trained.path), s.path)
    base_raw = json.loads((Path(s.path) / "config.json").read_text(encoding="utf-8"))
    if fmt == "hf":
        check_hf_exportable(base_raw, str(Path(s.path) / "config.json"))  # refuse before anything is written
    out_dtype = _output_dtype(dtype, base_raw)
    if fmt == "adapter":
        export_adapters(delta, _lora_configs(model), out, s.path, out_dtype)
        return Path(out)
    changed, vision = run_changes(cfg, s)
    new_config = converted_config(base_raw, out_dtype, changed, vision)
    if fmt == "hf":
        # Merge into a temporary official directory beside ``out`` (same disk), then rename/split from it.
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".official-", dir=Path(out).parent) as tmp:
            export_official(delta, s.path, tmp, new_config, out_dtype, max_shard_size)
            official_to_hf(tmp, out, max_shard_size)
        return Path(out)
    export_official(delta, s.path, out, new_config, out_dtype, max_shard_size)
    return Path(out)


def convert_from_hf(hf_dir: str, out: str, base: str | None = None, max_shard_size: str = "5GB") -> Path:
    """``--from-hf``: a transformers-native InternVL directory back to the official format.

    Args:
        hf_dir: an ``InternVLForConditionalGeneration`` directory (e.g. written by ``--format hf``).
        out: output directory (created).
        base: the official release it came from (config template, tokenizer and remote-code files).
        max_shard_size: largest weight file written.

    Returns:
        ``out`` as a Path.
    """
    return hf_to_official(hf_dir, out, base, max_shard_size)
