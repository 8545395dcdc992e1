"""InternVL3.5-GPT-OSS-20B-A4B backbone: transformers' GptOssForCausalLM with the official keys (fused experts with
biases, attention sinks), eager attention for the sinks, the router loss always on (as the official fine-tuning
script sets it), LoRA on attention and on the fused experts (peft's target_parameters; QLoRA quantizes attention
only), merged by convert exactly as peft merges, active and total parameters. Logits against the official semantics
(sliding window, sinks, yarn rope) are in test_official_equivalence.py (tiny family ``internvl3_5-gpt-oss-20b-a4b``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.model.helpers import answer_labels, assert_reloads_alike, image_text_inputs, train_tiny, weight_keys
from xtuner_vl.model import load_internvl
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
    assert_reloads_alike(model, ckpt, tmp_path / "saved", image_text_inputs(model))


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


def _lora_model(ckpt: Path, dtype: torch.dtype = torch.float32, checkpointing: bool = True, **lora):
    s = build_model_wrapper(dict(path=str(ckpt), gradient_checkpointing=checkpointing, lora=dict(llm_rank=4, **lora)))
    return s, s.apply_method(load_internvl(ckpt, dtype=dtype), dtype)


def test_lora_wraps_attention_and_both_fused_expert_weights_not_the_router(ckpt, caplog):
    from peft.tuners.lora import LoraLayer, ParamWrapper

    from xtuner_vl.recipes.estimate import count_parameters

    with caplog.at_level("WARNING", logger="xtuner_vl.adapters.lora"):
        _, model = _lora_model(ckpt)
    assert "model.lora.dropout=0.05" in caplog.text  # peft refuses dropout on target_parameters
    lm, cfg = model.language_model, json.loads((ckpt / "config.json").read_text())["llm_config"]
    assert lm.peft_config["default"].lora_dropout == 0.0
    wrappers = [m for m in lm.modules() if isinstance(m, ParamWrapper)]
    linears = {n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, LoraLayer) and m not in wrappers}
    assert linears == {"q_proj", "k_proj", "v_proj", "o_proj"}
    names = sorted(m.parameter_name for m in wrappers)
    assert names == sorted(["down_proj", "gate_up_proj"] * cfg["num_hidden_layers"])
    experts, rank = cfg["num_local_experts"], 4
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    shapes = {m.parameter_name: (m.lora_A["default"].weight.shape, m.lora_B["default"].weight.shape) for m in wrappers}
    assert shapes["gate_up_proj"] == ((experts * rank, hidden), (2 * inter, experts * rank))
    assert shapes["down_proj"] == ((experts * rank, inter), (hidden, experts * rank))
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)  # router and expert weights frozen
    assert not any(".router." in n for n in trainable)
    # active parameters: k of the E experts' rows of A and columns of B, as of the fused weights
    top_k = cfg["num_experts_per_tok"]
    fused = [p for m in wrappers for p in (m.get_param(), m.lora_A["default"].weight, m.lora_B["default"].weight)]
    fused += [p for n, p in lm.named_parameters() if n.endswith("_proj_bias")]
    row = count_parameters(model, set(), 4)[-1]
    assert row.total - row.active == sum(p.numel() * (experts - top_k) // experts for p in set(fused)) > 0


def test_convert_merges_fused_expert_lora_as_peft_does(ckpt, tmp_path):
    """Nonzero adapters (B is zero at init): each merged expert tensor is peft's own merge; a transposed delta or
    another gate/up column order would differ. Without the training model's parameter targets the keys are refused."""
    from xtuner_vl.checkpoint import CheckpointError, base_shapes, check_against_base, merge_lora_weight, split_delta
    from xtuner_vl.checkpoint.delta import lora_parameter_targets

    s, model = _lora_model(ckpt)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    delta = split_delta(state, s.lora_alphas(), lora_parameter_targets(model))
    check_against_base(delta, base_shapes(str(ckpt)), "trained", str(ckpt))
    base = load_internvl(ckpt, dtype=torch.float32).state_dict()
    merged = model.language_model.merge_and_unload().state_dict()
    keys = [LAYER.format(i) + f"mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")]
    assert set(keys) < set(delta.loras)
    for key in delta.loras:
        theirs = merged[key.removeprefix("language_model.")]
        torch.testing.assert_close(merge_lora_weight(base[key], delta.loras[key]), theirs, rtol=0, atol=1e-5)
        assert (theirs - base[key]).abs().max() > 1.0
    with pytest.raises(CheckpointError, match=r"two LoRA adapters on .*mlp\.experts\.weight"):
        split_delta(state, s.lora_alphas())


def test_lora_activations_of_the_fused_experts_match_saved_tensors(ckpt):
    """The estimate's share of the expert LoRAs (folded weight per layer, expert inputs per token) equals what
    autograd saves on top of attention-only LoRA."""
    from tests.engine.test_estimate import saved_bytes
    from xtuner_vl.recipes.estimate import _folded_expert_bytes

    attention = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    measured, folded = [], []
    for targets in (None, attention):
        _, model = _lora_model(ckpt, torch.bfloat16, False, dropout=0.0, llm_targets=targets)
        model.to(torch.bfloat16)  # the adapters too, as DeepSpeed's bf16 engine (test_estimate.py does the same)
        layer = model.language_model.get_base_model().model.layers[1]
        torch.manual_seed(0)  # the same batch, so the same routing (B = 0: the adapters change no output)
        saved, rows, seq, _, _ = saved_bytes(model, {"llm": layer})
        measured.append(saved["llm"])
        folded.append(_folded_expert_bytes(layer, model.language_model.config.num_experts_per_tok, 2))
    (per_token, per_layer), nothing = folded
    assert nothing == (0, 0) and per_token > 0 and per_layer > 0
    assert measured[0] - measured[1] == per_token * rows * seq + per_layer


def test_qlora_quantizes_attention_and_adapts_the_bf16_experts(ckpt):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    s = build_model_wrapper(dict(path=str(ckpt), lora=dict(llm_rank=4), quantization=dict(llm="nf4")))
    model = s.build(torch.device("cpu"))
    layer = model.language_model.get_base_model().model.layers[0]
    assert isinstance(layer.self_attn.q_proj.get_base_layer(), bnb.nn.Linear4bit)
    experts = layer.mlp.experts
    assert all(w.get_param().dtype == torch.float32 for w in (experts, experts.base_layer))  # not quantized
    inputs = image_text_inputs(model)
    model(**inputs, labels=answer_labels(model, inputs)).loss.backward()
    for wrapper in (experts, experts.base_layer):  # down_proj and gate_up_proj
        assert wrapper.lora_B["default"].weight.grad.abs().sum() > 0


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


def test_lora_training_learns_and_converts_to_pefts_own_merge(ckpt, tmp_path, monkeypatch, lone_process):
    """LoRA training on attention and the fused experts lowers the loss; convert's official weights give the logits
    of peft's merge_and_unload of the trained adapters, and its adapter export loads into peft with the same logits."""
    from peft import PeftModel

    from xtuner_vl.adapters import merge_lora
    from xtuner_vl.checkpoint import ADAPTER_DIRS, NON_LORA_FILE, materialize, read_trained_checkpoint
    from xtuner_vl.recipes.convert import convert

    work, records = train_tiny("tiny_internvl2_lora", ckpt, tmp_path, monkeypatch)
    losses = [r["loss"] for r in records]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]), losses
    assert all(r["router_aux_loss"] > 0 for r in records)
    (dumped,) = work.glob("*.py")
    out = convert(str(dumped), str(work), str(tmp_path / "official"), dtype="fp32")
    assert weight_keys(out) == weight_keys(ckpt)
    merged, original = load_internvl(out, dtype=torch.float32), load_internvl(ckpt, dtype=torch.float32)
    state, base = merged.state_dict(), original.state_dict()

    trained = {k: materialize(v) for k, v in read_trained_checkpoint(str(work)).state.items()}
    s = build_model_wrapper(dict(path=str(ckpt), lora=dict(llm_rank=8)))
    peft_model = s.apply_method(load_internvl(ckpt, dtype=torch.float32), torch.float32).eval()
    missing = peft_model.load_state_dict(trained, strict=False).missing_keys
    assert not [k for k in missing if "lora_" in k] and len(trained) > 0
    inputs = image_text_inputs(merged)
    with torch.no_grad():
        adapted = peft_model(**inputs).logits
    reference = merge_lora(peft_model).state_dict()  # peft's merge_and_unload
    for name in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "self_attn.q_proj.weight"):
        key = LAYER.format(1) + name
        assert (state[key] - base[key]).abs().max() > 1e-3  # trained and merged
        torch.testing.assert_close(state[key], reference[key], rtol=0, atol=1e-6)
    key = LAYER.format(1) + "mlp.router.weight"
    assert torch.equal(state[key], base[key])  # the router trained no adapter
    with torch.no_grad():
        logits = merged.eval()(**inputs).logits
        torch.testing.assert_close(logits, peft_model(**inputs).logits, rtol=0, atol=1e-5)
        assert (logits - original.eval()(**inputs).logits).abs().max() > 1e-3

    adapters = convert(str(dumped), str(work), str(tmp_path / "adapter"), fmt="adapter", dtype="fp32")
    config = json.loads((adapters / ADAPTER_DIRS["language_model"] / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    fresh = load_internvl(ckpt, dtype=torch.float32)
    fresh.language_model = PeftModel.from_pretrained(fresh.language_model, adapters / ADAPTER_DIRS["language_model"])
    from safetensors.torch import load_file

    assert not fresh.load_state_dict(load_file(adapters / NON_LORA_FILE), strict=False).unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(**inputs).logits, adapted, rtol=0, atol=1e-5)


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
