"""Data sources and exact fractional repeats."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xtuner_vl.dataset.annotations import AnnotationFile

__all__ = ["DataSource", "repeat_indices", "build_sources"]


@dataclass
class DataSource:
    """One annotation file with its own image folder, repeat factor and optional tile budget."""

    name: str
    annotations: AnnotationFile
    image_folder: Path | None
    repeat_times: float
    max_dynamic_patch: int | None = None


def repeat_indices(num_records: int, repeat_times: float, seed: int, source_index: int = 0) -> np.ndarray:
    """Record indices of one source after repeating: ``floor(r)`` full copies, then a seeded random
    ``round(frac(r) * n)`` records without replacement (3.5 = three copies plus a random half)."""
    if repeat_times < 0 or not math.isfinite(repeat_times):
        raise ValueError(f"repeat_times must be a finite number >= 0, got {repeat_times}")
    full = math.floor(repeat_times)
    extra = round((repeat_times - full) * num_records)
    parts = [np.arange(num_records, dtype=np.int64)] * full
    if extra:
        rng = np.random.default_rng([seed, source_index])
        parts.append(np.sort(rng.choice(num_records, size=extra, replace=False)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _per_source(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} data_paths")
        return list(value)
    return [value] * n


def build_sources(
    data_paths: str | Sequence[str],
    image_folders: str | None | Sequence[str | None] = None,
    repeat_times: float | Sequence[float] = 1.0,
    max_dynamic_patch: int | None | Sequence[int | None] = None,
) -> list[DataSource]:
    """Scan every annotation file (index only) and pair it with its per-source settings."""
    paths = [data_paths] if isinstance(data_paths, (str, Path)) else list(data_paths)
    if not paths:
        raise ValueError("data_paths is empty")
    folders = _per_source(image_folders, len(paths), "image_folders")
    repeats = _per_source(repeat_times, len(paths), "repeat_times")
    budgets = _per_source(max_dynamic_patch, len(paths), "max_dynamic_patch")
    return [
        DataSource(
            name=Path(p).stem,
            annotations=AnnotationFile.scan(p),
            image_folder=Path(f) if f is not None else None,
            repeat_times=float(r),
            max_dynamic_patch=b,
        )
        for p, f, r, b in zip(paths, folders, repeats, budgets, strict=True)
    ]
