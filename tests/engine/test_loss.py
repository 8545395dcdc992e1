"""The trainer's loss: only trained positions get logits, same value and gradients as full logits."""

from __future__ import annotations

import pytest
import torch

from xtuner_vl.engine.trainer import loss_positions, token_loss_sum
from xtuner_vl.model import load_internvl


@pytest.mark.parametrize("family", ["internvl2-2b", "internvl2-1b", "internvl2-4b", "internvl2-40b"])
def test_loss_on_trained_positions_only_equals_full_logits(tiny_ckpt, family):
    model = load_internvl(tiny_ckpt(family), dtype=torch.float32).train()
    ids = torch.randint(20, model.language_model.config.vocab_size - 20, (2, 300))
    ids[ids == model.img_context_token_id] = 20
    ids[0, 2:258] = model.img_context_token_id
    labels = torch.full_like(ids, -100)
    labels[0, 270:290], labels[1, 100:120] = ids[0, 270:290], ids[1, 100:120]
    pixels, flags = torch.randn(2, 3, 448, 448), torch.tensor([1, 0])
    full = model(pixels, ids, image_flags=flags, use_cache=False)
    ref = token_loss_sum(full.logits, labels)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    positions = loss_positions(labels)
    assert positions.tolist() == list(range(99, 119)) + list(range(269, 289))
    part = model(pixels, ids, image_flags=flags, use_cache=False, logits_to_keep=positions)
    assert part.logits.shape == (2, 40, full.logits.shape[-1])  # 40 positions, not 300
    got = token_loss_sum(part.logits, labels, positions)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    got.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-6, rtol=1e-5, msg=n)
