"""Video frame sampling (official get_frame_indices rule) on a real mp4 / webm and on frame folders."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms import InterpolationMode

from xtuner_vl.dataset.image import ImageError
from xtuner_vl.dataset.video import (
    VideoError,
    frames_to_tiles,
    list_frame_files,
    load_video_frames,
    sample_frame_indices,
)

av = pytest.importorskip("av")

NUM = 40  # frames in the test videos
STEP = 6  # frame i is grey level i * STEP


def _grey(i: int) -> np.ndarray:
    return np.full((48, 64, 3), i * STEP, dtype=np.uint8)


def _index_of(frame: Image.Image) -> int:
    return round(float(np.asarray(frame).mean()) / STEP)


def _write_video(path: Path, codec: str, options: dict) -> Path:
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=10, options=options)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(NUM):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_grey(i), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def mp4(tmp_path_factory) -> Path:
    return _write_video(tmp_path_factory.mktemp("video") / "clip.mp4", "libx264", {"crf": "0", "bf": "2"})


@pytest.fixture(scope="module")
def frame_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("frames")
    for i in range(NUM):  # not zero-padded: name order differs from number order
        Image.fromarray(_grey(i)).save(folder / f"frame_{i}.jpg", quality=100)
    (folder / ".DS_Store").write_bytes(b"junk")
    return folder


# Hand-derived: segments at int(linspace(0, 40, k + 1)); middle of [a, b) is (a + b - 1) // 2.
MIDDLE_8 = [2, 7, 12, 17, 22, 27, 32, 37]  # bounds 0, 5, 10, ..., 40
MIDDLE_7 = [2, 7, 13, 19, 24, 30, 36]  # bounds 0, 5, 11, 17, 22, 28, 34, 40


def test_middle_indices():
    assert sample_frame_indices(8, NUM, "middle") == MIDDLE_8
    assert sample_frame_indices(7, NUM, "middle") == MIDDLE_7
    assert sample_frame_indices(3, 3, "middle") == [0, 1, 2]
    assert sample_frame_indices(5, 2, "middle") == [0, 1, 1, 1, 1]  # padded with the last frame


def test_segment_bounds_use_float_linspace():
    # 30 frames in 22 segments: bound 11 is 11 * (30 / 22) = 14.999999999999998 in float, so int() gives 14,
    # not the exact 15; segments [13, 14) and [14, 16) have middles 13 and 14 (exact bounds: 13 and 15).
    got = sample_frame_indices(22, 30, "middle")
    assert got[10:13] == [13, 14, 16]


def _segments(k: int, vlen: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, vlen, k + 1).astype(int).tolist()  # the official formula
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def test_rand_indices_follow_official_rule():
    seen = set()
    for seed in range(200):
        got = sample_frame_indices(8, NUM, "rand", random.Random(seed))
        for index, (a, b) in zip(got, _segments(8, NUM), strict=True):
            assert a <= index <= b - 2  # official: random.choice(range(a, b - 1)), never the last frame
        seen.update(got)
        rng = random.Random(seed)
        assert got == [rng.choice(range(a, b - 1)) for a, b in _segments(8, NUM)]
    assert {4, 9, 14}.isdisjoint(seen) and {0, 3, 5, 8} <= seen


def test_rand_falls_back_when_a_segment_has_one_frame():
    # 40 frames in 32 segments: some segments hold one frame -> sorted distinct random frames.
    got = sample_frame_indices(32, NUM, "rand", random.Random(3))
    assert got == sorted(random.Random(3).sample(range(NUM), 32))
    assert len(set(got)) == 32


def test_video_file_middle(mp4):
    frames = load_video_frames(mp4, num_frames=8, sample="middle")
    assert [_index_of(f) for f in frames] == MIDDLE_8
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in frames)


def test_video_file_seeded_rand(mp4):
    frames = load_video_frames(mp4, min_frames=4, max_frames=10, sample="rand", rng=random.Random(7))
    rng = random.Random(7)
    count = rng.randint(4, 10)  # the count is drawn first, then one pick per segment
    expected = [rng.choice(range(a, b - 1)) for a, b in _segments(count, NUM)]
    assert [_index_of(f) for f in frames] == expected


def test_video_file_is_padded_folder_is_not(mp4, frame_folder):
    frames = load_video_frames(mp4, num_frames=45, sample="middle")
    assert [_index_of(f) for f in frames] == list(range(NUM)) + [NUM - 1] * 5
    frames = load_video_frames(frame_folder, num_frames=45, sample="middle")
    assert [_index_of(f) for f in frames] == list(range(NUM))


def test_frame_folder_order_and_sampling(frame_folder):
    names = [p.name for p in list_frame_files(frame_folder)]
    assert names == [f"frame_{i}.jpg" for i in range(NUM)]
    frames = load_video_frames(frame_folder, num_frames=7, sample="middle")
    assert [_index_of(f) for f in frames] == MIDDLE_7


def test_frame_count_bounds(frame_folder):
    counts = {len(load_video_frames(frame_folder, min_frames=3, max_frames=5, rng=random.Random(s))) for s in range(30)}
    assert counts == {3, 4, 5}
    with pytest.raises(ValueError):
        load_video_frames(frame_folder, min_frames=6, max_frames=5)
    with pytest.raises(ValueError):
        load_video_frames(frame_folder, num_frames=4, sample="uniform")


def test_webm(tmp_path):
    webm = _write_video(tmp_path / "clip.webm", "libvpx", {"crf": "4", "b:v": "1M"})
    frames = load_video_frames(webm, num_frames=8, sample="middle")
    assert [_index_of(f) for f in frames] == MIDDLE_8


def test_unreadable_videos_raise_naming_the_file(tmp_path, mp4):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(VideoError, match="missing.mp4"):
        load_video_frames(missing, num_frames=4)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="empty.mp4"):
        load_video_frames(empty, num_frames=4)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x01not a video" * 100)
    with pytest.raises(ImageError, match="corrupt.mp4"):  # VideoError is an ImageError
        load_video_frames(corrupt, num_frames=4)
    with pytest.raises(VideoError, match="over the limit"):
        load_video_frames(mp4, num_frames=4, max_pixels=100)
    (tmp_path / "no_frames").mkdir()
    with pytest.raises(VideoError, match="no_frames"):
        load_video_frames(tmp_path / "no_frames", num_frames=4)


def test_frames_to_tiles_matches_per_frame_transform(mp4):
    frames = load_video_frames(mp4, num_frames=3, sample="middle")
    transform = T.Compose(
        [
            T.Resize((448, 448), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ]
    )
    tiles = frames_to_tiles(frames)
    assert tiles.shape == (3, 3, 448, 448)
    assert torch.equal(tiles, torch.stack([transform(f) for f in frames]))
