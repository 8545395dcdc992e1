"""Large random checkpoints in the official format, for the memory benchmarks: a tiny release with its LLM
widened to real sizes, written tensor by tensor (never the whole model in memory)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from xtuner_vl.checkpoint import ShardWriter
from xtuner_vl.model import build_empty_model, read_config
from xtuner_vl.model.saver import copy_support_files

__all__ = ["write_widened_checkpoint"]

_POOL = 1 << 24  # random values sliced into every generated tensor (generating each one would take minutes)


def write_widened_checkpoint(tiny: Path, out: Path, llm: dict[str, Any], shard_size: str, seed: int = 0) -> int:
    """``tiny``'s files (tokenizer, code, config) with ``llm`` merged into its ``llm_config``, and random bf16
    weights of that shape written shard by shard into ``out``; returns the weight bytes."""
    raw = json.loads((tiny / "config.json").read_text())
    raw["llm_config"].update(llm)
    out.mkdir(parents=True)
    copy_support_files(tiny, out)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    skeleton = build_empty_model(read_config(out), img_context_token_id=0)  # meta device: keys and shapes only
    pool = torch.empty(_POOL, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed))
    writer = ShardWriter(out, shard_size)
    for i, (key, meta) in enumerate(skeleton.state_dict().items()):
        flat = torch.empty(meta.numel(), dtype=torch.bfloat16)
        offset = (i * 7919) % (_POOL // 2)
        for start in range(0, flat.numel(), _POOL // 2):
            n = min(_POOL // 2, flat.numel() - start)
            flat[start : start + n] = pool[offset : offset + n]
        writer.add(key, flat.view(meta.shape))
    writer.finish()
    return writer.total_bytes
