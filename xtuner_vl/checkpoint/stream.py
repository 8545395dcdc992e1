"""Shard-by-shard weight I/O: read a base directory's tensor shapes, write safetensors shards as they fill.

Peak memory of a streamed conversion is one output shard (``max_shard_size``) plus the tensor being
converted; the base is read one tensor at a time (safetensors) and never held whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from xtuner_vl.model.weights import atomic_write_text, iter_tensors, parse_size, weight_files

__all__ = ["base_shapes", "iter_base_tensors", "ShardWriter"]

_INDEX = "model.safetensors.index.json"


def base_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of ``model_dir`` (safetensors: headers only, no tensor read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(model_dir):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        else:
            shapes.update({k: tuple(t.shape) for k, t in iter_tensors(file)})
    return shapes


def iter_base_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` over every weight file of ``model_dir``, one tensor at a time, in file order."""
    for file in weight_files(model_dir):
        yield from iter_tensors(file)


class ShardWriter:
    """Collects tensors and writes a safetensors shard each time ``max_shard_size`` would be exceeded.

    Shards go to temporary names; :meth:`finish` renames them to ``model.safetensors`` or
    ``model-0000k-of-0000n.safetensors`` and writes the index, so a crash never leaves a final name
    on a partial output.
    """

    def __init__(self, out_dir: str | Path, max_shard_size: int | str = "5GB") -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.limit = parse_size(max_shard_size)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under ``key``; flushes the current shard first when it would overflow."""
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.limit:
            self._flush()
        self._pending[key] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        tmp = self.out / f".model-part-{len(self._written) + 1:05d}.safetensors.tmp"
        save_file(self._pending, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors creates 0600 files; releases are world-readable
        self._written.append((tmp, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, give every shard its final name, write the index; returns the names."""
        if self._pending or not self._written:
            self._flush()
        n = len(self._written)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for name, (tmp, keys) in zip(names, self._written, strict=True):
            os.replace(tmp, self.out / name)
            weight_map.update(dict.fromkeys(keys, name))
        for stale in self.out.glob("model*.safetensors*"):
            if stale.name not in names:  # files of an earlier output with another shard count
                stale.unlink()
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            atomic_write_text(self.out / _INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")
            names.append(_INDEX)
        return names
