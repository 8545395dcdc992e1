"""InternVL 2.5 / 3.5 backbones: Qwen2.5 and Qwen3 (q/k norms, its own head_dim), and heads tied to the
embedding (``llm_config.tie_word_embeddings``: no head stored, as the InternVL 3.5 code builds it). Load,
forward, save and stream in the official layout; a full fine-tuning step updates one shared tensor; LoRA and
full training runs learn and convert back to the official layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.model.helpers import train_tiny
from tests.model.reference import reference_logits
from xtuner_vl.model import load_internvl, save_official
from xtuner_vl.model.loader import open_checkpoint, stream_into
from xtuner_vl.model.weights import read_state_dict, weight_files
from xtuner_vl.tiny.checkpoints import make_tiny

HEAD = "language_model.lm_head.weight"
EMBED = "language_model.model.embed_tokens.weight"
# name -> (tiny family, llm_config overrides): InternVL2.5 / 3 (untied Qwen2.5), InternVL3.5 (tied Qwen3), and a
# tied Qwen2.5 (Qwen2.5-0.5B's own config ties, as a user's checkpoint built from it may).
VARIANTS = {
    "qwen2_5": ("internvl2_5-1b", {}),
    "qwen3_tied": ("internvl3_5-1b", {}),
    "qwen2_5_tied": ("internvl2_5-1b", {"tie_word_embeddings": True}),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen3_and_tied")
    return {name: make_tiny(family, root / name, llm_overrides=llm) for name, (family, llm) in VARIANTS.items()}


def _keys(path: Path) -> set[str]:
    keys = set()
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            keys |= set(f.keys())
    return keys


def _inputs(model) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ctx = model.img_context_token_id
    ids = torch.tensor([[5, 6, 7] + [ctx] * model.num_image_token + [30, 31, 32, 33, 34]])
    return {
        "pixel_values": torch.randn(1, 3, 448, 448, generator=g),
        "input_ids": ids,
        "image_flags": torch.ones(1, dtype=torch.long),
    }


def _tied(model) -> bool:
    lm = model.language_model
    return lm.get_output_embeddings().weight is lm.get_input_embeddings().weight


@pytest.mark.parametrize("name", list(VARIANTS))
def test_load_save_stream_round_trip(ckpts, tmp_path, name):
    path = ckpts[name]
    tied = name.endswith("tied")
    config = json.loads((path / "config.json").read_text())
    assert config["template"] == "internvl2_5" and config["llm_config"]["tie_word_embeddings"] is tied
    assert (HEAD in _keys(path)) is not tied and EMBED in _keys(path)
    model = load_internvl(path, dtype=torch.float32)
    assert _tied(model) is tied and type(model.language_model.lm_head).__name__ == "OutputHead"
    inputs = _inputs(model)
    with torch.no_grad():
        logits = model(**inputs).logits
    save_official(model, tmp_path / "saved", source_dir=path, dtype=torch.float32)
    assert (HEAD in _keys(tmp_path / "saved")) is not tied
    for again in (
        load_internvl(tmp_path / "saved", dtype=torch.float32),
        stream_into(open_checkpoint(tmp_path / "saved"), torch.float32, "cpu"),
    ):
        assert _tied(again) is tied
        with torch.no_grad():
            assert torch.equal(again(**inputs).logits, logits)


def test_qwen3_layers_are_transformers_own(ckpts):
    model = load_internvl(ckpts["qwen3_tied"], dtype=torch.float32)
    attn = model.language_model.model.layers[0].self_attn
    assert type(model.language_model).__name__ == "Qwen3ForCausalLM"
    assert attn.q_proj.out_features == 4 * 32 != model.language_model.config.hidden_size  # head_dim 32, not 16
    assert hasattr(attn, "q_norm") and hasattr(attn, "k_norm")


def test_tied_qwen2_5_matches_official_semantics(ckpts):
    """The tied Qwen2.5 variant against the independent reference (the tiny families are in
    test_official_equivalence.py)."""
    path = ckpts["qwen2_5_tied"]
    model = load_internvl(path, dtype=torch.float32)
    inputs = _inputs(model)
    sd, cfg = read_state_dict(path, torch.float32), json.loads((path / "config.json").read_text())
    with torch.no_grad():
        ours = model(**inputs).logits
        ref = reference_logits(
            sd,
            cfg,
            inputs["pixel_values"],
            inputs["input_ids"],
            None,
            inputs["image_flags"],
            model.img_context_token_id,
        )
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_full_fine_tuning_step_updates_one_shared_tensor(ckpts):
    model = load_internvl(ckpts["qwen3_tied"], dtype=torch.float32).train()
    lm = model.language_model
    embed = lm.get_input_embeddings().weight
    before = embed.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = _inputs(model)
    labels = inputs["input_ids"].clone()
    labels[:, : 3 + model.num_image_token] = -100
    model(**inputs, labels=labels).loss.backward()
    optimizer.step()
    head = lm.get_output_embeddings().weight
    assert head is lm.get_input_embeddings().weight and head.data_ptr() == embed.data_ptr()
    assert not torch.equal(embed.detach(), before)
    # Rows of tokens never input but predicted as targets moved: the head's gradient reached the shared tensor.
    assert not torch.equal(embed.detach()[34], before[34])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_learns_and_converts_to_official(ckpts, tmp_path, monkeypatch, lone_process, method):
    from xtuner_vl.recipes.convert import convert

    base = ckpts["qwen3_tied"]
    work, records = train_tiny(f"tiny_internvl2_{method}", base, tmp_path, monkeypatch)
    losses = [r["loss"] for r in records]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]), losses

    (dumped,) = work.glob("*.py")
    out = convert(str(dumped), str(work), str(tmp_path / "official"))
    assert HEAD not in _keys(out)
    merged, original = load_internvl(out, dtype=torch.float32), load_internvl(base, dtype=torch.float32)
    assert _tied(merged)
    changed = EMBED if method == "full" else "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[changed], original.state_dict()[changed])
    inputs = _inputs(merged)
    with torch.no_grad():
        assert torch.isfinite(merged(**inputs).logits).all()
