"""load_internvl / save_official: official format round trip, sharding, .bin, refusal of bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.engine.conftest import run_cli
from xtuner_vl.model import load_internvl, save_official
from xtuner_vl.model.weights import read_state_dict, weight_files
from xtuner_vl.tiny.families import TINY_FAMILIES


def _inputs(model, tiles=1, seq=300):
    ids = torch.randint(20, model.language_model.config.vocab_size - 20, (1, seq))
    ids[ids == model.img_context_token_id] = 20
    ids[0, 3 : 3 + tiles * model.num_image_token] = model.img_context_token_id
    return torch.randn(tiles, 3, 448, 448), ids


def _key_shapes(path):
    out = {}
    for f in weight_files(path):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_round_trip_keeps_format_and_logits(tiny_ckpt, tmp_path, family):
    src = tiny_ckpt(family)
    model = load_internvl(src, dtype=torch.float32)
    pixels, ids = _inputs(model)
    with torch.no_grad():
        before = model(pixels, ids).logits
    out = save_official(model, tmp_path / "out", source_dir=src)
    again = load_internvl(out, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(again(pixels, ids).logits, before)
    assert _key_shapes(out) == _key_shapes(src)  # same keys, shapes and dtype (BF16)
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()


def test_sharded_save_index_and_stale_shards(tiny_ckpt, tmp_path):
    src = tiny_ckpt("internvl2-2b")
    model = load_internvl(src, dtype=torch.float32)
    out = save_official(model, tmp_path / "out", max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in model.state_dict().values())
    reloaded = load_internvl(out, dtype=torch.float32, img_context_token_id=model.img_context_token_id)
    assert torch.equal(reloaded.mlp1[1].weight, model.mlp1[1].weight)
    save_official(model, out)  # one file now: the old shards and index must go
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_bin_checkpoint_loads_with_weights_only(tiny_ckpt, tmp_path):
    src = tiny_ckpt("internvl2-1b")
    d = tmp_path / "bin"
    shutil.copytree(src, d)
    torch.save(read_state_dict(d), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    a, b = load_internvl(src, dtype=torch.float32), load_internvl(d, dtype=torch.float32)
    pixels, ids = _inputs(a)
    with torch.no_grad():
        assert torch.equal(a(pixels, ids).logits, b(pixels, ids).logits)


class _Evil:
    def __reduce__(self):
        return (exec, ("open('PWNED_BIN', 'w').write('x')",))


def test_malicious_pickle_is_refused(tiny_ckpt, tmp_path, monkeypatch):
    d = tmp_path / "evil"
    shutil.copytree(tiny_ckpt("internvl2-2b"), d)
    (d / "model.safetensors").unlink()
    torch.save({"x": _Evil()}, d / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="refused to load: the pickle holds more than tensors") as refused:
        load_internvl(d)
    assert "False" not in str(refused.value)  # torch's advice to turn weights_only off is not repeated
    assert not (tmp_path / "PWNED_BIN").exists()


@pytest.mark.parametrize("family", ["internvl2-8b", "internvl2-4b", "internvl2-1b"])
def test_booby_trapped_remote_code_never_runs(tiny_ckpt, tmp_path, family):
    d = tmp_path / "trap"
    shutil.copytree(tiny_ckpt(family), d)
    marker = tmp_path / "EXECUTED"
    trap = f"open({str(marker)!r}, 'w').write(__name__)\nraise SystemExit('remote code executed')\n"
    for name in (
        "modeling_internvl_chat.py",
        "configuration_internvl_chat.py",
        "modeling_intern_vit.py",
        "configuration_intern_vit.py",
        "conversation.py",
        "modeling_internlm2.py",
        "configuration_internlm2.py",
        "tokenization_internlm2.py",
        "tokenization_internlm2_fast.py",
        "modeling_phi3.py",
        "configuration_phi3.py",
    ):
        (d / name).write_text(trap)
    model = load_internvl(d, dtype=torch.float32)
    pixels, ids = _inputs(model)
    model(pixels, ids)
    assert not marker.exists()


def test_mismatched_weights_are_refused(tiny_ckpt, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(tiny_ckpt("internvl2-2b"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["llm_config"]["num_hidden_layers"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"7 missing .*layers\.2\."):
        load_internvl(d)
    cfg["llm_config"]["num_hidden_layers"] = 2
    cfg["llm_config"]["hidden_size"] = 32
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shapes differ"):
        load_internvl(d)


def test_unmerged_lora_config_is_refused(tiny_ckpt, tmp_path):
    d = tmp_path / "lora"
    shutil.copytree(tiny_ckpt("internvl2-2b"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["use_llm_lora"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_llm_lora=16"):
        load_internvl(d)


def test_dtype_and_missing_files(tiny_ckpt, tmp_path):
    model = load_internvl(tiny_ckpt("internvl2-2b"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_internvl(tmp_path)


def _sharded(tiny_ckpt, tmp_path) -> Path:
    d = tmp_path / "sharded"
    model = load_internvl(tiny_ckpt("internvl2-2b"), dtype=torch.float32)
    save_official(model, d, source_dir=tiny_ckpt("internvl2-2b"), max_shard_size="200KB")
    assert (d / "model.safetensors.index.json").is_file()
    return d


@pytest.mark.parametrize("escape", ["relative", "absolute", "symlink"])
def test_index_entries_must_stay_inside_the_model_directory(tiny_ckpt, tmp_path, escape):
    d = _sharded(tiny_ckpt, tmp_path)
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    victim = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "elsewhere" / victim
    outside.parent.mkdir()
    shutil.move(d / victim, outside)  # a real safetensors file, so only the location is wrong
    if escape == "symlink":
        (d / victim).symlink_to(outside)
    else:
        name = os.path.relpath(outside, d) if escape == "relative" else str(outside)
        index["weight_map"] = {k: (name if v == victim else v) for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"weight_map entry .* points outside the model directory"):
        load_internvl(d)
    proc = run_cli(["chat", str(d), "--prompt", "hi"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("xtuner-vl chat: error: ") and "points outside" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_hugging_face_cache_snapshots_still_load(tiny_ckpt, tmp_path):
    """A hub cache snapshot links each file into the repository's blobs/: that is not an escape."""
    d = _sharded(tiny_ckpt, tmp_path)
    repo = tmp_path / "models--x--y"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in d.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    load_internvl(snapshot, dtype=torch.float32)
