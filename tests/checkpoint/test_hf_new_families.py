"""``--format hf`` / ``--from-hf`` for the InternVL 2.5 / 3 / 3.5 backbones: Qwen2.5, Qwen3 (tied head), Qwen3-MoE,
GPT-OSS (its keys are transformers' own on both sides; eager attention for the sinks).

transformers 5 loads the per-expert Qwen3-MoE keys of the export by fusing them (the ``qwen2_moe`` entry of
``transformers/conversion_mapping.py``); its ``save_pretrained`` writes them per expert again, or fused with
``save_original_format=False``: the import reads both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoProcessor, InternVLForConditionalGeneration

from tests.checkpoint.conftest import logits_of, sample_inputs
from xtuner_vl.checkpoint.hf_export import official_to_hf
from xtuner_vl.checkpoint.hf_import import hf_to_official
from xtuner_vl.dataset import get_template
from xtuner_vl.model import load_internvl
from xtuner_vl.model.weights import read_state_dict
from xtuner_vl.recipes.chat import official_prompt

# family -> (text model type, tied head)
FAMILIES = {
    "internvl2_5-1b": ("qwen2", False),
    "internvl3_5-1b": ("qwen3", True),
    "internvl3_5-30b-a3b": ("qwen3_moe", False),
    "internvl3_5-gpt-oss-20b-a4b": ("gpt_oss", False),
}
MOE = "internvl3_5-30b-a3b"
# transformers 5's additions: layer_types, Qwen2's unused sliding_window, GPT-OSS's swiglu_alpha (the 1.702 its
# transformers 4.55 class hard-codes)
LLM_IGNORED = ("transformers_version", "layer_types", "sliding_window", "swiglu_alpha")


@pytest.fixture(scope="module")
def hf_dirs(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    return {f: official_to_hf(tiny_ckpt(f), tmp_path_factory.mktemp(f"hf-{f}"), progress=False) for f in FAMILIES}


def _keys(model_dir: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def _load(hf_dir: Path, dtype: torch.dtype) -> InternVLForConditionalGeneration:
    model, info = InternVLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=dtype, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return model


def _assert_same_weights(got_dir: Path, want_dir: Path) -> None:
    got, want = read_state_dict(got_dir), read_state_dict(want_dir)
    assert list(got) == list(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_natively_with_our_logits(hf_dirs, tiny_ckpt, family):
    source, (text_type, tied) = tiny_ckpt(family), FAMILIES[family]
    model = _load(hf_dirs[family], torch.float32)
    cfg = json.loads((hf_dirs[family] / "config.json").read_text())
    assert cfg["text_config"]["model_type"] == text_type
    assert cfg["tie_word_embeddings"] is tied and cfg["text_config"]["tie_word_embeddings"] is tied
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) is tied
    assert ("lm_head.weight" in _keys(hf_dirs[family])) is not tied
    if text_type != "qwen2":  # explicit head_dim (32, not hidden / heads = 16), q/k norms
        assert cfg["text_config"]["head_dim"] == 32
        assert model.model.language_model.layers[0].self_attn.q_proj.weight.shape[0] == 4 * 32
    inputs = sample_inputs(source)
    expected = logits_of(load_internvl(source, dtype=torch.float32), inputs)
    got = logits_of(model, {k: v for k, v in inputs.items() if k != "image_flags"})
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_moe_export_keeps_per_expert_keys_and_transformers_fuses_them(hf_dirs, tiny_ckpt):
    keys = _keys(hf_dirs[MOE])
    prefix = "model.language_model.layers.1.mlp."
    assert keys[prefix + "experts.3.gate_proj.weight"] == (48, 64) and keys[prefix + "gate.weight"] == (4, 64)
    experts = _load(hf_dirs[MOE], torch.bfloat16).model.language_model.layers[1].mlp.experts
    official = read_state_dict(tiny_ckpt(MOE))
    name = "language_model.model.layers.1.mlp.experts.{}.{}_proj.weight"
    gate, up, down = ([official[name.format(e, p)] for e in range(4)] for p in ("gate", "up", "down"))
    assert torch.equal(experts.gate_up_proj, torch.cat([torch.stack(gate), torch.stack(up)], dim=1))
    assert torch.equal(experts.down_proj, torch.stack(down))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("with_base", [True, False])
def test_import_round_trip_is_bitwise(hf_dirs, tiny_ckpt, family, with_base, tmp_path):
    source, tied = tiny_ckpt(family), FAMILIES[family][1]
    out = hf_to_official(hf_dirs[family], tmp_path / "official", source if with_base else None, progress=False)
    _assert_same_weights(out, source)
    assert ("language_model.lm_head.weight" in read_state_dict(out)) is not tied
    cfg, base_cfg = (json.loads((d / "config.json").read_text()) for d in (out, source))
    if with_base:
        assert cfg == base_cfg
    else:
        for key in ("template", "ps_version", "tie_word_embeddings"):
            assert cfg[key] == base_cfg[key]
        # every official llm_config field back under its official name (transformers 5 writes Qwen3-MoE's
        # num_experts as num_local_experts); layer_types, Qwen2's unused sliding_window and None are transformers 5's
        rebuilt, release = (
            {k: v for k, v in c["llm_config"].items() if k not in LLM_IGNORED and v is not None}
            for c in (cfg, base_cfg)
        )
        assert rebuilt == release
        inputs = sample_inputs(source)
        torch.testing.assert_close(
            logits_of(load_internvl(out, dtype=torch.float32), inputs),
            logits_of(load_internvl(source, dtype=torch.float32), inputs),
            rtol=0,
            atol=0,
        )


@pytest.mark.parametrize(
    ("family", "original_format"),
    [(MOE, True), (MOE, False), ("internvl3_5-1b", True), ("internvl3_5-gpt-oss-20b-a4b", True)],
    ids=["moe", "moe-fused", "tied", "gpt-oss"],
)
def test_import_of_transformers_save_pretrained(hf_dirs, tiny_ckpt, family, original_format, tmp_path):
    saved = tmp_path / "saved"
    _load(hf_dirs[family], torch.bfloat16).save_pretrained(str(saved), save_original_format=original_format)
    keys = _keys(saved)
    if family == MOE:  # per expert by default (the conversion reverted), else fused [E, 2 I, H] / [E, H, I]
        experts = "model.language_model.layers.0.mlp.experts."
        fused = (keys.get(experts + "gate_up_proj"), keys.get(experts + "down_proj"))
        assert (experts + "0.gate_proj.weight" in keys) is original_format
        assert fused == ((None, None) if original_format else ((4, 96, 64), (4, 64, 48)))
    elif FAMILIES[family][1]:
        assert "lm_head.weight" not in keys
    for base in (tiny_ckpt(family), None):
        _assert_same_weights(
            hf_to_official(saved, tmp_path / f"back-{base is None}", base, progress=False), tiny_ckpt(family)
        )


def test_head_that_differs_from_embedding_is_not_tied(hf_dirs, tiny_ckpt, tmp_path):
    """A config that ties (as ``InternVLConfig`` does by default) over a distinct head: transformers keeps the head
    untied, and so does the import."""
    hf = tmp_path / "hf"
    shutil.copytree(hf_dirs["internvl2_5-1b"], hf)
    cfg = json.loads((hf / "config.json").read_text())
    del cfg["tie_word_embeddings"]
    (hf / "config.json").write_text(json.dumps(cfg))
    source = tiny_ckpt("internvl2_5-1b")
    out = hf_to_official(hf, tmp_path / "official", progress=False)
    _assert_same_weights(out, source)
    assert json.loads((out / "config.json").read_text())["llm_config"]["tie_word_embeddings"] is False


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_is_the_official_prompt(hf_dirs, tiny_ckpt, family):
    """internvl2_5 (ChatML) and the harmony ``internvl3_5_gpt_oss``: past answers closed by the separator, the
    assistant header (with the ``final`` channel for harmony) left open."""
    processor = AutoProcessor.from_pretrained(str(hf_dirs[family]))
    name = json.loads((tiny_ckpt(family) / "config.json").read_text())["template"]
    template = get_template(name)
    history = [("<IMG_CONTEXT>\nWhat is it?", "A cat.")]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": "And the colour?"},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == official_prompt(template, history, "And the colour?", [])
    start, end = {
        "internvl2_5": ("<|im_start|>system\n你是书生·万象", "<|im_end|>\n<|im_start|>assistant\n"),
        "internvl3_5_gpt_oss": (
            "<|start|>system<|message|>You are InternVL",
            "A cat.<|end|><|start|>user<|message|>And the colour?<|end|><|start|>assistant<|channel|>final<|message|>",
        ),
    }[name]
    assert prompt.startswith(start) and prompt.endswith(end)
    system = [{"role": "system", "content": "Be brief."}, messages[2]]
    assert processor.apply_chat_template(system, add_generation_prompt=True) == official_prompt(
        get_template(name, "Be brief."), [], "And the colour?", []
    )
