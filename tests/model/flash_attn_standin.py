"""A stand-in ``flash_attn`` package for CPU tests: the same functions and signatures as flash-attn 2,
computed with per-segment SDPA, so transformers' own flash-attention-2 code path (unpadding, varlen
keyword arguments) runs without a GPU. Install it with :func:`install`.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

calls: list[str] = []  # which entry points ran, for the tests to check the path taken


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool) -> torch.Tensor:
    """``[seq, heads, dim]`` -> same, one sequence."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        is_causal=causal,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.transpose(0, 1)


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    calls.append("varlen")
    assert isinstance(max_seqlen_q, int), "max_seqlen must reach the kernel as a host int"
    bounds = cu_seqlens_q.tolist()
    assert bounds[-1] == q.shape[0] and cu_seqlens_k.tolist() == bounds
    assert max_seqlen_q == max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    parts = [_attend(q[a:b], k[a:b], v[a:b], softmax_scale, causal) for a, b in zip(bounds, bounds[1:], strict=False)]
    return torch.cat(parts)


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    calls.append("dense")
    return torch.stack([_attend(q[i], k[i], v[i], softmax_scale, causal) for i in range(q.shape[0])])


varlen_calls: list[tuple[int, int]] = []  # (segments, max length) of each torch varlen_attn call


def varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """``torch.nn.attention.varlen.varlen_attn``'s contract (CUDA-only in torch), one segment at a time."""
    assert window_size == (-1, 0) and torch.equal(cu_seq_q, cu_seq_k) and isinstance(max_q, int)
    bounds = cu_seq_q.tolist()
    assert bounds[-1] == q.shape[0] and max_q == max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    varlen_calls.append((len(bounds) - 1, max_q))
    return torch.cat([_attend(q[a:b], k[a:b], v[a:b], scale, True) for a, b in zip(bounds, bounds[1:], strict=False)])


def flash_attn_with_kvcache(*args, **kwargs):
    raise NotImplementedError("not used in training")


def install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import flash_attn`` give this stand-in and transformers believe flash-attn 2 is usable."""
    import transformers.modeling_flash_attention_utils as fa_utils
    from transformers.modeling_flash_attention_utils import _pad_input, _unpad_input

    from xtuner_vl.model import attention

    pkg = types.ModuleType("flash_attn")
    pkg.flash_attn_func, pkg.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    pkg.flash_attn_with_kvcache = flash_attn_with_kvcache
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.pad_input, padding.unpad_input = _pad_input, _unpad_input
    pkg.bert_padding = padding
    monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.setitem(sys.modules, "flash_attn.bert_padding", padding)
    available = lambda *args, **kwargs: True  # noqa: E731
    monkeypatch.setattr(fa_utils, "is_flash_attn_2_available", available)
    monkeypatch.setitem(fa_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2], "general_availability_check", available)
    monkeypatch.setattr(fa_utils, "_loaded_implementation", None)  # import the stand-in on first use
    attention.flash_attn_import_error.cache_clear()
    monkeypatch.undo = _chain(monkeypatch.undo, attention.flash_attn_import_error.cache_clear)
    calls.clear()


def _chain(first, second):
    def both():
        first()
        second()

    return both
