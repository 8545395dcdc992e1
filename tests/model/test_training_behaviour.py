"""What training relies on: loss semantics, gradients, dummy tiles, checkpointing, generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xtuner_vl.model import IGNORE_INDEX, load_internvl


def _sample(model, tiles: int, seq: int = 320):
    ids = torch.randint(20, model.language_model.config.vocab_size - 20, (1, seq))
    ids[ids == model.img_context_token_id] = 20
    if tiles:
        ids[0, 2 : 2 + tiles * model.num_image_token] = model.img_context_token_id
    labels = ids.clone()
    labels[0, : seq - 20] = IGNORE_INDEX
    flags = torch.tensor([1] * tiles if tiles else [0])
    return torch.randn(len(flags), 3, 448, 448), ids, labels, flags


@pytest.fixture
def model(tiny_ckpt):
    return load_internvl(tiny_ckpt("internvl2-2b"), dtype=torch.float32).train()


def test_loss_is_mean_ce_over_trained_tokens(model):
    model.eval()
    pixels, ids, labels, flags = _sample(model, 1)
    out = model(pixels, ids, image_flags=flags, labels=labels)
    expected = F.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, expected)


def test_gradients_reach_mlp1_llm_and_vit(model):
    pixels, ids, labels, flags = _sample(model, 1)
    model(pixels, ids, image_flags=flags, labels=labels).loss.backward()
    for name in (
        "mlp1.1.weight",
        "language_model.model.layers.0.attention.wqkv.weight",
        "vision_model.encoder.layers.0.attn.qkv.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_text_only_dummy_tile_keeps_vit_in_graph(model):
    """A text-only sample runs its dummy tile (flag 0) through the ViT: every parameter gets a
    gradient (zero for the vision side), which DDP and ZeRO-3 need to stay in step."""
    pixels, ids, labels, flags = _sample(model, 0)
    out = model(pixels, ids, image_flags=flags, labels=labels)
    with torch.no_grad():
        no_pixels = model.language_model(input_ids=ids).logits
    torch.testing.assert_close(out.logits, no_pixels)  # the dummy tile does not change the text
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.mlp1[1].weight.grad.abs().sum() == 0
    assert model.language_model.model.layers[0].attention.wqkv.weight.grad.abs().sum() > 0


def test_mismatched_image_tokens_fail_loudly(model):
    pixels, ids, labels, flags = _sample(model, 1)
    with pytest.raises(ValueError, match="disagree"):
        model(torch.cat([pixels, pixels]), ids, image_flags=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="image_flags"):
        model(pixels, ids, image_flags=torch.tensor([1, 1]))


def test_image_flags_accepts_column_shape(model):
    model.eval()
    pixels, ids, _, flags = _sample(model, 1)
    with torch.no_grad():
        assert torch.equal(
            model(pixels, ids, image_flags=flags).logits, model(pixels, ids, image_flags=flags[:, None]).logits
        )


def test_gradient_checkpointing_gives_same_grads(model):
    pixels, ids, labels, flags = _sample(model, 1)
    model(pixels, ids, image_flags=flags, labels=labels).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.vision_model.encoder.gradient_checkpointing
    assert all(layer.gradient_checkpointing for layer in model.language_model.model.layers)
    model(pixels, ids, image_flags=flags, labels=labels).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5, rtol=1e-4, msg=n)


def test_drop_path_is_active_in_training_only(tiny_ckpt):
    from xtuner_vl.model.configuration import read_config
    from xtuner_vl.model.intern_vit import InternVisionModel

    cfg = read_config(tiny_ckpt("internvl2-2b")).vision
    cfg.drop_path_rate = 0.5
    vit = InternVisionModel(cfg)
    x = torch.randn(2, 3, 448, 448)
    with torch.no_grad():
        assert torch.equal(vit.eval()(x), vit(x))
        assert not torch.equal(vit.train()(x), vit.eval()(x))


@pytest.mark.parametrize("family", ["internvl2-2b", "internvl2-4b", "internvl2-1b"])
def test_generate_with_cache_matches_full_forward(tiny_ckpt, family):
    model = load_internvl(tiny_ckpt(family), dtype=torch.float32)
    pixels, ids, _, flags = _sample(model, 1, seq=280)
    new = model.generate(
        pixels, ids, image_flags=flags, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert new.shape == (1, 5)
    seq = ids
    with torch.no_grad():
        for step in range(5):
            nxt = model(pixels, seq, image_flags=flags).logits[:, -1].argmax(-1, keepdim=True)
            assert nxt.item() == new[0, step].item()
            seq = torch.cat([seq, nxt], dim=1)
