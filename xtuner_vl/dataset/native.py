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

Loading a shared library runs its code, so only a library this user built is loaded: the directory must
belong to the user and be writable by nobody else (else the library is built in a fresh private temporary
directory), and the library's SHA-256, recorded next to it when it was built, is checked before it is
loaded (else it is rebuilt). Both cases warn once.

Everything falls back to Pillow (same result, slower) with one warning when there is no compiler, the
build or the check fails (a missing symbol, an error code), a call fails later on, the machine is not
x86-64 (where Pillow's own coefficient arithmetic may use fused multiply-add), or ``XTUNER_VL_NATIVE=0``.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["NativeCallError", "NativeResampler", "native_cache_dir", "native_resampler"]

SOURCE = Path(__file__).with_name("csrc") / "resample.c"
# -ffp-contract=off and no -ffast-math: the coefficients must be computed with Pillow's exact double ops.
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c99", "-fPIC", "-shared")
ENV_SWITCH = "XTUNER_VL_NATIVE"
DIGEST_SUFFIX = ".sha256"  # the library's SHA-256, written when it is built

_P, _INT = ctypes.c_void_p, ctypes.c_int
# Descriptors of loaded libraries, never closed: see _load.
_PINNED_FDS: list[int] = []


def native_cache_dir() -> Path:
    """Where compiled libraries go: ``native/`` in ``$XTUNER_VL_CACHE`` (default ``~/.cache/xtuner_vl``)."""
    return Path(os.environ.get("XTUNER_VL_CACHE", Path.home() / ".cache" / "xtuner_vl")) / "native"


class NativeCallError(RuntimeError):
    """The library returned an error code."""


class UntrustedLibrary(RuntimeError):
    """A file or directory that must not be loaded from (foreign owner, writable by others, unrecorded hash)."""


class NativeResampler:
    """The compiled library: Pillow-exact RGB resize and tiling into normalised float planes.

    After a failed call it warns once and does the work with Pillow and numpy from then on (the same bytes).
    """

    def __init__(self, library: ctypes.CDLL, pillow13_order: bool):
        self.library = library
        self.pillow13_order = pillow13_order
        self.failure: str | None = None
        library.xvl_resize_rgb.argtypes = [_P, _INT, _INT, _P, _INT, _INT, _INT]
        library.xvl_resize_rgb.restype = _INT
        library.xvl_tiles_from_rgb.argtypes = [_P, _INT, _INT, _INT, _P, _P]
        library.xvl_tiles_from_rgb.restype = None

    def resize(self, rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """``Image.fromarray(rgb).resize(size, BICUBIC)`` as a uint8 array [height, width, 3]."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"need a uint8 [height, width, 3] array, got {rgb.dtype} {list(rgb.shape)}")
        if self.failure is None:
            try:
                return self.resize_native(rgb, size)
            except NativeCallError as e:
                self.failure = str(e)
                warnings.warn(
                    f"xtuner-vl: native image resize failed ({e}); using Pillow from now on: same tiles, slower.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC))

    def resize_native(self, rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """:meth:`resize` in the library only; raises :class:`NativeCallError` on an error code."""
        rgb = np.ascontiguousarray(rgb)
        width, height = size
        out = np.empty((height, width, 3), dtype=np.uint8)
        status = self.library.xvl_resize_rgb(
            rgb.ctypes.data, rgb.shape[1], rgb.shape[0], out.ctypes.data, width, height, int(self.pillow13_order)
        )
        if status != 0:
            raise NativeCallError(f"xvl_resize_rgb returned {status} for {rgb.shape[1]}x{rgb.shape[0]} -> {size}")
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
        if self.failure is not None:
            _tiles_numpy(rgb, cols, rows, lut, out)
            return
        self.library.xvl_tiles_from_rgb(rgb.ctypes.data, cols, rows, size, lut.data_ptr(), out.data_ptr())


def _tiles_numpy(rgb: np.ndarray, cols: int, rows: int, lut: torch.Tensor, out: torch.Tensor) -> None:
    """``xvl_tiles_from_rgb`` in numpy: the same table lookups, so the same floats."""
    size = out.shape[-1]
    tiles = rgb.reshape(rows, size, cols, size, 3).transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, size, size)
    planes, table = out.numpy(), lut.numpy()
    for c in range(3):
        planes[:, c] = table[c][tiles[:, c]]


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


def _library_name(compiler: str) -> str:
    """The library's file name, keyed by everything that changes its bytes."""
    key = b"\0".join(
        [SOURCE.read_bytes(), " ".join(FLAGS).encode(), _compiler_version(compiler).encode(), _cpu_features().encode()]
    )
    return f"resample-{platform.machine()}-{hashlib.sha256(key).hexdigest()[:16]}.so"


def _not_private(st: os.stat_result, uid: int) -> str | None:
    """Why a file or directory with this status is not safe to load code from, or None."""
    if st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _build_directory() -> tuple[Path, bool, str | None]:
    """(directory, is_temporary, why the cache was not used): the cache when it is this user's alone."""
    cache = native_cache_dir()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        try:
            cache.mkdir(mode=0o700)
        except FileExistsError:
            pass
        st = cache.stat()  # follows a symbolic link: the directory that would be written is the one checked
        problem = _not_private(st, os.geteuid()) if stat.S_ISDIR(st.st_mode) else "is not a directory"
    except OSError as e:
        problem = f"cannot be created ({e})"
    if problem is None:
        return cache, False, None
    why = f"{cache} {problem}, so it was not used (chmod 700 it, or set XTUNER_VL_CACHE, to reuse builds)"
    return Path(tempfile.mkdtemp(prefix="xtuner-vl-native-")), True, why  # a new 0o700 directory of ours


def _load(path: Path, digest: str | None) -> ctypes.CDLL:
    """dlopen ``path`` if it is a regular file of this user's, writable by nobody else, with SHA-256 ``digest``.

    The file is opened once, checked through that descriptor and loaded through ``/proc/self/fd`` (on Linux),
    so it cannot be swapped between the check and the load. The descriptor stays open: glibc recognises an
    already loaded library by the name it was opened with, so that name must never point at another file.
    Raises UntrustedLibrary (nothing loaded) or OSError.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise UntrustedLibrary(f"{path} is a symbolic link") from None
    try:
        st = os.fstat(fd)
        problem = _not_private(st, os.geteuid()) if stat.S_ISREG(st.st_mode) else "is not a regular file"
        if problem is not None:
            raise UntrustedLibrary(f"{path} {problem}")
        if digest is None:
            raise UntrustedLibrary(f"{path} has no recorded SHA-256 (an older xtuner-vl's, or not xtuner-vl's)")
        sha = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            sha.update(chunk)
        if sha.hexdigest() != digest:
            raise UntrustedLibrary(f"{path} does not match the SHA-256 recorded when it was built")
        by_fd = f"/proc/self/fd/{fd}"
        library = ctypes.CDLL(by_fd if os.path.exists(by_fd) else str(path))
    except BaseException:
        os.close(fd)
        raise
    _PINNED_FDS.append(fd)
    return library


def _recorded_digest(path: Path) -> str | None:
    try:
        return Path(str(path) + DIGEST_SUFFIX).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _build(compiler: str, target: Path) -> ctypes.CDLL:
    """Compile into ``target``, record its SHA-256 next to it, load it. Raises on a failed build."""
    # Build under private names and rename into place: ranks starting together never see half a file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".resample-", suffix=".so")
    os.close(fd)
    tmp_digest = tmp + DIGEST_SUFFIX
    try:
        result = subprocess.run(
            [compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o700)  # the linker's mode follows the umask, which may leave it group-writable
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        library = _load(Path(tmp), digest)  # this very file, whatever other ranks do to the names meanwhile
        # The digest goes first, so a library in place always has one (a concurrent rank at worst rebuilds).
        with open(tmp_digest, "x") as f:
            f.write(digest + "\n")
        os.replace(tmp_digest, str(target) + DIGEST_SUFFIX)
        os.replace(tmp, target)
    finally:
        for leftover in (tmp, tmp_digest):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return library


def _library(compiler: str, notes: list[str]) -> ctypes.CDLL:
    """The cached library when it checks out, else a fresh build; ``notes`` gets why it was rebuilt."""
    directory, temporary, why = _build_directory()
    if why is not None:
        notes.append(f"{why}; built in a private temporary directory instead")
    try:
        target = directory / _library_name(compiler)
        if not temporary:
            try:
                return _load(target, _recorded_digest(target))
            except FileNotFoundError:
                pass  # not built yet
            except UntrustedLibrary as e:
                notes.append(f"{e}, so it was not loaded but rebuilt")
        return _build(compiler, target)
    finally:
        if temporary:  # the library stays loaded (and its descriptor open) after the files are gone
            shutil.rmtree(directory, ignore_errors=True)


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
    """Resizes equal to Pillow's and tiles equal to the numpy lookup. Raises NativeCallError on an error code."""
    rng = np.random.default_rng(0)
    for (w, h), size in _CHECK_CASES:
        noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(noise).resize(size, Image.Resampling.BICUBIC))
        if not np.array_equal(resampler.resize_native(noise, size), expected):
            return False
    noise = rng.integers(0, 256, (2 * 5, 3 * 5, 3), dtype=np.uint8)
    table = torch.from_numpy(rng.standard_normal((3, 256), dtype=np.float32))
    native, expected = torch.full((6, 3, 5, 5), float("nan")), torch.empty(6, 3, 5, 5)
    resampler.tiles_into(noise, 3, 2, table, native)
    _tiles_numpy(noise, 3, 2, table, expected)
    return torch.equal(native, expected)


def _pillow_major() -> int:
    try:
        return int(Image.__version__.split(".")[0])
    except ValueError:
        return 0


def _checked_resampler(compiler: str, notes: list[str]) -> tuple[NativeResampler | None, str]:
    """The library checked against Pillow in either pass order, or (None, why not)."""
    try:
        library = _library(compiler, notes)
    except Exception as e:  # a failed compile or dlopen, an unwritable cache: Pillow does the work
        return None, f"building {SOURCE.name} failed: {e}"
    try:
        # Pillow 13 changed which pass runs first; try the installed version's order first.
        for order in (_pillow_major() >= 13, _pillow_major() < 13):
            resampler = NativeResampler(library, order)
            if _matches_pillow(resampler):
                return resampler, ""
    except Exception as e:  # a missing symbol, an error code: anything here means "use Pillow"
        return None, f"its self-check failed: {type(e).__name__}: {e}"
    return None, f"its output differs from the installed Pillow {Image.__version__}"


@functools.cache
def native_resampler() -> NativeResampler | None:
    """The checked native resampler, or None (with one warning saying why) when Pillow must do the work."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    if os.name != "posix" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None  # not a failure: Pillow is the implementation there (see the module docstring)
    compiler, notes = _compiler(), []
    if compiler is None:
        resampler, reason = None, "no C compiler found (set CC)"
    else:
        resampler, reason = _checked_resampler(compiler, notes)
    if resampler is not None:
        if notes:
            warnings.warn(f"xtuner-vl: native image resize: {'; '.join(notes)}.", RuntimeWarning, stacklevel=2)
        return resampler
    warnings.warn(
        f"xtuner-vl: native image resize unavailable ({'; '.join([*notes, reason])}); using Pillow: same tiles, "
        f"about 3x slower image loading. Set {ENV_SWITCH}=0 to silence this.",
        RuntimeWarning,
        stacklevel=2,
    )
    return None
