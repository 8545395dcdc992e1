"""Native image resize and tiling, bit-identical to Pillow, compiled on first use.

Resizing is most of the data pipeline's CPU time (the grid resize and the thumbnail resize of every
image). ``csrc/resample.c`` is Pillow's BICUBIC resize of 8-bit RGB with the same fixed-point arithmetic
and a vectorisable loop order: about 3x faster than Pillow on one core, and equal to it byte for byte.

It is compiled with the system C compiler (``$CC`` or ``cc``) into ``$XTUNER_VL_CACHE/native`` (default
``~/.cache/xtuner_vl/native``) the first time a process asks for it, keyed by the source, the flags, the
compiler and the CPU's instruction sets (built with ``-march=native``, so a cache shared between different
machines keeps one library per CPU kind). Before it is used, it is checked against the installed Pillow
on a set of resizes that covers both pass orders; this also picks the pass order of the installed Pillow
version (it changed in Pillow 13).

Everything falls back to Pillow (same result, slower) with one warning when there is no compiler, the
build or the check fails, the machine is not x86-64 (where Pillow's own coefficient arithmetic may
use fused multiply-add), or ``XTUNER_VL_NATIVE=0``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["NativeResampler", "native_cache_dir", "native_resampler"]

SOURCE = Path(__file__).with_name("csrc") / "resample.c"
# -ffp-contract=off and no -ffast-math: the coefficients must be computed with Pillow's exact double ops.
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c99", "-fPIC", "-shared")
ENV_SWITCH = "XTUNER_VL_NATIVE"

_P, _INT = ctypes.c_void_p, ctypes.c_int


def native_cache_dir() -> Path:
    """Where compiled libraries go: ``native/`` in ``$XTUNER_VL_CACHE`` (default ``~/.cache/xtuner_vl``)."""
    return Path(os.environ.get("XTUNER_VL_CACHE", Path.home() / ".cache" / "xtuner_vl")) / "native"


class NativeResampler:
    """The compiled library: Pillow-exact RGB resize and tiling into normalised float planes."""

    def __init__(self, library: ctypes.CDLL, pillow13_order: bool):
        self.library = library
        self.pillow13_order = pillow13_order
        library.xvl_resize_rgb.argtypes = [_P, _INT, _INT, _P, _INT, _INT, _INT]
        library.xvl_resize_rgb.restype = _INT
        library.xvl_tiles_from_rgb.argtypes = [_P, _INT, _INT, _INT, _P, _P]
        library.xvl_tiles_from_rgb.restype = None

    def resize(self, rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """``Image.fromarray(rgb).resize(size, BICUBIC)`` as a uint8 array [height, width, 3]."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"need a uint8 [height, width, 3] array, got {rgb.dtype} {list(rgb.shape)}")
        rgb = np.ascontiguousarray(rgb)
        width, height = size
        out = np.empty((height, width, 3), dtype=np.uint8)
        status = self.library.xvl_resize_rgb(
            rgb.ctypes.data, rgb.shape[1], rgb.shape[0], out.ctypes.data, width, height, int(self.pillow13_order)
        )
        if status != 0:
            raise MemoryError(f"out of memory resizing {rgb.shape[1]}x{rgb.shape[0]} to {width}x{height}")
        return out

    def tiles_into(self, rgb: np.ndarray, cols: int, rows: int, lut: torch.Tensor, out: torch.Tensor) -> None:
        """Cut ``rgb`` [rows*s, cols*s, 3] into tiles, row by row, as ``lut[channel, value]`` into ``out``.

        ``out`` is a contiguous float32 tensor [cols*rows, 3, s, s]; ``lut`` float32 [3, 256].
        """
        size = out.shape[-1]
        if rgb.shape != (rows * size, cols * size, 3) or not rgb.flags.c_contiguous:
            raise ValueError(f"need a contiguous [{rows * size}, {cols * size}, 3] array, got {list(rgb.shape)}")
        if out.shape != (cols * rows, 3, size, size) or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"need a contiguous float32 [{cols * rows}, 3, {size}, {size}] output")
        lut = lut.contiguous()
        self.library.xvl_tiles_from_rgb(rgb.ctypes.data, cols, rows, size, lut.data_ptr(), out.data_ptr())


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(compiler: str) -> Path:
    """The compiled library's path, compiling it unless the cache holds it. Raises on a failed build."""
    source = SOURCE.read_bytes()
    key = b"\0".join(
        [source, " ".join(FLAGS).encode(), _compiler_version(compiler).encode(), _cpu_features().encode()]
    )
    cache = native_cache_dir()
    target = cache / f"resample-{platform.machine()}-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # Build under a private name and rename into place: ranks starting together never load half a file.
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".resample-", suffix=".so")
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


# (source width, height) -> (target width, height): down, up, one axis, both pass orders of Pillow 13
# (the height shrinking more than twice as much as the width runs the vertical pass first), odd sizes.
_CHECK_CASES = (
    ((97, 61), (448, 448)),
    ((640, 480), (1344, 896)),
    ((3000, 200), (448, 448)),
    ((120, 900), (448, 448)),
    ((300, 1201), (257, 300)),
    ((513, 77), (1, 3)),
    ((64, 700), (64, 33)),
    ((701, 64), (29, 64)),
    ((35, 260), (30, 70)),
)


def _matches_pillow(resampler: NativeResampler) -> bool:
    rng = np.random.default_rng(0)
    for (w, h), size in _CHECK_CASES:
        noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(noise).resize(size, Image.Resampling.BICUBIC))
        if not np.array_equal(resampler.resize(noise, size), expected):
            return False
    return True


def _pillow_major() -> int:
    try:
        return int(Image.__version__.split(".")[0])
    except ValueError:
        return 0


@functools.cache
def native_resampler() -> NativeResampler | None:
    """The checked native resampler, or None (with one warning saying why) when Pillow must do the work."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    reason = None
    if os.name != "posix" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None  # not a failure: Pillow is the implementation there (see the module docstring)
    compiler = _compiler()
    if compiler is None:
        reason = "no C compiler found (set CC)"
    else:
        try:
            library = ctypes.CDLL(str(_build(compiler)))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            reason = f"building {SOURCE.name} failed: {e}"
        else:
            # Pillow 13 changed which pass runs first; try the installed version's order first.
            for order in (_pillow_major() >= 13, _pillow_major() < 13):
                resampler = NativeResampler(library, order)
                if _matches_pillow(resampler):
                    return resampler
            reason = f"its output differs from the installed Pillow {Image.__version__}"
    warnings.warn(
        f"xtuner-vl: native image resize unavailable ({reason}); using Pillow: same tiles, about 3x slower "
        f"image loading. Set {ENV_SWITCH}=0 to silence this.",
        RuntimeWarning,
        stacklevel=2,
    )
    return None
