"""Time to the first training batch on a generated LLaVA-665K-sized annotation file, cold and warm.

Ours, as ``xtuner-vl train`` starts: ``InternVLDataset`` (scans the ``.jsonl`` index only) ->
``length_stats()`` (per-record length estimates for length grouping, computed in parallel and cached by
file hash under ``$XTUNER_VL_CACHE``) -> ``LengthGroupedSampler`` -> ``DataLoader`` with
``collate_samples`` -> first batch (images decoded, tiled and tokenized in the workers). Cold: an empty
cache directory; warm: the same directory again (lengths read from the cache). The generated file is
in the OS page cache in both cases, so "cold" means "no cached lengths", not "cold disk".

Baseline: the naive start-up that tokenizes every sample in one process before step 1, as the official
InternVL ``group_by_length`` does (``readlines``, ``json.loads`` and ``tokenizer(joined conversation)`` per
record; here without the official's cache keyed on string length, which returns wrong lengths). It is timed
on the first ``--baseline-lines`` records and extrapolated linearly to the whole file (printed as such).

The file: ~80% single-image records with ``width``/``height``, ~10% multi-image (2-4 images), ~10%
text-only, LLaVA-665K-like turn counts and text lengths; the images are a handful of small JPEG files
reused by name. Both sides use the same tiny InternLM2 tokenizer (``write_tiny_tokenizer``).

Run: ``python benchmarks/bench_startup.py`` (``--lines 20000`` for a quick run; ``--help``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

from xtuner_vl.dataset import InternVLDataset, LengthGroupedSampler, collate_samples
from xtuner_vl.model import load_tokenizer
from xtuner_vl.tiny.tokenizers import write_tiny_tokenizer

IMAGE_SIZES = ((640, 480), (480, 640), (500, 375), (640, 427), (1024, 768), (336, 336), (800, 600), (1280, 720))
_WORDS = (
    "the a of and to in is on with for at by from image picture man woman people street car dog cat table "
    "sitting standing holding red blue green white black large small two three near behind front left right "
    "building tree sky water room kitchen bus train sign food plate person playing walking looking wearing "
    "shirt hat background scene shows appears there are this that which what where how many colour"
).split()
_SHORT_QUESTIONS = (
    "What is the man holding?", "How many people are in the picture?", "What colour is the bus?",
    "Is the dog sitting or standing?", "What is on the table?", "Where is the cat?",
)  # fmt: skip
_VQA_SUFFIX = "\nAnswer the question using a single word or phrase."


def _text(rng: random.Random, words: int) -> str:
    """Deterministic filler prose of about ``words`` words."""
    body = " ".join(rng.choice(_WORDS) for _ in range(words))
    return body[0].upper() + body[1:] + "."


def _turns(rng: random.Random, rounds: int, short: bool, answer_words: int) -> list[dict]:
    turns = []
    for _ in range(rounds):
        question = rng.choice(_SHORT_QUESTIONS) + (_VQA_SUFFIX if short else "")
        answer = rng.choice(_WORDS) if short else _text(rng, rng.randint(answer_words // 3, answer_words))
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def make_record(rng: random.Random, i: int, names: list[str]) -> dict:
    """One LLaVA-style record: 80% single image, 10% multi-image, 10% text-only."""
    r = rng.random()
    if r < 0.8:
        k = rng.randrange(len(names))
        short = rng.random() < 0.6  # VQA-style short answers (VQAv2, GQA, OCR-VQA) vs LLaVA-instruct prose
        turns = _turns(rng, rng.randint(1, 8) if short else rng.randint(1, 4), short, 90)
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
        w, h = IMAGE_SIZES[k]
        return {"id": f"{i:07d}", "image": names[k], "width": w, "height": h, "conversations": turns}
    if r < 0.9:
        n = rng.randint(2, 4)
        images = [rng.choice(names) for _ in range(n)]
        turns = _turns(rng, rng.randint(1, 2), False, 60)
        turns[0]["value"] = "".join(f"Image-{j + 1}: <image>\n" for j in range(n)) + turns[0]["value"]
        return {"id": f"{i:07d}", "image": images, "conversations": turns}
    turns = _turns(rng, rng.randint(1, 5), False, 250)  # ShareGPT-like text-only chats, longer answers
    return {"id": f"{i:07d}", "conversations": turns}


def generate(out: Path, lines: int, seed: int) -> tuple[Path, Path]:
    """Write ``images/`` (a few small JPEGs) and ``data.jsonl`` of ``lines`` records under ``out``."""
    folder = out / "images" / "coco" / "train2017"
    folder.mkdir(parents=True)
    nprng = np.random.default_rng(seed)
    names = []
    for k, (w, h) in enumerate(IMAGE_SIZES):
        name = f"coco/train2017/{k:012d}.jpg"
        coarse = nprng.integers(0, 256, (h // 32, w // 32, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR).save(out / "images" / name, quality=85)
        names.append(name)
    rng = random.Random(seed)
    path = out / "data.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, lines, 10_000):
            chunk = (make_record(rng, i, names) for i in range(start, min(lines, start + 10_000)))
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chunk))
    return path, out / "images"


def time_to_first_batch(data: Path, images: Path, tokenizer, args) -> dict[str, float]:
    """Seconds of each start-up phase of ours, up to the first collated batch."""
    t0 = time.perf_counter()
    dataset = InternVLDataset(
        str(data), tokenizer, str(images), template="internlm2-chat", max_dynamic_patch=args.max_patch
    )
    t1 = time.perf_counter()
    lengths, multimodal = dataset.length_stats()
    t2 = time.perf_counter()
    sampler = LengthGroupedSampler(lengths, multimodal, global_batch_size=args.batch_size, seed=42)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=args.num_workers,
        collate_fn=partial(collate_samples, pad_token_id=0),
        multiprocessing_context="fork" if args.num_workers else None,
    )
    it = iter(loader)
    first = next(it)
    t3 = time.perf_counter()
    del it  # shut the workers down outside the timed region
    if first.batch is None:
        raise SystemExit("the first batch has no usable sample")
    return {
        "index scan": t1 - t0,
        "length_stats": t2 - t1,
        "sampler + first batch": t3 - t2,
        "total": t3 - t0,
        "tiles": float(len(first.batch.pixel_values)),
        "tokens": float(first.batch.input_ids.numel()),
    }


def naive_seconds(data: Path, tokenizer, limit: int) -> tuple[float, int]:
    """Seconds to read, parse and tokenize the first ``limit`` records in one process."""
    t0 = time.perf_counter()
    with open(data, encoding="utf-8") as f:
        raw = [line for _, line in zip(range(limit), f, strict=False)]
    lengths = []
    for line in raw:
        item = json.loads(line)
        text = "\n".join(turn["value"] for turn in item["conversations"])
        lengths.append(len(tokenizer(text).input_ids))
    return time.perf_counter() - t0, len(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=665_000, help="records in the generated .jsonl")
    parser.add_argument("--baseline-lines", type=int, default=5_000, help="records the naive baseline tokenizes")
    parser.add_argument("--batch-size", type=int, default=4, help="micro batch size of the DataLoader")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (this machine: 2 cores)")
    parser.add_argument("--max-patch", type=int, default=6, help="max_dynamic_patch (the configs' default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_tiny_tokenizer("internlm2", tmp / "tokenizer")
        tokenizer = load_tokenizer(tmp / "tokenizer")
        t = time.perf_counter()
        data, images = generate(tmp / "data", args.lines, args.seed)
        size = data.stat().st_size
        print(
            f"generated {args.lines} records, {size / 2**20:.0f} MiB, in {time.perf_counter() - t:.1f} s "
            f"(not timed below)"
        )
        runs = {}
        for name in ("cold", "warm"):
            os.environ["XTUNER_VL_CACHE"] = str(tmp / "cache")  # empty for the cold run, filled by it
            runs[name] = time_to_first_batch(data, images, tokenizer, args)
        naive, counted = naive_seconds(data, tokenizer, args.baseline_lines)

    naive_total = naive / counted * args.lines
    phases = ("index scan", "length_stats", "sampler + first batch", "total")
    print(
        f"\nours, seconds to the first batch ({args.batch_size} samples, {args.num_workers} workers; "
        f"first batch {runs['cold']['tiles']:.0f} tiles, {runs['cold']['tokens']:.0f} padded tokens)"
    )
    print(f"{'phase':<22} {'cold':>8} {'warm':>8}")
    for phase in phases:
        print(f"{phase:<22} {runs['cold'][phase]:>8.2f} {runs['warm'][phase]:>8.2f}")
    print(
        f"\nnaive baseline: {counted} records tokenized in {naive:.2f} s ({naive / counted * 1e3:.3f} ms/record); "
        f"extrapolated linearly to {args.lines} records: {naive_total:.1f} s"
    )
    print(f"\n{'':<22} {'seconds':>8} {'vs naive':>9}")
    print(f"{'naive (extrapolated)':<22} {naive_total:>8.1f} {1.0:>8.2f}x")
    for name in ("cold", "warm"):
        print(f"{'ours ' + name:<22} {runs[name]['total']:>8.2f} {naive_total / runs[name]['total']:>8.1f}x")
    print(
        f"RATIO startup_first_batch naive/ours = {naive_total / runs['cold']['total']:.1f}x cold, "
        f"{naive_total / runs['warm']['total']:.1f}x warm (ours cold {runs['cold']['total']:.1f} s, "
        f"target < 60 s)"
    )


if __name__ == "__main__":
    main()
