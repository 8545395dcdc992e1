"""Samples/s per core of the xtuner-vl image + text pipeline vs the official InternVL way of doing it.

Ours: ``xtuner_vl.dataset.load_image_tiles`` (both resizes in the native, Pillow-exact resampler of
``xtuner_vl.dataset.native``; every pixel converted through a table of torchvision's result for each
value) and ``xtuner_vl.dataset.tokenize_conversation`` (images collapsed to one token while the labels
are placed). The ``PIL`` columns are ours with ``native=False``: Pillow resizes, as on a machine without
a C compiler.

Baseline, written here the way the official ``internvl_chat/internvl/train/dataset.py`` does it:
``Image.open(...).convert('RGB')`` -> ``dynamic_preprocess`` (candidate grids, closest aspect ratio with
the tie rule, resize, crop each tile, thumbnail) -> per tile ``T.Compose([convert RGB, Resize((448, 448),
BICUBIC), ToTensor, Normalize])`` -> ``torch.stack``; and ``preprocess_internlm`` (the joined prompt with
every ``<image>`` expanded to 256 x tiles ``<IMG_CONTEXT>`` tokens, tokenized whole, labels masked by
re-tokenizing the pieces of the prompt). Both sides use the same tiny InternLM2 tokenizer.

Before timing, the pixel tensors of every image must be ``torch.equal`` (ours, ours with Pillow, the
official) and the input ids and labels equal. Everything runs on one thread
(``torch.set_num_threads(1)``), so samples/s is per core. The functions alternate round by round and the
median round is kept, in wall time and in CPU time of this process (steadier on a shared machine).

Run: ``python benchmarks/bench_data.py`` (``--help`` for the knobs, ``--profile`` for where the time goes).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw
from torchvision.transforms.functional import InterpolationMode

from xtuner_vl.dataset import load_image_tiles, tokenize_conversation
from xtuner_vl.dataset.native import native_resampler
from xtuner_vl.model import load_tokenizer
from xtuner_vl.tiny.tokenizers import write_tiny_tokenizer

IGNORE_TOKEN_ID = -100
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_IMAGE_TOKEN = 256  # InternVL2: (448 / 14)^2 * 0.5^2 tokens per tile
# Official conversation.py, template 'internlm2-chat' (InternVL2 system message), SeparatorStyle.MPT.
SYSTEM_TEMPLATE = "<|im_start|>system\n{system_message}"
SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")
SEP = "<|im_end|>"
# Mixed sizes up to 4K (width, height): phone, web, camera, screenshots, panoramas, 4K UHD.
SIZES = (
    (224, 224), (500, 375), (640, 480), (480, 640), (800, 800), (1024, 768),
    (1280, 720), (1920, 1080), (1080, 1920), (2048, 1536), (3000, 2000), (3840, 2160),
)  # fmt: skip
CONVERSATION = [  # a typical LLaVA-665K style three-round conversation about one image
    {"from": "human", "value": "<image>\nWhat is the man in the picture doing?"},
    {"from": "gpt", "value": "The man is riding a bicycle along a street next to a row of parked cars."},
    {"from": "human", "value": "What colour is his jacket?"},
    {"from": "gpt", "value": "His jacket is red, and he is also wearing a black helmet."},
    {"from": "human", "value": "Is it safe to ride there? Explain briefly."},
    {
        "from": "gpt",
        "value": "It looks reasonably safe: the street is quiet, there is room between the bicycle and the "
        "parked cars, and the rider wears a helmet. Watching for opening car doors would make it safer.",
    },
]


# ----------------------------------------------------------------------------------- official-style baseline
def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    """Official ``find_closest_aspect_ratio``: closest ratio; on a tie, the later (larger) grid wins if the
    image has more than half its pixels."""
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    """Official ``dynamic_preprocess``: resize to the chosen grid, crop the tiles, append a thumbnail."""
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    target_aspect_ratio = find_closest_aspect_ratio(aspect_ratio, target_ratios, orig_width, orig_height, image_size)
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        processed_images.append(resized_img.crop(box))
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images


def build_transform(input_size=448):
    """Official ``build_transform(is_train=False)`` for ImageNet normalisation."""
    return T.Compose(
        [
            T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
            T.Resize((input_size, input_size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


def official_pixels(image: Image.Image, transform, max_num: int) -> torch.Tensor:
    """The official per-sample image path: tiles, then the transform on each tile, then stack."""
    tiles = dynamic_preprocess(image, min_num=1, max_num=max_num, image_size=448, use_thumbnail=True)
    return torch.stack([transform(tile) for tile in tiles])


def preprocess_internlm(sources, tokenizer, num_image_token_list):
    """Official ``preprocess_internlm`` (group_by_length: no padding) for one sample with one image."""
    roles = {"human": ROLES[0], "gpt": ROLES[1]}
    conversations = []
    for source in sources:
        if roles[source[0]["from"]] != ROLES[0]:
            source = source[1:]
        messages = []
        for j, sentence in enumerate(source):
            role = roles[sentence["from"]]
            assert role == ROLES[j % 2]
            messages.append((role, sentence["value"].strip()))
        ret = SYSTEM_TEMPLATE.format(system_message=SYSTEM_MESSAGE) + SEP  # Conversation.get_prompt, MPT
        for role, message in messages:
            ret += role + message + SEP if message else role
        conversations.append(ret)
    image_tokens = "<img>" + "<IMG_CONTEXT>" * num_image_token_list[0] + "</img>"
    conversations = [c.replace("<image>", image_tokens, 1) for c in conversations]
    input_ids = tokenizer(
        conversations, return_tensors="pt", padding=False, max_length=tokenizer.model_max_length, truncation=True
    ).input_ids
    targets = input_ids.clone()
    for conversation, target in zip(conversations, targets, strict=True):
        total_len = int(target.ne(tokenizer.pad_token_id).sum())
        cur_len = 1
        target[:cur_len] = IGNORE_TOKEN_ID  # <s>
        parts = conversation.split(ROLES[1])
        info = parts[0] + ROLES[1]
        temp_len = len(tokenizer(info).input_ids) - 1
        target[cur_len : cur_len + temp_len] = IGNORE_TOKEN_ID
        cur_len = cur_len + temp_len
        for index in range(1, len(parts) - 1):
            part1, part2 = parts[index].split(ROLES[0])
            temp_len = len(tokenizer(part1).input_ids) - 1
            cur_len = cur_len + temp_len
            part = ROLES[0] + part2 + ROLES[1]
            temp_len = len(tokenizer(part).input_ids) - 1
            target[cur_len : cur_len + temp_len] = IGNORE_TOKEN_ID
            cur_len = cur_len + temp_len
        temp_len = len(tokenizer(parts[-1]).input_ids) - 1
        cur_len = cur_len + temp_len
        target[cur_len:] = IGNORE_TOKEN_ID
        if cur_len < tokenizer.model_max_length and cur_len != total_len:
            target[:] = IGNORE_TOKEN_ID  # the official "tokenization mismatch" fallback
    return input_ids[0], targets[0]


def official_sample(jpeg: bytes, tokenizer, transform, max_num: int):
    """One official-style sample: decode, tile + per-tile transform, expanded-prompt tokenization."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    pixels = official_pixels(image, transform, max_num)
    conversation = [dict(turn) for turn in CONVERSATION]  # the official deep-copies before preprocessing
    ids, labels = preprocess_internlm([conversation], tokenizer, [NUM_IMAGE_TOKEN * len(pixels)])
    return pixels, ids, labels


# ------------------------------------------------------------------------------------------------- ours
def our_sample(jpeg: bytes, tokenizer, max_num: int, native: bool = True):
    """One xtuner-vl sample: ``load_image_tiles`` (decodes with ``load_image``) + ``tokenize_conversation``.

    ``native=False``: Pillow does the resizes, as where no C compiler is available.
    """
    pixels = load_image_tiles(io.BytesIO(jpeg), max_num=max_num, native=native)
    ids, labels = tokenize_conversation(CONVERSATION, tokenizer, "internlm2-chat", NUM_IMAGE_TOKEN * len(pixels))
    return pixels, ids, labels


# ------------------------------------------------------------------------------------------------ inputs
def make_image(size: tuple[int, int], seed: int) -> bytes:
    """A deterministic photo-like JPEG (smooth colour field, shapes, fine noise), quality 90."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.integers(0, 256, (max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (x0, y0, x0 + int(rng.integers(4, w // 3 + 5)), y0 + int(rng.integers(4, h // 3 + 5)))
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    noisy = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


# ------------------------------------------------------------------------------------------------ timing
def median_seconds(fns: list[Callable[[], object]], rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """Median wall and CPU seconds of each function, called in turn each round, after one warm-up round.

    CPU time (of this process) leaves out the time other jobs held the core: steadier on a shared machine.
    """
    times = np.zeros((rounds, len(fns), 2))
    for r in range(rounds + 1):
        for i, fn in enumerate(fns):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            if r:
                times[r - 1, i] = time.perf_counter() - w0, time.process_time() - c0
    medians = np.median(times, axis=0)
    return medians[:, 0], medians[:, 1]


def profile(name: str, fn: Callable[[], object], top: int) -> None:
    """cProfile ``fn`` and print the functions with the most own time."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    print(f"\n--- profile: {name} (top {top} by own time) ---")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def check_identical(images: list[bytes], sizes, tokenizer, transform, max_num: int) -> None:
    """Exit unless ours (native and Pillow resizes) and the official give equal pixels, ids and labels."""
    for size, jpeg in zip(sizes, images, strict=True):
        theirs = official_sample(jpeg, tokenizer, transform, max_num)
        for got in (our_sample(jpeg, tokenizer, max_num), our_sample(jpeg, tokenizer, max_num, native=False)):
            if not torch.equal(got[0], theirs[0]):
                raise SystemExit(f"{size}: pixel tensors differ")
            if not (torch.equal(got[1], theirs[1]) and torch.equal(got[2], theirs[2])):
                raise SystemExit(f"{size}: input ids or labels differ")
    print(f"checked: pixels (torch.equal), ids and labels equal for {len(images)} images (native and PIL resizes)")


def time_sizes(images: list[bytes], sizes, tokenizer, transform, max_num: int, rounds: int):
    """Print the per-size table (wall ms); return the wall and CPU medians of its 8 functions, summed."""
    header = (
        f"{'size':>10} {'tiles':>5} {'tokens':>6} | {'img ours':>8} {'img PIL':>8} {'img off':>8} {'ratio':>5} | "
        f"{'txt ours':>8} {'txt off':>8} {'ratio':>5} | {'all ours':>8} {'all PIL':>8} {'all off':>8} "
        f"{'ratio':>5} {'cpu':>5} {'PIL':>5}"
    )
    print(
        "\nmedian ms per sample (wall), one thread; img: decoded RGB image -> tiles tensor; txt: ids + labels; "
        "all: JPEG bytes -> tensor + ids + labels;\nPIL: ours with Pillow resizing (native=False); ratio: "
        "official / ours; cpu: the all ratio in CPU time; PIL: official / ours with Pillow"
    )
    print(header)
    print("-" * len(header))
    walls, cpus = np.zeros(8), np.zeros(8)
    for size, jpeg in zip(sizes, images, strict=True):
        rgb = Image.open(io.BytesIO(jpeg)).convert("RGB")
        pixels, ids, _ = our_sample(jpeg, tokenizer, max_num)
        n_tok = NUM_IMAGE_TOKEN * len(pixels)
        t, c = median_seconds(
            [
                lambda rgb=rgb: load_image_tiles(rgb, max_num=max_num),
                lambda rgb=rgb: load_image_tiles(rgb, max_num=max_num, native=False),
                lambda rgb=rgb: official_pixels(rgb, transform, max_num),
                lambda n=n_tok: tokenize_conversation(CONVERSATION, tokenizer, "internlm2-chat", n),
                lambda n=n_tok: preprocess_internlm([[dict(c) for c in CONVERSATION]], tokenizer, [n]),
                lambda jpeg=jpeg: our_sample(jpeg, tokenizer, max_num),
                lambda jpeg=jpeg: our_sample(jpeg, tokenizer, max_num, native=False),
                lambda jpeg=jpeg: official_sample(jpeg, tokenizer, transform, max_num),
            ],
            rounds,
        )
        walls, cpus = walls + t, cpus + c
        ms = [x * 1e3 for x in t]
        print(
            f"{size[0]:>5}x{size[1]:<4} {len(pixels):>5} {len(ids):>6} | {ms[0]:>8.1f} {ms[1]:>8.1f} {ms[2]:>8.1f} "
            f"{t[2] / t[0]:>5.2f} | {ms[3]:>8.1f} {ms[4]:>8.1f} {t[4] / t[3]:>5.2f} | {ms[5]:>8.1f} {ms[6]:>8.1f} "
            f"{ms[7]:>8.1f} {t[7] / t[5]:>5.2f} {c[7] / c[5]:>5.2f} {t[7] / t[6]:>5.2f}"
        )
    print("-" * len(header))
    return walls, cpus


def summarize(walls: np.ndarray, cpus: np.ndarray, count: int) -> None:
    """Print samples/s per core and ratios (wall and CPU time) per part, with native and Pillow resizes."""
    rows = (
        ("image tiling + transform", 0, 2),
        ("  same, Pillow resizes", 1, 2),
        ("conversation tokenization", 3, 4),
        ("whole sample (JPEG)", 5, 7),
        ("  same, Pillow resizes", 6, 7),
    )
    print(f"\nover the {count} sizes, one of each (samples/s per core, wall clock; ratio also in CPU time):")
    for label, a, b in rows:
        print(
            f"  {label:<26} ours {count / walls[a]:7.2f}   official-style {count / walls[b]:7.2f}   "
            f"ratio {walls[b] / walls[a]:5.2f}x   cpu {cpus[b] / cpus[a]:5.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sizes_help = "image sizes (default: 12 sizes from 224x224 to 3840x2160)"
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=list(SIZES), metavar="WxH", help=sizes_help)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per image; the median is kept")
    parser.add_argument("--max-num", type=int, default=12, help="max_dynamic_patch (official default 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    parser.add_argument("--profile", action="store_true", help="also cProfile both pipelines over all images")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer("internlm2", tmp)
        tokenizer = load_tokenizer(tmp)
    transform = build_transform(448)
    resampler = native_resampler()
    print(
        "native resampler: "
        + (f"on (Pillow {Image.__version__} pass order)" if resampler else "off: Pillow resizes (see the warning)")
    )
    images = [make_image(size, args.seed + i) for i, size in enumerate(args.sizes)]
    check_identical(images, args.sizes, tokenizer, transform, args.max_num)
    walls, cpus = time_sizes(images, args.sizes, tokenizer, transform, args.max_num, args.rounds)
    summarize(walls, cpus, len(images))
    if args.profile:
        profile("ours, whole sample", lambda: [our_sample(j, tokenizer, args.max_num) for j in images], 15)
        pillow = [lambda j=j: our_sample(j, tokenizer, args.max_num, native=False) for j in images]
        profile("ours with Pillow resizes", lambda: [fn() for fn in pillow], 15)
        official = [lambda j=j: official_sample(j, tokenizer, transform, args.max_num) for j in images]
        profile("official-style, whole sample", lambda: [fn() for fn in official], 15)
    print(
        f"RATIO data_samples_per_s_per_core ours/official = {walls[7] / walls[5]:.2f}x "
        f"(image only {walls[2] / walls[0]:.2f}x, text only {walls[4] / walls[3]:.2f}x; CPU time "
        f"{cpus[7] / cpus[5]:.2f}x; with Pillow resizes {walls[7] / walls[6]:.2f}x; target >= 2x)"
    )


if __name__ == "__main__":
    main()
