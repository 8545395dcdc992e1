"""Reading and writing the weight files of an official checkpoint directory.

Reads ``model.safetensors``, safetensors shards with their index, or ``pytorch_model*.bin``
(always ``weights_only=True``); writes HF-style sharded safetensors plus index, atomically.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "weight_files",
    "iter_tensors",
    "read_tensors",
    "tensor_shapes",
    "read_state_dict",
    "write_safetensors",
    "parse_size",
    "atomic_write_text",
]

_SAFE_INDEX = "model.safetensors.index.json"
_BIN_INDEX = "pytorch_model.bin.index.json"


def _inside(directory: Path, index: Path, name: str) -> Path:
    """``directory / name``, refused unless it resolves (symlinks included) to a file inside ``directory``:
    an index must never make the loader read a file elsewhere."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{index}: weight_map entry {name!r} is not a file name")
    path = (directory / name).resolve()
    roots = [directory.resolve()]
    if directory.parent.name == "snapshots":  # a Hugging Face cache snapshot: its files link into ../../blobs
        roots.append(directory.parent.parent.resolve() / "blobs")
    if not any(path.is_relative_to(root) for root in roots):
        raise ValueError(f"{index}: weight_map entry {name!r} points outside the model directory ({path})")
    return directory / name


def weight_files(model_dir: str | Path) -> list[Path]:
    """The weight files of ``model_dir`` in index order; safetensors preferred over ``.bin``."""
    d = Path(model_dir)
    for index_name, single in ((_SAFE_INDEX, "model.safetensors"), (_BIN_INDEX, "pytorch_model.bin")):
        index = d / index_name
        if index.is_file():
            names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
            files = [_inside(d, index, n) for n in names]
            missing = [n for n, f in zip(names, files, strict=True) if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{index}: shard(s) {missing} listed in weight_map are missing")
            return files
        if (d / single).is_file():
            return [d / single]
    raise FileNotFoundError(f"{d}: no model.safetensors, {_SAFE_INDEX}, pytorch_model.bin or {_BIN_INDEX}")


def _open_safetensors(path: Path):
    """A ``safe_open`` handle that reads each tensor with ``pread`` into its own memory where the installed
    safetensors supports it (``backend="pread"``, e.g. 0.8): a memory-mapped tensor keeps its file mapped, and
    the pages read resident, while it lives."""
    try:
        return safe_open(str(path), framework="pt", device="cpu", backend="pread")
    except TypeError:  # a safetensors without the backend option: memory-mapped only
        return safe_open(str(path), framework="pt", device="cpu")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # torch's message goes on to suggest turning the safety off: not repeated
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise ValueError(
            f"{path}: refused to load: the pickle holds more than tensors ({reason}); loading it could run code "
            "from the file. Use the release's safetensors weights"
        ) from None


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` from one weight file without loading the others (safetensors: with ``pread``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with _open_safetensors(path) as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    else:
        yield from _load_bin(path).items()


def read_tensors(items: Iterable[tuple[Path, str]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` for each ``(file, key)`` of ``items``, in that order, one tensor read at a time
    (as :func:`iter_tensors`); each file is opened on first use and stays open until the end."""
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}
        for file, key in items:
            safetensors = file.suffix == ".safetensors"
            if file not in handles:
                handles[file] = stack.enter_context(_open_safetensors(file)) if safetensors else _load_bin(file)
            yield key, handles[file].get_tensor(key) if safetensors else handles[file][key]


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """``key -> shape`` of one weight file, in the order :func:`iter_tensors` yields them, without reading data
    (safetensors: the header; ``.bin``: a memory map, whose pages are touched only for the pickle)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    return {key: tuple(t.shape) for key, t in _load_bin(path).items()}


def read_state_dict(model_dir: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of ``model_dir`` (floating ones cast to ``dtype`` when given)."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(model_dir):
        for key, tensor in iter_tensors(file):
            if key in state:
                raise ValueError(f"{file}: key {key!r} appears in two weight files")
            state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return state


def parse_size(size: int | str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"10KiB"`` / ``1234`` -> bytes (decimal units, as transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _shards(state: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def write_safetensors(
    state: dict[str, torch.Tensor], out_dir: str | Path, max_shard_size: int | str = "5GB"
) -> list[str]:
    """Write ``state`` as ``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` + index.

    Each file is written under a temporary name and renamed, so a crash never leaves a truncated
    weight file under a final name. Returns the names of the files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = _shards(state, parse_size(max_shard_size))
    names = (
        ["model.safetensors"]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    weight_map = {}
    for name, keys in zip(names, groups, strict=True):
        tmp = out / f".{name}.tmp"
        save_file({k: state[k].contiguous() for k in keys}, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors creates files 0600; released checkpoints are world-readable
        os.replace(tmp, out / name)
        weight_map.update(dict.fromkeys(keys, name))
    if len(groups) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(out / _SAFE_INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")
        names.append(_SAFE_INDEX)
    return names
