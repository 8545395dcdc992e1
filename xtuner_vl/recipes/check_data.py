"""``xtuner-vl check-data``: validate every record of every source before hours of training.

Each record is built exactly as training would build it (images decoded and tiled, conversation
tokenized), in parallel worker processes (in this process with ``--workers 1``), with a progress bar.
Prints per-source counts before and after repeats, token-length and tiles histograms, over-length
counts, and every problem as ``file:line: reason``. Exits non-zero when a record is unusable.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from xtuner_vl.dataset.annotations import AnnotationError
from xtuner_vl.dataset.conversation import ConversationError
from xtuner_vl.dataset.image import ImageError
from xtuner_vl.dataset.internvl_dataset import InternVLDataset, SampleError
from xtuner_vl.model import load_tokenizer
from xtuner_vl.recipes.config import load_config
from xtuner_vl.recipes.model_wrapper import build_model_wrapper
from xtuner_vl.registry import DATASETS

__all__ = ["check_data", "DataReport"]

_DATASET: InternVLDataset | None = None  # set in the parent before forking the workers, cleared at the end


@dataclass
class SourceReport:
    name: str
    path: str
    records: int
    after_repeats: int
    lengths: list[int] = field(default_factory=list)
    tiles: list[int] = field(default_factory=list)
    reduced: int = 0
    over_length: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class DataReport:
    sources: list[SourceReport]

    @property
    def num_problems(self) -> int:
        return sum(len(s.problems) for s in self.sources)


def _check_one(job: tuple[int, int]) -> tuple[int, int, int, bool, str | None]:
    """(source, tokens, tiles, reduced, problem) for one record."""
    s, r = job
    ds = _DATASET
    source = ds.sources[s]
    try:
        sample = ds.build_record(source, r, pixels=False)
    except (AnnotationError, ImageError, ConversationError, SampleError) as e:
        return s, 0, 0, False, str(e)
    return s, sample.num_tokens, int(sample.image_flags.sum()), sample.tiles_reduced, None


def _histogram(values: list[int], bins: list[int]) -> str:
    if not values:
        return "  (none)"
    counts, edges = np.histogram(values, bins=bins + [max(max(values), bins[-1]) + 1])
    total = len(values)
    rows = []
    for c, lo, hi in zip(counts, edges[:-1], edges[1:], strict=True):
        bar = "#" * int(40 * c / total)
        rows.append(f"  {int(lo):>6}-{int(hi) - 1:<6} {c:>8} {bar}")
    return "\n".join(rows)


def check_data(config: str, cfg_options: dict | None = None, workers: int | None = None) -> DataReport:
    global _DATASET
    cfg = load_config(config, cfg_options)
    model_s = build_model_wrapper(cfg.get("model"))
    tokenizer = load_tokenizer(model_s.path)
    _DATASET = DATASETS.build({"model_path": model_s.path, **cfg.train_dataset, "tokenizer": tokenizer})
    ds = _DATASET
    reports = [
        SourceReport(s.name, str(s.annotations.path), len(s.annotations), int((ds.source_of == i).sum()))
        for i, s in enumerate(ds.sources)
    ]
    jobs = [(i, r) for i, s in enumerate(ds.sources) for r in range(len(s.annotations))]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    with contextlib.ExitStack() as stack:
        if workers == 1:  # no worker process: this one checks every record (nothing is forked)
            results = map(_check_one, jobs)
        else:
            pool = stack.enter_context(mp.get_context("fork").Pool(workers))
            results = pool.imap_unordered(_check_one, jobs, chunksize=max(1, len(jobs) // (workers * 16)))
        for s, tokens, tiles, reduced, problem in tqdm(results, total=len(jobs), desc="check-data"):
            rep = reports[s]
            if problem is not None:
                rep.problems.append(problem)
                rep.over_length += "over max_length" in problem
                continue
            rep.lengths.append(tokens)
            rep.tiles.append(tiles)
            rep.reduced += reduced
    _DATASET = None
    for rep in reports:
        rep.problems.sort(key=_line_key)
    return DataReport(reports)


def _line_key(problem: str) -> tuple[str, int]:
    head = problem.split(": ", 1)[0]
    path, _, line = head.rpartition(":")
    return (path, int(line)) if line.isdigit() else (head, 0)


def format_report(report: DataReport, max_length: int) -> str:
    out = []
    for rep in report.sources:
        out.append(f"== {rep.name} ({rep.path})")
        out.append(
            f"records {rep.records}, after repeats {rep.after_repeats}, usable {len(rep.lengths)}, "
            f"problems {len(rep.problems)}, over max_length={max_length}: {rep.over_length} dropped, "
            f"{rep.reduced} with fewer tiles"
        )
        out.append("token lengths:")
        out.append(_histogram(rep.lengths, [0, 256, 512, 1024, 2048, 4096, 8192]))
        out.append("real tiles per sample:")
        counts = Counter(rep.tiles)
        out.extend(f"  {k:>3} {counts[k]:>8}" for k in sorted(counts))
        out.extend(f"  PROBLEM {p}" for p in rep.problems)
    total = sum(r.records for r in report.sources)
    out.append(f"{total} records checked, {report.num_problems} problems")
    return "\n".join(out)


def run_check_data(
    config: str, cfg_options: dict | None = None, workers: int | None = None, report_file: str | None = None
) -> int:
    report = check_data(config, cfg_options, workers)
    max_length = _DATASET.max_length if _DATASET is not None else 0
    text = format_report(report, max_length)
    print(text)
    if report_file:
        Path(report_file).write_text(text + "\n", encoding="utf-8")
    return 1 if report.num_problems else 0
