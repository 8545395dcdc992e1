"""The one training loss: chunked fp32 cross-entropy on the trained positions only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from xtuner_vl.dataset import collate_samples
from xtuner_vl.model import load_internvl
from xtuner_vl.model.loss import OutputHead, chunked_cross_entropy_sum
from xtuner_vl.structures import IGNORE_INDEX, Sample


def _reference_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over labels != -100, from full logits (the official shift)."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@pytest.mark.parametrize("family", ["internvl2-2b", "internvl2-1b", "internvl2-4b", "internvl2-40b"])
def test_training_form_equals_full_logits(tiny_ckpt, family):
    model = load_internvl(tiny_ckpt(family), dtype=torch.float32).train()
    ctx, vocab = model.img_context_token_id, model.language_model.config.vocab_size
    samples = []
    for seq, trained, tiles in ((300, (270, 290), 1), (200, (100, 120), 0)):
        ids = torch.randint(20, vocab - 20, (seq,))
        ids[ids == ctx] = 20
        ids[2 : 2 + tiles * model.num_image_token] = ctx
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[slice(*trained)] = ids[slice(*trained)]
        flags = torch.tensor([1] * tiles or [0])
        samples.append(Sample(ids, labels, torch.randn(len(flags), 3, 448, 448), flags))
    b = collate_samples(samples, img_context_token_id=ctx).batch
    assert b.num_trained == 40 and b.loss_index.tolist() == list(range(269, 289)) + list(range(300 + 99, 300 + 119))
    full = model(b.pixel_values, b.input_ids, attention_mask=b.attention_mask, image_flags=b.image_flags)
    ref = _reference_sum(full.logits, b.labels)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    out = model(
        b.pixel_values,
        b.input_ids,
        attention_mask=b.attention_mask,
        image_flags=b.image_flags,
        image_token_index=b.image_token_index,
        loss_index=b.loss_index,
        loss_targets=b.loss_targets,
    )
    assert out.logits is None and out.loss_sum.dtype == torch.float64
    torch.testing.assert_close(out.loss_sum.float(), ref, rtol=1e-6, atol=1e-5)
    out.loss_sum.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-6, rtol=1e-5, msg=n)
    # The official form (labels=) goes through the same loss.
    model.zero_grad(set_to_none=True)
    official = model(
        b.pixel_values, b.input_ids, attention_mask=b.attention_mask, image_flags=b.image_flags, labels=b.labels
    )
    torch.testing.assert_close(official.loss, ref / 40, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunks_equal_autograd(dtype):
    """Values and gradients (hidden, weight, bias) equal autograd through full logits, for any chunking."""
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=True).to(dtype)
    hidden = torch.randn(37, 16, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    ref = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    (ref * 0.5).backward()
    expected = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for chunk_rows in (1, 4, 37, 1024):
        head.zero_grad()
        hidden.grad = None
        total = chunked_cross_entropy_sum(hidden, head, targets, chunk_rows)
        assert total.dtype == torch.float64
        torch.testing.assert_close(total.float(), ref.detach(), **tol)
        (total * 0.5).backward()
        for got, want in zip([hidden.grad, head.weight.grad, head.bias.grad], expected, strict=True):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, **tol)


def test_one_head_call_per_micro_step_whatever_the_rows():
    """Under ZeRO-3 each head call gathers its weight, a collective every rank must join: the loss calls
    the head once, with or without trained positions, and the weight still gets a (zero) gradient."""
    head = OutputHead.adopt(nn.Linear(8, 30, bias=False))
    calls = []
    head.register_forward_pre_hook(lambda *_: calls.append(1))
    for rows in (0, 5, 3000):
        calls.clear()
        head.zero_grad()
        hidden = torch.randn(rows, 8, requires_grad=True)
        total = head(hidden, torch.zeros(rows, dtype=torch.long))
        total.backward()
        assert len(calls) == 1 and head.weight.grad is not None
        if rows == 0:
            assert total.item() == 0.0 and not head.weight.grad.any()
    assert head(torch.randn(2, 8)).shape == (2, 30)  # without targets: logits
    with pytest.raises(TypeError, match="must be a torch.nn.Linear"):
        OutputHead.adopt(nn.Embedding(3, 3))


class _Sizes(TorchDispatchMode):
    """Largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_full_vocabulary_logits_never_exist_at_once():
    rows, width, vocab = 3000, 32, 4000
    head = nn.Linear(width, vocab, bias=False).requires_grad_(False)  # LoRA: the head is frozen
    hidden = torch.randn(rows, width, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with _Sizes() as sizes, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_cross_entropy_sum(hidden, head, targets, 512).backward()
    assert sizes.largest <= 512 * vocab  # one chunk's logits at most
    assert max(saved) <= rows * width  # kept for backward: the hidden states' gradient, nothing vocabulary-wide
    with _Sizes() as sizes:  # what it replaces: the head over all trained rows at once
        F.cross_entropy(head(hidden), targets, reduction="sum").backward()
    assert sizes.largest == rows * vocab > 5 * 512 * vocab
