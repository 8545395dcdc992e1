"""preview-data: the CJK font search, the coloured prompt, the tiles in their grids."""

from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

from xtuner_vl.dataset.image import find_closest_grid, tile_count
from xtuner_vl.engine.deepspeed_config import CONFIG_ROOT
from xtuner_vl.model import load_tokenizer
from xtuner_vl.recipes import fonts
from xtuner_vl.recipes.config import load_config
from xtuner_vl.recipes.preview_data import (
    ImageTiles,
    PromptSpan,
    grid_of,
    image_tiles,
    marked_prompt,
    preview_data,
    prompt_spans,
    tiles_per_image,
)
from xtuner_vl.recipes.preview_render import STYLES, layout_text, render_preview
from xtuner_vl.registry import DATASETS
from xtuner_vl.structures import IGNORE_INDEX, IMG_CONTEXT_TOKEN, Sample
from xtuner_vl.tiny.data import make_synthetic_dataset

CONFIG = CONFIG_ROOT / "tiny" / "tiny_internvl2_lora.py"


@pytest.fixture()
def fresh_font_cache():
    """Font lookups and the fallback warning are cached per process: start and end each test without them."""
    fonts.preview_font.cache_clear()
    fonts._warn_no_cjk_font.cache_clear()
    yield
    fonts.preview_font.cache_clear()
    fonts._warn_no_cjk_font.cache_clear()


def _package_font() -> str:
    files = fonts.package_cjk_files()
    assert files, f"the CJK font package is missing: pip install {fonts.CJK_FONT_PACKAGE} (extra 'preview')"
    return str(files[0])


# -- fonts ----------------------------------------------------------------------------------------


def test_glyph_check_tells_real_cjk_glyphs_from_the_missing_glyph_box():
    assert not fonts.renders_cjk(ImageFont.load_default(15))  # Latin only: 中 and 文 are the same box
    font = ImageFont.truetype(_package_font(), 15, index=2)
    assert fonts.renders_cjk(font)
    assert bytes(font.getmask("中")) != bytes(font.getmask("文"))


def test_font_found_by_name_in_a_font_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "NotoSansCJK-Broken.ttc").write_bytes(b"not a font at all")  # matched by name, unreadable
    (tmp_path / "DejaVu-like.ttf").symlink_to(_package_font())  # a CJK font, but not a CJK font name
    assert fonts.find_cjk_font(15, dirs=[tmp_path], use_fontconfig=False, use_package=False) is None
    (tmp_path / "sub" / "wqy-microhei.ttc").symlink_to(_package_font())
    font = fonts.find_cjk_font(15, dirs=[tmp_path], use_fontconfig=False, use_package=False)
    assert font is not None and fonts.renders_cjk(font)
    assert font.getname()[0] == "Noto Sans Mono CJK SC"  # the collection's preferred face


def test_system_fonts_come_before_the_package(monkeypatch, tmp_path):
    broken = tmp_path / "broken.ttf"
    broken.write_bytes(b"\0" * 64)
    monkeypatch.setattr(fonts, "fontconfig_cjk_files", lambda: [broken])
    font = fonts.find_cjk_font(15, dirs=[])
    assert font is not None and fonts.renders_cjk(font)  # the unreadable system file is passed over

    def package_not_consulted():
        raise AssertionError("the package was searched although a system font was found")

    system = fonts.package_cjk_files()[0]
    monkeypatch.setattr(fonts, "fontconfig_cjk_files", lambda: [system])
    monkeypatch.setattr(fonts, "package_cjk_files", package_not_consulted)
    assert fonts.find_cjk_font(15, dirs=[]) is not None


def test_fallback_is_pillows_font_with_one_warning(monkeypatch, fresh_font_cache):
    monkeypatch.setattr(fonts, "find_cjk_font", lambda size: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small, large = fonts.preview_font(12), fonts.preview_font(15)
    assert len(caught) == 1 and fonts.CJK_FONT_PACKAGE in str(caught[0].message)
    assert not fonts.renders_cjk(small) and not fonts.renders_cjk(large)
    assert large.getbbox("A")[3] > small.getbbox("A")[3]


def test_preview_draws_distinct_cjk_characters(fresh_font_cache):
    assert fonts.renders_cjk(fonts.preview_font(15))
    zhong, wen = (np.asarray(render_preview("h", [], [], [PromptSpan(c * 3, False)])) for c in "中文")
    assert zhong.shape == wen.shape and not np.array_equal(zhong, wen)


# -- prompt spans and text layout -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_ckpt):
    return load_tokenizer(tiny_ckpt("internvl2-2b"))


def _sample(tokenizer, parts):
    """A sample from (text or image-token count, trained) parts."""
    ctx = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    ids, labels = [], []
    for part, trained in parts:
        new = [ctx] * part if isinstance(part, int) else tokenizer.encode(part, add_special_tokens=False)
        ids += new
        labels += new if trained else [IGNORE_INDEX] * len(new)
    ids_t = torch.tensor(ids)
    return Sample(ids_t, torch.tensor(labels), torch.zeros(1, 3, 4, 4), torch.ones(1, dtype=torch.long))


def test_prompt_spans_mark_trained_text_and_image_runs(tokenizer):
    sample = _sample(tokenizer, [("Look:", False), (512, False), ("你好 there", False), ("Answer 答案", True)])
    spans = prompt_spans(sample, tokenizer)
    assert [(s.trained, s.image_tokens) for s in spans] == [(False, 0), (False, 512), (False, 0), (True, 0)]
    assert spans[1].text == "<IMG_CONTEXT>x512" and spans[1].style == "image"
    assert "答案" in spans[3].text and spans[3].style == "trained" and spans[0].style == "prompt"
    text = marked_prompt(sample, tokenizer)
    assert text.count("[[") == 1 and text.endswith("]]") and "<IMG_CONTEXT>x512" in text and "你好" in text
    assert tiles_per_image(spans, 256) == [2]
    with pytest.raises(ValueError, match="not a multiple of 300"):
        tiles_per_image(spans, 300)


def test_text_wraps_by_pixel_width_cjk_anywhere_latin_at_spaces(fresh_font_cache):
    font = fonts.preview_font(15)
    runs, height = layout_text([PromptSpan("中文没有空格" * 20, False)], font, 200)
    lines = sorted({r.y for r in runs})
    assert len(lines) > 3 and height >= lines[-1] + 15
    assert all(r.x + r.width <= 200 + 1e-6 for r in runs)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    runs, _ = layout_text([PromptSpan(" ".join(words), False), PromptSpan(" lambda mu", True)], font, 120)
    assert all(r.x + r.width <= 120 + 1e-6 for r in runs)
    drawn = [w for r in runs for w in r.text.split()]
    assert drawn == [*words, "lambda", "mu"]  # no word was cut
    assert {r.style for r in runs} == {"prompt", "trained"}
    image, _ = layout_text([PromptSpan("<IMG_CONTEXT>x4096", False, 4096)], font, 60)
    assert [r.text for r in image] == ["<IMG_CONTEXT>x4096"]  # never broken


def _count_colour(img: Image.Image, colour) -> int:
    return int((np.asarray(img) == np.array(colour, dtype=np.uint8)).all(axis=-1).sum())


def test_trained_and_image_spans_are_coloured(fresh_font_cache):
    trained, image = STYLES["trained"][1], STYLES["image"][1]
    plain = render_preview("header", [], [], [PromptSpan("question answer", False)])
    spans = [PromptSpan("question ", False), PromptSpan("<IMG_CONTEXT>x256", False, 256), PromptSpan("answer", True)]
    coloured = render_preview("header", [], [], spans)
    # The legend shows each colour once in both; only the coloured prompt adds more.
    assert _count_colour(coloured, trained) > _count_colour(plain, trained) > 0
    assert _count_colour(coloured, image) > _count_colour(plain, image) > 0


# -- tiling grids ---------------------------------------------------------------------------------


def test_grid_recovered_from_tile_count_whatever_the_budget():
    rng = random.Random(0)
    for _ in range(2000):
        w, h, budget = rng.randint(16, 4000), rng.randint(16, 4000), rng.randint(1, 40)
        n = tile_count(w, h, 1, budget, 448, True)
        cols, rows, thumb = grid_of(w, h, n, 1, 448, True)
        assert (cols, rows) == find_closest_grid(w, h, 1, budget, 448) and thumb == (cols * rows > 1)
    assert grid_of(1000, 500, 2, 1, 448, False) == (2, 1, False)
    with pytest.raises(ValueError, match="2 tiles"):
        grid_of(1000, 500, 2, 1, 448, True)


def _solid_tiles(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (448, 448), (10 + 20 * k, 240 - 20 * k, 77)) for k in range(n)]


def _centre(img: Image.Image, k: int) -> tuple[float, float]:
    ys, xs = np.nonzero((np.asarray(img) == np.array((10 + 20 * k, 240 - 20 * k, 77))).all(axis=-1))
    assert len(xs), f"tile {k} is not drawn"
    return float(xs.mean()), float(ys.mean())


def test_tiles_drawn_in_their_grids_thumbnail_apart(fresh_font_cache):
    layouts = [ImageTiles("image 1: 2x2", 0, 4, 2, True), ImageTiles("image 2: 1x3", 5, 3, 1, True)]
    img = render_preview("data.jsonl:1", _solid_tiles(9), layouts, [PromptSpan("q", False)])
    c = [_centre(img, k) for k in range(9)]
    # (centres move a little with the width of the number drawn in each tile's corner)
    assert c[1][1] == pytest.approx(c[0][1], abs=3) and c[1][0] > c[0][0]  # 0 1
    assert c[2][0] == pytest.approx(c[0][0], abs=3) and c[2][1] > c[0][1]  # 2 3
    assert c[4][0] > c[1][0] and c[4][1] < c[2][1]  # the thumbnail, right of the grid
    assert abs(c[5][0] - c[6][0]) < 3 and abs(c[6][0] - c[7][0]) < 3 and c[5][1] < c[6][1] < c[7][1]
    assert c[8][0] > c[5][0] and c[5][0] > c[4][0]  # image 2 follows image 1
    assert _count_colour(img, (230, 130, 0))  # the thumbnail frame


def test_narrow_image_has_the_header_beside_it(fresh_font_cache):
    img = render_preview("data.jsonl:1 | header", _solid_tiles(1), [ImageTiles("1x1", 0, 1, 1)], [])
    x, y = _centre(img, 0)
    row = np.asarray(img)[int(y) - 70 : int(y) + 70, int(x) + 100 :]
    assert (row < 128).any()  # dark text to the right of the tile, not a blank area
    assert img.width < 1200


def test_preview_data_of_a_multi_image_sample(tiny_ckpt, tmp_path, capsys):
    data, images = make_synthetic_dataset(tmp_path / "d", num_samples=10, seed=2, multi_image=0.5, text_only=0.0)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    index = next(i for i, r in enumerate(records) if isinstance(r["image"], list))
    options = {
        "model.path": str(tiny_ckpt("internvl2-2b")),
        "train_dataset.data_paths": [str(data)],
        "train_dataset.image_folders": [str(images)],
        "train_dataset.max_dynamic_patch": 12,
        "train_dataset.max_length": 8192,
    }
    out = tmp_path / "p" / "s.png"
    assert preview_data(str(CONFIG), index, str(out), options) == 0
    assert "<IMG_CONTEXT>x" in capsys.readouterr().out and Image.open(out).width > 500
    cfg = load_config(str(CONFIG), options)
    tok = load_tokenizer(options["model.path"])
    ds = DATASETS.build({"model_path": options["model.path"], **cfg.train_dataset, "tokenizer": tok, "strict": True})
    sample = ds[index]
    layouts = image_tiles(sample, prompt_spans(sample, tok), ds, records[index], images)
    paths = records[index]["image"]
    assert len(layouts) == len(paths)
    assert sum(lay.count + lay.thumbnail for lay in layouts) == len(sample.pixel_values)
    for lay, path in zip(layouts, paths, strict=True):
        w, h = Image.open(images / path).size
        cols, rows = find_closest_grid(w, h, 1, 12 // len(paths), 448)
        assert (lay.cols, lay.rows) == (cols, rows) and path in lay.label


def test_out_may_be_a_directory_and_a_wrong_suffix_is_one_line(tiny_ckpt, tmp_path):
    data, images = make_synthetic_dataset(tmp_path / "d", num_samples=3, seed=1)
    options = {
        "model.path": str(tiny_ckpt("internvl2-2b")),
        "train_dataset.data_paths": [str(data)],
        "train_dataset.image_folders": [str(images)],
    }
    assert preview_data(str(CONFIG), 2, str(tmp_path / "previews"), options) == 0
    assert (tmp_path / "previews" / "sample-2.png").is_file() and (tmp_path / "previews" / "sample-2.txt").is_file()
    with pytest.raises(ValueError, match=r"--out .*x\.pdf: give a \.png"):
        preview_data(str(CONFIG), 0, str(tmp_path / "x.pdf"), options)
