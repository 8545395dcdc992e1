"""Real tokens / processed tokens of random, length-grouped and packed batches on a LLaVA-665K-like mix.

Processed tokens are what the GPU computes: rows x padded row length of every micro batch; real tokens
are the samples' own tokens. All three strategies run the toolkit's own code exactly as ``xtuner-vl
train`` wires it (``recipes/train.py``): a ``DataLoader`` (micro batch 4, ``drop_last``) with
``collate_samples`` over (a) ``DistributedRandomSampler``, (b) ``LengthGroupedSampler`` fed with
``length_stats()`` (``dataloader.group_by_length=True``, the default) and (c) ``PackedDataset``
(``dataloader.pack=True``: ``plan_packs``, best-fit decreasing over shuffled windows of ``pack_window``
samples on the length estimates with ``pack_headroom`` left free, then ``pack_rows`` on the real samples;
``pack_length`` tokens and ``pack_max_tiles`` tiles per row; the defaults of ``DataLoaderSettings``) under
``DistributedRandomSampler``. Only the dataset is a stand-in: it returns samples with the right token
count and tile count (1-pixel tiles), and its ``length_stats()`` are what
``xtuner_vl.dataset.lengths.estimate_record`` computes for the record.

The length mix models LLaVA-v1.5-mix665k (``llava_v1_5_mix665k.json``), whose composition is given in the
LLaVA-1.5 paper (Liu et al., "Improved Baselines with Visual Instruction Tuning", arXiv:2310.03744, data
mixture table): LLaVA-Instruct 158K, ShareGPT 40K (text only), VQAv2 83K, GQA 72K, OKVQA 9K, OCR-VQA 80K,
A-OKVQA 66K, TextCaps 22K, RefCOCO 48K, Visual Genome 86K: ~665K conversations, 94% single-image; the
VQA sets merge all questions about one image into one multi-round conversation with short answers.
The per-source rounds and text tokens per round below are this script's model of that data (not measured
on the real files): ShareGPT conversations are long (median ~800 text tokens), VQA rounds are ~15-25
tokens, LLaVA-Instruct answers are prose. Image sizes: COCO (LLaVA, VQAv2, OKVQA, A-OKVQA, RefCOCO) is
mostly 640x480 / 640x427 and portrait versions; Visual Genome (GQA, VG) 500x375 / 500x333 / 800x600;
OCR-VQA book covers are small portrait images; TextCaps images are OpenImages up to 1024 px. Tiles come
from the toolkit's own grid choice (``xtuner_vl.dataset.image.tile_count``) with InternVL2's fine-tune
budget ``max_dynamic_patch`` 6 + thumbnail, 256 tokens per tile; a sample over ``max_length`` loses
tiles as ``InternVLDataset`` does, and text-only samples over ``max_length`` are left out (the dataset
skips them). Real length = template (45 tokens) + 5 per extra turn + text + per image (tiles x 256 + 2).

``--lengths`` says what the annotation records carry, hence how good ``length_stats()`` is: ``sized`` (the
default, as the README recommends: ``width``/``height`` per record, so exact tiles; text still estimated at
4 bytes/token while the synthetic text has 3-5 bytes/token), ``text`` (as LLaVA-665K ships: no image size,
so every image is also estimated at max tiles) or ``exact`` (a ``length`` field per record). For scale, the
script also prints how full best-fit decreasing of the whole epoch on the real lengths (a reference near
the optimum, which a plan from estimates cannot reach) would make the rows.

Run: ``python benchmarks/bench_packing.py`` (``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from xtuner_vl.dataset import DistributedRandomSampler, LengthGroupedSampler, collate_samples
from xtuner_vl.dataset.collate import PackedItem
from xtuner_vl.dataset.image import tile_count
from xtuner_vl.dataset.lengths import estimate_record
from xtuner_vl.dataset.packing import PackedDataset, best_fit_decreasing
from xtuner_vl.recipes.settings import DataLoaderSettings, ScheduleSettings
from xtuner_vl.structures import Sample

NUM_IMAGE_TOKEN, IMAGE_SIZE, MIN_PATCH = 256, 448, 1
BASE_TOKENS = 45  # InternVL2 internlm2-chat system block + one user/assistant header pair (approximate)
TURN_TOKENS = 5  # <|im_start|>role\n ... <|im_end|>\n per further turn
IMAGE_EXTRA = 2  # <img> and </img> around the IMG_CONTEXT tokens


@dataclass(frozen=True)
class SourceModel:
    """One source of the mix: conversations, image pool (None: text only), rounds, text tokens per round."""

    name: str
    count: int
    pool: str | None
    rounds: tuple[int, int]
    round_tokens: float  # median text tokens of one round (question + answer)
    sigma: float  # lognormal spread of the per-sample tokens per round


SOURCES = (
    SourceModel("llava_instruct", 158_000, "coco", (1, 5), 90, 0.5),
    SourceModel("sharegpt", 40_000, None, (1, 6), 230, 0.7),
    SourceModel("vqav2", 83_000, "coco", (1, 8), 22, 0.3),
    SourceModel("gqa", 72_000, "vg", (3, 15), 18, 0.3),
    SourceModel("okvqa", 9_000, "coco", (1, 3), 22, 0.3),
    SourceModel("ocrvqa", 80_000, "book", (3, 6), 18, 0.3),
    SourceModel("aokvqa", 66_000, "coco", (1, 2), 60, 0.3),
    SourceModel("textcaps", 22_000, "openimages", (1, 1), 35, 0.4),
    SourceModel("refcoco", 48_000, "coco", (2, 10), 30, 0.4),
    SourceModel("vg", 86_000, "vg", (3, 12), 30, 0.4),
)
POOLS = {  # (width, height, weight)
    "coco": ((640, 480, 45), (640, 427, 20), (480, 640, 12), (427, 640, 8), (640, 640, 3), (612, 612, 3),
             (640, 360, 4), (500, 375, 5)),
    "vg": ((500, 375, 30), (500, 333, 25), (800, 600, 15), (375, 500, 10), (333, 500, 10), (1024, 768, 5),
           (500, 500, 5)),
    "book": ((300, 475, 30), (330, 500, 30), (260, 400, 20), (500, 750, 10), (500, 500, 10)),
    "openimages": ((1024, 768, 45), (1024, 683, 25), (768, 1024, 15), (1024, 576, 10), (1024, 1024, 5)),
}  # fmt: skip


@dataclass
class LengthMix:
    """Per sample: real tokens, real tiles (0 = text only), estimated tokens, multimodal flag, source."""

    real: np.ndarray
    tiles: np.ndarray
    estimate: np.ndarray
    multimodal: np.ndarray
    source: np.ndarray


def _fit_tiles(w: int, h: int, text_tokens: int, max_patch: int, max_length: int) -> int:
    """Tiles of the image after ``InternVLDataset._fit_tiles``: lower the budget until the sample fits."""
    for budget in range(max_patch, 0, -1):
        tiles = tile_count(w, h, MIN_PATCH, budget, IMAGE_SIZE, True)
        if text_tokens + tiles * NUM_IMAGE_TOKEN + IMAGE_EXTRA <= max_length:
            return tiles
    return 0  # does not fit with one tile: skipped


def _record(text_bytes: int, turns: int, size: tuple[int, int] | None, real: int, mode: str) -> dict:
    """A record that ``estimate_record`` sees as the real one (it reads only total text bytes and turns)."""
    conv = [{"from": "human", "value": ("<image>\n" if size else "") + "x" * text_bytes}, {"from": "gpt", "value": ""}]
    conv += [{"from": "human" if k % 2 == 0 else "gpt", "value": ""} for k in range(turns - 2)]
    record: dict = {"conversations": conv}
    if size:
        record["image"] = "img.jpg"
        if mode == "sized":
            record["width"], record["height"] = size
    if mode == "exact":
        record["length"] = real
    return record


def make_mix(n: int, seed: int, max_patch: int, max_length: int, mode: str) -> tuple[LengthMix, int]:
    """``n`` samples of the modelled LLaVA-665K mix (seeded); returns the mix and how many were left out."""
    rng = np.random.default_rng(seed)
    weights = np.array([s.count for s in SOURCES], dtype=float)
    picks = rng.choice(len(SOURCES), size=n, p=weights / weights.sum())
    settings = {
        "base_tokens": BASE_TOKENS,
        "num_image_token": NUM_IMAGE_TOKEN,
        "max_dynamic_patch": max_patch,
        "min_dynamic_patch": MIN_PATCH,
        "use_thumbnail": True,
        "image_size": IMAGE_SIZE,
        "max_num_frames": 32,
    }
    out: dict[str, list] = {"real": [], "tiles": [], "estimate": [], "multimodal": [], "source": []}
    skipped = 0
    for k in picks.tolist():
        src = SOURCES[k]
        rounds = int(rng.integers(src.rounds[0], src.rounds[1] + 1))
        text = int(round(rounds * src.round_tokens * rng.lognormal(0.0, src.sigma)))
        text_tokens = BASE_TOKENS + TURN_TOKENS * (2 * rounds - 2) + text
        size, tiles = None, 0
        if src.pool is not None:
            pool = POOLS[src.pool]
            w, h, _ = pool[rng.choice(len(pool), p=np.array([p[2] for p in pool]) / sum(p[2] for p in pool))]
            size, tiles = (w, h), _fit_tiles(w, h, text_tokens, max_patch, max_length)
        real = text_tokens + (tiles * NUM_IMAGE_TOKEN + IMAGE_EXTRA if size else 0)
        if real > max_length or (size and tiles == 0):
            skipped += 1  # the dataset returns a SkippedSample for these
            continue
        text_bytes = int(text * float(np.clip(rng.normal(4.0, 0.5), 3.0, 5.0)))
        estimate, modal = estimate_record(_record(text_bytes, 2 * rounds, size, real, mode), settings)
        for key, value in zip(out, (real, tiles, estimate, modal, k), strict=True):
            out[key].append(value)
    return LengthMix(*(np.asarray(out[key]) for key in out)), skipped


class LengthOnlyDataset(Dataset):
    """Stands in for ``InternVLDataset``: samples with the mix's token and tile counts, 1-pixel tiles."""

    def __init__(self, mix: LengthMix, max_length: int) -> None:
        self.mix, self.max_length, self.num_image_token = mix, max_length, NUM_IMAGE_TOKEN

    def __len__(self) -> int:
        return len(self.mix.real)

    def length_stats(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mix.estimate, self.mix.multimodal

    def __getitem__(self, i: int) -> Sample:
        ids = torch.zeros(int(self.mix.real[i]), dtype=torch.long)
        tiles = int(self.mix.tiles[i])
        flags = torch.ones(tiles, dtype=torch.long) if tiles else torch.zeros(1, dtype=torch.long)  # dummy tile
        return Sample(ids, ids, torch.zeros(len(flags), 1, 1, 1), flags, "mix", i)


@dataclass
class Stats:
    batches: int = 0
    rows: int = 0
    samples: int = 0
    real: int = 0
    processed: int = 0
    tiles: list[int] | None = None
    row_tiles_max: int = 0
    dummy: int = 0
    dummy_batches: int = 0
    overflow_rows: int = 0
    seconds: float = 0.0


def run_loader(dataset: Dataset, sampler: Sampler, micro_batch: int) -> Stats:
    """Iterate one epoch as ``xtuner-vl train`` does and count real and processed tokens, tiles, dummies."""
    stats, row_tiles = Stats(tiles=[]), []

    def collate(items: list) -> object:
        row_tiles.extend(len(r.pixel_values) for it in items for r in (it.rows if isinstance(it, PackedItem) else [it]))
        return collate_samples(items, pad_token_id=0)

    loader = DataLoader(
        dataset, batch_size=micro_batch, sampler=sampler, drop_last=True, num_workers=0, collate_fn=collate
    )
    t0 = time.perf_counter()
    for cb in loader:
        b = cb.batch
        dummies = int((b.image_flags == 0).sum())
        stats.batches += 1
        stats.rows += b.input_ids.shape[0]
        stats.samples += cb.num_samples
        stats.real += int(b.attention_mask.sum())
        stats.processed += b.input_ids.numel()
        stats.tiles.append(len(b.pixel_values))
        stats.dummy += dummies
        stats.dummy_batches += dummies > 0
        stats.overflow_rows += cb.overflow_rows
    stats.seconds = time.perf_counter() - t0
    stats.row_tiles_max = max(row_tiles)
    return stats


def best_fit_reference(mix: LengthMix, pack_length: int) -> tuple[float, int]:
    """Best-fit decreasing of the whole epoch on the real lengths (known only after tokenizing everything):
    the mean real tokens per row / ``pack_length`` and the rows; near the optimum for this mix."""
    tiles = np.zeros(len(mix.real), dtype=np.int64)  # the tile budget never binds at these lengths
    rows = best_fit_decreasing(list(range(len(mix.real))), mix.real, tiles, pack_length, 1)
    return float(mix.real.sum() / len(rows) / pack_length), len(rows)


def print_mix(mix: LengthMix, skipped: int, mode: str) -> None:
    """Per source: share, mean real length, mean tiles, mean estimate error."""
    print(f"\n{'source':<15} {'share':>6} {'real tok':>9} {'tiles':>6} {'est/real':>9}")
    for k, src in enumerate(SOURCES):
        sel = mix.source == k
        if sel.any():
            err = float(np.mean(mix.estimate[sel] / mix.real[sel]))
            print(
                f"{src.name:<15} {sel.mean():>6.1%} {mix.real[sel].mean():>9.0f} {mix.tiles[sel].mean():>6.2f} "
                f"{err:>9.3f}"
            )
    err = np.abs(mix.estimate / mix.real - 1)
    print(
        f"{'all':<15} {1:>6.0%} {mix.real.mean():>9.0f} {mix.tiles.mean():>6.2f} "
        f"{float(np.mean(mix.estimate / mix.real)):>9.3f}"
    )
    q50, q90, q99 = np.quantile(err, (0.5, 0.9, 0.99))
    print(
        f"{len(mix.real)} samples ({skipped} over max_length left out); length_stats from records with "
        f"--lengths {mode}: |estimate / real - 1| mean {err.mean():.1%}, median {q50:.1%}, p90 {q90:.1%}, "
        f"p99 {q99:.1%}"
    )


def print_table(results: dict[str, Stats], micro_batch: int, packed: PackedDataset) -> None:
    header = (
        f"{'batching':<15} {'batches':>7} {'rows':>6} {'smp/b':>6} {'pad len':>7} {'real/b':>7} "
        f"{'proc/b':>7} {'real/proc':>9} | {'tiles/b':>7} {'max':>4} {'row max':>7} {'dummy':>6} {'s':>5}"
    )
    print("\n" + header)
    print("-" * len(header))
    for name, s in results.items():
        print(
            f"{name:<15} {s.batches:>7} {s.rows:>6} {s.samples / s.batches:>6.2f} {s.processed / s.rows:>7.0f} "
            f"{s.real / s.batches:>7.0f} {s.processed / s.batches:>7.0f} {s.real / s.processed:>9.4f} | "
            f"{np.mean(s.tiles):>7.1f} {max(s.tiles):>4} {s.row_tiles_max:>7} {s.dummy:>6} {s.seconds:>5.1f}"
        )
    print("-" * len(header))
    run = results["packed"]
    print(
        f"plan: {packed.stats()}; tile budget (pack_max_tiles) {packed.max_tiles} per packed row; max tiles in one "
        f"packed row {run.row_tiles_max}, in one batch of {micro_batch} packs {max(run.tiles)}"
    )
    print(
        f"packed rows beyond the plan (real lengths overflowing a planned row, PackedItem.overflow_rows): "
        f"{run.overflow_rows} of {run.rows}"
    )
    print(
        "dummy = dummy tiles the ViT runs (text-only batches keep one); "
        + ", ".join(f"{n}: {s.dummy_batches} of {s.batches} batches" for n, s in results.items())
    )


def parse_args() -> argparse.Namespace:
    loader, sched = DataLoaderSettings(), ScheduleSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--samples", type=int, default=50_000, help="synthetic samples drawn from the mix")
    add("--micro-batch", type=int, default=sched.micro_batch_size, help="schedule.micro_batch_size")
    add("--max-length", type=int, default=4096, help="train_dataset.max_length, per sample (official 4096)")
    add("--max-patch", type=int, default=6, help="max_dynamic_patch (InternVL2 fine-tune: 6)")
    add("--pack-length", type=int, default=loader.pack_length, help="dataloader.pack_length (tokens per row)")
    add("--pack-max-tiles", type=int, default=loader.pack_max_tiles, help="dataloader.pack_max_tiles")
    add("--pack-window", type=int, default=loader.pack_window, help="dataloader.pack_window (samples)")
    add("--pack-headroom", type=float, default=loader.pack_headroom, help="dataloader.pack_headroom")
    add("--group-factor", type=int, default=loader.group_factor, help="dataloader.group_factor")
    add(
        "--lengths",
        choices=("sized", "text", "exact"),
        default="sized",
        help="what the records carry for length_stats (see the module docstring)",
    )
    add("--seed", type=int, default=42, help="runtime.seed (sampler, packer)")
    add("--data-seed", type=int, default=0, help="seed of the synthetic length mix")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    mix, skipped = make_mix(args.samples, args.data_seed, args.max_patch, args.max_length, args.lengths)
    print(
        f"length mix generated in {time.perf_counter() - t0:.1f} s (micro batch {args.micro_batch}, max_length "
        f"{args.max_length}, max_dynamic_patch {args.max_patch} + thumbnail, {NUM_IMAGE_TOKEN} tokens per tile)"
    )
    print_mix(mix, skipped, args.lengths)
    dataset = LengthOnlyDataset(mix, args.max_length)
    lengths, multimodal = dataset.length_stats()
    t0 = time.perf_counter()
    packed = PackedDataset(
        dataset, args.pack_length, args.pack_max_tiles, args.seed, args.pack_window, args.pack_headroom
    )
    print(
        f"\npacking plan in {time.perf_counter() - t0:.2f} s: pack_length {packed.pack_length}, pack_window "
        f"{args.pack_window}, pack_headroom {args.pack_headroom}"
    )
    results = {
        "random": run_loader(dataset, DistributedRandomSampler(len(dataset), 0, 1, args.seed), args.micro_batch),
        "length-grouped": run_loader(
            dataset,
            LengthGroupedSampler(lengths, multimodal, args.micro_batch, 0, 1, args.seed, args.group_factor),
            args.micro_batch,
        ),
        "packed": run_loader(packed, DistributedRandomSampler(len(packed), 0, 1, args.seed), args.micro_batch),
    }
    print_table(results, args.micro_batch, packed)
    fill, rows = best_fit_reference(mix, packed.pack_length)
    run = results["packed"]
    print(
        f"reference, not the toolkit: best-fit decreasing of the whole epoch on the real lengths fills rows to "
        f"{fill:.3f} of pack_length ({rows} rows); packed here: {run.real / run.rows / packed.pack_length:.3f} "
        f"({run.rows} rows)"
    )
    eff = {k: s.real / s.processed for k, s in results.items()}
    print(
        f"RATIO packing_efficiency packed/random = {eff['packed'] / eff['random']:.2f}x, packed/length-grouped = "
        f"{eff['packed'] / eff['length-grouped']:.2f}x (real/processed tokens: packed {eff['packed']:.3f}, "
        f"length-grouped {eff['length-grouped']:.3f}, random {eff['random']:.3f}; target packed >= 0.98)"
    )


if __name__ == "__main__":
    main()
