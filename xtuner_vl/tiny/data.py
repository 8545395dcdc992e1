"""A synthetic image question-answering set (coloured shapes, counts, positions), generated locally.

Used by the tests and the demo: single-image, multi-image and text-only samples in LLaVA format, with
images of mixed sizes and aspect ratios, so tiling, templates and training can be exercised end to end.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = ["COLOURS", "POSITIONS", "make_synthetic_dataset", "draw_scene"]

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 20)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
_SIZES = ((448, 448), (640, 480), (300, 800), (1000, 500), (224, 224), (900, 900))


def draw_scene(size: tuple[int, int], colour: str, count: int, position: str, shape: str = "square") -> Image.Image:
    """``count`` shapes of ``colour`` inside the ``position`` quadrant of a light-grey canvas."""
    w, h = size
    img = Image.new("RGB", size, (235, 235, 235))
    draw = ImageDraw.Draw(img)
    x0 = 0 if "left" in position else w // 2
    y0 = 0 if "top" in position else h // 2
    side = max(4, min(w, h) // 8)
    for k in range(count):
        cx = x0 + (k % 2) * (w // 4) + w // 16
        cy = y0 + (k // 2) * (h // 4) + h // 16
        box = (cx, cy, cx + side, cy + side)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return img


def _single(rng: random.Random, image_name: str, folder: Path) -> dict:
    colour, count, position = rng.choice(list(COLOURS)), rng.randint(1, 4), rng.choice(POSITIONS)
    size = rng.choice(_SIZES)
    draw_scene(size, colour, count, position).save(folder / image_name)
    kind = rng.randrange(3)
    if kind == 0:
        q, a = "What colour are the squares?", colour
    elif kind == 1:
        q, a = "How many squares are there?", str(count)
    else:
        q, a = "Where are the squares?", position
    turns = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
    if rng.random() < 0.3:  # a second turn on the same image
        turns += [{"from": "human", "value": "And their colour?"}, {"from": "gpt", "value": colour}]
    return {"image": image_name, "width": size[0], "height": size[1], "conversations": turns}


def _multi(rng: random.Random, names: list[str], folder: Path) -> dict:
    counts = rng.sample(range(1, 5), len(names))
    for name, count in zip(names, counts, strict=True):
        draw_scene(rng.choice(_SIZES), rng.choice(list(COLOURS)), count, rng.choice(POSITIONS)).save(folder / name)
    header = "".join(f"Image-{i + 1}: <image>\n" for i in range(len(names)))
    best = counts.index(max(counts)) + 1
    question = f"{header}Which image has the most squares?"
    return {
        "image": names,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": f"Image-{best}"}],
    }


def _text(rng: random.Random) -> dict:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return {
        "conversations": [{"from": "human", "value": f"What is {a} plus {b}?"}, {"from": "gpt", "value": str(a + b)}]
    }


def make_synthetic_dataset(
    out_dir: str | Path, num_samples: int = 64, seed: int = 0, multi_image: float = 0.15, text_only: float = 0.15
) -> tuple[Path, Path]:
    """Write ``images/`` and ``data.jsonl`` under ``out_dir``; returns (annotation file, image folder)."""
    out = Path(out_dir)
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(num_samples):
        r = rng.random()
        if r < text_only:
            rec = _text(rng)
        elif r < text_only + multi_image:
            rec = _multi(rng, [f"{i:05d}_{k}.png" for k in range(rng.randint(2, 3))], folder)
        else:
            rec = _single(rng, f"{i:05d}.png", folder)
        records.append({"id": i, **rec})
    path = out / "data.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path, folder
