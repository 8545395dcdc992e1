"""Write a model back in the official InternVL on-disk format."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from xtuner_vl.model.internvl import InternVLChatModel, official_state_dict
from xtuner_vl.model.weights import atomic_write_text, write_safetensors

__all__ = ["save_official", "official_config_dict", "copy_support_files"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def official_config_dict(model: InternVLChatModel, dtype: torch.dtype) -> dict:
    """The source config.json, unchanged but for the dtype and merged-LoRA flags."""
    raw = copy.deepcopy(model.config.raw)
    raw["use_backbone_lora"] = 0
    raw["use_llm_lora"] = 0
    raw["torch_dtype"] = _DTYPE_NAMES[dtype]
    return raw


def copy_support_files(source_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy remote-code ``.py``, tokenizer, generation and processor files (everything but weights
    and config.json) from ``source_dir``; these are what transformers, lmdeploy and vLLM need."""
    copied = []
    for f in sorted(Path(source_dir).iterdir()):
        if f.is_file() and f.name not in _NOT_COPIED and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, Path(out_dir) / f.name)
            copied.append(f.name)
    return copied


def save_official(
    model: InternVLChatModel,
    out_dir: str | Path,
    source_dir: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Save ``model`` as an official InternVL directory.

    Writes the official key names and shapes as sharded safetensors plus index (a tied output head is not
    written, as in the tied releases), and config.json as
    the source release's (``use_*_lora`` 0, ``torch_dtype`` = ``dtype``, no attention setting
    forced). With ``source_dir`` its remote-code, tokenizer and generation files are copied too.

    Returns:
        ``out_dir`` as a Path.
    """
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES)}, got {dtype}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A tied output head is the embedding's Parameter: stored once, under the embedding's key (official layout).
    state = {k: v.detach().to("cpu", dtype) for k, v in official_state_dict(model).items()}
    adapters = [k for k in state if "lora_" in k or ".base_layer." in k]
    if adapters:
        raise ValueError(f"model holds unmerged LoRA weights (e.g. {adapters[0]}); merge them before save_official")
    written = set(write_safetensors(state, out, max_shard_size))
    for stale in out.glob("model*.safetensors*"):
        if stale.name not in written:  # shards of an earlier save with another shard count
            stale.unlink()
    if source_dir is not None:
        copy_support_files(source_dir, out)
    atomic_write_text(out / "config.json", json.dumps(official_config_dict(model, dtype), indent=2) + "\n")
    return out
