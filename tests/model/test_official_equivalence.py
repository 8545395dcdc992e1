"""Our model against an independent naive implementation of the official forward (fp32, 1e-4)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.model.reference import reference_logits
from xtuner_vl.model import load_internvl
from xtuner_vl.model.weights import read_state_dict
from xtuner_vl.tiny.families import TINY_FAMILIES

ATOL = 1e-4


def _batch(model, tiles_per_sample: list[int], seq: int, pad: list[int]):
    """Right-padded batch; sample i has tiles_per_sample[i] real tiles (0 = text-only, one dummy tile)."""
    n_tok = model.num_image_token
    ids = torch.randint(20, model.language_model.config.vocab_size - 20, (len(tiles_per_sample), seq))
    ids[ids == model.img_context_token_id] = 20
    flags, mask = [], torch.ones_like(ids)
    for i, tiles in enumerate(tiles_per_sample):
        ids[i, 2 : 2 + tiles * n_tok] = model.img_context_token_id
        flags += [1] * tiles if tiles else [0]
        if pad[i]:
            mask[i, seq - pad[i] :] = 0
            ids[i, seq - pad[i] :] = 0
    pixels = torch.randn(len(flags), 3, 448, 448)
    return pixels, ids, mask, torch.tensor(flags)


def _check(path, model, pixels, ids, mask, flags, state=None):
    cfg = json.loads((path / "config.json").read_text())
    sd = read_state_dict(path, torch.float32)
    with torch.no_grad():
        ours = model(pixels, ids, attention_mask=mask, image_flags=flags).logits
        ref = reference_logits(sd, cfg, pixels, ids, mask, flags, model.img_context_token_id, state)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_logits_match_official_semantics(tiny_ckpt, family):
    """Multi-tile, single-tile and text-only samples with right padding, every release family."""
    path = tiny_ckpt(family)
    model = load_internvl(path, dtype=torch.float32)
    pixels, ids, mask, flags = _batch(model, [2, 1, 0], seq=620, pad=[0, 37, 300])
    _check(path, model, pixels, ids, mask, flags)


@pytest.mark.parametrize(
    "overrides", [{"ps_version": "v1"}, {"select_layer": -2}, {"ps_version": "v2", "select_layer": -3}]
)
def test_ps_version_and_select_layer(tiny_ckpt, overrides):
    path = tiny_ckpt("internvl2-26b", **overrides)
    model = load_internvl(path, dtype=torch.float32)
    pixels, ids, mask, flags = _batch(model, [1, 2], seq=560, pad=[5, 0])
    _check(path, model, pixels, ids, mask, flags)


def test_ps_version_changes_logits(tiny_ckpt):
    """v1 and v2 differ on the same weights: a test that ignores ps_version would fail here."""
    v1 = load_internvl(tiny_ckpt("internvl2-2b", ps_version="v1"), dtype=torch.float32)
    v2 = load_internvl(tiny_ckpt("internvl2-2b"), dtype=torch.float32)
    pixels, ids, mask, flags = _batch(v1, [1], seq=300, pad=[0])
    with torch.no_grad():
        assert not torch.allclose(v1(pixels, ids).logits, v2(pixels, ids).logits, atol=1e-3)


def test_internlm2_dynamic_ntk_is_stateful_like_official(tiny_ckpt):
    """InternLM2.5's dynamic NTK rope keeps the longest length seen (official cache semantics):
    a short input after a long one uses the scaled base; the reference carries the same state."""
    path = tiny_ckpt("internvl2-8b")  # max_position_embeddings 256, rope dynamic x2
    model = load_internvl(path, dtype=torch.float32)
    state: dict = {}
    short = _batch(model, [0], seq=120, pad=[0])
    long = _batch(model, [2], seq=700, pad=[40])
    _check(path, model, *short, state=state)
    with torch.no_grad():
        before = model(short[0], short[1], image_flags=short[3]).logits
    _check(path, model, *long, state=state)
    _check(path, model, *short, state=state)
    with torch.no_grad():
        after = model(short[0], short[1], image_flags=short[3]).logits
    assert (before - after).abs().max() > 1e-4  # the NTK state really changed the short input's logits


def test_phi3_su_rope_switches_to_long_factors(tiny_ckpt):
    """Phi-3 'su' rope: positions beyond original_max_position_embeddings (256 here) use long factors."""
    path = tiny_ckpt("internvl2-4b")
    model = load_internvl(path, dtype=torch.float32)
    pixels, ids, mask, flags = _batch(model, [0], seq=300, pad=[0])
    _check(path, model, pixels, ids, mask, flags)
    with torch.no_grad():
        prefix = model(pixels, ids[:, :200], image_flags=flags).logits
        full = model(pixels, ids, image_flags=flags).logits[:, :200]
    assert (prefix - full).abs().max() > 1e-3  # long factors changed the rotary table for the prefix too


def test_input_size_interpolates_position_embedding(tiny_ckpt):
    """A 224px tile (16x16 patches) interpolates the 32x32 position grid bicubically, as official."""
    path = tiny_ckpt("internvl2-2b")
    model = load_internvl(path, dtype=torch.float32)
    pixels = torch.randn(2, 3, 224, 224)
    ref_cfg = json.loads((path / "config.json").read_text())
    from tests.model.reference import _vit

    sd = read_state_dict(path, torch.float32)
    with torch.no_grad():
        ours = model.vision_model(pixels)
        ref = _vit(sd, ref_cfg["vision_config"], pixels, -1)
    assert ours.shape == (2, 257, 32)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
