"""DeepSpeed JSON presets and their completion from the training config.

``"auto"`` fields are filled here, in one place, from the values the trainer really uses (micro
batch, accumulation, clipping, dtype, world size, LLM width), so the JSON never disagrees with them.
"""

from __future__ import annotations

import copy
import json
from importlib.resources import files
from pathlib import Path
from typing import Any

__all__ = ["PRESETS", "CONFIG_ROOT", "load_deepspeed_config", "complete_deepspeed_config", "zero_stage"]

# The shipped configs and DeepSpeed presets are package data: found the same way from a source checkout, an
# editable install or a wheel (importlib.resources; setuptools installs them as plain files).
CONFIG_ROOT = Path(str(files("xtuner_vl").joinpath("configs")))
PRESETS = ("zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")
_ALIASES = {f"deepspeed_{p}": p for p in PRESETS}


def load_deepspeed_config(name_or_path: str) -> dict[str, Any]:
    """A preset name (``zero2``, ``deepspeed_zero2``...) or a path to a DeepSpeed JSON file."""
    name = _ALIASES.get(name_or_path, name_or_path)
    path = CONFIG_ROOT / "deepspeed" / f"{name}.json" if name in PRESETS else Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {name_or_path!r}: not a preset ({', '.join(PRESETS)}) nor a file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e


def zero_stage(config: dict[str, Any]) -> int:
    """The ZeRO stage of a DeepSpeed config (0 without ``zero_optimization``)."""
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def _fill(d: dict, key: str, value: Any) -> None:
    if d.get(key, "auto") == "auto":
        d[key] = value


def complete_deepspeed_config(
    config: dict[str, Any],
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    max_grad_norm: float,
    bf16: bool,
    hidden_size: int,
) -> dict[str, Any]:
    """Fill every ``"auto"`` of ``config`` and check the explicit values agree with the trainer."""
    cfg = copy.deepcopy(config)
    _fill(cfg, "train_micro_batch_size_per_gpu", micro_batch_size)
    _fill(cfg, "gradient_accumulation_steps", grad_accum)
    _fill(cfg, "train_batch_size", micro_batch_size * grad_accum * world_size)
    _fill(cfg, "gradient_clipping", max_grad_norm)
    cfg.setdefault("bf16", {})
    _fill(cfg["bf16"], "enabled", bf16)
    expected = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
    }
    for key, value in expected.items():
        if cfg[key] != value:
            raise ValueError(f"DeepSpeed config sets {key}={cfg[key]} but the training config implies {value}")
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    _fill(zero, "reduce_bucket_size", hidden_size * hidden_size)
    _fill(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
    _fill(zero, "stage3_param_persistence_threshold", 10 * hidden_size)
    if "offload_optimizer" in zero:
        # The optimizer of an offloaded run is DeepSpeed's CPU Adam (engine/optimizer.py), so DeepSpeed's check
        # that refuses any other optimizer there (zero_force_ds_cpu_optimizer, default true) stays on.
        for part in ("offload_optimizer", "offload_param"):
            if part in zero and not bf16:  # CPU runs: pinned memory needs CUDA
                zero[part]["pin_memory"] = False
    return cfg
