"""Image loading and InternVL dynamic tiling, pixel-identical to the official training code.

The official pipeline (``internvl_chat/internvl/train/dataset.py``) is
``Image.open(path).convert('RGB')`` -> ``dynamic_preprocess`` -> per tile
``Resize((s, s), BICUBIC) -> ToTensor -> Normalize(ImageNet)``. This module reproduces its output bit for
bit (checked with ``torch.equal`` against the official functions) with less work: the two resizes run
in a compiled, Pillow-exact resampler (:mod:`xtuner_vl.dataset.native`; Pillow itself where it is
unavailable), no tile is cropped or copied as a PIL image, and every pixel is converted through a table
of torchvision's float32 ``ToTensor`` + ``Normalize`` result for each of the 256 values.

Where the official loader is unsafe we are stricter, never different on good images:

- it sets ``Image.MAX_IMAGE_PIXELS = None`` and ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` globally; we
  touch no PIL global, refuse images over ``max_pixels`` and raise :class:`ImageError` on truncated files;
- 16-bit greyscale (modes ``I;16*`` and ``I``): PIL's ``convert('RGB')`` clips every value above 255 to
  white, so the official sees a nearly white image; we scale 0..65535 to 0..255 instead.

Every other mode goes through ``convert('RGB')`` exactly as the official: alpha (LA, RGBA, PA and
palette transparency) is dropped, not composited on white, and CMYK uses PIL's naive formula (no ICC).
EXIF orientation is not applied, as in the official.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from xtuner_vl.dataset.native import native_resampler

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageError",
    "ImageSource",
    "candidate_grids",
    "dynamic_tiles",
    "find_closest_grid",
    "image_tile_budget",
    "load_image",
    "load_image_tiles",
    "tile_count",
    "tiles_to_tensor",
]

# PIL's own hard limit (2 x its default Image.MAX_IMAGE_PIXELS), above which Image.open raises anyway.
DEFAULT_MAX_PIXELS = 178_956_970
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageSource = str | os.PathLike | BinaryIO | Image.Image

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(ValueError):
    """An image that cannot be used: missing, empty, truncated, corrupt or too large. Names the file."""


def _name(source: ImageSource) -> str:
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", repr(source)))


def _check_pixels(size: tuple[int, int], max_pixels: int | None, name: str) -> None:
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        raise ImageError(
            f"{name}: image of {size[0]}x{size[1]} = {size[0] * size[1]} pixels is over the limit of "
            f"{max_pixels} pixels (possible decompression bomb; raise max_pixels to accept it)"
        )


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    # round(v * 255 / 65535) in integers; 'I' images (32-bit) are read as 16-bit data and clipped to it.
    values = np.asarray(img).astype(np.int64).clip(0, 65535)
    eight = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(eight, mode="L").convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    """A new RGB image (never ``img`` itself), converted as the official ``convert('RGB')`` except 16-bit."""
    if img.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(img)
    with warnings.catch_warnings():
        # "Palette images with Transparency expressed in bytes should be converted to RGBA": the
        # official converts to RGB regardless, dropping the transparency; so do we, quietly.
        warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)
        return img.convert("RGB")


def load_image(source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image as RGB, as the official ``Image.open(path).convert('RGB')``.

    Args:
        source: a path, a binary file object or an already opened PIL image.
        max_pixels: refuse images with more pixels (checked from the header, before decoding);
            None disables this check, though PIL's own global limit (``Image.MAX_IMAGE_PIXELS``,
            untouched here) still applies while opening.

    Returns:
        A new, fully loaded RGB image (16-bit greyscale scaled to 8 bits; see the module docstring).

    Raises:
        ImageError: the file is missing, empty, truncated, corrupt, not an image, or too large.
    """
    name = _name(source)
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, name)
        return _to_rgb(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name}: image file not found (or not a regular file)")
        if path.stat().st_size == 0:
            raise ImageError(f"{name}: image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # We apply our own limit; PIL's warning between its two thresholds would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                _check_pixels(img.size, max_pixels, name)
                img.load()  # decode now so that truncated data raises here
                # Freshly decoded RGB is already what convert('RGB') would return, as a copy: skip the copy.
                return img if img.mode == "RGB" else _to_rgb(img)
    except (ImageError, MemoryError):
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: {e} (PIL's global Image.MAX_IMAGE_PIXELS)") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        raise ImageError(f"{name}: cannot read image: {type(e).__name__}: {e}") from e


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """Tile grids ``(columns, rows)`` with ``min_num <= columns * rows <= max_num``, by tile count.

    Grids with the same tile count keep the official order, which is CPython's (deterministic) iteration
    order of the set the official builds; it only matters when ``min_num > 1`` (see find_closest_grid).
    """
    return list(_candidate_grids(min_num, max_num))


@functools.cache
def _candidate_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    if min_num < 1 or max_num < min_num:
        raise ValueError(f"need 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def find_closest_grid(
    width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = 448
) -> tuple[int, int]:
    """The official grid choice (``find_closest_aspect_ratio``) for an image of ``width`` x ``height``.

    The grid whose columns/rows ratio is closest to width/height wins; on an exact tie a grid later in
    :func:`candidate_grids` order (more tiles) replaces the current one only if the image has more than
    half the pixels of that grid (``width * height > 0.5 * image_size**2 * columns * rows``). With
    ``min_num == 1`` two grids of equal tile count can never be the best tie (1x1 is strictly closer).

    Returns:
        ``(columns, rows)``.
    """
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in _candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def tile_count(width: int, height: int, min_num: int, max_num: int, image_size: int, use_thumbnail: bool) -> int:
    """How many tiles :func:`dynamic_tiles` makes for an image of this size, without decoding it."""
    cols, rows = find_closest_grid(width, height, min_num, max_num, image_size)
    return cols * rows + (1 if use_thumbnail and cols * rows > 1 else 0)


def _resize_for_tiles(
    image: Image.Image, cols: int, rows: int, image_size: int, use_thumbnail: bool
) -> tuple[Image.Image, Image.Image | None]:
    """The image resized to the grid and, when the grid has several tiles and thumbnails are on, to one tile.

    Both from the full image, as the official (PIL's default filter for RGB, BICUBIC). Sharing work
    between the two is not bit-safe: each resize is two uint8 passes whose order Pillow picks per call
    (horizontal first up to Pillow 12; from 13, vertical first when the height shrinks more than twice
    as much as the width), so a pass of one is not a pass of the other.
    """
    s, bicubic = image_size, Image.Resampling.BICUBIC
    resized = image.resize((s * cols, s * rows), bicubic)
    return resized, image.resize((s, s), bicubic) if use_thumbnail and cols * rows != 1 else None


def dynamic_tiles(
    image: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True
) -> list[Image.Image]:
    """Split an image into tiles exactly as the official ``dynamic_preprocess``.

    Args:
        image: an RGB image (use :func:`load_image`).
        min_num: fewest tiles of the grid.
        max_num: most tiles of the grid (the thumbnail comes on top).
        image_size: tile side in pixels.
        use_thumbnail: append the whole image resized to one tile, last, when the grid has several tiles.

    Returns:
        ``image_size`` x ``image_size`` tiles, row by row, then the thumbnail if any.
    """
    cols, rows = find_closest_grid(image.width, image.height, min_num, max_num, image_size)
    resized, thumbnail = _resize_for_tiles(image, cols, rows, image_size, use_thumbnail)
    s = image_size
    tiles = [resized.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)]
    return tiles if thumbnail is None else [*tiles, thumbnail]


def _rgb_planes(image: Image.Image) -> list[np.ndarray]:
    """The R, G and B planes of an RGB image, uint8 [height, width] each (one copy out of PIL per plane)."""
    return [
        np.frombuffer(image.tobytes("raw", band), dtype=np.uint8).reshape(image.height, image.width) for band in "RGB"
    ]


def _normalize_into(out: torch.Tensor, planes: Sequence[np.ndarray], mean: torch.Tensor, std: torch.Tensor) -> None:
    """Fill ``out`` [3, H, W] from uint8 planes with torchvision's float32 ops, in their order.

    ``ToTensor`` is ``x.float().div(255)`` and ``Normalize`` is ``x.sub_(mean).div_(std)``: the same
    elementwise float32 operations here, in place on one tile (which stays in cache), give the same bits.
    """
    view = out.numpy()
    for channel, plane in enumerate(planes):
        view[channel] = plane  # uint8 -> float32, exact
    out.div_(255).sub_(mean).div_(std)


def _channel_tensors(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    # As torchvision's Normalize: float32 tensors viewed as [C, 1, 1].
    return (
        torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1),
        torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1),
    )


@functools.cache
def _value_table(mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """torchvision's ``ToTensor`` + ``Normalize`` of every uint8 value, per channel: float32 [3, 256].

    Computed with the very ops of :func:`_normalize_into` (elementwise, so a pixel's result depends only on
    its value and channel): looking a pixel up here gives the transform's bits.
    """
    mean_t, std_t = _channel_tensors(mean, std)
    values = torch.arange(256, dtype=torch.float32).expand(len(mean), 1, 256).clone()
    return values.div_(255).sub_(mean_t).div_(std_t).view(len(mean), 256)


def tiles_to_tensor(
    tiles: Sequence[Image.Image],
    image_size: int = 448,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Stack tiles as the official ``build_transform(is_train=False)`` applied to each.

    That transform is: convert to RGB if needed, ``Resize((image_size, image_size), BICUBIC)`` (which
    returns tiles already of that size unchanged), ``ToTensor``, ``Normalize(mean, std)``.

    Returns:
        float32 tensor [len(tiles), 3, image_size, image_size].
    """
    if not tiles:
        raise ValueError("tiles_to_tensor needs at least one tile")
    s = image_size
    out = torch.empty((len(tiles), 3, s, s), dtype=torch.float32)
    resampler = native_resampler()
    if resampler is not None:
        table = _value_table(tuple(mean), tuple(std))
    else:
        mean_t, std_t = _channel_tensors(mean, std)
    for k, tile in enumerate(tiles):
        if tile.mode != "RGB":
            tile = tile.convert("RGB")
        if resampler is not None:
            rgb = np.asarray(tile)
            rgb = rgb if tile.size == (s, s) else resampler.resize(rgb, (s, s))
            resampler.tiles_into(rgb, 1, 1, table, out[k : k + 1])
            continue
        if tile.size != (s, s):
            tile = tile.resize((s, s), Image.Resampling.BICUBIC)
        _normalize_into(out[k], _rgb_planes(tile), mean_t, std_t)
    return out


def load_image_tiles(
    image: ImageSource,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    native: bool = True,
) -> torch.Tensor:
    """Tile and normalise one image: ``tiles_to_tensor(dynamic_tiles(image, ...))``, but faster.

    The resizes run in the native resampler when available (:func:`native_resampler`), each pixel then
    taken from :func:`_value_table`; otherwise Pillow resizes and the tiles are normalised from views of
    the resized image's colour planes (:func:`_normalize_into`). Both are identical to the official
    ``dynamic_preprocess`` + per-tile ``build_transform(is_train=False)`` output.

    Args:
        image: an RGB PIL image, or a path / file object loaded with :func:`load_image`.
        min_num: fewest tiles of the grid.
        max_num: most tiles of the grid (the thumbnail comes on top).
        image_size: tile side in pixels.
        use_thumbnail: append the whole image as one more tile when the grid has several tiles.
        max_pixels: pixel limit passed to :func:`load_image` when ``image`` is not yet an RGB image.
        native: use the native resampler when it is available; False always resizes with Pillow (the
            same tensor, slower).

    Returns:
        float32 tensor [tiles, 3, image_size, image_size].
    """
    if not (isinstance(image, Image.Image) and image.mode == "RGB"):
        image = load_image(image, max_pixels)
    s = image_size
    cols, rows = find_closest_grid(image.width, image.height, min_num, max_num, s)
    n = cols * rows
    thumbnail = bool(use_thumbnail) and n != 1
    out = torch.empty((n + int(thumbnail), 3, s, s), dtype=torch.float32)
    resampler = native_resampler() if native else None
    if resampler is not None:
        rgb, table = np.asarray(image), _value_table(IMAGENET_MEAN, IMAGENET_STD)
        resampler.tiles_into(resampler.resize(rgb, (s * cols, s * rows)), cols, rows, table, out[:n])
        if thumbnail:
            resampler.tiles_into(resampler.resize(rgb, (s, s)), 1, 1, table, out[n:])
        return out
    resized, thumb = _resize_for_tiles(image, cols, rows, s, use_thumbnail)
    mean_t, std_t = _channel_tensors(IMAGENET_MEAN, IMAGENET_STD)
    # Plane [rows*s, cols*s] -> [rows, s, cols, s]: tile (r, c), row-major, is [r, :, c, :].
    planes = [plane.reshape(rows, s, cols, s) for plane in _rgb_planes(resized)]
    for k in range(n):
        r, c = divmod(k, cols)
        _normalize_into(out[k], [plane[r, :, c] for plane in planes], mean_t, std_t)
    if thumb is not None:
        _normalize_into(out[n], _rgb_planes(thumb), mean_t, std_t)
    return out


def image_tile_budget(max_dynamic_patch: int, num_images: int) -> int:
    """Tiles allowed per image of a multi-image sample, as the official: ``max(1, max // num_images)``."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    return max(1, max_dynamic_patch // num_images)
