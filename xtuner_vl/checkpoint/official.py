"""Merged export to the official InternVL format, streamed shard by shard over the base directory."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from xtuner_vl.checkpoint.delta import TrainedDelta, merge_lora_weight
from xtuner_vl.checkpoint.stream import ShardWriter, iter_base_tensors
from xtuner_vl.checkpoint.trained import CheckpointError, materialize
from xtuner_vl.model.saver import copy_support_files
from xtuner_vl.model.weights import atomic_write_text

__all__ = ["DTYPES", "DTYPE_NAMES", "converted_config", "export_official"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def converted_config(
    base: Mapping[str, Any], dtype: torch.dtype, changed: Mapping[str, Any], vision_changed: Mapping[str, Any]
) -> dict[str, Any]:
    """The base config.json with the run's changes: merged LoRA flags 0, ``torch_dtype`` = ``dtype``,
    top-level fields ``changed`` and ``vision_config`` fields ``vision_changed``; nothing else added."""
    raw = copy.deepcopy(dict(base))
    raw.update(changed)
    raw["use_backbone_lora"] = 0
    raw["use_llm_lora"] = 0
    raw["torch_dtype"] = DTYPE_NAMES[dtype]
    raw["vision_config"].update(vision_changed)
    for sub in ("llm_config", "vision_config"):
        if "torch_dtype" in raw[sub]:
            raw[sub]["torch_dtype"] = DTYPE_NAMES[dtype]
    return raw


def _converted(key: str, tensor: torch.Tensor, delta: TrainedDelta, dtype: torch.dtype) -> torch.Tensor:
    if key in delta.replacements:
        tensor = materialize(delta.replacements[key])
    elif key in delta.loras:
        # The base weight as released (bf16 for QLoRA too: never the nf4 copy training used).
        tensor = merge_lora_weight(tensor, delta.loras[key])
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def export_official(
    delta: TrainedDelta,
    base_dir: str | Path,
    out_dir: str | Path,
    config: Mapping[str, Any],
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
) -> list[str]:
    """Write base + ``delta`` as an official InternVL directory, one tensor at a time.

    Every key of the base is written once, with its base shape, in ``dtype`` (non-floating tensors
    unchanged); replaced tensors come from the checkpoint, LoRA targets are merged in fp32. Remote-code,
    tokenizer and generation files are copied from ``base_dir`` and ``config`` is written as config.json.

    Returns:
        The names of the weight files written.

    Raises:
        CheckpointError: ``out_dir`` is ``base_dir``, or a delta key was never met in the base.
    """
    base, out = Path(base_dir), Path(out_dir)
    if out.resolve() == base.resolve():
        raise CheckpointError(f"output directory {out} is the base directory; choose another one")
    writer = ShardWriter(out, max_shard_size)
    seen = set()
    for key, tensor in iter_base_tensors(base, "convert" if progress else None):
        writer.add(key, _converted(key, tensor, delta, dtype))
        seen.add(key)
        del tensor  # not held while the next one is read
    unused = delta.touched() - seen
    if unused:
        raise CheckpointError(f"{sorted(unused)[:5]} of the checkpoint were not found in {base}")
    names = writer.finish()
    copy_support_files(base, out)
    atomic_write_text(out / "config.json", json.dumps(dict(config), indent=2, ensure_ascii=False) + "\n")
    return names
