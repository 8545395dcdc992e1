"""Per-record token lengths and modality for length grouping, without tokenizing at start-up.

A record's ``length`` field wins; otherwise the length is estimated from its text size and image
count (exact tile grid when ``width``/``height`` are given). Estimates are computed once, in
parallel, and cached under ``~/.cache/xtuner_vl/lengths`` keyed by the file's content hash and the
estimator settings.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from xtuner_vl.dataset.annotations import AnnotationError, AnnotationFile
from xtuner_vl.dataset.image import tile_count
from xtuner_vl.dataset.sources import DataSource

__all__ = ["estimate_record", "source_stats", "cache_dir"]

BYTES_PER_TOKEN = 4  # rough: ~4 bytes of UTF-8 per token for English, ~3 (one CJK char) per token for Chinese
IMAGE_TAG_TOKENS = 2  # <img> and </img> around each image's context tokens
ESTIMATOR_VERSION = 2  # 2: counts IMAGE_TAG_TOKENS


def cache_dir() -> Path:
    return Path(os.environ.get("XTUNER_VL_CACHE", Path.home() / ".cache" / "xtuner_vl")) / "lengths"


def estimate_record(item: dict[str, Any], settings: dict[str, Any]) -> tuple[int, bool]:
    """(estimated token length, is multimodal) of one decoded record."""
    if isinstance(item.get("length"), int):
        return item["length"], bool(item.get("image") or item.get("video"))
    turns = item.get("conversations") or []
    text_bytes = sum(len(str(t.get("value", "")).encode("utf-8")) for t in turns if isinstance(t, dict))
    tokens = settings["base_tokens"] + text_bytes // BYTES_PER_TOKEN + 8 * max(0, len(turns) - 2)
    if item.get("video"):
        return tokens + settings["max_num_frames"] * (settings["num_image_token"] + 8), True
    images = item.get("image")
    if not images:
        return tokens, False
    images = [images] if isinstance(images, str) else list(images)
    per_image = max(1, settings["max_dynamic_patch"] // len(images))
    w, h = item.get("width"), item.get("height")
    if len(images) == 1 and isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
        tiles = tile_count(
            w, h, settings["min_dynamic_patch"], per_image, settings["image_size"], settings["use_thumbnail"]
        )
    else:
        tiles = per_image + (1 if settings["use_thumbnail"] and per_image > 1 else 0)
    return tokens + len(images) * (tiles * settings["num_image_token"] + IMAGE_TAG_TOKENS), True


def _estimate_chunk(args: tuple[AnnotationFile, int, int, dict]) -> tuple[np.ndarray, np.ndarray]:
    annotations, start, stop, settings = args
    lengths, modal = np.zeros(stop - start, dtype=np.int64), np.zeros(stop - start, dtype=bool)
    for i in range(start, stop):
        try:
            lengths[i - start], modal[i - start] = estimate_record(annotations.record(i), settings)
        except AnnotationError:
            lengths[i - start] = 0  # a broken record: check-data reports it, training skips it
    return lengths, modal


def file_hash(path: Path) -> str:
    """SHA-256 of a file's content; read once per process while its size and mtime stay the same (the lengths
    cache and the resume data signature both ask for it)."""
    st = Path(path).stat()
    return _file_hash(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def source_stats(
    source: DataSource,
    num_image_token: int,
    max_dynamic_patch: int,
    min_dynamic_patch: int,
    use_thumbnail: bool,
    image_size: int,
    max_num_frames: int,
    base_tokens: int,
    num_workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, multimodal) per record of ``source``, from the cache when the file is unchanged.

    ``base_tokens`` is the template's cost of a one-question conversation (system block, role headers).
    """
    settings = {
        "base_tokens": base_tokens,
        "num_image_token": num_image_token,
        "max_dynamic_patch": max_dynamic_patch,
        "min_dynamic_patch": min_dynamic_patch,
        "use_thumbnail": use_thumbnail,
        "image_size": image_size,
        "max_num_frames": max_num_frames,
        "bytes_per_token": BYTES_PER_TOKEN,
        "estimator": ESTIMATOR_VERSION,  # part of the cache key: a changed formula recomputes
    }
    key = hashlib.sha256((file_hash(source.annotations.path) + json.dumps(settings, sort_keys=True)).encode())
    cached = cache_dir() / f"{key.hexdigest()}.npz"
    if cached.is_file():
        with np.load(cached) as z:
            return z["lengths"], z["multimodal"]
    n = len(source.annotations)
    workers = max(1, min(num_workers or os.cpu_count() or 1, n // 20_000 + 1))
    bounds = np.linspace(0, n, workers + 1, dtype=np.int64)
    chunks = [(source.annotations, int(a), int(b), settings) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if workers == 1:
        parts = [_estimate_chunk(c) for c in chunks]
    else:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_estimate_chunk, chunks))
    lengths = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    modal = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, dtype=bool)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, lengths=lengths, multimodal=modal)
    os.replace(tmp, cached)
    return lengths, modal
