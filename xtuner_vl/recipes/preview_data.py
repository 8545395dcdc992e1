"""``xtuner-vl preview-data``: one sample's images in their tiling grids, and its prompt with the trained
spans coloured (drawn by :mod:`xtuner_vl.recipes.preview_render`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from xtuner_vl.dataset.image import find_closest_grid
from xtuner_vl.model import load_tokenizer
from xtuner_vl.recipes.config import load_config
from xtuner_vl.recipes.model_wrapper import build_model_wrapper
from xtuner_vl.recipes.preview_render import ImageTiles, PromptSpan, denormalize_tiles, render_preview
from xtuner_vl.registry import DATASETS
from xtuner_vl.structures import IGNORE_INDEX, IMG_CONTEXT_TOKEN, Sample

__all__ = [
    "ImageTiles",
    "PromptSpan",
    "grid_of",
    "image_tiles",
    "marked_prompt",
    "preview_data",
    "prompt_spans",
    "tiles_per_image",
]

TRAIN_OPEN, TRAIN_CLOSE = "[[", "]]"
_VIDEO_COLUMNS = 8


def prompt_spans(sample: Sample, tokenizer) -> list[PromptSpan]:
    """The decoded prompt as runs of tokens with one training status; each run of ``<IMG_CONTEXT>``
    tokens is one span shown as ``<IMG_CONTEXT>xN``."""
    ctx = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    ids, trained = sample.input_ids.tolist(), (sample.labels != IGNORE_INDEX).tolist()
    spans, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and trained[j] == trained[i] and (ids[j] == ctx) == (ids[i] == ctx):
            j += 1
        if ids[i] == ctx:
            spans.append(PromptSpan(f"{IMG_CONTEXT_TOKEN}x{j - i}", trained[i], j - i))
        else:
            spans.append(PromptSpan(tokenizer.decode(ids[i:j], skip_special_tokens=False), trained[i]))
        i = j
    return spans


def marked_prompt(sample: Sample, tokenizer) -> str:
    """Decoded prompt; trained spans inside ``[[ ]]``; runs of <IMG_CONTEXT> shown as ``<IMG_CONTEXT>xN``."""
    return "".join(
        f"{TRAIN_OPEN}{s.text}{TRAIN_CLOSE}" if s.trained else s.text for s in prompt_spans(sample, tokenizer)
    )


def tiles_per_image(spans: Sequence[PromptSpan], num_image_token: int) -> list[int]:
    """Tiles of each image (or video frame), in order, from its run of ``<IMG_CONTEXT>`` tokens."""
    counts = []
    for s in spans:
        if s.image_tokens:
            if s.image_tokens % num_image_token:
                raise ValueError(f"a run of {s.image_tokens} image tokens is not a multiple of {num_image_token}")
            counts.append(s.image_tokens // num_image_token)
    return counts


def grid_of(
    width: int, height: int, tiles: int, min_num: int, image_size: int, use_thumbnail: bool, max_num: int = 0
) -> tuple[int, int, bool]:
    """The tiling grid that gave an image of ``width`` x ``height`` its ``tiles`` tiles.

    The dataset may have lowered the tile budget to fit ``max_length``, so the budget is not known;
    but the grid the official choice (``find_closest_grid``) makes under a budget is also its choice
    under a budget of exactly that grid's size, so the smallest budget giving that many tiles finds it.

    Returns:
        ``(columns, rows, thumbnail)``.
    """
    if use_thumbnail and tiles == 2:  # one tile has no thumbnail, two tiles get one
        raise ValueError("2 tiles cannot come from a tiling with thumbnails")
    thumbnail = use_thumbnail and tiles > 2
    grid = tiles - int(thumbnail)
    for budget in range(max(grid, min_num), max(grid, min_num, max_num) + 1):
        cols, rows = find_closest_grid(width, height, min_num, budget, image_size)
        if cols * rows == grid:
            return cols, rows, thumbnail
    raise ValueError(f"no tiling grid of a {width}x{height} image gives {tiles} tiles")


def image_tiles(
    sample: Sample, spans: Sequence[PromptSpan], dataset, record: dict, folder: Path | None
) -> list[ImageTiles]:
    """One :class:`ImageTiles` per image of ``record`` (all frames of a video together); [] without images.

    ``dataset`` supplies the tiling settings (``num_image_token``, ``min_dynamic_patch``, ``image_size``,
    ``use_thumbnail``, ``max_dynamic_patch``); image sizes are read from the files of ``record``.
    """
    if not bool(sample.image_flags.any()):
        return []
    counts = tiles_per_image(spans, dataset.num_image_token)
    if record.get("video") is not None:
        if any(n != 1 for n in counts):
            raise ValueError(f"video frames have one tile each, the prompt's image tokens say {counts}")
        name = f"video {record['video']}: {len(counts)} frames, one tile each"
        return [ImageTiles(name, 0, len(counts), min(len(counts), _VIDEO_COLUMNS))]
    paths = [record["image"]] if isinstance(record["image"], str) else list(record["image"])
    tiling = (dataset.min_dynamic_patch, dataset.image_size, dataset.use_thumbnail, dataset.max_dynamic_patch)
    layouts, first = [], 0
    for k, (path, n) in enumerate(zip(paths, counts, strict=True)):
        with Image.open(Path(folder, path) if folder is not None else Path(path)) as im:
            width, height = im.size
        cols, rows, thumb = grid_of(width, height, n, *tiling)
        label = f"image {k + 1}/{len(paths)} {path} ({width}x{height}): grid {cols}x{rows}" + (
            " + thumbnail" if thumb else ""
        )
        layouts.append(ImageTiles(label, first, cols * rows, cols, thumb))
        first += n
    if first != len(sample.pixel_values):
        raise ValueError(
            f"the prompt's image tokens account for {first} tiles, pixel_values has {len(sample.pixel_values)}"
        )
    return layouts


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def preview_data(config: str, index: int, out: str, cfg_options: dict | None = None) -> int:
    """Write ``out`` (PNG) and ``out`` with suffix ``.txt`` for dataset sample ``index``; print the text.

    ``out`` may be a directory (existing, or a path without suffix): the files are then ``sample-<index>.png``
    and ``.txt`` in it.
    """
    path = Path(out)
    if path.is_dir() or not path.suffix:
        path = path / f"sample-{index}.png"
    elif path.suffix.lower() not in _IMAGE_SUFFIXES:
        raise ValueError(f"--out {out}: give a .png (or .jpg / .webp) file or a directory")
    out = str(path)
    cfg = load_config(config, cfg_options)
    model_s = build_model_wrapper(cfg.get("model"))
    tokenizer = load_tokenizer(model_s.path)
    dataset = DATASETS.build({"model_path": model_s.path, **cfg.train_dataset, "tokenizer": tokenizer, "strict": True})
    sample = dataset[index]
    source, record = dataset.locate(index)
    spans = prompt_spans(sample, tokenizer)
    prompt = marked_prompt(sample, tokenizer)
    real = int(sample.image_flags.sum())
    header = (
        f"{source.annotations.path}:{source.annotations.line_of(record)} | {sample.num_tokens} tokens, "
        f"{int((sample.labels != IGNORE_INDEX).sum())} trained, {real} real tiles"
        + ("" if real else " (text only: its placeholder tile is not shown)")
    )
    print(header)
    print(prompt)
    layouts = image_tiles(sample, spans, dataset, source.annotations.record(record), source.image_folder)
    image = render_preview(header, denormalize_tiles(sample.pixel_values), layouts, spans)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    Path(out).with_suffix(".txt").write_text(header + "\n" + prompt + "\n", encoding="utf-8")
    print(f"wrote {out} and {Path(out).with_suffix('.txt')}")
    return 0
