"""Attention back-ends and how each one sees padded and packed batches.

| value | padded batches | packed rows |
|---|---|---|
| ``flash_attention_2`` | flash-attn varlen over the real tokens | flash-attn varlen, one segment per sample |
| ``torch_varlen`` | torch's ``varlen_attn`` (CUDA), padding as a segment of its own | same, one segment per sample |
| ``sdpa`` / ``eager`` | 2-D padding mask | dense block-diagonal mask (CPU only) |

The variable-length back-ends get the segment boundaries (``cu_seqlens``, ``max_seqlen``) collate
computed on the CPU, as keyword arguments of transformers' attention interface, for any number of
rows: transformers infers boundaries from ``position_ids`` only for a batch of one row
(``modeling_flash_attention_utils._is_packed_sequence``), and with several rows would attend across
samples. ``flash_attention_2`` is chosen only if ``import flash_attn`` really works (a wheel built for
another torch fails there, not after a long load).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "VARLEN_IMPLEMENTATIONS",
    "flash_attn_import_error",
    "resolve_attn_implementation",
    "default_attn_implementation",
    "torch_varlen_attention",
    "vision_attention",
]

VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "torch_varlen")
ATTN_IMPLEMENTATIONS = (*VARLEN_IMPLEMENTATIONS, "sdpa", "eager")


@functools.cache
def flash_attn_import_error() -> str | None:
    """None when ``flash_attn`` (with its varlen kernel) imports; else the error, in one line."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func  # noqa: F401
    except Exception as e:  # ImportError, or OSError / RuntimeError from a wheel built for another torch
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None


def _torch_varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attn_implementation(requested: str | None, device: torch.device, packed: bool = False) -> str:
    """The attention back-end for training on ``device``.

    ``None`` (auto): ``flash_attention_2`` on CUDA when flash-attn imports, else ``torch_varlen`` on CUDA
    (one warning naming the import error), ``sdpa`` on the CPU. An explicit choice is checked: a
    variable-length back-end it cannot run is an error, and ``packed`` rows on CUDA need one (the CPU
    fallback materialises a ``[rows, 1, seq, seq]`` mask and computes every block).
    """
    if requested is not None and requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"model.attn_implementation must be one of {ATTN_IMPLEMENTATIONS} or None, got {requested!r}")
    on_cuda = device.type == "cuda"
    if requested is None:
        if not on_cuda:
            return "sdpa"
        error = flash_attn_import_error()
        if error is None:
            return "flash_attention_2"
        if _torch_varlen_available():
            warnings.warn(f"flash-attn unavailable ({error}); attention runs on torch varlen_attn", stacklevel=2)
            return "torch_varlen"
        requested = "sdpa"
    if requested == "flash_attention_2" and (error := flash_attn_import_error()) is not None:
        raise ValueError(f"model.attn_implementation='flash_attention_2' but flash-attn does not import ({error})")
    if requested == "torch_varlen" and not (on_cuda and _torch_varlen_available()):
        raise ValueError("model.attn_implementation='torch_varlen' needs CUDA and torch.nn.attention.varlen")
    if packed and on_cuda and requested not in VARLEN_IMPLEMENTATIONS:
        raise ValueError(
            f"dataloader.pack=True with model.attn_implementation={requested!r} on CUDA: packed rows need a "
            "variable-length back-end (flash_attention_2 or torch_varlen); a dense block mask would compute "
            "every sample against every other"
        )
    return requested


def default_attn_implementation(device: torch.device | None = None) -> str:
    """For inference and conversion: ``flash_attention_2`` on CUDA when flash-attn imports, else ``sdpa``."""
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    return "flash_attention_2" if on_cuda and flash_attn_import_error() is None else "sdpa"


def torch_varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function on torch's ``varlen_attn`` (``[batch, heads, seq, dim]``
    in, ``[batch, seq, heads, dim]`` out, like the other back-ends).

    Without boundaries (generation) it runs transformers' SDPA function on the mask it is given.
    """
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise ValueError("torch_varlen attention has no dropout; the InternVL LLMs train without it")
    from torch.nn.attention.varlen import varlen_attn

    batch, _, seq, dim = query.shape
    # Causal within each segment; a sliding window keeps `sliding_window` keys including the current one.
    window = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], dim) for t in (query, key, value))
    out = varlen_attn(
        q,
        k,
        v,
        cu_seq_lens_q,
        cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q,
        max_length_q,
        max_length_k if max_length_k is not None else max_length_q,
        scale=scaling,
        window_size=window,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.reshape(batch, seq, -1, dim), None


# transformers' public extension point: any model built with attn_implementation="torch_varlen" calls it.
# No mask function is registered for it, so transformers builds no mask (the segments replace it).
AttentionInterface.register("torch_varlen", torch_varlen_attention)


def vision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """Bidirectional attention over ``[batch, seq, heads, head_dim]`` tensors; same layout out."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_import_error() is None:
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v, dropout_p=dropout, causal=False)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout)
    return out.transpose(1, 2)
