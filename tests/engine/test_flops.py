"""The analytic FLOP count of a training step against torch's FlopCounterMode on real steps."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from xtuner_vl.dataset import collate_samples
from xtuner_vl.dataset.collate import PackedItem
from xtuner_vl.dataset.packing import pack_rows
from xtuner_vl.engine.flops import TrainingFlops, peak_bf16_flops, sample_shapes
from xtuner_vl.model import load_internvl
from xtuner_vl.recipes.model_wrapper import InternVLChat
from xtuner_vl.structures import IGNORE_INDEX, Sample
from xtuner_vl.tiny.checkpoints import make_tiny

aten = torch.ops.aten


def _sdpa_forward(query, key, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode has no formula for the CPU flash kernel; this is its CUDA formula: two matmuls.
    b, h, s, d = query  # shapes, not tensors
    return 4 * b * h * s * key[-2] * d


def _sdpa_backward(grad_out, query, key, *args, out_shape=None, **kwargs) -> int:
    b, h, s, d = query
    return 8 * b * h * s * key[-2] * d


def _addmm_inplace(accumulator, a, b, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode counts addmm but not its in-place form, which the loss uses to sum the head's gradient.
    return 2 * a[0] * a[1] * b[1]


CPU_SDPA = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
    aten.addmm_: _addmm_inplace,
}


@pytest.fixture(scope="module")
def tiny_internvl2(tmp_path_factory):
    return make_tiny("internvl2-2b", tmp_path_factory.mktemp("flops") / "ckpt")


def _counted_step(model, tokens: int, tiles: int, prompt: int) -> tuple[float, tuple[int, int, int]]:
    """FLOPs FlopCounterMode sees in one forward + backward of a sample (the trainer's loss), and its shape."""
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.randint(10, 500, (1, tokens), generator=gen)
    ids[0, 5 : 5 + tiles * model.num_image_token] = model.img_context_token_id
    labels = ids.clone()
    labels[0, :prompt] = IGNORE_INDEX
    size = model.config.image_size
    pixels, flags = torch.randn(tiles, 3, size, size, generator=gen), torch.ones(tiles, dtype=torch.long)
    index = (labels[0, 1:] != IGNORE_INDEX).nonzero()[:, 0]
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        out = model(
            pixel_values=pixels,
            input_ids=ids,
            image_flags=flags,
            use_cache=False,
            loss_index=index,
            loss_targets=labels[0, index + 1],
        )
        out.loss_sum.backward()
    return counter.get_total_flops(), sample_shapes(ids[0], labels[0], flags)


METHODS = {
    "lora (vit frozen, mlp1 trained)": dict(lora=dict(llm_rank=8, dropout=0.0)),
    "full": dict(freeze=dict(vit=False)),
    "vit + llm lora": dict(lora=dict(llm_rank=8, vit_rank=4, dropout=0.0)),
    "lora, mlp1 frozen": dict(lora=dict(llm_rank=8, dropout=0.0), freeze=dict(mlp=True)),
    "llm frozen, mlp1 trained": dict(freeze=dict(llm=True)),
    "last vit layer only": dict(freeze=dict(mlp=True, llm=True, unfreeze_vit_layers=1)),
    "lm head only": dict(freeze=dict(mlp=True, llm=True, unfreeze_lm_head=True)),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_count_equals_flop_counter(tiny_internvl2, method):
    settings = InternVLChat(path=str(tiny_internvl2), gradient_checkpointing=False, **METHODS[method])
    model = settings.apply_method(load_internvl(tiny_internvl2, dtype=torch.float32), torch.float32)
    flops = TrainingFlops(model)
    for tokens, tiles, prompt in ((700, 2, 600), (300, 1, 280)):
        counted, shape = _counted_step(model, tokens, tiles, prompt)
        # SDPA here runs full (non-causal-discounted) attention matmuls, as FlopCounterMode counts them.
        assert flops.sample(*shape, causal=False) == pytest.approx(counted, rel=1e-9), (method, tokens)
        model.zero_grad(set_to_none=True)


def test_causal_discount_and_what_training_adds(tiny_internvl2):
    model = load_internvl(tiny_internvl2, dtype=torch.float32)
    frozen = TrainingFlops(model.requires_grad_(False))
    forward = frozen.sample(1000, 3, 50, causal=False)
    llm_attention_forward = 4.0 * 1000 * 1000 * frozen.llm_width * len(frozen.walk.attention["llm"])
    assert frozen.sample(1000, 3, 50) == pytest.approx(forward - llm_attention_forward / 2)
    full = TrainingFlops(model.requires_grad_(True))
    # Training everything: backward is twice the forward for every matmul, except the patch convolution's
    # input gradient (pixels need none).
    patch_forward = 2.0 * 3 * 14 * 14 * model.config.vision.hidden_size * 3 * frozen.vit_tokens
    assert full.sample(1000, 3, 50, causal=False) == pytest.approx(3 * forward - patch_forward)


def test_peak_by_device_name():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_bf16_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == pytest.approx(312e12)
    assert peak_bf16_flops("NVIDIA H200") == pytest.approx(989.4e12)
    assert peak_bf16_flops("NVIDIA GeForce GTX 1080") is None


def _sample(tokens: int, tiles: int, prompt: int) -> Sample:
    ids = torch.arange(tokens) % 500 + 10
    labels = ids.clone()
    labels[:prompt] = IGNORE_INDEX
    flags = torch.ones(tiles, dtype=torch.long) if tiles else torch.zeros(1, dtype=torch.long)  # dummy tile
    return Sample(ids, labels, torch.zeros(len(flags), 3, 4, 4), flags)


def test_batch_count_is_per_sample_packed_or_padded(tiny_internvl2):
    settings = InternVLChat(path=str(tiny_internvl2), lora=dict(llm_rank=8))
    flops = TrainingFlops(settings.apply_method(load_internvl(tiny_internvl2, dtype=torch.float32), torch.float32))
    samples = [_sample(900, 3, 850), _sample(120, 0, 60), _sample(400, 1, 390), _sample(50, 0, 20)]
    expected = sum(flops.sample(*sample_shapes(s.input_ids, s.labels, s.image_flags)) for s in samples)
    padded = collate_samples(samples).batch
    packed = collate_samples([PackedItem(pack_rows(samples, pack_length=1100, max_tiles=8), [])]).batch
    assert padded.input_ids.shape == (4, 900) and packed.input_ids.shape == (2, 1020) and packed.packed
    assert flops.of_batch(padded) == pytest.approx(expected)
    assert flops.of_batch(packed) == pytest.approx(expected)
    # Per-sample attention: one sample of all the tokens would cost more.
    assert flops.sample(1470, 4, 1470 - 1 - 850 - 60 - 390 - 20 + 3) > expected
