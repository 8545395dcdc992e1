"""Shard-by-shard weight I/O: read a base directory's tensor shapes, write safetensors shards as they fill.

Peak memory of a streamed conversion is the tensor being converted: the base is read one tensor at a
time and output bytes go to disk as soon as each tensor is converted; no shard is held in memory.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open
from tqdm import tqdm

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


def iter_base_tensors(model_dir: str | Path, desc: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` over every weight file of ``model_dir``, one tensor at a time, in file order;
    with ``desc``, a progress bar of that name ticks per tensor.

    The generator drops each tensor before reading the next; a caller that wants the same (peak memory
    of one tensor) deletes its own reference in its loop body.
    """
    total = len(base_shapes(model_dir)) if desc else None
    with tqdm(total=total, desc=desc, disable=desc is None) as bar:
        for file in weight_files(model_dir):
            for key, tensor in iter_tensors(file):
                yield key, tensor
                del tensor
                bar.update()


# safetensors dtype names and item sizes of the dtypes a checkpoint holds.
_SAFETENSORS_DTYPES = {
    torch.float64: ("F64", 8),
    torch.float32: ("F32", 4),
    torch.float16: ("F16", 2),
    torch.bfloat16: ("BF16", 2),
    torch.int64: ("I64", 8),
    torch.int32: ("I32", 4),
    torch.int16: ("I16", 2),
    torch.int8: ("I8", 1),
    torch.uint8: ("U8", 1),
    torch.bool: ("BOOL", 1),
}
_COPY_CHUNK = 64 << 20


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_size`` bytes, holding none of them.

    Each tensor's bytes go to the current shard's temporary data file as soon as it is added, so the
    caller's tensor (and any file mapping behind it) can be freed at once. When the shard is full (or at
    :meth:`finish`) the shard file is assembled from the header and the data copied in chunks, in the
    order ``safetensors.save_file`` uses (larger item size first, then by name: every tensor stays aligned).
    Shards go to temporary names; :meth:`finish` renames them to ``model.safetensors`` or
    ``model-0000k-of-0000n.safetensors`` and writes the index, so a crash never leaves a final name
    on a partial output.
    """

    def __init__(self, out_dir: str | Path, max_shard_size: int | str = "5GB") -> None:
        if sys.byteorder != "little":
            raise RuntimeError("ShardWriter writes raw tensor bytes and needs a little-endian machine")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.limit = parse_size(max_shard_size)
        self._pending: dict[str, tuple[str, list[int], int, int]] = {}  # key -> dtype, shape, data file range
        self._pending_bytes = 0
        self._data: BinaryIO | None = None
        self._written: list[tuple[Path, list[str]]] = []
        self._keys: set[str] = set()
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` under ``key``; flushes the current shard first when it would overflow."""
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{key}: dtype {tensor.dtype} cannot be written to safetensors here")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.limit:
            self._flush()
        if key in self._keys:
            raise ValueError(f"{key} was already written")
        self._keys.add(key)
        if self._data is None:
            self._data = open(self._part_path(".data.tmp"), "w+b")  # closed in _flush
        self._data.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        dtype = _SAFETENSORS_DTYPES[tensor.dtype][0]
        self._pending[key] = (dtype, list(tensor.shape), self._pending_bytes, self._pending_bytes + size)
        self._pending_bytes += size
        self.total_bytes += size

    def _part_path(self, suffix: str) -> Path:
        return self.out / f".model-part-{len(self._written) + 1:05d}{suffix}"

    def _flush(self) -> None:
        item_size = {name: size for name, size in _SAFETENSORS_DTYPES.values()}
        order = sorted(self._pending, key=lambda k: (-item_size[self._pending[k][0]], k))
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key in order:
            dtype, shape, begin, end = self._pending[key]
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + end - begin]}
            offset += end - begin
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
        tmp = self._part_path(".safetensors.tmp")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            if self._data is not None:
                self._data.flush()
                buf = bytearray(_COPY_CHUNK)
                for key in order:
                    _copy_range(self._data, f, self._pending[key][2], self._pending[key][3], buf)
        if self._data is not None:
            self._data.close()
            os.unlink(self._data.name)
        os.chmod(tmp, 0o644)  # releases are world-readable
        self._written.append((tmp, order))
        self._pending, self._pending_bytes, self._data = {}, 0, None

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


def _copy_range(src: BinaryIO, dst: BinaryIO, begin: int, end: int, buf: bytearray) -> None:
    """Append bytes ``begin:end`` of ``src`` to ``dst`` through ``buf``."""
    src.seek(begin)
    view = memoryview(buf)
    while begin < end:
        n = src.readinto(view[: min(len(buf), end - begin)])
        if not n:
            raise OSError(f"{src.name}: unexpected end of file at byte {begin}")
        dst.write(view[:n])
        begin += n
