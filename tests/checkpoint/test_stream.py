"""Unit tests of the streaming pieces: shard writer limits and the training-name -> official-name mapping."""

from __future__ import annotations

import weakref

import pytest
import torch
from safetensors.torch import load_file

from xtuner_vl.checkpoint import CheckpointError, ShardWriter, official_name, split_delta
from xtuner_vl.model.weights import read_state_dict, weight_files


def test_shard_writer_flushes_before_a_shard_overflows(tmp_path):
    tensors = {f"t{i}": torch.full((250,), float(i)) for i in range(7)}  # 1000 bytes each
    writer = ShardWriter(tmp_path, max_shard_size=2500)
    for key, t in tensors.items():
        writer.add(key, t)
        assert writer._pending_bytes <= 2500  # never more than one shard in memory
    names = writer.finish()
    assert names[-1] == "model.safetensors.index.json" and len(names) == 5  # 4 shards of <= 2 tensors
    got = read_state_dict(tmp_path)
    assert list(got) == list(tensors) and all(torch.equal(got[k], tensors[k]) for k in got)
    assert not list(tmp_path.glob(".*.tmp"))
    writer = ShardWriter(tmp_path, "1MB")
    writer.add("x", torch.zeros(3))
    assert writer.finish() == ["model.safetensors"]
    assert [p.name for p in weight_files(tmp_path)] == ["model.safetensors"]
    assert not list(tmp_path.glob("model-*"))  # stale shards of the earlier output removed


def test_shard_writer_keeps_no_tensor_and_writes_what_safetensors_reads(tmp_path):
    tensors = {
        "w": torch.randn(3, 5).bfloat16(),
        "ids": torch.arange(7),
        "mask": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
        "half": torch.ones(2).half(),
        "empty": torch.zeros(0, 4),
    }
    writer = ShardWriter(tmp_path, "1GB")
    for key, t in tensors.items():
        writer.add(key, t)
    probe = torch.ones(1000)
    ref = weakref.ref(probe)
    writer.add("probe", probe)
    del probe
    assert ref() is None  # its bytes went to disk at once; nothing waits in memory for the shard to fill
    with pytest.raises(ValueError, match="already written"):
        writer.add("w", torch.ones(1))
    assert writer.finish() == ["model.safetensors"]
    got = load_file(tmp_path / "model.safetensors")
    assert got.keys() == {*tensors, "probe"}
    assert all(got[k].dtype == t.dtype and torch.equal(got[k], t) for k, t in tensors.items())
    assert not list(tmp_path.glob(".*"))  # no temporary data or shard file left


def test_official_names_and_lora_pairs():
    prefix = "language_model.base_model.model.model.layers.0.attention.wqkv"
    assert official_name("language_model.base_model.model.output.weight") == "language_model.output.weight"
    assert official_name("vision_model.base_model.model.encoder.layers.1.attn.qkv.base_layer.bias") == (
        "vision_model.encoder.layers.1.attn.qkv.bias"
    )
    state = {
        f"{prefix}.lora_A.default.weight": torch.ones(2, 4),
        f"{prefix}.lora_B.default.weight": torch.ones(6, 2),
        "mlp1.1.weight": torch.zeros(3, 3),
    }
    delta = split_delta(state, {"language_model": 4.0})
    key = "language_model.model.layers.0.attention.wqkv.weight"
    assert set(delta.replacements) == {"mlp1.1.weight"} and set(delta.loras) == {key}
    torch.testing.assert_close(delta.loras[key].delta(), torch.full((6, 4), 2.0 * 2.0))  # B@A = 2, alpha/r = 2
    with pytest.raises(CheckpointError, match="only lora_A"):
        split_delta({f"{prefix}.lora_A.default.weight": torch.ones(2, 4)}, {"language_model": 4.0})
    with pytest.raises(CheckpointError, match="trains no LoRA"):
        split_delta(state, {"vision_model": 4.0})
