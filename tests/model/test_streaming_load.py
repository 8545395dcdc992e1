"""Tensor-by-tensor loading (open_checkpoint / stream_into): the same model and the same errors as
load_internvl, and QLoRA quantizing each LLM linear as it is read equal to quantizing after the load."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from xtuner_vl.model import load_internvl, save_official
from xtuner_vl.model.loader import open_checkpoint, stream_into
from xtuner_vl.model.weights import read_state_dict
from xtuner_vl.recipes.model_wrapper import InternVLChat

CPU = torch.device("cpu")


def _same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    buffers = dict(b.named_buffers())  # non-persistent ones (rotary tables) too
    assert all(t.dtype == buffers[n].dtype and torch.equal(t, buffers[n]) for n, t in a.named_buffers())
    assert [(n, p.requires_grad) for n, p in a.named_parameters()] == [
        (n, p.requires_grad) for n, p in b.named_parameters()
    ]
    assert a.training == b.training and a.img_context_token_id == b.img_context_token_id


@pytest.mark.parametrize(
    ("family", "dtype"),
    [
        ("internvl2-2b", torch.float32),
        ("internvl2-40b", torch.bfloat16),
        ("internvl2-4b", torch.float32),
        ("internvl2-1b", torch.bfloat16),
    ],
)
def test_stream_equals_load_internvl(tiny_ckpt, family, dtype):
    path = tiny_ckpt(family)
    streamed = stream_into(open_checkpoint(path), dtype, CPU)
    _same_model(streamed, load_internvl(path, dtype=dtype))
    assert streamed.language_model.generation_config.eos_token_id is not None
    assert not any(t.is_meta for t in [*streamed.parameters(), *streamed.buffers()])


def test_stream_reads_shards_and_bin_files(tiny_ckpt, tmp_path):
    src = tiny_ckpt("internvl2-2b")
    ref = load_internvl(src, dtype=torch.float32)
    sharded = save_official(ref, tmp_path / "sharded", source_dir=src, dtype=torch.float32, max_shard_size="100KB")
    binary = tmp_path / "bin"
    shutil.copytree(src, binary)
    torch.save(read_state_dict(binary), binary / "pytorch_model.bin")
    (binary / "model.safetensors").unlink()
    for d in (sharded, binary):
        stream = open_checkpoint(d)
        sizes = [math.prod(stream.model.state_dict()[key].shape) for _, key in stream.order]
        assert sorted(key for _, key in stream.order) == sorted(ref.state_dict()) and sizes == sorted(sizes)[::-1]
        assert len({file for file, _ in stream.order}) == (1 if d == binary else len(list(d.glob("*.safetensors"))))
        _same_model(stream_into(stream, torch.float32, CPU), ref)


def corrupt_checkpoint(src, dst, how: str):
    """A copy of ``src`` at ``dst`` with one defect: a missing or unexpected key, a wrong shape, a key in
    two shards, or unmerged LoRA in config.json."""
    shutil.copytree(src, dst)
    file = dst / "model.safetensors"
    state = load_file(str(file))
    if how == "missing":
        del state["language_model.model.layers.1.attention.wo.weight"]
    elif how == "unexpected":
        state["mlp1.9.weight"] = torch.zeros(2)
    elif how == "shape":
        state["mlp1.1.weight"] = state["mlp1.1.weight"][:, :-1].contiguous()
    elif how == "twice":  # the same key in two shards
        keys = sorted(state)
        save_file({k: state[k] for k in keys[:10]}, str(dst / "a.safetensors"), metadata={"format": "pt"})
        save_file({k: state[k] for k in keys[9:]}, str(dst / "b.safetensors"), metadata={"format": "pt"})
        weight_map = {**dict.fromkeys(keys[9:], "b.safetensors"), **dict.fromkeys(keys[:10], "a.safetensors")}
        (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        file.unlink()
        return dst
    elif how == "lora":
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, "use_llm_lora": 16}))
    save_file(state, str(file), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("how", ["missing", "unexpected", "shape", "twice", "lora"])
def test_bad_checkpoints_give_load_internvl_errors(tiny_ckpt, tmp_path, how):
    bad = corrupt_checkpoint(tiny_ckpt("internvl2-2b"), tmp_path / how, how)
    with pytest.raises(ValueError) as plain:
        load_internvl(bad)
    with pytest.raises(ValueError) as streamed:
        open_checkpoint(bad)
    assert str(streamed.value) == str(plain.value)
    expected = {
        "missing": "1 missing",
        "unexpected": "1 unexpected",
        "shape": "shapes differ",
        "twice": "appears in two weight files",
        "lora": "use_llm_lora=16",
    }[how]
    assert expected in str(plain.value)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_qlora_quantized_while_loading_equals_quantized_after(tiny_ckpt, dtype):
    """InternVLChat.build quantizes each LLM linear as it is read; the old way loads the whole model and
    then quantizes it (InternVLChat.apply_method). Same nf4 bytes, same trainable set, same logits and loss."""
    bnb = pytest.importorskip("bitsandbytes")
    path = tiny_ckpt("internvl2-2b")
    s = InternVLChat(path=str(path), dtype=dtype, lora=dict(llm_rank=8, dropout=0.0), quantization=dict(llm="nf4"))
    torch.manual_seed(0)
    new = s.build(CPU)
    torch.manual_seed(0)  # LoRA's init draws from the global RNG after the load, in both
    load_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    old = s.apply_method(load_internvl(path, dtype=load_dtype), load_dtype)
    _same_model(new, old)
    assert sum(type(m) is bnb.nn.Linear4bit for m in new.modules()) == 2 * 5  # 2 layers x 5 InternLM2 linears
    assert all(p.quant_state is not None for p in new.parameters() if p.dtype == torch.uint8)
    ids = torch.randint(20, 600, (2, 300))
    ids[ids == new.img_context_token_id] = 20
    ids[:, 3 : 3 + new.num_image_token] = new.img_context_token_id
    pixels = torch.randn(2, 3, 448, 448, dtype=load_dtype)
    new.eval(), old.eval()
    with torch.no_grad():
        a, b = new(pixels, ids, labels=ids), old(pixels, ids, labels=ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)


def test_qlora_layers_exist_before_any_tensor_is_read(tiny_ckpt):
    """Each target linear is an empty Linear4bit from the start: no bf16 linear of the LLM is ever kept."""
    pytest.importorskip("bitsandbytes")
    from xtuner_vl.adapters.qlora import nf4_loader

    stream = open_checkpoint(tiny_ckpt("internvl2-40b"))
    place = nf4_loader(stream.model.language_model, torch.float32, CPU)
    quantized = [m for m in stream.model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(quantized) == 2 * 7 and all(m.weight.is_meta for m in quantized)  # Llama: q, k, v, o, gate, up, down
    kept = []

    def watching(module, name, tensor):
        placed = place(module, name, tensor)
        kept.extend(
            n
            for n, p in stream.model.language_model.named_parameters()
            if p.dim() == 2 and p.is_floating_point() and not p.is_meta and "embed" not in n and "lm_head" not in n
        )
        return placed

    model = stream_into(stream, torch.float32, CPU, watching)
    assert kept == [] and all(not m.weight.is_meta for m in quantized)
    assert model.language_model.is_loaded_in_4bit
