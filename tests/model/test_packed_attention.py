"""Packed rows keep their samples apart on every attention back-end, for any number of rows.

The flash-attention-2 and torch-varlen paths run transformers' and our real plumbing on the CPU with
stand-in kernels (per-segment SDPA): packed batches of several rows (overflow rows included) must give
the logits, loss and gradients of the same samples unpacked, and dropping the boundaries must not.
"""

from __future__ import annotations

import pytest
import torch

from tests.model import flash_attn_standin
from xtuner_vl.dataset import InternVLDataset, collate_samples
from xtuner_vl.dataset.packing import pack_rows
from xtuner_vl.model import load_internvl, load_tokenizer
from xtuner_vl.model.attention import resolve_attn_implementation
from xtuner_vl.model.tokenizer import img_context_token_id
from xtuner_vl.structures import Sample
from xtuner_vl.tiny.data import make_synthetic_dataset


@pytest.fixture(scope="module")
def samples(tiny_ckpt, tmp_path_factory) -> dict[str, list[Sample]]:
    data, images = make_synthetic_dataset(tmp_path_factory.mktemp("attn"), num_samples=10, seed=4)
    out = {}
    for family in ("internvl2-2b", "internvl2-1b"):
        path = tiny_ckpt(family)
        ds = InternVLDataset(
            data_paths=[str(data)],
            tokenizer=load_tokenizer(path),
            image_folders=[str(images)],
            model_path=path,
            max_dynamic_patch=2,
        )
        out[family] = [ds[i] for i in range(6)]
    return out


@pytest.fixture
def backend(request, monkeypatch):
    """Install the stand-in kernel of the back-end under test."""
    if request.param == "flash_attention_2":
        flash_attn_standin.install(monkeypatch)
    elif request.param == "torch_varlen":
        import torch.nn.attention.varlen as varlen

        monkeypatch.setattr(varlen, "varlen_attn", flash_attn_standin.varlen_attn)
        flash_attn_standin.varlen_calls.clear()
    return request.param


def _run(model, cb, **drop):
    model.zero_grad(set_to_none=True)
    b = cb.batch
    inputs = dict(
        attention_mask=None if b.packed else b.attention_mask,
        position_ids=b.position_ids,
        image_flags=b.image_flags,
        cu_seqlens=b.cu_seqlens,
        max_seqlen=b.max_seqlen,
        image_token_index=b.image_token_index,
        use_cache=False,
    )
    inputs.update(drop)
    logits = model(b.pixel_values, b.input_ids, **inputs).logits
    out = model(b.pixel_values, b.input_ids, **inputs, loss_index=b.loss_index, loss_targets=b.loss_targets)
    loss = out.loss_sum.float() / b.num_trained
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), loss.detach(), grads


def _sample_logits(cb, logits):
    """Per sample, the logits of its own tokens (rows unpacked by the segment boundaries)."""
    flat, bounds = logits.reshape(-1, logits.shape[-1]), cb.batch.cu_seqlens.tolist()
    mask = cb.batch.attention_mask.reshape(-1).bool()
    return [flat[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if mask[a]]


@pytest.mark.parametrize("backend", ["flash_attention_2", "torch_varlen", "sdpa"], indirect=True)
@pytest.mark.parametrize("family", ["internvl2-2b", "internvl2-1b"])
def test_packed_rows_equal_unpacked(tiny_ckpt, samples, backend, family):
    model = load_internvl(tiny_ckpt(family), dtype=torch.float32, attn_implementation=backend).train()
    model.vision_model.requires_grad_(False)
    ctx = img_context_token_id(load_tokenizer(tiny_ckpt(family)))
    batch = samples[family]
    # Rows of ~1100 tokens: three rows (the last one holding what overflowed), more than one sample each.
    packed = collate_samples(pack_rows(batch, pack_length=1100, max_tiles=8), img_context_token_id=ctx)
    unpacked = collate_samples(batch, img_context_token_id=ctx)
    assert packed.batch.input_ids.shape[0] >= 2 and packed.num_samples == 6
    assert len(packed.batch.cu_seqlens) - 1 > packed.batch.input_ids.shape[0]  # segments > rows
    logits_u, loss_u, grads_u = _run(model, unpacked)
    logits_p, loss_p, grads_p = _run(model, packed)
    for got, ref in zip(_sample_logits(packed, logits_p), _sample_logits(unpacked, logits_u), strict=True):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loss_p, loss_u, atol=1e-5, rtol=1e-5)
    assert grads_u.keys() == grads_p.keys() and "mlp1.1.weight" in grads_u
    for k in grads_u:
        torch.testing.assert_close(grads_p[k], grads_u[k], atol=1e-5, rtol=1e-4, msg=k)
    if backend == "flash_attention_2":
        assert set(flash_attn_standin.calls) == {"varlen"}
    if backend == "torch_varlen":
        assert (len(packed.batch.cu_seqlens) - 1, packed.batch.max_seqlen) in flash_attn_standin.varlen_calls
    if backend != "sdpa":
        # The check above can fail: without the boundaries, transformers runs plain causal attention
        # over several rows, and the second sample of a row sees the first.
        logits_x, _, _ = _run(model, packed, cu_seqlens=None, max_seqlen=None)
        diffs = [
            (a - b).abs().max()
            for a, b in zip(_sample_logits(packed, logits_x), _sample_logits(unpacked, logits_u), strict=True)
        ]
        assert max(diffs) > 1e-2


def test_backend_choice_by_real_import(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_attn_implementation(None, cpu) == "sdpa"
    assert resolve_attn_implementation(None, cpu, packed=True) == "sdpa"  # the block mask: CPU only
    monkeypatch.setitem(__import__("sys").modules, "flash_attn", None)  # `import flash_attn` raises ImportError
    from xtuner_vl.model import attention

    attention.flash_attn_import_error.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"flash-attn unavailable \(ModuleNotFoundError.*torch varlen_attn"):
            assert resolve_attn_implementation(None, cuda, packed=True) == "torch_varlen"
        with pytest.raises(ValueError, match="flash-attn does not import"):
            resolve_attn_implementation("flash_attention_2", cuda)
        with pytest.raises(ValueError, match="packed rows need a variable-length back-end"):
            resolve_attn_implementation("sdpa", cuda, packed=True)
        assert resolve_attn_implementation("sdpa", cuda) == "sdpa"
        with pytest.raises(ValueError, match="needs CUDA"):
            resolve_attn_implementation("torch_varlen", cpu)
        with pytest.raises(ValueError, match="must be one of"):
            resolve_attn_implementation("flash", cpu)
    finally:
        attention.flash_attn_import_error.cache_clear()


def test_broken_flash_attn_wheel_is_not_chosen(monkeypatch):
    """A wheel built for another torch is found by find_spec but fails on import: not chosen."""
    import importlib.abc
    import sys

    class BrokenWheel(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            return importlib.util.spec_from_loader(name, self) if name == "flash_attn" else None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")

    from xtuner_vl.model import attention

    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.setattr(sys, "meta_path", [BrokenWheel(), *sys.meta_path])
    attention.flash_attn_import_error.cache_clear()
    try:
        assert importlib.util.find_spec("flash_attn") is not None
        assert "undefined symbol" in attention.flash_attn_import_error()
        with pytest.warns(UserWarning, match="undefined symbol"):
            assert resolve_attn_implementation(None, torch.device("cuda", 0)) == "torch_varlen"
    finally:
        attention.flash_attn_import_error.cache_clear()
