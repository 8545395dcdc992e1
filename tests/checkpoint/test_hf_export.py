"""Official <-> transformers-native InternVL (``--format hf`` / ``--from-hf``): same logits, bitwise round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, InternVLForConditionalGeneration
from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

from tests.checkpoint.conftest import dumped_config, logits_of, sample_inputs
from tests.engine.conftest import run_cli
from xtuner_vl.checkpoint import CheckpointError
from xtuner_vl.checkpoint.hf_export import official_to_hf, split_wqkv, write_hf_processor
from xtuner_vl.checkpoint.hf_import import hf_to_official, pack_wqkv
from xtuner_vl.dataset import get_template, load_image_tiles
from xtuner_vl.dataset.image import IMAGENET_MEAN, IMAGENET_STD, find_closest_grid, tile_count
from xtuner_vl.model import img_context_token_id, load_internvl, load_tokenizer
from xtuner_vl.model.configuration import InternVLConfig as OfficialConfig
from xtuner_vl.model.weights import read_state_dict
from xtuner_vl.recipes.chat import official_prompt

SUPPORTED = ["internvl2-2b", "internvl2-8b", "internvl2-1b", "internvl2-40b"]
PROMPTS = [
    "Hello world",
    "  two  spaces\n\nnew lines\tand a tab",
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL",
    "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nDescribe the image.<|im_end|><|im_start|>assistant\n",
    "emoji 😀 and accents éà, <ref>cat</ref><box>[[12, 345, 678, 901]]</box> <quad>",
]


@pytest.fixture(scope="module")
def hf_dirs(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    """Each supported tiny release exported once (bf16 weights, as released)."""
    return {f: official_to_hf(tiny_ckpt(f), tmp_path_factory.mktemp(f"hf-{f}"), progress=False) for f in SUPPORTED}


def _hf_logits(hf_dir: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model = InternVLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32)
    hf_inputs = {k: v for k, v in inputs.items() if k != "image_flags"}
    return logits_of(model, hf_inputs)


@pytest.mark.parametrize("family", SUPPORTED)
def test_hf_export_gives_our_logits(hf_dirs, tiny_ckpt, family):
    # 263 tokens: past the 8b fixture's max_position_embeddings (256), so its dynamic NTK rope is scaled in both
    # models, from the same length (transformers' table only differs after a longer call, see hf_export).
    source = tiny_ckpt(family)
    inputs = sample_inputs(source)
    expected = logits_of(load_internvl(source, dtype=torch.float32), inputs)
    got = _hf_logits(hf_dirs[family], inputs)
    assert expected.abs().max() > 1.0  # O(1) logits: a wrong mapping shows far above the tolerance
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    cfg = json.loads((hf_dirs[family] / "config.json").read_text())
    assert cfg["architectures"] == ["InternVLForConditionalGeneration"] and "auto_map" not in cfg
    assert cfg["image_token_id"] == img_context_token_id(load_tokenizer(source))
    assert not list(hf_dirs[family].glob("*.py"))  # no remote code


def test_select_layer_maps_to_vision_feature_layer(tiny_ckpt, tmp_path):
    source = tiny_ckpt("internvl2-2b", select_layer=-2)
    out = official_to_hf(source, tmp_path / "hf", progress=False)
    inputs = sample_inputs(source)
    expected = logits_of(load_internvl(source, dtype=torch.float32), inputs)
    last = logits_of(load_internvl(tiny_ckpt("internvl2-2b"), dtype=torch.float32), inputs)
    assert (expected - last).abs().max() > 1e-2
    torch.testing.assert_close(_hf_logits(out, inputs), expected, rtol=0, atol=1e-4)


def test_wqkv_split_and_pack_are_inverse_and_grouped():
    heads, kv, d, hidden = 8, 2, 3, 5
    wqkv = torch.randn((heads + 2 * kv) * d, hidden)
    q, k, v = split_wqkv(wqkv, heads, kv)
    groups = wqkv.reshape(kv, heads // kv + 2, d, hidden)
    assert torch.equal(q[:d], groups[0, 0]) and torch.equal(q[(heads // kv) * d : (heads // kv + 1) * d], groups[1, 0])
    assert torch.equal(k[d:], groups[1, -2]) and torch.equal(v[:d], groups[0, -1])
    assert torch.equal(pack_wqkv(q, k, v, kv), wqkv)


@pytest.mark.parametrize("family", SUPPORTED)
def test_hf_tokenizer_and_processor_load_natively(hf_dirs, tiny_ckpt, family):
    ours = load_tokenizer(tiny_ckpt(family))
    tok = AutoTokenizer.from_pretrained(str(hf_dirs[family]))
    for text in PROMPTS:
        assert tok(text)["input_ids"] == ours(text)["input_ids"], text
    processor = AutoProcessor.from_pretrained(str(hf_dirs[family]))
    assert processor.image_token_id == img_context_token_id(ours) and processor.image_seq_length == 256
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("<IMG_CONTEXT>\nDescribe.<|im_end|><|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\n你是由上海人工智能实验室")  # the official default system message
    image = torch.randint(0, 256, (3, 300, 500), dtype=torch.uint8)
    batch = processor(images=[image], text=[prompt], return_tensors="pt")
    tiles = batch["pixel_values"].shape[0]
    assert batch["pixel_values"].shape[1:] == (3, 448, 448) and tiles > 1  # tiled + thumbnail
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 256 * tiles


@pytest.mark.parametrize("family", SUPPORTED)
@pytest.mark.parametrize("with_base", [True, False])
def test_round_trip_is_bitwise(hf_dirs, tiny_ckpt, family, with_base, tmp_path):
    source = tiny_ckpt(family)
    out = hf_to_official(hf_dirs[family], tmp_path / "official", source if with_base else None, progress=False)
    got, want = read_state_dict(out), read_state_dict(source)
    assert list(got) == list(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    cfg, base_cfg = (json.loads((d / "config.json").read_text()) for d in (out, source))
    if with_base:
        assert cfg == base_cfg
        assert {f.name for f in source.iterdir()} <= {f.name for f in out.iterdir()}
    else:  # rebuilt from the hf config: every field our loader reads is the release's
        for key in ("template", "ps_version", "select_layer", "downsample_ratio", "max_dynamic_patch"):
            assert cfg[key] == base_cfg[key]
        assert cfg["llm_config"]["architectures"] == base_cfg["llm_config"]["architectures"]
        assert cfg["llm_config"]["rope_scaling"] == base_cfg["llm_config"].get("rope_scaling")
        inputs = sample_inputs(source)
        torch.testing.assert_close(
            logits_of(load_internvl(out, dtype=torch.float32), inputs),
            logits_of(load_internvl(source, dtype=torch.float32), inputs),
            rtol=0,
            atol=0,
        )


@pytest.mark.parametrize(("family", "reason"), [("internvl-chat-v1-5", "ps_version"), ("internvl2-4b", "Phi-3")])
def test_v1_and_phi3_are_refused_before_writing(tiny_ckpt, family, reason, tmp_path):
    out = tmp_path / "hf"
    with pytest.raises(CheckpointError, match=reason):
        official_to_hf(tiny_ckpt(family), out, progress=False)
    assert not out.exists()
    proc = run_cli(["convert", "--from-hf", str(tiny_ckpt(family)), str(out)], check=False)
    assert proc.returncode == 1 and "not InternVLForConditionalGeneration" in proc.stderr and not out.exists()


def test_cli_format_hf_and_back(trained_run, tmp_path):
    """A trained LoRA run -> ``convert --format hf`` -> the merged official model's logits; ``--from-hf`` back."""
    work = trained_run("lora")
    official = tmp_path / "official"
    run_cli(["convert", str(dumped_config(work)), str(work), str(official), "--dtype", "fp32"])
    hf = tmp_path / "hf"
    proc = run_cli(["convert", str(dumped_config(work)), str(work), str(hf), "--format", "hf", "--dtype", "fp32"])
    assert "wrote hf output" in proc.stdout and not list(tmp_path.glob(".official-*"))  # temporary dir removed
    inputs = sample_inputs(official)
    expected = logits_of(load_internvl(official, dtype=torch.float32), inputs)
    torch.testing.assert_close(_hf_logits(hf, inputs), expected, rtol=0, atol=1e-4)
    back = tmp_path / "back"
    run_cli(["convert", "--from-hf", str(hf), str(back), "--base", str(official)])
    got, want = read_state_dict(back), read_state_dict(official)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert run_cli(["convert", "--from-hf", str(hf)], check=False).returncode == 2


# ---- The exported processor against our tiling (bit-identical to the official dynamic_preprocess + transform) ----

# (width, height): 1x1-ish, around one tile, wide, tall, exact aspect ties on both sides of the area rule, 4K.
SIZES = [
    (1, 1),
    (2, 1),
    (1, 3),
    (5, 7),
    (447, 448),
    (448, 448),
    (449, 448),
    (300, 500),
    (500, 300),
    (1000, 10),
    (10, 1000),
    (633, 633),
    (634, 634),  # ratio 1: 1x1 and 2x2 tie; 2x2 wins past 0.5 * 448^2 * 4 = 401 408 px
    (1266, 633),
    (1268, 634),  # ratio 2: 2x1 and 4x2 tie; 4x2 wins past 802 816 px (when max_patches >= 8)
    (1344, 448),
    (448, 1344),
    (1344, 1344),
    (3840, 2160),
    (2160, 3840),
]
KINDS = ("noise", "smooth")
MEAN, STD = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _image(width: int, height: int, kind: str) -> Image.Image:
    """Pixel noise (the worst case for resampling) or slow sinusoids (like a photograph's low frequencies)."""
    if kind == "noise":
        return Image.fromarray(
            np.random.default_rng(width * 7919 + height).integers(0, 256, (height, width, 3), dtype=np.uint8)
        )
    y, x = np.mgrid[0:height, 0:width]
    waves = [
        np.sin(2 * np.pi * (fx * x / width + fy * y / height) + phase)
        for fx, fy, phase in ((1.5, 0.5, 0.1), (0.7, 2.1, 1.0), (2.5, 1.3, 2.0))
    ]
    return Image.fromarray(np.clip(np.rint(127.5 + 127.5 * np.stack(waves, -1)), 0, 255).astype(np.uint8))


def _our_tiles(cfg: OfficialConfig, image: Image.Image) -> torch.Tensor:
    """The official tiles for ``image`` under ``cfg`` (without dynamic_image_size: one resized tile)."""
    dynamic = cfg.dynamic_image_size
    min_num, max_num = (cfg.min_dynamic_patch, cfg.max_dynamic_patch) if dynamic else (1, 1)
    return load_image_tiles(image, min_num, max_num, cfg.image_size, cfg.use_thumbnail)


def _processed(processor, image: Image.Image) -> torch.Tensor:
    """``pixel_values`` of the full InternVLProcessor call (which forces crop_to_patches=True), one image."""
    batch = processor(images=[image], text=["<IMG_CONTEXT>"], return_tensors="pt")
    tiles = batch["pixel_values"]
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == processor.image_seq_length * len(tiles)
    return tiles


def _exact_processor(hf_dir: Path):
    """The documented bit-exact way to load the export: the PIL backend of the image processor."""
    image_processor = AutoImageProcessor.from_pretrained(str(hf_dir), backend="pil")
    return AutoProcessor.from_pretrained(str(hf_dir), image_processor=image_processor)


@pytest.fixture(scope="module")
def processor_dirs(hf_dirs, tiny_ckpt, tmp_path_factory) -> dict[str, tuple[Path, OfficialConfig]]:
    """The 2B export (max_dynamic_patch 12, thumbnail) and processors written for two variants of its config."""
    source = tiny_ckpt("internvl2-2b")
    base = json.loads((source / "config.json").read_text())
    dirs = {"release": (hf_dirs["internvl2-2b"], OfficialConfig.from_dict(base))}
    for name, change in {"max6": {"max_dynamic_patch": 6}, "static": {"dynamic_image_size": False}}.items():
        raw = {**base, **change}
        out = tmp_path_factory.mktemp(f"processor-{name}")
        write_hf_processor(source, out, raw)
        dirs[name] = (out, OfficialConfig.from_dict(raw))
    return dirs


SMALL_SIZES = [size for size in SIZES if size[0] * size[1] < 2_000_000]  # 4K adds nothing to the variants


@pytest.mark.parametrize(
    ("variant", "sizes"),
    [("release", SIZES), ("max6", SMALL_SIZES), ("static", SMALL_SIZES)],
    ids=["release", "max6", "static"],
)
def test_pil_backend_processor_gives_our_tiles_bitwise(processor_dirs, variant, sizes):
    hf_dir, cfg = processor_dirs[variant]
    processor = _exact_processor(hf_dir)
    counts = set()
    for width, height in sizes:
        for kind in KINDS:
            image = _image(width, height, kind)
            got, want = _processed(processor, image), _our_tiles(cfg, image)
            assert got.dtype == want.dtype and torch.equal(got, want), (width, height, kind)
            counts.add(len(want))
    # the config's tiling is in force: the longest grid (+ thumbnail) is reached, nothing beyond it
    assert max(counts) == (cfg.max_dynamic_patch + 1 if cfg.dynamic_image_size else 1)


def test_default_torchvision_processor_same_grids_bounded_resize_gap(processor_dirs):
    hf_dir, cfg = processor_dirs["release"]
    processor = AutoProcessor.from_pretrained(str(hf_dir))
    assert processor.image_processor.backend == "torchvision"  # transformers' choice whenever torchvision is there
    worst = dict.fromkeys(KINDS, 0)
    for width, height in SIZES:
        for kind in KINDS:
            image = _image(width, height, kind)
            got, want = _processed(processor, image), _our_tiles(cfg, image)
            assert got.shape == want.shape, (width, height)  # same grid, same thumbnail
            levels = got * STD * 255 + MEAN * 255  # integral exactly when rescale, mean and std are the official
            assert (levels - levels.round()).abs().max() < 1e-3
            ours = want * STD * 255 + MEAN * 255
            worst[kind] = max(worst[kind], int((levels.round() - ours.round()).abs().max()))
            if (width, height) == (448, 448):  # no resize at all: only the fused rescale + normalise differs
                torch.testing.assert_close(got, want, rtol=0, atol=2.4e-7)
    # The bounds documented in hf_export (measured with torch's AVX2 uint8 kernel); noise > 0 keeps that text honest.
    assert worst["smooth"] <= 2 and 0 < worst["noise"] <= 26, worst


def test_grid_choice_is_the_official_rule(processor_dirs):
    every = [(w, h) for w in range(1, 549) for h in range(1, 549)]  # 300 304 sizes
    ties = sorted(
        {
            (k * i, k * j)
            for i in range(1, 13)
            for j in range(1, 13)
            if i * j <= 12
            for k in range(1, 4000 // max(i, j) + 1)
        }
    )  # exact aspect ratios of every grid, up to 4000 px
    for min_num, max_num, sizes in [(1, 12, every + ties), (1, 6, ties), (2, 12, ties)]:
        wrong = [
            (w, h)
            for w, h in sizes
            if get_optimal_tiled_canvas.__wrapped__((h, w), (448, 448), min_num, max_num)
            != find_closest_grid(w, h, min_num, max_num, 448)
        ]
        assert wrong == [], (min_num, max_num, wrong[:10])
    hf_dir, cfg = processor_dirs["release"]
    image_processor = AutoProcessor.from_pretrained(str(hf_dir)).image_processor
    for w, h in ties:
        assert image_processor.get_number_of_image_patches(h, w) == tile_count(
            w, h, cfg.min_dynamic_patch, cfg.max_dynamic_patch, cfg.image_size, cfg.use_thumbnail
        ), (w, h)


def test_transparency_is_composited_on_white_unlike_the_official(processor_dirs):
    hf_dir, cfg = processor_dirs["release"]
    rgb = np.asarray(_image(700, 500, "noise"))
    alpha = np.broadcast_to(np.linspace(0, 255, 700).astype(np.uint8), (500, 700))
    image = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    got = _processed(_exact_processor(hf_dir), image)
    on_white = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    assert torch.equal(got, _our_tiles(cfg, on_white))
    assert not torch.equal(got, _our_tiles(cfg, image))  # ours, as the official convert('RGB'), drops alpha


def test_use_thumbnail_false_is_warned_and_gets_one_tile_more(tiny_ckpt, tmp_path, caplog):
    source = tiny_ckpt("internvl2-2b")
    raw = {**json.loads((source / "config.json").read_text()), "use_thumbnail": False}
    with caplog.at_level("WARNING", logger="xtuner_vl.checkpoint.hf_export"):
        write_hf_processor(source, tmp_path, raw)
    assert "use_thumbnail is false" in caplog.text
    image = _image(896, 448, "smooth")
    got, want = _processed(_exact_processor(tmp_path), image), _our_tiles(OfficialConfig.from_dict(raw), image)
    assert len(want) == 2 and len(got) == 3 and torch.equal(got[:2], want)  # the extra tile is the thumbnail


@pytest.mark.parametrize("family", SUPPORTED)
def test_processor_prompt_ids_equal_the_official_chat_prompt(hf_dirs, tiny_ckpt, family):
    source = tiny_ckpt(family)
    raw = json.loads((source / "config.json").read_text())
    cfg, tokenizer = OfficialConfig.from_dict(raw), load_tokenizer(source)
    template = get_template(cfg.template, raw.get("system_message"))
    processor = AutoProcessor.from_pretrained(str(hf_dirs[family]))
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    second = first + [
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
    ]
    for width, height in [(1, 1), (300, 500), (1268, 634)]:
        image = _image(width, height, "smooth")
        counts = [cfg.num_image_token * len(_our_tiles(cfg, image))]
        for messages, history, question in [
            (first, [], "<image>\nWhat is it?"),
            (second, [("<image>\nWhat is it?", "A cat.")], "And now?"),
        ]:
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
            got = processor(images=[image], text=[text], return_tensors="pt")["input_ids"][0].tolist()
            want = tokenizer(official_prompt(template, history, question, counts))["input_ids"]
            assert got == want, (family, width, height, len(history))
            assert got.count(processor.image_token_id) == counts[0]
