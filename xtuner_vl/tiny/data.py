"""A synthetic image question-answering set (coloured shapes, counts, positions), generated locally.

Used by the tests and the demo: single-image, multi-image and text-only samples in LLaVA format, with
images of mixed sizes and aspect ratios, so tiling, templates and training can be exercised end to end.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "POSITIONS",
    "QUESTIONS",
    "SIZES",
    "SMALL_SIZES",
    "draw_scene",
    "image_folder",
    "make_synthetic_dataset",
    "multi_image_record",
    "single_image_record",
    "text_record",
    "write_jsonl",
]

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 20)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZES = ((448, 448), (640, 480), (300, 800), (1000, 500), (224, 224), (900, 900))
SMALL_SIZES = ((448, 448), (640, 480), (480, 640), (560, 336), (336, 448), (224, 224))  # fast to decode
_CANVAS = (235, 235, 235)
# A scene has five colours, so it is drawn as a palette image: its PNG holds one byte per pixel instead of three,
# written about 10x and decoded about 6x faster than RGB, with the same pixels after convert("RGB") (which is how
# the official code and our loader read every image). Flat colours compress well at any level: level 1 writes
# them about twice as fast as PIL's default 6. Both matter for the demo's thousands of images.
_PALETTE = [channel for rgb in (_CANVAS, *COLOURS.values()) for channel in rgb]
_PNG = {"compress_level": 1}


def draw_scene(size: tuple[int, int], colour: str, count: int, position: str, shape: str = "square") -> Image.Image:
    """``count`` shapes of ``colour`` in the cells of the ``position`` quadrant of a light-grey canvas, as a palette
    image of the canvas and :data:`COLOURS` (``convert("RGB")`` gives its pixels).

    The canvas is a 4x4 grid of cells scaled with the image (so a shape covers the same share of a tile
    whatever the aspect ratio); a quadrant holds 2x2 cells, filled row by row, one shape per cell.
    """
    w, h = size
    img = Image.new("P", size, 0)
    img.putpalette(_PALETTE)
    draw = ImageDraw.Draw(img)
    qx = 0 if "left" in position else 2
    qy = 0 if "top" in position else 2
    for k in range(count):
        x0, y0 = (qx + k % 2) * w / 4, (qy + k // 2) * h / 4
        box = (x0 + w / 40, y0 + h / 40, x0 + w / 4 - w / 40, y0 + h / 4 - h / 40)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=1 + list(COLOURS).index(colour))
    return img


QUESTIONS = {
    "colour": "What colour are the squares?",
    "count": "How many squares are there?",
    "position": "Where are the squares?",
}


def single_image_record(
    rng: random.Random,
    image_name: str,
    folder: Path,
    questions: int = 1,
    sizes: tuple[tuple[int, int], ...] = SIZES,
    kinds: Sequence[str] | None = None,
) -> dict:
    """One scene saved as ``folder/image_name`` and ``questions`` (1-3) different questions on it, one per
    turn in random order (or the question ``kinds`` given, in order); returns the record."""
    colour, count, position = rng.choice(list(COLOURS)), rng.randint(1, 4), rng.choice(POSITIONS)
    size = rng.choice(sizes)
    draw_scene(size, colour, count, position).save(folder / image_name, **_PNG)
    answers = {"colour": colour, "count": str(count), "position": position}
    kinds = list(kinds) if kinds is not None else rng.sample(list(QUESTIONS), questions)
    turns = []
    for k, kind in enumerate(kinds):
        prefix = "<image>\n" if k == 0 else ""
        turns += [{"from": "human", "value": prefix + QUESTIONS[kind]}, {"from": "gpt", "value": answers[kind]}]
    return {"image": image_name, "width": size[0], "height": size[1], "conversations": turns}


def multi_image_record(
    rng: random.Random, names: list[str], folder: Path, sizes: tuple[tuple[int, int], ...] = SIZES
) -> dict:
    """Scenes saved under ``names`` and the question which of them has the most squares."""
    counts = rng.sample(range(1, 5), len(names))
    for name, count in zip(names, counts, strict=True):
        scene = draw_scene(rng.choice(sizes), rng.choice(list(COLOURS)), count, rng.choice(POSITIONS))
        scene.save(folder / name, **_PNG)
    header = "".join(f"Image-{i + 1}: <image>\n" for i in range(len(names)))
    best = counts.index(max(counts)) + 1
    question = f"{header}Which image has the most squares?"
    return {
        "image": names,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": f"Image-{best}"}],
    }


def text_record(rng: random.Random) -> dict:
    """A text-only sample: the sum of two digits."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return {
        "conversations": [{"from": "human", "value": f"What is {a} plus {b}?"}, {"from": "gpt", "value": str(a + b)}]
    }


def make_synthetic_dataset(
    out_dir: str | Path,
    num_samples: int = 64,
    seed: int = 0,
    multi_image: float = 0.15,
    text_only: float = 0.15,
    questions: tuple[int, int] = (1, 2),
    sizes: tuple[tuple[int, int], ...] = SIZES,
) -> tuple[Path, Path]:
    """Write ``images/`` and ``data.jsonl`` under ``out_dir``; returns (annotation file, image folder).

    Args:
        num_samples: records; a ``multi_image`` share asks which image has the most squares, a
            ``text_only`` share adds two digits, the rest ask ``questions`` (min, max) questions on a scene.
        sizes: image sizes (width, height) to draw scenes at.
    """
    folder = image_folder(out_dir)
    rng = random.Random(seed)
    records = []
    for i in range(num_samples):
        r = rng.random()
        if r < text_only:
            rec = text_record(rng)
        elif r < text_only + multi_image:
            rec = multi_image_record(rng, [f"{i:05d}_{k}.png" for k in range(rng.randint(2, 3))], folder, sizes)
        else:
            rec = single_image_record(rng, f"{i:05d}.png", folder, rng.randint(*questions), sizes)
        records.append({"id": i, **rec})
    return write_jsonl(Path(out_dir) / "data.jsonl", records), folder


def image_folder(out_dir: str | Path) -> Path:
    """``out_dir/images``, created."""
    folder = Path(out_dir) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_jsonl(path: Path, records: Sequence[dict]) -> Path:
    """Write ``records`` as one JSON object per line; returns ``path``."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path
