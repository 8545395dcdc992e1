"""``xtuner-vl preview-data``: one sample's tiles as a grid, and its prompt with the trained spans marked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from xtuner_vl.dataset.image import IMAGENET_MEAN, IMAGENET_STD
from xtuner_vl.model import load_tokenizer
from xtuner_vl.recipes.config import load_config
from xtuner_vl.recipes.settings import ModelSettings, parse_section
from xtuner_vl.registry import DATASETS
from xtuner_vl.structures import IGNORE_INDEX, IMG_CONTEXT_TOKEN, Sample

__all__ = ["marked_prompt", "tile_grid", "preview_data"]

TRAIN_OPEN, TRAIN_CLOSE = "[[", "]]"


def marked_prompt(sample: Sample, tokenizer) -> str:
    """Decoded prompt; trained spans inside ``[[ ]]``; runs of <IMG_CONTEXT> shown as ``<IMG_CONTEXT>xN``."""
    ctx = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    ids, trained = sample.input_ids.tolist(), (sample.labels != IGNORE_INDEX).tolist()
    pieces, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and trained[j] == trained[i] and (ids[j] == ctx) == (ids[i] == ctx):
            j += 1
        if ids[i] == ctx:
            text = f"{IMG_CONTEXT_TOKEN}x{j - i}"
        else:
            text = tokenizer.decode(ids[i:j], skip_special_tokens=False)
        pieces.append(f"{TRAIN_OPEN}{text}{TRAIN_CLOSE}" if trained[i] else text)
        i = j
    return "".join(pieces)


def tile_grid(pixel_values: torch.Tensor, columns: int = 4, tile: int = 224) -> Image.Image:
    """Un-normalised tiles, ``columns`` per row, each resized to ``tile`` pixels."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images = ((pixel_values * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * tile, rows * tile), (255, 255, 255))
    for k, img in enumerate(images):
        pil = Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy())).resize((tile, tile))
        grid.paste(pil, ((k % columns) * tile, (k // columns) * tile))
    return grid


def _with_text(grid: Image.Image, text: str, width_chars: int = 110) -> Image.Image:
    lines = []
    for para in text.splitlines() or [""]:
        while len(para) > width_chars:
            lines.append(para[:width_chars])
            para = para[width_chars:]
        lines.append(para)
    safe = [ln.encode("latin-1", "replace").decode("latin-1") for ln in lines]  # the built-in font is latin-1
    height = 14 * len(safe) + 10
    out = Image.new("RGB", (max(grid.width, 7 * width_chars), grid.height + height), (255, 255, 255))
    out.paste(grid, (0, 0))
    draw = ImageDraw.Draw(out)
    for k, ln in enumerate(safe):
        draw.text((5, grid.height + 5 + 14 * k), ln, fill=(0, 0, 0))
    return out


def preview_data(config: str, index: int, out: str, cfg_options: dict | None = None) -> int:
    cfg = load_config(config, cfg_options)
    model_s = parse_section(ModelSettings, cfg.get("model"), "model")
    tokenizer = load_tokenizer(model_s.path)
    dataset = DATASETS.build({"model_path": model_s.path, **cfg.train_dataset, "tokenizer": tokenizer, "strict": True})
    sample = dataset[index]
    source, record = dataset.locate(index)
    prompt = marked_prompt(sample, tokenizer)
    header = (
        f"{source.annotations.path}:{source.annotations.line_of(record)} | {sample.num_tokens} tokens, "
        f"{int((sample.labels != IGNORE_INDEX).sum())} trained, {int(sample.image_flags.sum())} real tiles"
    )
    print(header)
    print(prompt)
    image = _with_text(tile_grid(sample.pixel_values), header + "\n" + prompt)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    Path(out).with_suffix(".txt").write_text(header + "\n" + prompt + "\n", encoding="utf-8")
    print(f"wrote {out} and {Path(out).with_suffix('.txt')}")
    return 0
