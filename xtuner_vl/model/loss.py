"""The one training loss: next-token cross-entropy of the output head, in fp32, in chunks.

Only the positions that are trained reach the head, a chunk of rows at a time, and each chunk's
gradients are computed right after its loss, so the full-vocabulary logits of all trained positions
never exist at once: a 16k-token packed row of Qwen2 (152k vocabulary) with 4k trained tokens would
need 2.3 GiB of fp32 logits, a chunk of 1024 rows 0.6 GiB.

The loss runs inside the head module's own forward (:class:`OutputHead`): ZeRO-3 gathers a module's
partitioned weight around its forward and its backward, so the head is gathered once per micro-step
on every rank, whatever the number of trained positions, and no rank waits on a gather another rank
never makes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEFAULT_CHUNK_ROWS", "OutputHead", "chunked_cross_entropy_sum"]

DEFAULT_CHUNK_ROWS = 1024


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed (optionally weighted) cross-entropy of ``hidden @ weight.T + bias``; gradients computed chunk by
    chunk in forward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        weights: torch.Tensor | None,
        chunk_rows: int,
    ) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        # Summed in float64: a float32 vector sum depends on buffer alignment (SIMD lanes), which differs
        # between a run and its resumption; the float64 sum rounds back to the same float32 loss.
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
            w = None if weights is None else weights[start : start + chunk_rows].float()
            logits = F.linear(h, weight, bias).float()
            ce = F.cross_entropy(logits, t, reduction="none").double()
            total += (ce if w is None else ce * w.double()).sum()
            if not (need_h or need_w or need_b):
                continue
            # d(sum of cross-entropy) / d(logits) = softmax - one_hot, in fp32, then in the weights' dtype
            # for the two products, as autograd's backward of `linear(...).float()` would do.
            grad = logits.softmax(-1)
            grad[torch.arange(t.numel(), device=t.device), t] -= 1.0
            if w is not None:
                grad *= w[:, None]
            del logits
            if need_b:
                grad_b += grad.sum(0)
            grad = grad.to(weight.dtype)
            if need_h:
                grad_h[start : start + chunk_rows] = grad @ weight
            if need_w:
                grad_w.addmm_(grad.t().float(), h.float())
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out.to(torch.float32)
        out_h = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
        out_w = (grad_w * scale).to(ctx.dtypes[0]) if grad_w is not None else None
        out_b = (grad_b * scale).to(ctx.dtypes[1]) if grad_b is not None else None
        return out_h, out_w, out_b, None, None, None


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,
    head: nn.Linear,
    targets: torch.Tensor,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_i w_i * cross_entropy(head(hidden[i]), targets[i])`` in float64 (``w_i`` = ``weights[i]``, 1 when
    None), ``chunk_rows`` rows of logits at a time. Reads ``head``'s weight directly: under ZeRO-3 call it from
    the head's forward (:class:`OutputHead`), where the weight is gathered."""
    return _ChunkedCrossEntropy.apply(hidden, head.weight, head.bias, targets, weights, chunk_rows)


class OutputHead(nn.Linear):
    """The LLM's output projection (same parameters and state-dict keys as the ``nn.Linear`` it replaces).

    ``head(hidden)`` gives logits; ``head(hidden, targets)`` gives the summed chunked cross-entropy, and
    ``head(hidden, targets, weights)`` its per-position weighted sum (``loss_reduction`` sample / square).
    """

    chunk_rows = DEFAULT_CHUNK_ROWS

    def forward(
        self, hidden: torch.Tensor, targets: torch.Tensor | None = None, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        if targets is None:
            return super().forward(hidden)
        return chunked_cross_entropy_sum(hidden, self, targets, self.chunk_rows, weights)

    @classmethod
    def adopt(cls, linear: nn.Linear) -> OutputHead:
        """Turn ``linear`` into an :class:`OutputHead` in place: no new parameters, so it works on the meta
        device, on ZeRO-3 partitioned weights and on loaded ones alike."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"the output head must be a torch.nn.Linear, got {type(linear).__name__}")
        linear.__class__ = cls
        return linear
