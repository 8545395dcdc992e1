"""The dataset around templates and tiling: sources, exact repeats, samples, bad input, collate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from xtuner_vl.dataset import (
    AnnotationError,
    AnnotationFile,
    InternVLDataset,
    SampleError,
    SkippedSample,
    collate_samples,
    repeat_indices,
)
from xtuner_vl.model import load_tokenizer
from xtuner_vl.structures import IGNORE_INDEX, Sample
from xtuner_vl.tiny.data import make_synthetic_dataset


@pytest.mark.parametrize(("repeat", "full", "extra"), [(3.5, 3, 5), (0.5, 0, 5), (1.0, 1, 0), (0.0, 0, 0), (2.3, 2, 3)])
def test_fractional_repeats_are_exact(repeat, full, extra):
    idx = repeat_indices(10, repeat, seed=7)
    counts = np.bincount(idx, minlength=10)
    assert len(idx) == 10 * full + extra
    assert (counts >= full).all() and (counts <= full + 1).all()
    assert np.array_equal(idx, repeat_indices(10, repeat, seed=7))  # seeded
    if extra:
        tails = {tuple(repeat_indices(10, repeat, seed=s)[10 * full :]) for s in range(6)}
        assert len(tails) > 1  # the fractional part really is a random subset


def test_annotation_index_json_and_jsonl(tmp_path):
    (tmp_path / "a.json").write_text('[\n  {"id": 1},\n  {"id": "é",\n   "x": 2}\n]', encoding="utf-8")
    a = AnnotationFile.scan(tmp_path / "a.json")
    assert len(a) == 2 and a.line_of(1) == 3 and a.record(1) == {"id": "é", "x": 2}
    (tmp_path / "b.jsonl").write_text('{"id": 1}\n\n{"id": 2}\n{bad\n[1]\n', encoding="utf-8")
    b = AnnotationFile.scan(tmp_path / "b.jsonl")
    assert len(b) == 4 and b.record(1) == {"id": 2}
    with pytest.raises(AnnotationError, match=r"b\.jsonl:4: invalid JSON"):
        b.record(2)
    with pytest.raises(AnnotationError, match=r"b\.jsonl:5: a sample must be a JSON object"):
        b.record(3)
    (tmp_path / "c.json").write_bytes(b'[\n{"id": 1},\n{"id": "\xff"}]')
    with pytest.raises(AnnotationError, match=r"c\.json:3: not UTF-8"):
        AnnotationFile.scan(tmp_path / "c.json")
    (tmp_path / "d.json").write_text('{"id": 1}')
    with pytest.raises(AnnotationError, match="must hold a list"):
        AnnotationFile.scan(tmp_path / "d.json")
    (tmp_path / "e.json").write_text('[{"id": 1}\n {"id": 2}]')
    with pytest.raises(AnnotationError, match=r"e\.json:2: invalid JSON"):
        AnnotationFile.scan(tmp_path / "e.json")


@pytest.fixture(scope="module")
def setup(tiny_ckpt, tmp_path_factory):
    model = tiny_ckpt("internvl2-2b")
    data, images = make_synthetic_dataset(tmp_path_factory.mktemp("ds"), num_samples=30, seed=3)
    return model, load_tokenizer(model), data, images


def _dataset(setup, **kw):
    model, tok, data, images = setup
    return InternVLDataset(
        data_paths=kw.pop("data_paths", [str(data)]),
        tokenizer=tok,
        image_folders=kw.pop("image_folders", [str(images)]),
        model_path=model,
        **kw,
    )


def test_samples_single_multi_and_text_only(setup):
    ds = _dataset(setup, max_dynamic_patch=6)
    assert ds.template.name == "internlm2-chat"  # from the checkpoint's config.json
    kinds = set()
    for i in range(len(ds)):
        s = ds[i]
        assert isinstance(s, Sample), s
        rec = ds.sources[0].annotations.record(i)
        n_ctx = int((s.input_ids == ds.img_context_token_id).sum())
        images = rec.get("image")
        if images is None:
            kinds.add("text")
            assert s.image_flags.tolist() == [0] and n_ctx == 0 and s.pixel_values.shape == (1, 3, 448, 448)
        else:
            n_img = 1 if isinstance(images, str) else len(images)
            kinds.add("single" if n_img == 1 else "multi")
            assert n_ctx == len(s.pixel_values) * 256 and s.image_flags.all()
            budget = max(1, 6 // n_img)
            assert len(s.pixel_values) <= n_img * (budget + (1 if budget > 1 else 0))
        assert (s.labels != IGNORE_INDEX).any()
        assert (s.labels[s.input_ids == ds.img_context_token_id] == IGNORE_INDEX).all()
    assert kinds == {"text", "single", "multi"}


def test_over_length_reduces_tiles_never_cuts_image_tokens(setup, tmp_path):
    model, tok, _, _ = setup
    Image.new("RGB", (2688, 448), (10, 200, 30)).save(tmp_path / "wide.png")
    rec = {
        "image": "wide.png",
        "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "green"}],
    }
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    kw = dict(data_paths=[str(tmp_path / "d.jsonl")], image_folders=[str(tmp_path)], max_dynamic_patch=6)
    full = _dataset(setup, **kw)[0]
    assert len(full.pixel_values) == 7  # aspect 6: a 6x1 grid + thumbnail
    text_tokens = full.num_tokens - 7 * 256
    reduced = _dataset(setup, max_length=text_tokens + 4 * 256, **kw)[0]
    assert isinstance(reduced, Sample) and len(reduced.pixel_values) == 4  # 3x1 grid + thumbnail fits exactly
    assert int((reduced.input_ids == _dataset(setup, **kw).img_context_token_id).sum()) == 4 * 256
    skipped = _dataset(setup, max_length=text_tokens + 255, **kw)[0]
    assert isinstance(skipped, SkippedSample) and "over max_length" in skipped.reason and skipped.line == 1


BAD = {
    "no_conv": ({"image": "ok.png"}, "'conversations' is missing"),
    "empty_conv": ({"conversations": []}, "'conversations' is missing, empty"),
    "role": ({"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]}, "robot"),
    "missing_img": (
        {
            "image": "nope.png",
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
        },
        "nope.png",
    ),
    "zero_byte": (
        {"image": "empty.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        "empty.png",
    ),
    "escape": (
        {"image": "../outside.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        "escapes",
    ),
    "count": (
        {
            "image": ["ok.png", "ok.png"],
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
        },
        "image",
    ),
    "literal": (
        {"conversations": [{"from": "human", "value": "hi <IMG_CONTEXT>"}, {"from": "gpt", "value": "a"}]},
        "IMG_CONTEXT",
    ),
}


def test_bad_records_are_skipped_with_file_line_and_strict_raises(setup, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "ok.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "outside.png")
    (folder / "empty.png").write_bytes(b"")
    lines = [json.dumps(rec) for rec, _ in BAD.values()]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    ds = _dataset(setup, data_paths=[str(tmp_path / "bad.jsonl")], image_folders=[str(folder)])
    for i, (name, (_, needle)) in enumerate(BAD.items()):
        out = ds[i]
        assert isinstance(out, SkippedSample), name
        assert out.line == i + 1 and out.source.endswith("bad.jsonl")
        assert needle in out.reason, (name, out.reason)
    strict = _dataset(setup, data_paths=[str(tmp_path / "bad.jsonl")], image_folders=[str(folder)], strict=True)
    with pytest.raises((SampleError, ValueError), match=r"bad\.jsonl:1"):
        strict[0]
    allowed = _dataset(
        setup, data_paths=[str(tmp_path / "bad.jsonl")], image_folders=[str(folder)], allow_path_escape=True
    )
    assert isinstance(allowed[5], Sample)


def test_multi_source_repeats_and_per_source_budget(setup, tmp_path):
    model, tok, data, images = setup
    ds = InternVLDataset(
        data_paths=[str(data), str(data)],
        tokenizer=tok,
        image_folders=[str(images)] * 2,
        repeat_times=[2.5, 0.5],
        source_max_dynamic_patch=[None, 1],
        model_path=model,
    )
    assert len(ds) == 30 * 2 + 15 + 15
    assert (ds.source_of == 0).sum() == 75
    last = ds[len(ds) - 1]
    assert isinstance(last, Sample) and len(last.pixel_values) <= 3  # budget 1 per image (multi: up to 3 images)


def test_collate_pads_right_and_concatenates_tiles(setup):
    ds = _dataset(setup)
    items = [ds[0], ds[1], SkippedSample("x.jsonl", 3, "bad"), ds[2]]
    cb = collate_samples(items, pad_token_id=0)
    b = cb.batch
    assert cb.num_samples == 3 and [s.line for s in cb.skipped] == [3]
    lengths = [s.num_tokens for s in (ds[0], ds[1], ds[2])]
    assert b.input_ids.shape == (3, max(lengths)) and b.attention_mask.sum(1).tolist() == lengths
    for row, n in enumerate(lengths):
        assert (b.labels[row, n:] == IGNORE_INDEX).all() and (b.input_ids[row, n:] == 0).all()
    assert len(b.pixel_values) == len(b.image_flags) == sum(len(ds[i].pixel_values) for i in range(3))
    assert collate_samples([SkippedSample("x", 1, "r")]).batch is None


def test_length_stats_use_field_estimate_and_cache(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("XTUNER_VL_CACHE", str(tmp_path / "cache"))
    model, tok, data, images = setup
    recs = [json.loads(x) for x in data.read_text().splitlines()]
    recs[0]["length"] = 12345
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ds = _dataset(setup, data_paths=[str(tmp_path / "d.jsonl")])
    lengths, modal = ds.length_stats()
    assert lengths[0] == 12345
    assert modal.tolist() == [bool(r.get("image")) for r in recs]
    sized = [i for i in range(1, len(ds)) if "width" in recs[i] or not recs[i].get("image")]
    ratio = np.asarray([lengths[i] for i in sized]) / np.asarray([ds[i].num_tokens for i in sized])
    assert len(sized) > 10 and (ratio > 0.5).all() and (ratio < 2.0).all()  # exact tile grid from width/height
    assert len(list((tmp_path / "cache" / "lengths").glob("*.npz"))) == 1
    import xtuner_vl.dataset.lengths as L

    monkeypatch.setattr(L, "_estimate_chunk", lambda *_: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = _dataset(setup, data_paths=[str(tmp_path / "d.jsonl")]).length_stats()
    assert np.array_equal(again[0], lengths)


def test_pixel_values_are_float_tiles(setup):
    s = _dataset(setup)[1]
    assert s.pixel_values.dtype == torch.float32 and s.pixel_values.shape[1:] == (3, 448, 448)


def _built_without_pixels_as_with_them(ds: InternVLDataset) -> list[Sample]:
    """Each record built with ``pixels=False`` (check-data) has the full build's ids, labels, tile count, flags
    and tile reduction, and no pixels; returns the full builds."""
    full_builds = []
    for i in range(len(ds)):
        source, record = ds.locate(i)
        full, bare = (ds.build_record(source, record, i, pixels=p) for p in (True, False))
        assert torch.equal(full.input_ids, bare.input_ids) and torch.equal(full.labels, bare.labels)
        assert torch.equal(full.image_flags, bare.image_flags) and full.tiles_reduced == bare.tiles_reduced
        assert full.pixel_values.shape[1:] == (3, 448, 448)
        assert bare.pixel_values.shape == (len(full.image_flags), 3, 0, 0)
        full_builds.append(full)
    return full_builds


def test_check_data_builds_every_record_as_training_does_but_its_pixels(setup):
    samples = _built_without_pixels_as_with_them(_dataset(setup, max_dynamic_patch=6, max_length=1300))
    assert any(not s.image_flags.any() for s in samples)  # text-only
    assert any(s.tiles_reduced for s in samples) and any(len(s.image_flags) > 2 for s in samples)


def test_video_sample_one_tile_per_frame(setup, tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), k * 10, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    rec = {
        "video": "clip.mp4",
        "conversations": [
            {"from": "human", "value": "<video>\nWhat happens?"},
            {"from": "gpt", "value": "It brightens."},
        ],
    }
    (tmp_path / "v.jsonl").write_text(json.dumps(rec) + "\n")
    ds = _dataset(
        setup,
        data_paths=[str(tmp_path / "v.jsonl")],
        image_folders=[str(tmp_path)],
        min_num_frames=4,
        max_num_frames=6,
        training=False,
    )
    s = ds[0]
    assert isinstance(s, Sample), s
    n = len(s.pixel_values)
    assert 4 <= n <= 6 and s.image_flags.tolist() == [1] * n
    assert len(_built_without_pixels_as_with_them(ds)[0].image_flags) == n
    assert int((s.input_ids == ds.img_context_token_id).sum()) == 256 * n
    text = ds.tokenizer.decode(s.input_ids[s.input_ids != ds.img_context_token_id])
    import re

    assert re.findall(r"Frame-(\d+):\s*<img>\s*</img>", text) == [str(i + 1) for i in range(n)], text


def test_estimate_record_counts_image_tags_and_grid():
    from xtuner_vl.dataset.lengths import estimate_record

    settings = {
        "base_tokens": 45,
        "num_image_token": 256,
        "max_dynamic_patch": 6,
        "min_dynamic_patch": 1,
        "use_thumbnail": True,
        "image_size": 448,
        "max_num_frames": 32,
    }
    turns = [{"from": "human", "value": "<image>\n" + "q" * 12}, {"from": "gpt", "value": "a" * 20}]  # 40 bytes
    # 896x448: grid 2x1 + thumbnail = 3 tiles of 256 tokens, plus <img> and </img>.
    sized = {"image": "x.jpg", "width": 896, "height": 448, "conversations": turns}
    assert estimate_record(sized, settings) == (45 + 40 // 4 + 3 * 256 + 2, True)
    # Two images without sizes: each gets max(1, 6 // 2) = 3 tiles + thumbnail, and its own tags.
    two = {"image": ["a.jpg", "b.jpg"], "conversations": turns}
    assert estimate_record(two, settings) == (45 + 10 + 2 * (4 * 256 + 2), True)
    assert estimate_record({"conversations": turns}, settings) == (55, False)
