"""Training methods: which weights train, in which dtype; frozen weights are never upcast."""

from __future__ import annotations

import pytest
import torch

from xtuner_vl.engine.dist import DistInfo
from xtuner_vl.engine.param_groups import param_groups
from xtuner_vl.engine.torch_backend import TorchBackend
from xtuner_vl.model.loss import OutputHead
from xtuner_vl.recipes.model_wrapper import InternVLChat

CPU = torch.device("cpu")


def test_lora_in_bf16_keeps_frozen_llm_bf16(tiny_ckpt):
    model = InternVLChat(path=str(tiny_ckpt("internvl2-2b")), dtype="bf16", lora=dict(llm_rank=4)).build(CPU)
    frozen = {p.dtype for n, p in model.language_model.named_parameters() if not p.requires_grad}
    lora = {p.dtype for n, p in model.language_model.named_parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and lora == {torch.float32}
    assert all(not p.requires_grad for p in model.vision_model.parameters())
    assert all(p.requires_grad for p in model.mlp1.parameters())
    targets = {n.split(".")[-4] for n, _ in model.language_model.named_parameters() if "lora_A" in n}
    assert targets == {"wqkv", "wo", "w1", "w2", "w3"}  # official InternLM2 targets


def test_full_finetune_masters_fp32_frozen_vit_bf16(tiny_ckpt):
    model = InternVLChat(path=str(tiny_ckpt("internvl2-2b")), dtype="bf16").build(CPU)
    groups = param_groups(model, 1e-3, 0.01, {"mlp1": 2.0})
    optim = torch.optim.AdamW(groups)
    TorchBackend(model, optim, DistInfo(0, 1, 0, CPU), 1.0, bf16=True)
    assert {p.dtype for p in model.vision_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    names = {g["name"]: g for g in groups}
    assert names["mlp1.decay"]["lr"] == 2e-3 and names["mlp1.no_decay"]["weight_decay"] == 0.0
    assert "vision_model.decay" not in names


def test_qlora_quantizes_llm_linears_only(tiny_ckpt):
    model = InternVLChat(
        path=str(tiny_ckpt("internvl2-2b")), lora=dict(llm_rank=4), quantization=dict(llm="nf4")
    ).build(CPU)
    kinds = {type(m).__name__ for m in model.language_model.modules()}
    assert "Linear4bit" in kinds
    head = model.language_model.get_output_embeddings()
    assert type(head) is OutputHead and head.weight.dtype.is_floating_point  # the head stays unquantized
    assert not any(type(m).__name__ == "Linear4bit" for m in (*model.vision_model.modules(), *model.mlp1.modules()))
    pixels, ids = torch.randn(1, 3, 448, 448), torch.randint(20, 300, (1, 300))
    ids[0, 2:258] = model.img_context_token_id
    out = model(pixels, ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_unfreeze_last_vit_layers_and_drop_path(tiny_ckpt):
    s = InternVLChat(
        path=str(tiny_ckpt("internvl2-2b")), drop_path_rate=0.2, freeze=dict(unfreeze_vit_layers=1, llm=True)
    )
    model = s.build(CPU)
    layers = model.vision_model.encoder.layers
    assert all(p.requires_grad for p in layers[-1].parameters())
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert not any(p.requires_grad for p in model.language_model.parameters())
    assert abs(layers[-1].drop_path1.drop_prob - 0.2) < 1e-6  # float32 linspace, as the official
    assert model.vision_model.encoder.gradient_checkpointing


def test_unfreeze_switches_under_lora(tiny_ckpt):
    path = str(tiny_ckpt("internvl2-2b"))
    model = InternVLChat(path=path, freeze=dict(unfreeze_lm_head=True), lora=dict(llm_rank=4)).build(CPU)
    trained = {n for n, p in model.language_model.named_parameters() if p.requires_grad}
    assert "base_model.model.output.weight" in trained and all(
        "lora_" in n for n in trained - {"base_model.model.output.weight"}
    )
    with pytest.raises(ValueError, match="unfreeze_vit_layers and model.lora.vit_rank"):
        InternVLChat(path=path, freeze=dict(unfreeze_vit_layers=1), lora=dict(vit_rank=4)).build(CPU)


def test_vit_lora_wraps_official_vit_targets(tiny_ckpt):
    model = InternVLChat(path=str(tiny_ckpt("internvl2-26b")), lora=dict(vit_rank=4, llm_rank=4)).build(CPU)
    vit_targets = {n.split(".")[-4] for n, p in model.vision_model.named_parameters() if "lora_A" in n}
    assert vit_targets == {"qkv", "proj", "fc1", "fc2"}
    pixels, ids = torch.randn(1, 3, 448, 448), torch.randint(20, 300, (1, 300))
    ids[0, 2:258] = model.img_context_token_id
    model(pixels, ids, labels=ids).loss.backward()
    vit_lora = [p for n, p in model.vision_model.named_parameters() if "lora_B" in n]
    assert vit_lora and all(p.grad is not None for p in vit_lora)
