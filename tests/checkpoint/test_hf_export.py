"""Official <-> transformers-native InternVL (``--format hf`` / ``--from-hf``): same logits, bitwise round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer, InternVLForConditionalGeneration

from tests.checkpoint.conftest import dumped_config, logits_of, sample_inputs
from tests.engine.conftest import run_cli
from xtuner_vl.checkpoint import CheckpointError
from xtuner_vl.checkpoint.hf_export import official_to_hf, split_wqkv
from xtuner_vl.checkpoint.hf_import import hf_to_official, pack_wqkv
from xtuner_vl.model import img_context_token_id, load_internvl, load_tokenizer
from xtuner_vl.model.weights import read_state_dict

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
    assert torch.equal(q[: d], groups[0, 0]) and torch.equal(q[(heads // kv) * d : (heads // kv + 1) * d], groups[1, 0])
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
