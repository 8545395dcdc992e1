"""Attention back-ends: flash-attention 2 when installed and running on a GPU, SDPA otherwise."""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

__all__ = ["flash_attn_available", "default_attn_implementation", "vision_attention"]


@functools.cache
def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flash_attn_available(device: torch.device | None = None) -> bool:
    """True when flash-attention 2 is importable and ``device`` (default: any) is a CUDA GPU."""
    on_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
    return on_gpu and _flash_attn_installed()


def default_attn_implementation() -> str:
    """``flash_attention_2`` on a GPU machine with flash-attn installed, else ``sdpa``."""
    return "flash_attention_2" if flash_attn_available() else "sdpa"


def vision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """Bidirectional attention over ``[batch, seq, heads, head_dim]`` tensors; same layout out."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _flash_attn_installed():
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v, dropout_p=dropout, causal=False)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout)
    return out.transpose(1, 2)
