"""The native resampler against the installed Pillow, byte for byte, and its fallbacks."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import types
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from xtuner_vl.dataset import image as image_module
from xtuner_vl.dataset import native
from xtuner_vl.dataset.image import IMAGENET_MEAN, IMAGENET_STD, _value_table, find_closest_grid, load_image_tiles
from xtuner_vl.dataset.native import NativeResampler, native_resampler

X86_WITH_COMPILER = platform.machine().lower() in ("x86_64", "amd64") and shutil.which(os.environ.get("CC", "cc"))


@pytest.fixture
def fresh_native(tmp_path, monkeypatch):
    """An empty library cache and no remembered resampler, restored afterwards."""
    monkeypatch.setenv("XTUNER_VL_CACHE", str(tmp_path / "cache"))
    native_resampler.cache_clear()
    yield tmp_path / "cache" / "native"
    native_resampler.cache_clear()


def _resampler() -> NativeResampler:
    resampler = native_resampler()
    if resampler is None:
        pytest.skip("no native resampler on this machine (not x86-64, or no C compiler)")
    return resampler


def _photo(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth colour field plus noise, uint8 [height, width, 3]: both flat and busy regions."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)).astype(np.int16)
    noise = rng.integers(-20, 21, (height, width, 3), dtype=np.int16)
    return (smooth + noise).clip(0, 255).astype(np.uint8)


def _pillow(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC))


def test_native_resampler_is_built_on_x86_with_a_compiler():
    # The equality tests below are only worth something where the native path really runs: CI is x86-64
    # with gcc, so there it must be on.
    if not X86_WITH_COMPILER:
        pytest.skip("not x86-64 or no C compiler")
    if os.environ.get(native.ENV_SWITCH) == "0":
        pytest.skip(f"{native.ENV_SWITCH}=0 in the environment")
    assert native_resampler() is not None


# (source width, height) -> (target width, height). InternVL's grid and thumbnail resizes of common and
# extreme shapes; upscales; one axis only; 1-pixel images; Pillow 13's vertical-first order (the height
# shrinks more than twice as much as the width); no change at all.
CASES = [
    ((3840, 2160), (1344, 896)),
    ((3840, 2160), (448, 448)),
    ((224, 224), (448, 448)),
    ((500, 375), (1792, 1344)),
    ((1080, 1920), (1344, 2240)),
    ((4000, 300), (5376, 448)),
    ((300, 4000), (448, 5376)),
    ((1, 1), (448, 448)),
    ((1, 700), (448, 448)),
    ((700, 1), (448, 448)),
    ((640, 480), (640, 200)),
    ((640, 480), (100, 480)),
    ((900, 3000), (448, 448)),
    ((120, 5000), (448, 896)),
    ((448, 448), (448, 448)),
    ((1023, 767), (3, 2)),
]


@pytest.mark.parametrize(("source", "target"), CASES)
def test_resize_equals_pillow(source, target):
    resampler = _resampler()
    rgb = _photo(*source, seed=source[0] * 7 + source[1])
    assert np.array_equal(resampler.resize(rgb, target), _pillow(rgb, target))


def test_resize_equals_pillow_on_random_shapes():
    resampler = _resampler()
    rng = np.random.default_rng(1)
    for _ in range(60):
        sw, sh, dw, dh = (int(v) for v in rng.integers(1, 700, 4))
        rgb = rng.integers(0, 256, (sh, sw, 3), dtype=np.uint8)
        assert np.array_equal(resampler.resize(rgb, (dw, dh)), _pillow(rgb, (dw, dh))), ((sw, sh), (dw, dh))


def test_pass_order_is_the_installed_pillows():
    # A vertical-first resize under Pillow 13's rule: the two orders give different bytes, and only the
    # order the resampler picked matches the installed Pillow (so a wrong pick cannot pass unnoticed).
    resampler = _resampler()
    assert resampler.pillow13_order == (int(Image.__version__.split(".")[0]) >= 13)
    rgb = np.random.default_rng(2).integers(0, 256, (900, 120, 3), dtype=np.uint8)
    target = (100, 200)
    other = NativeResampler(resampler.library, not resampler.pillow13_order)
    assert np.array_equal(resampler.resize(rgb, target), _pillow(rgb, target))
    assert not np.array_equal(other.resize(rgb, target), _pillow(rgb, target))


def test_value_table_is_torchvision_on_every_value():
    values = np.arange(256, dtype=np.uint8)
    image = Image.fromarray(np.stack([values, values[::-1], np.roll(values, 100)], axis=-1)[None])  # 1 x 256
    expected = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(image))[:, 0]  # [3, 256]
    table = _value_table(IMAGENET_MEAN, IMAGENET_STD)
    got = torch.stack([table[0], table[1].flip(0), table[2].roll(100)])
    assert torch.equal(got, expected)


@pytest.mark.parametrize("size", [(3000, 2000), (1920, 1080), (448, 448), (97, 2000), (5000, 400)])
@pytest.mark.parametrize("thumbnail", [True, False])
def test_tiles_equal_the_pillow_path(size, thumbnail):
    _resampler()
    image = Image.fromarray(_photo(*size, seed=size[0]))
    native_tiles = load_image_tiles(image, use_thumbnail=thumbnail)
    pillow_tiles = load_image_tiles(image, use_thumbnail=thumbnail, native=False)
    cols, rows = find_closest_grid(*size)
    assert native_tiles.shape[0] == cols * rows + (thumbnail and cols * rows > 1)
    assert torch.equal(native_tiles, pillow_tiles)


def test_input_checks():
    resampler = _resampler()
    with pytest.raises(ValueError, match="uint8"):
        resampler.resize(np.zeros((4, 4, 3), dtype=np.float32), (2, 2))
    with pytest.raises(ValueError, match="uint8"):
        resampler.resize(np.zeros((4, 4), dtype=np.uint8), (2, 2))
    with pytest.raises(ValueError, match="float32"):
        resampler.tiles_into(
            np.zeros((4, 4, 3), np.uint8),
            1,
            1,
            _value_table(IMAGENET_MEAN, IMAGENET_STD),
            torch.empty(1, 3, 4, 4, dtype=torch.float64),
        )


def test_library_is_cached_and_reused(fresh_native):
    if not X86_WITH_COMPILER:
        pytest.skip("not x86-64 or no C compiler")
    assert native_resampler() is not None
    built = list(fresh_native.glob("resample-*.so"))
    assert len(built) == 1 and not list(fresh_native.glob(".resample-*"))  # no temporary file left
    assert stat.S_IMODE(fresh_native.stat().st_mode) == 0o700
    digest = (fresh_native / (built[0].name + native.DIGEST_SUFFIX)).read_text().strip()
    assert digest == hashlib.sha256(built[0].read_bytes()).hexdigest()
    stamp = built[0].stat().st_mtime_ns
    native_resampler.cache_clear()
    assert native_resampler() is not None
    assert list(fresh_native.glob("resample-*.so")) == built and built[0].stat().st_mtime_ns == stamp


def test_failed_build_falls_back_to_pillow_with_one_warning(fresh_native, monkeypatch):
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("Pillow is the implementation off x86-64")
    monkeypatch.setattr(native, "_compiler", lambda: shutil.which("false"))
    with pytest.warns(RuntimeWarning, match="native image resize unavailable.*failed"):
        assert native_resampler() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native_resampler() is None  # remembered: no second warning
        image = Image.fromarray(_photo(1000, 700, seed=3))
        assert torch.equal(load_image_tiles(image), load_image_tiles(image, native=False))
    assert not list(fresh_native.glob("*.so"))


def test_env_switch_turns_it_off_quietly(fresh_native, monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native_resampler() is None
    assert not fresh_native.exists()


# Fault injection. A library's constructor runs when it is loaded: the planted one below leaves a marker
# file, so "not loaded" is observable.
needs_native = pytest.mark.skipif(not X86_WITH_COMPILER, reason="not x86-64 or no C compiler")

PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) { FILE *f = fopen("%s", "w"); if (f) fclose(f); }
int xvl_resize_rgb(void) { return 0; }
void xvl_tiles_from_rgb(void) {}
"""


def _compile(code: str, out) -> bytes:
    src = out.with_suffix(".c")
    src.write_text(code)
    subprocess.run(
        [shutil.which(os.environ.get("CC", "cc")), "-shared", "-fPIC", "-o", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    return out.read_bytes()


def _planted(tmp_path) -> tuple[bytes, object]:
    """(bytes of a library whose constructor creates a marker file, the marker's path)."""
    marker = tmp_path / "constructor-ran"
    return _compile(PLANTED % marker, tmp_path / "planted.so"), marker


def _call_recording_warnings(fn):
    """fn()'s result and the messages of the xtuner-vl RuntimeWarnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if w.category is RuntimeWarning and "xtuner-vl" in str(w.message)]


def _expected_library(cache):
    return cache / native._library_name(native._compiler())


def _assert_works(resampler):
    assert resampler is not None
    rgb = _photo(333, 222, seed=5)
    assert np.array_equal(resampler.resize(rgb, (448, 448)), _pillow(rgb, (448, 448)))


@needs_native
def test_planted_library_is_not_loaded_but_rebuilt(fresh_native, tmp_path):
    fresh_native.mkdir(mode=0o700, parents=True)
    planted, marker = _planted(tmp_path)
    target = _expected_library(fresh_native)
    target.write_bytes(planted)  # the expected name, but no recorded SHA-256
    resampler, warned = _call_recording_warnings(native_resampler)
    assert not marker.exists()
    _assert_works(resampler)
    assert len(warned) == 1 and "no recorded SHA-256" in warned[0] and "rebuilt" in warned[0]
    assert target.read_bytes() != planted
    native_resampler.cache_clear()  # the rebuilt library is now reused quietly
    resampler, warned = _call_recording_warnings(native_resampler)
    assert resampler is not None and warned == []


@needs_native
def test_tampered_library_is_not_loaded(fresh_native, tmp_path):
    assert native_resampler() is not None
    target = _expected_library(fresh_native)
    planted, marker = _planted(tmp_path)
    # Changed after the build (its recorded SHA-256 is the build's). Written beside and renamed: rewriting the
    # file in place would change the pages this process mapped when it loaded the build.
    (tmp_path / "swap.so").write_bytes(planted)
    os.replace(tmp_path / "swap.so", target)
    native_resampler.cache_clear()
    resampler, warned = _call_recording_warnings(native_resampler)
    assert not marker.exists()
    _assert_works(resampler)
    assert len(warned) == 1 and "does not match the SHA-256" in warned[0]


@needs_native
def test_cache_writable_by_others_is_refused(fresh_native, tmp_path, monkeypatch):
    fresh_native.mkdir(parents=True)
    fresh_native.chmod(0o777)
    planted, marker = _planted(tmp_path)
    target = _expected_library(fresh_native)
    target.write_bytes(planted)  # with a matching hash: only the directory check stands in the way
    (fresh_native / (target.name + native.DIGEST_SUFFIX)).write_text(hashlib.sha256(planted).hexdigest())
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    resampler, warned = _call_recording_warnings(native_resampler)
    assert not marker.exists()
    _assert_works(resampler)
    assert len(warned) == 1 and "writable by group or others (mode 777)" in warned[0], warned
    assert "private temporary directory" in warned[0]
    assert target.read_bytes() == planted and len(list(fresh_native.iterdir())) == 2  # left untouched
    assert list((tmp_path / "tmp").iterdir()) == []  # the private build directory is removed after loading


def test_only_private_files_and_directories_are_trusted():
    uid = os.geteuid()

    def status(mode: int, owner: int) -> os.stat_result:
        return os.stat_result((mode, 0, 0, 1, owner, 0, 0, 0, 0, 0))

    assert native._not_private(status(stat.S_IFDIR | 0o700, uid), uid) is None
    assert native._not_private(status(stat.S_IFDIR | 0o755, uid), uid) is None
    assert "owned by uid" in native._not_private(status(stat.S_IFDIR | 0o700, uid + 1), uid)
    for mode in (0o770, 0o707, 0o1777):
        assert "writable by group or others" in native._not_private(status(stat.S_IFDIR | mode, uid), uid)


STUB = r"""
int xvl_resize_rgb(const void *s, int sw, int sh, void *d, int dw, int dh, int o) { return %d; }
%s
"""


@needs_native
@pytest.mark.parametrize(
    ("status", "tiles", "reason"),
    [
        (0, "", "undefined symbol: xvl_tiles_from_rgb"),  # a library without a symbol
        (-1, "void xvl_tiles_from_rgb(void) {}", "NativeCallError: xvl_resize_rgb returned -1"),  # an error code
    ],
)
def test_broken_library_falls_back_to_pillow_with_one_warning(
    fresh_native, tmp_path, monkeypatch, status, tiles, reason
):
    source = tmp_path / "broken.c"
    source.write_text(STUB % (status, tiles))
    monkeypatch.setattr(native, "SOURCE", source)
    resampler, warned = _call_recording_warnings(native_resampler)
    assert resampler is None
    assert len(warned) == 1 and "native image resize unavailable" in warned[0] and reason in warned[0], warned
    image = Image.fromarray(_photo(1000, 700, seed=3))
    tiles_now, warned = _call_recording_warnings(lambda: load_image_tiles(image))
    assert warned == [] and torch.equal(tiles_now, load_image_tiles(image, native=False))


def test_failing_call_falls_back_to_pillow_with_one_warning(monkeypatch):
    # An error code after the self-check passed (out of memory in the library): Pillow and a table lookup
    # take over for good, the tensors are unchanged.
    library = types.SimpleNamespace(xvl_resize_rgb=lambda *args: -1, xvl_tiles_from_rgb=lambda *args: None)
    failing = NativeResampler(library, native._pillow_major() >= 13)
    monkeypatch.setattr(image_module, "native_resampler", lambda: failing)
    images = [Image.fromarray(_photo(*size, seed=size[0])) for size in ((1000, 700), (300, 900), (448, 448))]
    got, warned = _call_recording_warnings(lambda: [load_image_tiles(image) for image in images])
    assert len(warned) == 1 and "xvl_resize_rgb returned -1" in warned[0]
    for tiles, image in zip(got, images, strict=True):
        assert torch.equal(tiles, load_image_tiles(image, native=False))
