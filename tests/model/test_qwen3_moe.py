"""InternVL3.5 Qwen3-MoE backbone (30B-A3B / 241B-A28B): per-expert linears with the official keys, every expert
in every forward (gradients, no ZeRO-3 hang), the router load-balancing loss as the official forward adds it,
LoRA and QLoRA on experts, active and total parameters. The logits against the official semantics are in
test_official_equivalence.py (the tiny family ``internvl3_5-30b-a3b``); a two-rank ZeRO-3 run in
tests/engine/test_train_runs.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.model.helpers import answer_labels, assert_reloads_alike, image_text_inputs, train_tiny, weight_keys
from xtuner_vl.model import load_internvl
from xtuner_vl.model.moe import ExpertLinears, expert_parameter_counts, router_aux_loss
from xtuner_vl.recipes.model_wrapper import build_model_wrapper
from xtuner_vl.tiny.checkpoints import make_tiny

FAMILY = "internvl3_5-30b-a3b"
EXPERT = "language_model.model.layers.{}.mlp.experts.{}.{}.weight"


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(FAMILY, tmp_path_factory.mktemp("moe"))


def test_official_expert_keys_round_trip(moe_ckpt, tmp_path):
    keys = weight_keys(moe_ckpt)
    cfg = json.loads((moe_ckpt / "config.json").read_text())["llm_config"]
    for layer in range(cfg["num_hidden_layers"]):  # the transformers 4.55 layout the official code stores
        assert f"language_model.model.layers.{layer}.mlp.gate.weight" in keys
        for e in range(cfg["num_experts"]):
            assert {EXPERT.format(layer, e, p) for p in ("gate_proj", "up_proj", "down_proj")} <= keys
    assert not any("gate_up_proj" in k for k in keys)
    model = load_internvl(moe_ckpt, dtype=torch.float32)
    assert type(model.language_model).__name__ == "Qwen3MoeForCausalLM"
    assert isinstance(model.language_model.model.layers[0].mlp.experts, ExpertLinears)
    assert_reloads_alike(model, moe_ckpt, tmp_path / "saved", image_text_inputs(model, high=600))


def test_every_expert_runs_and_gets_a_gradient(moe_ckpt):
    """Tokens routed to experts 0 and 1 only: experts 2 and 3 still run (on no token) and get zero gradients, so
    every rank calls the same modules and no parameter is unused; the routed sum is the weighted experts'."""
    model = load_internvl(moe_ckpt, dtype=torch.float32).train()
    experts = model.language_model.model.layers[0].mlp.experts
    calls = []
    hooks = [
        e.register_forward_hook(lambda m, i, o, n=n: calls.append((n, i[0].shape[0]))) for n, e in enumerate(experts)
    ]
    hidden = torch.randn(5, experts[0].gate_proj.in_features)
    index = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1]])
    weights = torch.rand(5, 2)
    out = experts(hidden, index, weights)
    for h in hooks:
        h.remove()
    assert calls == [(0, 5), (1, 5), (2, 0), (3, 0)]
    expected = torch.stack(
        [sum(weights[t, k] * experts[int(index[t, k])](hidden[t]) for k in range(2)) for t in range(5)]
    )
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    for n, e in enumerate(experts):
        for p in e.parameters():
            assert p.grad is not None and bool(p.grad.any()) is (n < 2)


def _naive_aux(logits: list[torch.Tensor], experts: int, top_k: int, mask: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance loss written out: E * sum_e (share of routed slots to e) * (mean prob of e),
    over the real tokens of every layer together."""
    keep = mask.reshape(-1).bool()
    probs = torch.cat([lg.float().softmax(-1)[keep] for lg in logits])
    chosen = torch.cat([lg.float().topk(top_k, -1).indices[keep] for lg in logits])
    slots = torch.stack([(chosen == e).float().sum() for e in range(experts)]) / probs.shape[0]
    return experts * (slots * probs.mean(0)).sum()


def test_router_aux_loss_against_naive_formula():
    g = torch.Generator().manual_seed(3)
    logits = tuple(torch.randn(10, 6, generator=g) for _ in range(3))
    mask = torch.tensor([[1] * 4 + [0], [1] * 5])
    torch.testing.assert_close(router_aux_loss(logits, 6, 2, mask), _naive_aux(list(logits), 6, 2, mask))
    # padding changes it: the mask is honoured
    assert not torch.allclose(
        router_aux_loss(logits, 6, 2, torch.ones_like(mask)), _naive_aux(list(logits), 6, 2, mask)
    )


def test_aux_loss_enters_the_loss_as_the_official_rule(moe_ckpt, tmp_path):
    """Coefficient ``router_aux_loss_coef`` when ``output_router_logits``, else 0 (logged only); a config may
    set it."""
    model = load_internvl(moe_ckpt, dtype=torch.float32)
    assert model.moe and model.router_aux_loss_coef == 0.0  # the release's output_router_logits is false
    on = make_tiny(FAMILY, tmp_path / "on", llm_overrides={"output_router_logits": True, "router_aux_loss_coef": 0.25})
    model_on = load_internvl(on, dtype=torch.float32)
    assert model_on.router_aux_loss_coef == 0.25
    inputs = image_text_inputs(model_on, high=600)
    labels = answer_labels(model_on, inputs)
    with torch.no_grad():
        out = model_on(**inputs, labels=labels)
        model_on.router_aux_loss_coef = 0.0
        plain = model_on(**inputs, labels=labels)
    assert out.aux_loss is not None and float(out.aux_loss) > 0 and out.aux_loss_coef == 0.25
    assert float(out.loss - plain.loss) == pytest.approx(0.25 * float(out.aux_loss), rel=1e-4)
    s = build_model_wrapper(dict(path=str(moe_ckpt), router_aux_loss_coef=0.5))
    assert s.apply_method(load_internvl(moe_ckpt, dtype=torch.float32), torch.float32).router_aux_loss_coef == 0.5
    with pytest.raises(ValueError, match="router_aux_loss_coef must be a number"):
        build_model_wrapper(dict(path=str(moe_ckpt), router_aux_loss_coef="big"))


def test_lora_and_qlora_reach_the_experts(moe_ckpt):
    from peft.tuners.lora import LoraLayer

    lora = build_model_wrapper(dict(path=str(moe_ckpt), lora=dict(llm_rank=4), freeze=dict(vit=True, mlp=True)))
    model = lora.apply_method(load_internvl(moe_ckpt, dtype=torch.float32), torch.float32)
    wrapped = {n for n, m in model.language_model.named_modules() if isinstance(m, LoraLayer)}
    assert any(n.endswith("mlp.experts.3.down_proj") for n in wrapped)
    assert any(n.endswith("self_attn.q_proj") for n in wrapped)
    assert not any(n.endswith("mlp.gate") for n in wrapped)  # the router trains no adapter
    assert model.language_model.get_base_model().config.model_type == "qwen3_moe"  # restored after wrapping

    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    qlora = build_model_wrapper(dict(path=str(moe_ckpt), lora=dict(llm_rank=4), quantization=dict(llm="nf4")))
    model = qlora.build(torch.device("cpu"))
    expert = model.language_model.get_base_model().model.layers[1].mlp.experts[0].up_proj
    assert isinstance(expert.get_base_layer(), bnb.nn.Linear4bit)
    inputs = image_text_inputs(model, high=600)
    labels = answer_labels(model, inputs)
    model(**inputs, labels=labels).loss.backward()
    assert expert.lora_B["default"].weight.grad is not None


def test_expert_parameter_counts_match_the_built_model(moe_ckpt):
    from xtuner_vl.recipes.estimate import count_parameters

    model = load_internvl(moe_ckpt, dtype=torch.float32)
    cfg = json.loads((moe_ckpt / "config.json").read_text())["llm_config"]
    total, active = expert_parameter_counts(cfg)
    experts = sum(p.numel() for m in model.modules() if isinstance(m, ExpertLinears) for p in m.parameters())
    assert experts == total and active == total * cfg["num_experts_per_tok"] // cfg["num_experts"]
    row = count_parameters(model, set(), 4)[-1]
    assert row.total - row.active == total - active


def test_chat_with_the_thinking_prompt_uses_the_official_chatml_ids(moe_ckpt, tmp_path):
    """``chat --system internvl3_5_thinking`` on the MoE family: the prompt is the official internvl2_5 ChatML with
    the InternVL3.5 model cards' R1 system prompt, and generation stops at ``<|im_end|>``."""
    from xtuner_vl.dataset.templates import THINKING_SYSTEM_PROMPT
    from xtuner_vl.model import load_tokenizer
    from xtuner_vl.recipes.chat import chat

    assert THINKING_SYSTEM_PROMPT.startswith("You are an AI assistant that rigorously follows this response protocol")
    assert "<think> and </think>" in THINKING_SYSTEM_PROMPT and not THINKING_SYSTEM_PROMPT.endswith("\n")
    log = tmp_path / "log.jsonl"
    (answer,) = chat(moe_ckpt, prompt="Why?", max_new_tokens=4, prompt_log=log, system_message="internvl3_5_thinking")
    record = json.loads(log.read_text().splitlines()[0])
    expected = (
        f"<|im_start|>system\n{THINKING_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert record["input_ids"] == load_tokenizer(moe_ckpt)(expected)["input_ids"]
    assert "<|im_end|>" not in answer


def test_lora_on_experts_learns_and_merges_into_the_official_layout(moe_ckpt, tmp_path, monkeypatch, lone_process):
    """One-process LoRA training of the MoE family lowers the loss, logs the router loss, and convert merges
    the expert adapters into the per-expert official keys."""
    from xtuner_vl.recipes.convert import convert

    work, records = train_tiny("tiny_internvl2_lora", moe_ckpt, tmp_path, monkeypatch)
    losses = [r["loss"] for r in records]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]), losses
    assert all(r["router_aux_loss"] > 0 for r in records)
    (dumped,) = work.glob("*.py")
    out = convert(str(dumped), str(work), str(tmp_path / "official"))
    assert weight_keys(out) == weight_keys(moe_ckpt)
    merged, original = load_internvl(out, dtype=torch.float32), load_internvl(moe_ckpt, dtype=torch.float32)
    key = EXPERT.format(1, 0, "down_proj")
    assert not torch.equal(merged.state_dict()[key], original.state_dict()[key])  # the expert's adapter merged
    router = "language_model.model.layers.1.mlp.gate.weight"
    assert torch.equal(merged.state_dict()[router], original.state_dict()[router])  # the router trained no adapter
