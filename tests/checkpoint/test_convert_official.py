"""Tiny full / LoRA / QLoRA runs -> ``xtuner-vl convert`` -> official directory with the trained model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.checkpoint.conftest import dumped_config, logits_of, rebuilt_training_model, sample_inputs
from tests.engine.conftest import run_cli
from xtuner_vl.checkpoint import read_trained_checkpoint
from xtuner_vl.model import load_internvl
from xtuner_vl.model.weights import read_state_dict, weight_files
from xtuner_vl.recipes.convert import convert


def _convert(work: Path, out: Path, *extra: str) -> Path:
    run_cli(["convert", str(dumped_config(work)), str(work), str(out), *extra])
    return out


def _base(work: Path) -> Path:
    return Path(json.loads(next(work.glob("checkpoints/step-*/meta.json")).read_text())["model_path"])


@pytest.mark.parametrize("method", ["full", "lora"])
def test_full_and_lora_give_the_trained_logits(trained_run, method, tmp_path):
    work = trained_run(method)
    out = _convert(work, tmp_path / "out", "--dtype", "fp32")
    inputs = sample_inputs(out)
    expected = logits_of(rebuilt_training_model(work), inputs)
    got = logits_of(load_internvl(out, dtype=torch.float32), inputs)
    base = logits_of(load_internvl(_base(work), dtype=torch.float32), inputs)
    assert (expected - base).abs().max() > 1e-3, "training changed nothing: the test would prove nothing"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_qlora_merges_into_the_bf16_base_not_the_nf4_copy(trained_run, tmp_path):
    work = trained_run("qlora")
    out = _convert(work, tmp_path / "out", "--dtype", "fp32")
    base_dir = _base(work)
    # Independently: released bf16 base weights + B @ A * alpha / r (alpha = 2r), mlp1 from the checkpoint.
    state = read_state_dict(base_dir, torch.float32)
    for name, value in read_trained_checkpoint(work).state.items():
        if "lora_A" in name:
            b = read_trained_checkpoint(work).state[name.replace("lora_A", "lora_B")]
            key = name.replace("base_model.model.", "").replace(".lora_A.default", "")
            state[key] = state[key] + b.float() @ value.float() * 2.0
        elif "lora_B" not in name:
            state[name] = value.float()
    reference = load_internvl(base_dir, dtype=torch.float32)
    reference.load_state_dict(state, strict=True)
    inputs = sample_inputs(out)
    torch.testing.assert_close(
        logits_of(load_internvl(out, dtype=torch.float32), inputs), logits_of(reference, inputs), rtol=0, atol=1e-5
    )


def test_output_is_the_base_layout(trained_run, tmp_path):
    work = trained_run("lora")
    base_dir = _base(work)
    out = convert(str(dumped_config(work)), str(work), str(tmp_path / "out"))  # default dtype: the base's (bf16)
    got, base = read_state_dict(out), read_state_dict(base_dir)
    assert got.keys() == base.keys()
    assert all(got[k].shape == base[k].shape and got[k].dtype == base[k].dtype for k in base)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    changed = [k for k in base if not torch.equal(got[k], base[k])]
    assert any(k.startswith("mlp1.") for k in changed) and any("attention.wqkv" in k for k in changed)
    assert not any(k.startswith("vision_model.") for k in changed)  # ViT frozen, no ViT LoRA
    cfg, base_cfg = (json.loads((d / "config.json").read_text()) for d in (out, base_dir))
    assert cfg["use_llm_lora"] == 0 and cfg["use_backbone_lora"] == 0 and cfg["torch_dtype"] == "bfloat16"
    assert cfg["max_dynamic_patch"] == 2 and base_cfg["max_dynamic_patch"] == 12  # from the run's data config
    assert cfg["template"] == base_cfg["template"]
    for key in ("max_dynamic_patch", "min_dynamic_patch", "use_thumbnail"):
        cfg.pop(key), base_cfg.pop(key)
    assert cfg == base_cfg  # nothing else changed, nothing added
    support = {f.name for f in base_dir.iterdir() if not f.name.endswith(".safetensors")}
    assert support <= {f.name for f in out.iterdir()}


def test_sharded_output_streams_and_loads(trained_run, tmp_path):
    work = trained_run("full")
    one = convert(str(dumped_config(work)), str(work), str(tmp_path / "one"), dtype="fp32")
    many = convert(str(dumped_config(work)), str(work), str(tmp_path / "many"), dtype="fp32", max_shard_size="300KB")
    files = weight_files(many)
    assert len(files) > 2 and (many / "model.safetensors.index.json").is_file()
    assert all(f.stat().st_size < 300_000 + 300_000 for f in files)  # a shard exceeds the limit by < 1 tensor
    a, b = read_state_dict(one), read_state_dict(many)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_with_unfrozen_head_converts_the_trained_head(trained_run, tmp_path):
    """`freeze.unfreeze_lm_head` under LoRA trains the full head beside the adapters; convert keeps both."""
    work = trained_run("lora", "model.freeze.unfreeze_lm_head=True")
    state = read_trained_checkpoint(work).state
    head = "language_model.output.weight"
    assert any(k.endswith("output.weight") and "lora" not in k for k in state), sorted(state)[:5]
    out = _convert(work, tmp_path / "out", "--dtype", "fp32")
    base = read_state_dict(_base(work), torch.float32)[head]
    merged = read_state_dict(out, torch.float32)[head]
    assert (merged - base).abs().max() > 1e-4, "the head did not train"
    inputs = sample_inputs(out)
    expected = logits_of(rebuilt_training_model(work), inputs)
    torch.testing.assert_close(logits_of(load_internvl(out, dtype=torch.float32), inputs), expected, rtol=0, atol=1e-5)
