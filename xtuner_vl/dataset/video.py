"""Video frames for InternVL: the official frame sampling, decoded with PyAV, one tile per frame.

The official code (``internvl_chat/internvl/train/dataset.py``: ``get_frame_indices``,
``read_frames_decord``, ``read_frames_folder``) picks ``randint(min, max)`` frames (in training and in
evaluation alike), splits the video into that many equal segments and takes one frame per segment: a
random one ('rand', training) or the middle one ('middle', evaluation). Quirks kept on purpose, since
they define which frames a model was trained on:

- 'rand' draws from ``range(start, end - 1)`` of each segment ``[start, end)``: never its last frame;
  and when any segment has a single frame, it instead takes a sorted random subset of all frames;
- a video file with fewer frames than requested is padded by repeating its last frame; a folder of
  frames is not (all its frames are returned);
- folder frames are ordered by the number in ``*_<n>.jpg``; files without it come first.
  The official leaves ties in ``os.listdir`` order; we break them by natural name order.

Each frame later becomes one tile: ``Resize((s, s), BICUBIC) -> ToTensor -> Normalize``, no tiling
(:func:`frames_to_tiles`). Decoding uses PyAV (the official uses decord); both convert with FFmpeg, but
pixel values of decoded frames may differ slightly between the two.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xtuner_vl.dataset.image import DEFAULT_MAX_PIXELS, ImageError, load_image, tiles_to_tensor

__all__ = [
    "VideoError",
    "frames_to_tiles",
    "list_frame_files",
    "load_video_frames",
    "sample_frame_indices",
]

_OFFICIAL_FRAME_NUMBER = re.compile(r"_(\d+).jpg$")  # the official pattern, unescaped dot included
_DIGITS = re.compile(r"(\d+)")


class VideoError(ImageError):
    """A video (file or frame folder) that cannot be used. Names the path."""


def sample_frame_indices(
    num_frames: int, vlen: int, sample: str = "rand", rng: random.Random | None = None
) -> list[int]:
    """The official ``get_frame_indices`` for 'rand' and 'middle' sampling.

    The ``vlen`` frames are split into ``k = min(num_frames, vlen)`` segments at
    ``int(linspace(0, vlen, k + 1))``; segment ``[a, b)`` gives ``(a + b - 1) // 2`` ('middle') or
    ``rng.choice(range(a, b - 1))`` ('rand'; if any segment has fewer than 2 frames, 'rand' instead takes
    ``sorted(rng.sample(range(vlen), k))``). The result is padded to ``num_frames`` with its last index.

    Args:
        num_frames: number of indices wanted (>= 1).
        vlen: number of frames in the video (>= 1).
        sample: 'rand' or 'middle'.
        rng: random source for 'rand' (a fresh unseeded one when None).

    Returns:
        ``num_frames`` frame indices in increasing order.
    """
    if sample not in ("rand", "middle"):
        raise ValueError(f"sample must be 'rand' or 'middle', got {sample!r}")
    if num_frames < 1 or vlen < 1:
        raise ValueError(f"need num_frames >= 1 and vlen >= 1, got num_frames={num_frames}, vlen={vlen}")
    k = min(num_frames, vlen)
    bounds = np.linspace(start=0, stop=vlen, num=k + 1).astype(int).tolist()
    segments = list(zip(bounds[:-1], bounds[1:], strict=True))
    if sample == "middle":
        indices = [(a + b - 1) // 2 for a, b in segments]
    else:
        rng = rng if rng is not None else random.Random()
        if all(b - a >= 2 for a, b in segments):
            indices = [rng.choice(range(a, b - 1)) for a, b in segments]
        else:  # the official falls back when random.choice meets an empty range
            indices = sorted(rng.sample(range(vlen), k))
    return indices + [indices[-1]] * (num_frames - len(indices))


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in _DIGITS.split(name)]


def list_frame_files(folder: str | os.PathLike) -> list[Path]:
    """Frame images of a folder in the official order (see module docstring); hidden files skipped."""
    folder = Path(folder)
    names = [e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")]

    def key(name: str) -> tuple:
        match = _OFFICIAL_FRAME_NUMBER.search(name)
        return (int(match.group(1)) if match else -1, _natural_key(name))

    return [folder / name for name in sorted(names, key=key)]


def _frame_count(num_frames: int | None, min_frames: int, max_frames: int, rng: random.Random) -> int:
    if num_frames is not None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        return num_frames
    if not 1 <= min_frames <= max_frames:
        raise ValueError(f"need 1 <= min_frames <= max_frames, got {min_frames}, {max_frames}")
    return rng.randint(min_frames, max_frames)


def _read_folder(folder: Path, count: int, sample: str, rng: random.Random, max_pixels: int | None) -> list:
    files = list_frame_files(folder)
    if not files:
        raise VideoError(f"{folder}: frame folder has no files")
    if len(files) > count:  # the official keeps every frame of a short folder, without padding
        files = [files[i] for i in sample_frame_indices(count, len(files), sample, rng)]
    return [load_image(f, max_pixels) for f in files]


def _read_video_file(path: Path, count: int, sample: str, rng: random.Random, max_pixels: int | None) -> list:
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading video files needs PyAV: pip install av") from e
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            # Count frames by demuxing (no decoding), like decord's frame index.
            vlen = sum(1 for p in container.demux(video=0) if p.size > 0)
        if vlen == 0:
            raise VideoError(f"{path}: video has no frames")
        indices = sample_frame_indices(count, vlen, sample, rng)
        wanted = set(indices)
        decoded: dict[int, Image.Image] = {}
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if max_pixels is not None and width * height > max_pixels:
                raise VideoError(f"{path}: frames of {width}x{height} are over the limit of {max_pixels} pixels")
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    decoded[i] = frame.to_image()
                if i >= indices[-1]:
                    break
    except (ImageError, MemoryError):
        raise
    except Exception as e:  # av.FFmpegError (InvalidDataError, ...), OSError, ...
        raise VideoError(f"{path}: cannot read video: {type(e).__name__}: {e}") from e
    missing = sorted(wanted - decoded.keys())
    if missing:
        raise VideoError(f"{path}: {vlen} frames by packet count but frame {missing[0]} could not be decoded")
    return [decoded[i] for i in indices]


def load_video_frames(
    path: str | os.PathLike,
    num_frames: int | None = None,
    min_frames: int = 8,
    max_frames: int = 32,
    sample: str = "rand",
    rng: random.Random | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> list[Image.Image]:
    """Sample RGB frames from a video file (any format FFmpeg reads) or a folder of frame images.

    Args:
        path: a video file (mp4, webm, ...) or a folder of frames.
        num_frames: frames to take; None draws ``rng.randint(min_frames, max_frames)`` as the official.
        min_frames: fewest frames when drawing the count.
        max_frames: most frames when drawing the count.
        sample: 'rand' (training) or 'middle' (evaluation); see :func:`sample_frame_indices`.
        rng: random source; it draws the count first, then the 'rand' picks. A fresh unseeded
            ``random.Random()`` when None.
        max_pixels: refuse frames with more pixels.

    Returns:
        The frames in time order: ``num_frames`` (or the drawn count) of them for a video file, padded
        with its last frame if the video is shorter; at most that many for a folder.

    Raises:
        VideoError: missing, empty, unreadable or too large (also an :class:`ImageError`).
    """
    if sample not in ("rand", "middle"):
        raise ValueError(f"sample must be 'rand' or 'middle', got {sample!r}")
    rng = rng if rng is not None else random.Random()
    path = Path(path)
    count = _frame_count(num_frames, min_frames, max_frames, rng)
    if path.is_dir():
        return _read_folder(path, count, sample, rng, max_pixels)
    if not path.is_file():
        raise VideoError(f"{path}: video file or frame folder not found")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: video file is empty (0 bytes)")
    return _read_video_file(path, count, sample, rng, max_pixels)


def frames_to_tiles(frames: Sequence[Image.Image], image_size: int = 448) -> torch.Tensor:
    """One tile per frame, as the official video path: ``build_transform(is_train=False)`` on each frame.

    Returns:
        float32 tensor [len(frames), 3, image_size, image_size].
    """
    return tiles_to_tensor(frames, image_size)
