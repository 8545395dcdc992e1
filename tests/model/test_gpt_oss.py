"""InternVL3.5-GPT-OSS-20B-A4B backbone: transformers' GptOssForCausalLM with the official keys (fused experts with
biases, attention sinks), eager attention for the sinks, the router loss always on (as the official fine-tuning
script sets it), LoRA and QLoRA on attention (the fused experts frozen), active and total parameters. Logits
against the official semantics (sliding window, sinks, yarn rope) are in test_official_equivalence.py (tiny family
``internvl3_5-gpt-oss-20b-a4b``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.model.helpers import answer_labels, image_text_inputs, train_tiny, weight_keys
from xtuner_vl.model import load_internvl, save_official
from xtuner_vl.model.loader import open_checkpoint, stream_into
from xtuner_vl.recipes.model_wrapper import build_model_wrapper
from xtuner_vl.tiny.checkpoints import make_tiny

FAMILY = "internvl3_5-gpt-oss-20b-a4b"
LAYER = "language_model.model.layers.{}."


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(FAMILY, tmp_path_factory.mktemp("gpt_oss"))


def test_official_keys_round_trip_and_eager_attention(ckpt, tmp_path):
    keys = weight_keys(ckpt)
    for name in ("self_attn.sinks", "self_attn.o_proj.bias", "mlp.router.bias", "mlp.experts.gate_up_proj_bias"):
        assert LAYER.format(1) + name in keys
    model = load_internvl(ckpt, dtype=torch.float32, attn_implementation="sdpa")
    lm = model.language_model
    assert type(lm).__name__ == "GptOssForCausalLM" and lm.config._attn_implementation == "eager"  # sinks
    assert lm.model.layers[0].self_attn.sliding_window == 8 and lm.model.layers[1].self_attn.sliding_window is None
    inputs = image_text_inputs(model)
    with torch.no_grad():
        logits = model(**inputs).logits
    save_official(model, tmp_path / "saved", source_dir=ckpt, dtype=torch.float32)
    assert weight_keys(tmp_path / "saved") == keys
    for again in (
        load_internvl(tmp_path / "saved", dtype=torch.float32),
        stream_into(open_checkpoint(tmp_path / "saved"), torch.float32, "cpu"),
    ):
        with torch.no_grad():
            assert torch.equal(again(**inputs).logits, logits)


def test_router_loss_is_always_on_as_the_official_script_sets_it(ckpt):
    model = load_internvl(ckpt, dtype=torch.float32)
    config = json.loads((ckpt / "config.json").read_text())["llm_config"]
    assert config["output_router_logits"] is False and model.moe
    assert model.router_aux_loss_coef == config["router_aux_loss_coef"] == 0.9
    inputs = image_text_inputs(model)
    labels = answer_labels(model, inputs)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
        model.router_aux_loss_coef = 0.0
        plain = model(**inputs, labels=labels)
    assert float(out.aux_loss) > 0
    assert float(out.loss - plain.loss) == pytest.approx(0.9 * float(out.aux_loss), rel=1e-4)


def test_lora_wraps_attention_and_leaves_the_fused_experts_frozen(ckpt):
    from peft.tuners.lora import LoraLayer

    s = build_model_wrapper(dict(path=str(ckpt), lora=dict(llm_rank=4)))
    model = s.apply_method(load_internvl(ckpt, dtype=torch.float32), torch.float32)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.language_model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not any(p.requires_grad for n, p in model.language_model.named_parameters() if ".experts." in n)


def test_qlora_quantizes_attention_and_keeps_the_experts(ckpt):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    s = build_model_wrapper(dict(path=str(ckpt), lora=dict(llm_rank=4), quantization=dict(llm="nf4")))
    model = s.build(torch.device("cpu"))
    layer = model.language_model.get_base_model().model.layers[0]
    assert isinstance(layer.self_attn.q_proj.get_base_layer(), bnb.nn.Linear4bit)
    inputs = image_text_inputs(model)
    model(**inputs, labels=answer_labels(model, inputs)).loss.backward()


def test_active_parameters_count_k_of_the_fused_experts(ckpt):
    from xtuner_vl.recipes.estimate import count_parameters

    model = load_internvl(ckpt, dtype=torch.float32)
    cfg = json.loads((ckpt / "config.json").read_text())["llm_config"]
    experts = sum(
        p.numel() for n, p in model.language_model.named_parameters() if ".experts." in n or n.endswith("experts")
    )
    row = count_parameters(model, set(), 4)[-1]
    idle = experts * (cfg["num_local_experts"] - cfg["num_experts_per_tok"]) // cfg["num_local_experts"]
    assert row.total - row.active == idle > 0


def test_lora_training_learns_and_merges_into_the_official_layout(ckpt, tmp_path, monkeypatch, lone_process):
    from xtuner_vl.recipes.convert import convert

    work, records = train_tiny("tiny_internvl2_lora", ckpt, tmp_path, monkeypatch)
    losses = [r["loss"] for r in records]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]), losses
    assert all(r["router_aux_loss"] > 0 for r in records)
    (dumped,) = work.glob("*.py")
    out = convert(str(dumped), str(work), str(tmp_path / "official"))
    assert weight_keys(out) == weight_keys(ckpt)
    merged, original = load_internvl(out, dtype=torch.float32), load_internvl(ckpt, dtype=torch.float32)
    state, base = merged.state_dict(), original.state_dict()
    assert not torch.equal(
        state[LAYER.format(1) + "self_attn.q_proj.weight"], base[LAYER.format(1) + "self_attn.q_proj.weight"]
    )
    assert torch.equal(
        state[LAYER.format(1) + "mlp.experts.down_proj"], base[LAYER.format(1) + "mlp.experts.down_proj"]
    )


def test_router_loss_takes_the_routing_scores_as_the_official_4_55_stack_does():
    """transformers 4.55's GPT-OSS router hands the loss its routing scores (softmax over each token's top-k
    logits, zeros elsewhere) as logits; the official InternVL3.5 value is the Switch loss of those."""
    from tests.model.test_qwen3_moe import _naive_aux
    from xtuner_vl.model.moe import router_aux_loss

    g = torch.Generator().manual_seed(5)
    logits = tuple(torch.randn(20, 4, generator=g) for _ in range(2))
    mask = torch.tensor([[1] * 7 + [0] * 3, [1] * 10])
    top = [lg.topk(2, -1) for lg in logits]
    scores = [
        torch.zeros_like(lg).scatter(-1, t.indices, t.values.softmax(-1)) for lg, t in zip(logits, top, strict=True)
    ]
    got = router_aux_loss(logits, 4, 2, mask, scores_as_logits=True)
    torch.testing.assert_close(got, _naive_aux(scores, 4, 2, mask))
    assert not torch.allclose(got, router_aux_loss(logits, 4, 2, mask))
