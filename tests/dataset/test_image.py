"""Image loading and dynamic tiling against hand-derived grids and an independent torchvision pipeline."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageFile
from torchvision.transforms import InterpolationMode

from xtuner_vl.dataset.image import (
    ImageError,
    dynamic_tiles,
    find_closest_grid,
    image_tile_budget,
    load_image,
    load_image_tiles,
    tiles_to_tensor,
)

S = 448
HALF_TILE_AREA = 0.5 * S * S  # a larger tied grid wins only if w*h > 0.5 * 448^2 * cols * rows

# (width, height, min_num, max_num, use_thumbnail) -> (cols, rows, number of tiles incl. thumbnail).
# Each derived by hand from the official find_closest_aspect_ratio / dynamic_preprocess
# (OpenGVLab/InternVL internvl_chat/internvl/train/dataset.py).
GRID_CASES = [
    # aspect 1: 1x1, 2x2, 3x3 tie at diff 0; area 200704 passes neither 2x2 (401408) nor 3x3 (903168).
    ((448, 448, 1, 12, True), (1, 1, 1)),
    # aspect 2: 2x1 and 4x2 tie; area 401408 is not > 802816 (4x2) -> 2x1 + thumbnail.
    ((896, 448, 1, 12, True), (2, 1, 3)),
    # aspect 1, area 1e6 > 903168 -> 3x3 + thumbnail.
    ((1000, 1000, 1, 12, True), (3, 3, 10)),
    ((1000, 1000, 1, 12, False), (3, 3, 9)),
    # max 6: 3x3 is no candidate, 2x2 passes (1e6 > 401408).
    ((1000, 1000, 1, 6, True), (2, 2, 5)),
    # aspect 0.5: 1x2 and 2x4 tie; 500000 is not > 802816.
    ((500, 1000, 1, 12, True), (1, 2, 3)),
    # 1x1 pixel: 1x1 grid, a single tile and no thumbnail.
    ((1, 1, 1, 12, True), (1, 1, 1)),
    # aspect 13.3: the widest grid 12x1 (diff 1.33) beats 11x1 (diff 2.33).
    ((4000, 300, 1, 12, True), (12, 1, 13)),
    ((300, 4000, 1, 12, True), (1, 12, 13)),
    # The tie threshold itself, squares: 633^2 = 400689 <= 401408 < 634^2 = 401956.
    ((633, 633, 1, 12, True), (1, 1, 1)),
    ((634, 634, 1, 12, True), (2, 2, 5)),
    # 950^2 = 902500 <= 903168 < 951^2 = 904401.
    ((950, 950, 1, 12, True), (2, 2, 5)),
    ((951, 951, 1, 12, True), (3, 3, 10)),
    # aspect 0.889 is closest to 1 (1x1, 2x2, 3x3 tie at diff 0.111); 896*1008 = 903168 is exactly the 3x3
    # threshold, not above it -> 2x2.
    ((896, 1008, 1, 12, True), (2, 2, 5)),
    ((1024, 882, 1, 12, True), (2, 2, 5)),
    # aspect 2: 1266*633 = 801378 <= 802816 < 1268*634 = 803912.
    ((1266, 633, 1, 12, True), (2, 1, 3)),
    ((1268, 634, 1, 12, True), (4, 2, 9)),
    # aspect 1.75 is exactly between 2x1 (2.0) and 3x2 (1.5); 4x2 (2.0) also ties. Ordered by tile count:
    # 2x1, 3x2 (needs > 602112), 4x2 (needs > 802816).
    ((700, 400, 1, 12, True), (2, 1, 3)),  # 280000: none passes
    ((1050, 600, 1, 12, True), (3, 2, 7)),  # 630000: 3x2 only
    ((1400, 800, 1, 12, True), (4, 2, 9)),  # 1120000: 3x2, then 4x2
    # aspect 1.25: 4x3 (1.333) is closest among grids of <= 12 tiles.
    ((500, 400, 1, 12, True), (4, 3, 13)),
    # aspect 1.5 exactly 3x2; 6x4 has 24 tiles.
    ((600, 400, 1, 12, True), (3, 2, 7)),
    # min_num 2 removes 1x1: aspect 1 -> 2x2 is exact.
    ((448, 448, 2, 6, True), (2, 2, 5)),
    # max 1: always 1x1, no thumbnail.
    ((4000, 300, 1, 1, True), (1, 1, 1)),
]


@pytest.mark.parametrize(("args", "expected"), GRID_CASES, ids=[f"{a[0]}x{a[1]}-{a[2]}-{a[3]}" for a, _ in GRID_CASES])
def test_grid_and_tile_count(args, expected):
    width, height, min_num, max_num, thumb = args
    cols, rows, count = expected
    assert find_closest_grid(width, height, min_num, max_num, S) == (cols, rows)
    tiles = dynamic_tiles(Image.new("RGB", (width, height), (10, 20, 30)), min_num, max_num, S, thumb)
    assert len(tiles) == count
    assert all(t.size == (S, S) for t in tiles)


def test_grid_with_smaller_tiles():
    # image_size 224: aspect 1, area 250000 > 0.5*224^2*9 = 225792 -> 3x3.
    assert find_closest_grid(500, 500, 1, 12, 224) == (3, 3)
    assert find_closest_grid(470, 470, 1, 12, 224) == (2, 2)  # 220900 <= 225792


def _reference_grid(width: int, height: int, min_num: int, max_num: int) -> tuple[int, int]:
    """The official dynamic_preprocess grid rule restated: among the grids closest in aspect, the one with most
    tiles whose threshold the image passes, else the one with fewest tiles (min_num 1: equal tile counts never
    tie best)."""
    grids = [(c, r) for c in range(1, max_num + 1) for r in range(1, max_num + 1) if min_num <= c * r <= max_num]
    best = min(abs(width / height - c / r) for c, r in grids)
    tied = sorted((g for g in grids if abs(width / height - g[0] / g[1]) == best), key=lambda g: g[0] * g[1])
    passing = [g for g in tied[1:] if width * height > HALF_TILE_AREA * g[0] * g[1]]
    return passing[-1] if passing else tied[0]


def test_grid_sweep_matches_rule():
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(300)]
    sizes += [(w, h) for w in (1, 2, 3, 447, 448, 449, 896) for h in (1, 2, 3, 447, 448, 449, 896)]
    for width, height in sizes:
        for max_num in (1, 4, 6, 12):
            assert find_closest_grid(width, height, 1, max_num, S) == _reference_grid(width, height, 1, max_num)


def _torchvision_tiles(image: Image.Image, cols: int, rows: int, thumb: bool) -> torch.Tensor:
    """Independent per-tile pipeline: resize (PIL default filter), crop row-major, per-tile transform."""
    transform = T.Compose(
        [
            T.Resize((S, S), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ]
    )
    resized = image.resize((S * cols, S * rows))
    crops = [resized.crop((c * S, r * S, (c + 1) * S, (r + 1) * S)) for r in range(rows) for c in range(cols)]
    if thumb and len(crops) > 1:
        crops.append(image.resize((S, S)))
    return torch.stack([transform(c) for c in crops])


# Grids by hand: 1000x600 (1.67) -> 3x2 (1.5); 640x480 (1.33) -> 4x3 exactly; 300x700 (0.43) -> 2x5 (0.4);
# 5x3 (1.67) -> 3x2; 1x1 -> 1x1.
@pytest.mark.parametrize(
    ("size", "grid"),
    [((1000, 600), (3, 2)), ((640, 480), (4, 3)), ((300, 700), (2, 5)), ((5, 3), (3, 2)), ((1, 1), (1, 1))],
)
def test_tile_pixels_equal_torchvision(tmp_path, size, grid):
    noise = np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(noise).save(path)
    assert find_closest_grid(*size) == grid
    expected = _torchvision_tiles(Image.open(path).convert("RGB"), *grid, thumb=True)
    got = load_image_tiles(path)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)
    assert torch.equal(tiles_to_tensor(dynamic_tiles(load_image(path))), expected)
    assert torch.equal(load_image_tiles(path, use_thumbnail=False), expected[: grid[0] * grid[1]])


# One-column grids (by hand): 448x1344 (1/3), 300x900 (1/3, widened), 600x1800 (1/3, narrowed; 1080000 <=
# 1204224 keeps 1x3 over 2x6), 500x1000 (1/2; 500000 <= 802816 keeps 1x2 over 2x4), 200x2400 (1/12),
# 450x1900 (0.237 -> 1x4). With Pillow >= 13 some of these resize height first (see _resize_for_tiles).
ONE_COLUMN = [
    ((448, 1344), 3),
    ((300, 900), 3),
    ((600, 1800), 3),
    ((500, 1000), 2),
    ((200, 2400), 12),
    ((450, 1900), 4),
]


@pytest.mark.parametrize(("size", "rows"), ONE_COLUMN, ids=[f"{w}x{h}" for (w, h), _ in ONE_COLUMN])
def test_one_column_grid_equals_torchvision(size, rows):
    image = Image.fromarray(np.random.default_rng(size[0]).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    assert find_closest_grid(*size) == (1, rows)
    expected = _torchvision_tiles(image, 1, rows, thumb=True)
    assert torch.equal(load_image_tiles(image), expected)
    tiles = dynamic_tiles(image)
    assert torch.equal(tiles_to_tensor(tiles), expected)
    assert tiles[-1].tobytes() == image.resize((S, S)).tobytes()  # the thumbnail, as a PIL image too
    assert torch.equal(load_image_tiles(image, use_thumbnail=False), expected[:rows])


# JPEG through the whole path (decode, no RGB copy, resize, tiles) vs Image.open().convert('RGB') + the
# per-tile transform, over qualities and chroma subsamplings (4:4:4, 4:2:2, 4:2:0) and grey JPEGs.
@pytest.mark.parametrize("subsampling", [0, 1, 2])
def test_jpeg_path_equals_official(tmp_path, subsampling):
    rng = np.random.default_rng(subsampling)
    for k, (quality, size) in enumerate([(95, (1000, 600)), (75, (333, 777)), (50, (1500, 400)), (90, (64, 64))]):
        smooth = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
            size, Image.Resampling.BILINEAR
        )
        noisy = np.asarray(smooth).astype(np.int16) + rng.integers(-20, 21, (size[1], size[0], 3), dtype=np.int16)
        path = tmp_path / f"img{k}.jpg"
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=quality, subsampling=subsampling)
        official = Image.open(path).convert("RGB")
        loaded = load_image(path)
        assert loaded.mode == "RGB" and loaded.tobytes() == official.tobytes()
        assert loaded.fp is None  # decoded and the file closed, not held open by the returned image
        assert torch.equal(load_image_tiles(path), _torchvision_tiles(official, *find_closest_grid(*size), thumb=True))
    grey = tmp_path / "grey.jpg"
    Image.fromarray(rng.integers(0, 256, (300, 500), dtype=np.uint8), mode="L").save(grey, quality=80)
    official = Image.open(grey).convert("RGB")
    assert torch.equal(load_image_tiles(grey), _torchvision_tiles(official, *find_closest_grid(500, 300), thumb=True))


def test_tiles_to_tensor_resizes_and_converts():
    rng = np.random.default_rng(1)
    odd = Image.fromarray(rng.integers(0, 256, (30, 50), dtype=np.uint8), mode="L")
    rgba = Image.fromarray(rng.integers(0, 256, (S, S, 4), dtype=np.uint8), mode="RGBA")
    tile = Image.fromarray(rng.integers(0, 256, (S, S, 3), dtype=np.uint8))
    transform = T.Compose(
        [
            T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
            T.Resize((S, S), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ]
    )
    tiles = [odd, tile, rgba]
    assert torch.equal(tiles_to_tensor(tiles), torch.stack([transform(t) for t in tiles]))
    mean, std = (0.5, 0.25, 0.125), (0.3, 0.2, 0.1)
    expected = T.Normalize(mean, std)(T.ToTensor()(tile))[None]
    assert torch.equal(tiles_to_tensor([tile], mean=mean, std=std), expected)


def test_image_tile_budget():
    assert image_tile_budget(12, 1) == 12
    assert image_tile_budget(12, 5) == 2
    assert image_tile_budget(6, 7) == 1
    with pytest.raises(ValueError):
        image_tile_budget(6, 0)


def _save_and_load(tmp_path: Path, img: Image.Image, name: str, **save) -> np.ndarray:
    path = tmp_path / name
    img.save(path, **save)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out)


def test_modes_palette_and_grey(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([200, 10, 20, 30, 40, 250])
    pal.putpixel((1, 0), 1)
    # Transparency is dropped (the official converts P straight to RGB): the palette colour remains.
    got = _save_and_load(tmp_path, pal, "p.png", transparency=1)
    assert got[0].tolist() == [[200, 10, 20], [30, 40, 250]]
    grey = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), mode="L")
    assert _save_and_load(tmp_path, grey, "l.png")[0].tolist() == [[0, 0, 0], [77, 77, 77], [255, 255, 255]]
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    assert _save_and_load(tmp_path, bilevel, "one.png")[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_modes_alpha_is_dropped_not_composited(tmp_path):
    la = Image.fromarray(np.array([[[90, 0], [90, 255]]], dtype=np.uint8), mode="LA")
    assert _save_and_load(tmp_path, la, "la.png")[0].tolist() == [[90, 90, 90], [90, 90, 90]]
    rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [40, 50, 60, 128]]], dtype=np.uint8), mode="RGBA")
    assert _save_and_load(tmp_path, rgba, "rgba.png")[0].tolist() == [[10, 20, 30], [40, 50, 60]]


def test_mode_cmyk(tmp_path):
    cmyk = Image.new("CMYK", (1, 1), (10, 20, 30, 40))
    # PIL's naive conversion, as the official: channel = (255 - ink) * (255 - k) / 255, rounded.
    expected = [round((255 - v) * (255 - 40) / 255) for v in (10, 20, 30)]
    assert _save_and_load(tmp_path, cmyk, "c.tiff")[0, 0].tolist() == expected


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).convert("RGB").getpixel((1, 0)) == (255, 255, 255)  # what the official gets
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 100, 128, 255]
    wide = Image.fromarray(np.array([[-5, 257 * 7, 65535, 10**6]], dtype=np.int32), mode="I")
    assert np.asarray(load_image(wide))[0, :, 1].tolist() == [0, 7, 255, 255]


def test_one_pixel_image(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(path)
    tiles = load_image_tiles(path)
    assert tiles.shape == (1, 3, S, S)
    red = (1 - 0.485) / 0.229
    assert torch.allclose(tiles[0, 0], torch.full((S, S), red), atol=1e-6)


def test_pil_input_is_copied():
    src = Image.new("RGB", (4, 4), (1, 2, 3))
    out = load_image(src)
    assert out is not src and out.getpixel((0, 0)) == (1, 2, 3)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height pixels (a few bytes of image data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    )


def test_bombs_refused_without_touching_pil_globals(tmp_path):
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    small = tmp_path / "small.png"
    Image.new("RGB", (100, 100)).save(small)
    with pytest.raises(ImageError, match="over the limit of 5000 pixels") as err:
        load_image(small, max_pixels=5000)
    assert str(small) in str(err.value)
    assert load_image(small, max_pixels=10_000).size == (100, 100)
    # A header claiming 12000 x 12000 (144e6 pixels, between PIL's warning and error thresholds) with
    # almost no data: refused from the header, before any decoding, and without PIL's warning.
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 12_000, 12_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match="over the limit of 1000000 pixels"):
            load_image(bomb, max_pixels=1_000_000)
    # 40000 x 40000 is over PIL's own hard limit, which still applies with max_pixels=None.
    _png_header_only(bomb, 40_000, 40_000)
    with pytest.raises(ImageError, match="bomb.png.*exceeds limit"):
        load_image(bomb, max_pixels=None)
    with pytest.raises(ImageError, match="bomb.png"):
        load_image(bomb)
    with pytest.raises(ImageError, match="over the limit"):
        load_image(Image.new("L", (100, 100)), max_pixels=99)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


def test_bad_files_raise_image_error_naming_the_file(tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(ImageError, match="not found") as err:
        load_image(missing)
    assert str(missing) in str(err.value)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty") as err:
        load_image(empty)
    assert str(empty) in str(err.value)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageError, match="corrupt.jpg"):
        load_image(corrupt)
    noise = np.random.default_rng(2).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    for ext in ("png", "jpg"):
        full = tmp_path / f"full.{ext}"
        Image.fromarray(noise).save(full)
        cut = tmp_path / f"truncated.{ext}"
        cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
        with pytest.raises(ImageError, match=f"truncated.{ext}"):
            load_image(cut)


def test_file_object_input(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (3, 2), (5, 6, 7)).save(path)
    with open(path, "rb") as f:
        assert load_image(f).getpixel((2, 1)) == (5, 6, 7)
