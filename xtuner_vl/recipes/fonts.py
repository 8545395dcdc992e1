"""A font for the previews that has CJK glyphs (InternVL2's default system prompt is Chinese).

Search order: a system font (fontconfig's ``fc-list :lang=zh``, then the usual font folders of Linux,
macOS and Windows, by file name), then the optional pip package ``noto-cjk-sans-otc`` (Noto Sans CJK,
SIL Open Font License 1.1), and finally Pillow's built-in font, which has no CJK glyphs, with one
warning naming the package to install. Every candidate must pass :func:`renders_cjk` before it is used.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from PIL import ImageFont

__all__ = [
    "CJK_FONT_PACKAGE",
    "FONT_FILE_HINTS",
    "default_font_dirs",
    "find_cjk_font",
    "fontconfig_cjk_files",
    "open_cjk_font",
    "package_cjk_files",
    "preview_font",
    "renders_cjk",
]

CJK_FONT_PACKAGE = "noto-cjk-sans-otc"
_PACKAGE_MODULE = "noto_cjk_sans_otc"
# File-name fragments (lower case) of common CJK fonts: Noto / Source Han, WenQuanYi, Droid, Microsoft
# YaHei / SimHei / SimSun, Apple PingFang / Hiragino / STHeiti, Arial Unicode.
FONT_FILE_HINTS = (
    "notosanscjk",
    "notosansmonocjk",
    "notoserifcjk",
    "notosanssc",
    "sourcehansans",
    "sourcehanserif",
    "wqy-",
    "droidsansfallback",
    "msyh",
    "simhei",
    "simsun",
    "pingfang",
    "hiragino sans gb",
    "stheiti",
    "arial unicode",
)
_FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
# Faces of a collection in order of preference: monospaced Latin reads best for prompts, SC for Chinese.
_FACE_PREFERENCE = ("mono cjk sc", "cjk sc", " sc", "cjk")
_MAX_FACES = 32
_OTHER_WEIGHTS = ("bold", "black", "heavy", "light", "thin", "medium", "semibold", "demilight", "italic")


def renders_cjk(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> bool:
    """Whether ``font`` draws real CJK glyphs: two different ideographs must give two different bitmaps
    (a font without them draws the same "missing glyph" box, or nothing, for both)."""
    first, second = font.getmask("中"), font.getmask("文")
    return first.size != (0, 0) and (first.size != second.size or bytes(first) != bytes(second))


def _faces(path: Path, size: int) -> Iterator[ImageFont.FreeTypeFont]:
    """Every face of a font file (one for .ttf/.otf, several for a collection)."""
    for index in range(_MAX_FACES):
        try:
            yield ImageFont.truetype(str(path), size, index=index)
        except OSError:  # past the last face, or not a font FreeType can read
            return


def open_cjk_font(path: str | os.PathLike, size: int) -> ImageFont.FreeTypeFont | None:
    """The preferred face of ``path`` that renders CJK (see :func:`renders_cjk`), or None."""
    usable = [f for f in _faces(Path(path), size) if renders_cjk(f)]
    if not usable:
        return None
    names = [" ".join(f.getname()).lower() for f in usable]
    for wanted in _FACE_PREFERENCE:
        for font, name in zip(usable, names, strict=True):
            if wanted in name:
                return font
    return usable[0]


def fontconfig_cjk_files(timeout: float = 10.0) -> list[Path]:
    """Font files fontconfig says cover Chinese (``fc-list :lang=zh``); empty without fontconfig."""
    fc_list = shutil.which("fc-list")
    if fc_list is None:
        return []
    try:
        out = subprocess.run(
            [fc_list, "--format", "%{file}\n", ":lang=zh"], capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return _regular_first(sorted({Path(line) for line in out.stdout.splitlines() if line.strip()}))


def default_font_dirs() -> list[Path]:
    """The usual system and user font folders of Linux, macOS and Windows."""
    home = Path.home()
    windows = Path(os.environ.get("WINDIR", "C:/Windows")) / "Fonts"
    return [
        Path("/usr/share/fonts"),
        Path("/usr/local/share/fonts"),
        home / ".fonts",
        home / ".local/share/fonts",
        Path("/System/Library/Fonts"),
        Path("/Library/Fonts"),
        home / "Library/Fonts",
        windows,
    ]


def _regular_first(paths: Iterable[Path]) -> list[Path]:
    """Regular weights before bold, light, etc. (a stable sort: otherwise in the given order)."""
    return sorted(paths, key=lambda p: any(w in p.name.lower() for w in _OTHER_WEIGHTS))


def _files_by_name(dirs: Iterable[Path]) -> list[Path]:
    found = []
    for folder in dirs:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            name = path.name.lower()
            if name.endswith(_FONT_SUFFIXES) and any(hint in name for hint in FONT_FILE_HINTS):
                found.append(path)
    return _regular_first(found)


def package_cjk_files() -> list[Path]:
    """The font file of the optional ``noto-cjk-sans-otc`` package, when it is installed."""
    if importlib.util.find_spec(_PACKAGE_MODULE) is None:
        return []
    module = importlib.import_module(_PACKAGE_MODULE)
    return [Path(str(module.FONT_PATH))]


def find_cjk_font(
    size: int, dirs: Sequence[Path] | None = None, use_fontconfig: bool = True, use_package: bool = True
) -> ImageFont.FreeTypeFont | None:
    """The first CJK-capable font: fontconfig's, then one found by name in ``dirs``
    (default: :func:`default_font_dirs`), then the pip package's; None when there is none."""
    sources = [
        fontconfig_cjk_files if use_fontconfig else list,
        functools.partial(_files_by_name, default_font_dirs() if dirs is None else dirs),
        package_cjk_files if use_package else list,
    ]
    tried: set[Path] = set()
    for source in sources:  # each looked up only when the ones before it found nothing
        for path in source():
            if path not in tried:
                tried.add(path)
                font = open_cjk_font(path, size)
                if font is not None:
                    return font
    return None


@functools.cache
def preview_font(size: int = 15) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A CJK-capable font of ``size`` pixels (:func:`find_cjk_font`), else Pillow's built-in font after
    a warning (once per process). Cached per size."""
    font = find_cjk_font(size)
    if font is not None:
        return font
    _warn_no_cjk_font()
    return ImageFont.load_default(size)


@functools.cache
def _warn_no_cjk_font() -> None:
    warnings.warn(
        "no font with CJK glyphs found: Chinese/Japanese/Korean text in previews is drawn as boxes. "
        f"Install one: pip install {CJK_FONT_PACKAGE} (or 'xtuner-vl[preview]'), or a system CJK font "
        "such as fonts-noto-cjk",
        stacklevel=3,
    )
