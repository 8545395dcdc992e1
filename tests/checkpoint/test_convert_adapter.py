"""``--format adapter``: peft adapter directories that reproduce the merged model on the official structure."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from tests.checkpoint.conftest import dumped_config, logits_of, sample_inputs
from xtuner_vl.checkpoint import ADAPTER_DIRS, NON_LORA_FILE, CheckpointError
from xtuner_vl.model import load_internvl
from xtuner_vl.recipes.convert import convert


@pytest.mark.parametrize("vit_rank", [0, 4])
def test_adapters_reproduce_the_merged_logits(trained_run, train_assets, vit_rank, tmp_path):
    work = trained_run("lora", *([f"model.lora.vit_rank={vit_rank}"] if vit_rank else []))
    config = str(dumped_config(work))
    merged = convert(config, str(work), str(tmp_path / "merged"), dtype="fp32")
    adapters = convert(config, str(work), str(tmp_path / "adapters"), fmt="adapter", dtype="fp32")
    parts = {"language_model"} | ({"vision_model"} if vit_rank else set())
    assert {p.name for p in adapters.iterdir()} == {ADAPTER_DIRS[p] for p in parts} | {NON_LORA_FILE}

    model = load_internvl(train_assets["model"], dtype=torch.float32)
    rest = load_file(adapters / NON_LORA_FILE)
    assert set(rest) == {k for k in model.state_dict() if k.startswith("mlp1.")}
    model.load_state_dict(rest, strict=False)
    for part in parts:
        adapter_dir = adapters / ADAPTER_DIRS[part]
        settings = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert settings["r"] == (8 if part == "language_model" else 4) and settings["lora_alpha"] == 2 * settings["r"]
        setattr(model, part, PeftModel.from_pretrained(getattr(model, part), str(adapter_dir)))
    inputs = sample_inputs(merged)
    base = logits_of(load_internvl(train_assets["model"], dtype=torch.float32), inputs)
    expected = logits_of(load_internvl(merged, dtype=torch.float32), inputs)
    got = logits_of(model, inputs)
    vit = load_internvl(merged, dtype=torch.float32).vision_model.encoder.layers[0].attn.qkv.weight
    vit_base = load_internvl(train_assets["model"], dtype=torch.float32).vision_model.encoder.layers[0].attn.qkv.weight
    assert torch.equal(vit, vit_base) != bool(vit_rank)  # the ViT LoRA is merged too
    assert (got - base).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_full_finetune_has_no_adapter(trained_run, tmp_path):
    work = trained_run("full")
    with pytest.raises(CheckpointError, match="no LoRA"):
        convert(str(dumped_config(work)), str(work), str(tmp_path / "a"), fmt="adapter")
