"""Drawing of a sample preview: each image's tiles in its tiling grid, a legend, the coloured prompt."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from xtuner_vl.dataset.image import IMAGENET_MEAN, IMAGENET_STD
from xtuner_vl.recipes.fonts import preview_font

__all__ = ["ImageTiles", "PromptSpan", "STYLES", "denormalize_tiles", "layout_text", "render_preview"]

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@dataclass(frozen=True)
class PromptSpan:
    """A run of prompt tokens with one training status; ``image_tokens > 0`` marks a run of that many
    ``<IMG_CONTEXT>`` tokens, whose ``text`` is the short form ``<IMG_CONTEXT>xN``."""

    text: str
    trained: bool
    image_tokens: int = 0

    @property
    def style(self) -> str:
        return "image" if self.image_tokens else ("trained" if self.trained else "prompt")


@dataclass(frozen=True)
class ImageTiles:
    """Where one image's tiles are in ``pixel_values`` and how they were laid out.

    Tiles ``first .. first + count - 1`` fill a grid of ``cols`` columns row by row; the thumbnail, if
    any, is tile ``first + count``.
    """

    label: str
    first: int
    count: int
    cols: int
    thumbnail: bool = False

    @property
    def rows(self) -> int:
        return math.ceil(self.count / self.cols)


# style -> (text colour, background or None, legend text)
STYLES = {
    "trained": ((0, 100, 0), (200, 240, 205), "trained (gets a loss)"),
    "prompt": ((110, 110, 110), None, "not trained"),
    "image": ((80, 30, 150), (225, 215, 250), "image tokens <IMG_CONTEXT>xN"),
    "plain": ((20, 20, 20), None, ""),
}
MARGIN, GAP, TILE_GAP = 12, 16, 3
THUMB_FRAME = (230, 130, 0)
LABEL_BG = (30, 30, 30)
_MIN_TEXT_WIDTH, _MAX_BLOCK_WIDTH, _MIN_SIDE_PANEL = 760, 1100, 320
# Special tokens whole (<|im_start|>, </img>), Latin words, runs of spaces, else one character: CJK has no
# spaces, so it wraps between any two characters.
_PIECE = re.compile(r"\n|<\|?/?[A-Za-z0-9_]+\|?>|[0-9A-Za-z_]+|[ \t]+|.", re.S)


def denormalize_tiles(pixel_values: torch.Tensor) -> list[Image.Image]:
    """ImageNet-normalised tiles [n, 3, H, W] back to RGB images."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images = ((pixel_values.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(t.permute(1, 2, 0).numpy())) for t in images]


def _line_height(font: Font) -> int:
    return font.getbbox("Ag|中")[3] + 5


@dataclass
class _Run:
    x: float
    y: int
    text: str
    style: str
    width: float


def layout_text(spans: Sequence[PromptSpan], font: Font, width: int) -> tuple[list[_Run], int]:
    """Place ``spans`` in lines of at most ``width`` pixels; returns the runs and the total height.

    Lines break at newlines, else before a piece (word, special token, CJK character) that would
    overflow; a piece longer than a line is broken between characters. An image run is never broken.
    """
    line_h = _line_height(font)
    runs: list[_Run] = []
    x, y = 0.0, 0

    def place(piece: str, style: str) -> None:
        nonlocal x, y
        w = font.getlength(piece)
        if x + w > width and x > 0:
            x, y = 0.0, y + line_h
            if piece.isspace():
                return
        if w > width and len(piece) > 1 and style != "image":
            for ch in piece:
                place(ch, style)
            return
        last = runs[-1] if runs else None
        if last is not None and last.y == y and last.style == style and abs(last.x + last.width - x) < 1e-6:
            last.text, last.width = last.text + piece, last.width + w
        else:
            runs.append(_Run(x, y, piece, style, w))
        x += w

    for span in spans:
        if span.image_tokens:
            place(span.text, span.style)
            continue
        for piece in _PIECE.findall(span.text.replace("\t", "    ")):
            if piece == "\n":
                x, y = 0.0, y + line_h
            else:
                place(piece, span.style)
    return runs, y + line_h


def _draw_runs(draw: ImageDraw.ImageDraw, runs: Sequence[_Run], font: Font, left: int, top: int) -> None:
    line_h = _line_height(font)
    for run in runs:
        fill, background, _ = STYLES[run.style]
        x, y = left + run.x, top + run.y
        if background is not None:
            draw.rectangle((x, y, x + run.width, y + line_h - 1), fill=background)
        draw.text((x, y + 2), run.text, font=font, fill=fill)


def _text_block(text: str, font: Font, width: int) -> Image.Image:
    runs, height = layout_text([PromptSpan(text, False)], font, width)
    runs = [_Run(r.x, r.y, r.text, "plain", r.width) for r in runs]
    used = math.ceil(max((r.x + r.width for r in runs), default=1))
    block = Image.new("RGB", (used, height), "white")
    _draw_runs(ImageDraw.Draw(block), runs, font, 0, 0)
    return block


def _legend(font: Font, width: int) -> Image.Image:
    """One swatch per style and what the tile numbers mean, wrapped to ``width``."""
    line_h = _line_height(font)
    box = line_h - 4
    entries = []
    for style in ("trained", "prompt", "image"):
        fill, background, text = STYLES[style]
        entry = Image.new("RGB", (box + 6 + math.ceil(font.getlength(text)), line_h), "white")
        draw = ImageDraw.Draw(entry)
        draw.rectangle((0, 2, box, 2 + box), fill=background or "white", outline=fill)
        draw.text((box + 6, 2), text, font=font, fill=fill)
        entries.append(entry)
    entries.append(_text_block("#k: tile k of pixel_values", font, width))
    return _flow(entries, width)


def _tile_label(draw: ImageDraw.ImageDraw, x: int, y: int, text: str, font: Font) -> None:
    w = math.ceil(font.getlength(text))
    draw.rectangle((x, y, x + w + 6, y + _line_height(font)), fill=LABEL_BG)
    draw.text((x + 3, y + 1), text, font=font, fill="white")


def _image_block(images: Sequence[Image.Image], layout: ImageTiles, font: Font, small: Font) -> Image.Image:
    """The title, the grid of tiles (numbered) and the thumbnail to its right, captioned."""
    columns = layout.cols + int(layout.thumbnail)
    tile = max(64, min(160, (_MAX_BLOCK_WIDTH - GAP) // columns - TILE_GAP))
    grid_w = layout.cols * (tile + TILE_GAP) - TILE_GAP
    grid_h = layout.rows * (tile + TILE_GAP) - TILE_GAP
    title_h, caption_h = _line_height(font) + 4, _line_height(small) + 2
    thumb_w = tile + GAP if layout.thumbnail else 0
    width = max(grid_w + thumb_w + 2, math.ceil(font.getlength(layout.label)))  # + 2: the thumbnail's frame
    height = title_h + max(grid_h, tile + caption_h + 2 if layout.thumbnail else 0)
    block = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(block)
    draw.text((0, 1), layout.label, font=font, fill=STYLES["plain"][0])
    for k in range(layout.count):
        r, c = divmod(k, layout.cols)
        x, y = c * (tile + TILE_GAP), title_h + r * (tile + TILE_GAP)
        block.paste(images[layout.first + k].resize((tile, tile)), (x, y))
        _tile_label(draw, x, y, f"#{layout.first + k}", small)
    if layout.thumbnail:
        x, index = grid_w + GAP, layout.first + layout.count
        block.paste(images[index].resize((tile, tile)), (x, title_h))
        draw.rectangle((x - 2, title_h - 2, x + tile + 1, title_h + tile + 1), outline=THUMB_FRAME, width=2)
        _tile_label(draw, x, title_h, f"#{index}", small)
        draw.text((x, title_h + tile + 3), "thumbnail", font=small, fill=THUMB_FRAME)
    return block


def _flow(blocks: Sequence[Image.Image], width: int) -> Image.Image:
    """``blocks`` left to right, wrapping to a new row at ``width``; as small as the content."""
    places, x, y, row_h, used = [], 0, 0, 0, 0
    for b in blocks:
        if x > 0 and x + b.width > width:
            x, y, row_h = 0, y + row_h + GAP, 0
        places.append((x, y))
        used, row_h = max(used, x + b.width), max(row_h, b.height)
        x += b.width + GAP
    canvas = Image.new("RGB", (max(used, 1), y + row_h), "white")
    for b, p in zip(blocks, places, strict=True):
        canvas.paste(b, p)
    return canvas


def render_preview(
    header: str, tiles: Sequence[Image.Image], layouts: Sequence[ImageTiles], spans: Sequence[PromptSpan]
) -> Image.Image:
    """The preview picture: images (each in its grid), header and legend beside them when there is
    room, else above; then the prompt coloured by training status, wrapped to the picture's width."""
    font, small = preview_font(15), preview_font(12)
    images = _flow([_image_block(tiles, lay, font, small) for lay in layouts], _MAX_BLOCK_WIDTH) if layouts else None
    # Images narrower than a text line get the header and legend beside them, not a blank area.
    side = images is not None and images.width < _MIN_TEXT_WIDTH
    content_w = max(_MIN_TEXT_WIDTH, images.width + (GAP + _MIN_SIDE_PANEL if side else 0) if images is not None else 0)
    info_w = content_w - images.width - GAP if side else content_w
    info = _stack([_text_block(header, font, info_w), _legend(font, info_w)])
    if images is None:
        top = info
    elif side:
        top = _flow([images, info], content_w)
    else:
        top = _stack([info, images])
    runs, prompt_h = layout_text(spans, font, content_w)
    canvas = Image.new("RGB", (content_w + 2 * MARGIN, MARGIN + top.height + GAP + prompt_h + MARGIN), "white")
    canvas.paste(top, (MARGIN, MARGIN))
    _draw_runs(ImageDraw.Draw(canvas), runs, font, MARGIN, MARGIN + top.height + GAP)
    return canvas


def _stack(blocks: Sequence[Image.Image]) -> Image.Image:
    """``blocks`` top to bottom, left-aligned."""
    height = sum(b.height for b in blocks) + GAP * (len(blocks) - 1)
    canvas = Image.new("RGB", (max(b.width for b in blocks), height), "white")
    y = 0
    for b in blocks:
        canvas.paste(b, (0, y))
        y += b.height + GAP
    return canvas
