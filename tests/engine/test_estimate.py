"""``xtuner-vl estimate``: parameter counts against hand counts and loaded models, model-state bytes against
hand computation, nf4 bytes against bitsandbytes, activation formulas against the tensors autograd really
saves, the shipped release architectures against their published sizes, and the CLI on every config."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from xtuner_vl.cli.main import main
from xtuner_vl.engine import memory_estimate as me
from xtuner_vl.engine.deepspeed_config import CONFIG_ROOT
from xtuner_vl.model import load_internvl
from xtuner_vl.model.configuration import read_config
from xtuner_vl.model.loader import build_empty_model
from xtuner_vl.model.releases import release_config, release_names, resolve_model_config
from xtuner_vl.recipes.config import list_configs, load_config
from xtuner_vl.recipes.estimate import count_parameters, estimate, layer_spec
from xtuner_vl.recipes.model_wrapper import InternVLChat

TINY = str(CONFIG_ROOT / "tiny" / "tiny_internvl2_{}.py")


def _opts(path) -> dict:
    return {"model.path": str(path)}


# -- parameter counts ---------------------------------------------------------------------------------
def hand_count(path) -> dict[str, int]:
    """Parameters of a checkpoint, written out from the architecture in its config.json."""
    cfg = read_config(path)
    v, llm = cfg.vision, cfg.llm_config
    d, i = v.hidden_size, v.intermediate_size
    norm = 2 * d if v.norm_type == "layer_norm" else d
    vit_layer = d * 3 * d + (3 * d if v.qkv_bias else 0)  # attn.qkv
    vit_layer += 2 * d if v.qk_normalization else 0  # attn.q_norm, attn.k_norm
    vit_layer += d * d + d + d * i + i + i * d + d  # attn.proj, mlp.fc1, mlp.fc2
    vit_layer += 2 * norm + 2 * d  # norm1, norm2, ls1, ls2
    patches = (v.image_size // v.patch_size) ** 2
    vit = v.num_hidden_layers * vit_layer + d + (3 * v.patch_size**2 * d + d) + (patches + 1) * d
    h, inter, vocab = llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"]
    heads, kv = llm["num_attention_heads"], llm["num_key_value_heads"]
    hd = h // heads
    mlp1 = 2 * 4 * d + (4 * d * h + h) + (h * h + h)  # LayerNorm(4D), Linear(4D, H), Linear(H, H)
    attn = h * (heads + 2 * kv) * hd + heads * hd * h  # wqkv / qkv_proj / q,k,v_proj, wo / o_proj
    if llm["architectures"][0] == "Qwen2ForCausalLM":
        attn += (heads + 2 * kv) * hd  # q, k, v biases
    layer = attn + 3 * h * inter + 2 * h  # gate, up, down; two RMSNorms
    lm = llm["num_hidden_layers"] * layer + h + 2 * vocab * h  # final norm, embedding, untied head
    return {"vision_model": vit, "mlp1": mlp1, "language_model": lm}


@pytest.mark.parametrize("family", ["internvl2-2b", "internvl-chat-v1-5", "internvl2-1b", "internvl2-4b"])
def test_counts_match_hand_count_and_loaded_model(family, tiny_ckpt):
    path = tiny_ckpt(family)
    e = estimate(TINY.format("full"), gpus=2, cfg_options=_opts(path))
    counts = {c.name: c for c in e.counts}
    loaded = load_internvl(path, dtype=torch.float32)
    for part, expected in hand_count(path).items():
        assert counts[part].total == expected == sum(p.numel() for p in getattr(loaded, part).parameters())
    assert counts["total"].total == sum(p.numel() for p in loaded.parameters())
    # full fine-tune with the ViT frozen: mlp1 and the LLM train
    assert counts["vision_model"].trainable == 0
    assert counts["total"].trainable == counts["mlp1"].total + counts["language_model"].total
    assert e.release is None  # a real config.json is preferred over the shipped releases


def _lora_hand_count(path, rank: int, vit_rank: int = 0) -> tuple[int, int]:
    cfg = read_config(path)
    llm, d, i = cfg.llm_config, cfg.vision.hidden_size, cfg.vision.intermediate_size
    h, inter = llm["hidden_size"], llm["intermediate_size"]
    hd = h // llm["num_attention_heads"]
    qkv = (llm["num_attention_heads"] + 2 * llm["num_key_value_heads"]) * hd
    # InternLM2 targets: wqkv, wo, w1, w3, w2 -> r x (in + out) each
    per_layer = rank * ((h + qkv) + (h + h) + 2 * (h + inter) + (inter + h))
    vit_layer = vit_rank * ((d + 3 * d) + (d + d) + (d + i) + (i + d))  # attn.qkv, attn.proj, mlp.fc1, mlp.fc2
    return llm["num_hidden_layers"] * per_layer, cfg.vision.num_hidden_layers * vit_layer


def test_lora_trainable_counts(tiny_ckpt):
    path = tiny_ckpt("internvl2-2b")
    e = estimate(TINY.format("lora"), cfg_options={**_opts(path), "model.lora.vit_rank": 4})
    counts = {c.name: c for c in e.counts}
    llm_lora, vit_lora = _lora_hand_count(path, rank=8, vit_rank=4)
    assert counts["language_model"].lora == counts["language_model"].trainable == llm_lora
    assert counts["vision_model"].lora == counts["vision_model"].trainable == vit_lora
    assert counts["total"].trainable == llm_lora + vit_lora + counts["mlp1"].total
    assert counts["total"].total == sum(hand_count(path).values()) + llm_lora + vit_lora


# -- nf4 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(64, 64), (300, 1000), (77, 333)])
def test_nf4_bytes_match_bitsandbytes(shape):
    bnb = pytest.importorskip("bitsandbytes")
    weight = torch.randn(*shape)
    q = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")._quantize("cpu")
    s = q.quant_state
    tensors = [q, s.absmax, s.code, s.offset, s.state2.absmax, s.state2.code]
    assert me.nf4_bytes(weight.numel()) == sum(t.untyped_storage().nbytes() for t in tensors)


def test_qlora_counts_match_quantized_model(tiny_ckpt):
    pytest.importorskip("bitsandbytes")
    path = tiny_ckpt("internvl2-2b")
    e = estimate(TINY.format("qlora"), cfg_options={**_opts(path), "model.dtype": "bf16"})
    lm = {c.name: c for c in e.counts}["language_model"]
    # the real QLoRA model: the same layers quantized by bitsandbytes on CPU
    s = InternVLChat(
        path=str(path), dtype="bf16", gradient_checkpointing=False, lora=dict(llm_rank=8), quantization=dict(llm="nf4")
    )
    real = s.apply_method(load_internvl(path, dtype=torch.float32), torch.bfloat16)
    packed = [p for p in real.language_model.parameters() if p.dtype == torch.uint8]
    assert lm.nf4_params == sum(p.quant_state.shape.numel() for p in packed)
    nf4 = sum(me.nf4_bytes(p.quant_state.shape.numel()) for p in packed)
    others = sum(p.numel() for p in real.language_model.parameters() if p.dtype != torch.uint8)
    assert lm.stored_bytes == nf4 + 2 * others
    assert lm.lora == lm.trainable == _lora_hand_count(path, rank=8)[0]


# -- model states -------------------------------------------------------------------------------------
def test_model_state_bytes_by_hand():
    p, n = me.ParamBytes(trainable=1000, frozen_bytes=500, largest_module=100, largest_trainable_module=60), 2
    expected = {
        me.ZeroSetup(0): (4000 + 500, 4000 + 4000, 8000, 0),  # fp32 masters, fp32 grads + DDP bucket, AdamW
        me.ZeroSetup(1): (2000 + 500, 2000, 12000 // n, 0),
        me.ZeroSetup(2): (2000 + 500, 2000 // n, 12000 // n, 0),
        me.ZeroSetup(3): ((2000 + 500) // n + 2 * 100, 2000 // n + 2 * 60, 12000 // n, 0),
        me.ZeroSetup(2, offload_optimizer=True): (2500, 0, 0, 12000 // n + 4000 // n),
        me.ZeroSetup(3, True, True): (2 * 100, 2 * 60, 0, 2500 // n + 12000 // n + 4000 // n),
    }
    for z, (weights, grads, optimizer, cpu) in expected.items():
        assert me.model_state_bytes(p, z, n) == me.StateMemory(weights, grads, optimizer, cpu), z.label
    assert me.model_state_bytes(p, me.ZeroSetup(0), 1).grads == 4000  # one process: no DDP bucket
    assert me.model_state_bytes(p, me.ZeroSetup(2), n, bf16=False) == me.StateMemory(4500, 2000, 4000)


def test_full_finetune_states_in_report(tiny_ckpt):
    """2 GPUs, full fine-tune in bf16: weights 2P (+ frozen ViT 2 B), grads 2P/(n from ZeRO-2), optimizer 12P/n."""
    path = tiny_ckpt("internvl2-2b")
    e = estimate(TINY.format("full"), gpus=2, cfg_options={**_opts(path), "model.dtype": "bf16"})
    counts = hand_count(path)
    trained, vit = counts["mlp1"] + counts["language_model"], counts["vision_model"]
    states = {z.stage: replace(s, load=0) for z, s in e.states if not z.offload_optimizer}  # load: tested below
    assert states[0] == me.StateMemory(4 * trained + 2 * vit, 8 * trained, 8 * trained)
    assert states[1] == me.StateMemory(2 * trained + 2 * vit, 2 * trained, 12 * trained // 2)
    assert states[2] == me.StateMemory(2 * trained + 2 * vit, 2 * trained // 2, 12 * trained // 2)
    assert e.selected == me.ZeroSetup(0)  # the tiny config runs without DeepSpeed


# -- load peak ----------------------------------------------------------------------------------------
def test_load_peak_by_hand():
    """ZeRO-3: 1/n of the base weights + the largest parameter whole; QLoRA: + the largest quantized linear in
    the load dtype; otherwise the whole model on every GPU."""
    p = me.ParamBytes(1000, 500, 100, 60, base_bytes=4000, largest_param=300)
    n = 4
    assert me.load_bytes(p, me.ZeroSetup(0), n) == me.load_bytes(p, me.ZeroSetup(2), n) == 4000
    assert me.load_bytes(p, me.ZeroSetup(3), n) == 4000 // n + 2 * 300
    assert me.load_bytes(p, me.ZeroSetup(3, True, True), n) == 2 * 300  # partitions go to the CPU as they are made
    assert me.load_bytes(p, me.ZeroSetup(3), n, bf16=False) == 4000 // n + 4 * 300
    q = me.ParamBytes(1000, 500, 100, 60, base_bytes=2500, largest_param=300, largest_quantized=200)
    assert me.load_bytes(q, me.ZeroSetup(2), n) == 2500 + 2 * 200
    assert me.model_state_bytes(p, me.ZeroSetup(3), n).load == 4000 // n + 600  # carried beside the step's states


def test_load_peak_in_report_matches_the_models(tiny_ckpt, capsys):
    pytest.importorskip("bitsandbytes")
    path = tiny_ckpt("internvl2-2b")
    opts = {**_opts(path), "model.dtype": "bf16"}
    loaded = load_internvl(path, dtype=torch.bfloat16)
    base, largest = sum(2 * p.numel() for p in loaded.parameters()), max(p.numel() for p in loaded.parameters())
    full = dict(estimate(TINY.format("full"), gpus=2, cfg_options=opts).states)
    assert full[me.ZeroSetup(3)].load == base // 2 + 2 * largest
    assert full[me.ZeroSetup(0)].load == full[me.ZeroSetup(2)].load == base
    # QLoRA: the nf4 model (as InternVLChat.build quantizes it while loading) + its largest linear in bf16
    s = InternVLChat(path=str(path), dtype="bf16", lora=dict(llm_rank=8), quantization=dict(llm="nf4"))
    real = s.build(torch.device("cpu"))
    packed = [p.quant_state.shape.numel() for p in real.parameters() if p.dtype == torch.uint8]
    others = sum(p.numel() for n, p in real.named_parameters() if p.dtype != torch.uint8 and "lora_" not in n)
    qlora = dict(estimate(TINY.format("qlora"), gpus=2, cfg_options=opts).states)
    assert qlora[me.ZeroSetup(1)].load == sum(map(me.nf4_bytes, packed)) + 2 * others + 2 * max(packed)
    assert (
        main(["estimate", TINY.format("qlora"), "--gpus", "2", "--cfg-options", *[f"{k}={v}" for k, v in opts.items()]])
        == 0
    )
    out = capsys.readouterr().out
    assert "load peak" in out and "loading peaks at" in out and f"({max(packed):,} params)" in out


# -- activations --------------------------------------------------------------------------------------
def saved_bytes(model, layers: dict[str, torch.nn.Module], tiles: int = 2, rows: int = 2, text: int = 40):
    """Bytes autograd saves inside each module of ``layers`` (storages counted once, weights excluded)
    for one forward of a padded batch; returns (bytes per part, rows, row length, ViT tokens, image tokens)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    scope, seen, out = ["other"], set(), defaultdict(int)

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            out[scope[-1]] += t.untyped_storage().nbytes()
        return t

    for name, module in layers.items():
        module.register_forward_pre_hook(lambda m, a, name=name: scope.append(name) and None)
        module.register_forward_hook(lambda m, a, o: scope.pop() and None)
    seq = 256 + text
    ids = torch.randint(3, 60, (rows, seq))
    ids[:, 5 : 5 + 256] = model.img_context_token_id  # one tile per row
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[1, -7:] = 0  # padding, as in a real batch
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(tiles, 3, 448, 448, dtype=torch.bfloat16), ids, attention_mask=mask, use_cache=False)
    return out, rows, seq, tiles * 1025, tiles * 256


def _unwrap(m):
    return m.get_base_model() if hasattr(m, "get_base_model") else m


@pytest.mark.parametrize(
    "family, method, o_proj_copy",
    [
        ("internvl2-2b", {}, False),  # full: InternLM2, ViT-300M trained
        ("internvl2-2b", {"freeze": {"llm": True}}, False),  # frozen LLM: gradients still flow to mlp1
        ("internvl2-2b", {"lora": {"llm_rank": 8, "vit_rank": 4}}, False),
        ("internvl2-2b", {"lora": {"llm_rank": 8, "vit_rank": 4, "dropout": 0.0}}, False),
        ("internvl-chat-v1-5", {"lora": {"llm_rank": 8, "vit_rank": 4}}, False),  # ViT-6B: rms + qk norm
        ("internvl-chat-v1-5", {}, False),
        ("internvl2-1b", {"lora": {"llm_rank": 8}}, False),  # Qwen2: separate q/k/v with bias
        ("internvl2-4b", {}, True),  # Phi-3: fused MHA qkv, o_proj reads a copy
    ],
)
def test_layer_formulas_match_saved_tensors(family, method, o_proj_copy, tiny_ckpt):
    """The closed form equals the bytes autograd saves per token in a real bf16 layer on CPU (where the
    dropout mask and LayerNorm statistics are bf16, so mask_bytes = stat_bytes = 2)."""
    path = tiny_ckpt(family)
    lora, freeze = method.get("lora"), method.get("freeze", {})
    freeze_vit = bool(lora and lora.get("vit_rank")) or freeze.get("llm", False)
    s = InternVLChat(path=str(path), gradient_checkpointing=False, freeze={**freeze, "vit": freeze_vit}, lora=lora)
    model = s.apply_method(load_internvl(path, dtype=torch.bfloat16), torch.bfloat16).to(torch.bfloat16)
    vit, lm = _unwrap(model.vision_model), _unwrap(model.language_model)
    layers = {"llm": lm.model.layers[1], "vit": vit.encoder.layers[1], "mlp1": model.mlp1}
    measured, rows, seq, vit_tokens, image_tokens = saved_bytes(model, layers)
    a = me.ActivationSettings(
        lora_dropout=s.lora.dropout if s.lora else 0.0,
        mask_bytes=2,
        stat_bytes=2,
        attn_out_copy=o_proj_copy,
        mask_seq_len=seq,
    )
    lc, vc = lm.config, vit.config
    heads, kv = lc.num_attention_heads, lc.num_key_value_heads
    llm = layer_spec(lm.model.layers[1], lc.hidden_size, lc.intermediate_size, heads, kv, vision=False)
    assert me.layer_activation_bytes(llm, a) * rows * seq == measured["llm"]
    heads = vc.num_attention_heads
    spec = layer_spec(vit.encoder.layers[1], vc.hidden_size, vc.intermediate_size, heads, heads, vision=True)
    expected_vit = me.layer_activation_bytes(spec, a) * vit_tokens if not freeze_vit or s.vit_lora_rank else 0
    assert expected_vit == measured["vit"]
    mlp1 = me.projector_activation_bytes(model.mlp1[0].normalized_shape[0], lc.hidden_size, True, a)
    assert mlp1 * image_tokens == measured["mlp1"]


def test_stack_and_logits_arithmetic():
    a = me.ActivationSettings()
    assert me.stack_activation_bytes(100, 3, 10, 8, checkpointing=False, a=a) == 3 * 100 * 10
    # checkpointing: one bf16 hidden state per layer boundary plus one layer recomputed
    assert me.stack_activation_bytes(100, 3, 10, 8, checkpointing=True, a=a) == 3 * 2 * 8 * 10 + 100 * 10
    assert me.stack_activation_bytes(100, 0, 10, 8, checkpointing=True, a=a) == 0
    assert me.logits_bytes(rows=2, positions=5, vocab=7, a=a) == 2 * 5 * 7 * (2 + 4 + 4)


def test_activation_parts_follow_the_method(tiny_ckpt):
    path = tiny_ckpt("internvl2-2b")
    lora = estimate(TINY.format("lora"), cfg_options=_opts(path), trained_tokens=100)
    parts = lora.activations["checkpointing"]
    assert "vision_model" not in parts and parts["mlp1"] > 0 and parts["language_model"] > 0
    vocab = read_config(path).llm_config["vocab_size"]
    assert parts["logits"] == me.logits_bytes(lora.workload.micro_batch, 100, vocab, me.ActivationSettings())
    assert lora.activations["no_checkpointing"]["language_model"] > parts["language_model"]
    vit = estimate(TINY.format("lora"), cfg_options={**_opts(path), "model.lora.vit_rank": 4})
    assert vit.activations["checkpointing"]["vision_model"] > 0
    # tiles: max_dynamic_patch 2 + thumbnail; logits by default at max_length minus one full-tile image
    assert vit.workload.tiles_per_row == 3
    assert vit.workload.trained_positions == 2048 - 3 * 256


# -- releases -----------------------------------------------------------------------------------------
PUBLISHED = {  # total parameters, billions (Hugging Face model cards / safetensors metadata)
    "InternVL2-1B": 0.94,
    "InternVL2-2B": 2.21,
    "InternVL2-4B": 4.15,
    "InternVL2-8B": 8.08,
    "InternVL2-26B": 25.5,
    "InternVL2-40B": 40.1,
    "InternVL2-Llama3-76B": 76.3,
    "InternVL-Chat-V1-5": 25.5,
    "Mini-InternVL-Chat-2B-V1-5": 2.2,
    "Mini-InternVL-Chat-4B-V1-5": 4.15,
    "InternVL2_5-1B": 0.94,
    "InternVL3-1B": 0.94,
    "InternVL2_5-8B": 8.08,
    "InternVL3-2B": 2.09,
    "InternVL3-8B": 7.94,
    "InternVL3-14B": 15.1,
    "InternVL3-38B": 38.4,
    "InternVL3-78B": 78.4,
    "InternVL3_5-1B": 1.06,  # untied head: the InternVL3.5 docs' 0.8B language / 1.1B total
    "InternVL3_5-2B": 2.35,
    "InternVL3_5-4B": 4.73,
    "InternVL3_5-8B": 8.53,
    "InternVL3_5-14B": 15.1,
    "InternVL3_5-38B": 38.4,
    "InternVL3_5-30B-A3B": 30.8,  # InternVL3.5 docs: 0.3B vision + 30.5B language
    "InternVL3_5-241B-A28B": 240.7,  # 5.5B vision + 235.1B language
    "InternVL3_5-GPT-OSS-20B-A4B": 21.2,  # 0.3B vision + gpt-oss-20b's 20.9B
}
# MoE releases: billions active per token (the "A3B" / "A28B" of their names; Qwen3-30B-A3B activates 3.3B).
# Embedding tables count whole: gpt-oss-20b's 3.6B active excludes its 0.58B embedding.
ACTIVE = {"InternVL3_5-30B-A3B": 3.67, "InternVL3_5-241B-A28B": 27.8, "InternVL3_5-GPT-OSS-20B-A4B": 4.51}


def test_release_totals_match_published_figures():
    assert set(release_names()) == set(PUBLISHED)
    for name, billions in PUBLISHED.items():
        config, release = resolve_model_config(f"/nowhere/{name.lower()}")  # basename, case-insensitive
        assert release == name
        row = count_parameters(build_empty_model(config, attn_implementation="sdpa"), set(), 2)[-1]
        total = row.total
        assert abs(total / 1e9 - billions) / billions < 0.02, (name, total)
        assert row.active / 1e9 == pytest.approx(ACTIVE.get(name, total / 1e9), rel=0.02), (name, row.active)
        assert release_config(name)["_model_card_size_b"] == pytest.approx(billions, rel=0.05)


def test_unknown_model_path_is_refused(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="not a shipped release"):
        resolve_model_config(tmp_path / "My-Model")
    assert main(["estimate", TINY.format("lora"), "--cfg-options", f"model.path={tmp_path / 'x'}"]) == 1
    assert "not a shipped release" in capsys.readouterr().err


# -- CLI ----------------------------------------------------------------------------------------------
def _run(capsys, *args) -> str:
    assert main(["estimate", *args]) == 0
    return capsys.readouterr().out


def _representatives() -> set[str]:
    """One config per release directory and method: those run on their release's real architecture (on the meta
    device); the others on the tiny model of their family. MoE LoRA configs always take the tiny model: peft wraps
    every expert's linears one by one (18,624 in 30B-A3B, about a minute)."""
    seen, chosen = set(), set()
    for name in list_configs():
        key = (name.rsplit("_", 2)[0], name.rsplit("_", 1)[1])
        if key not in seen and "moe" not in name:
            seen.add(key)
            chosen.add(name)
    return chosen


REPRESENTATIVES = _representatives()


@pytest.mark.parametrize("name", list_configs())
def test_cli_on_every_shipped_config(name, capsys, tiny_ckpt):
    from tests.engine.test_configs import _tiny_for

    real = name in REPRESENTATIVES
    if not name.startswith("tiny"):  # every shipped config names a shipped release architecture
        assert release_config(Path(load_config(name).model.path).name) is not None, name
    family = "internvl2-2b" if name.startswith("tiny") else _tiny_for(name)
    extra = [] if real else ["--cfg-options", f"model.path={tiny_ckpt(family)}"]
    out = _run(capsys, name, *extra)
    for row in ("vision_model", "mlp1", "language_model", "total", "ZeRO-3", "Summary: fits in"):
        assert row in out
    total_row = next(line for line in out.splitlines() if line.startswith("  total "))
    assert int(total_row.split()[1].replace(",", "")) > 0
    assert ("active per token" in total_row) is ("moe" in name or "gpt_oss" in name)
    marked = [line for line in out.splitlines() if line.startswith("* ")]
    assert len(marked) == 1  # the config's own backend
    if real and not name.startswith("tiny"):
        assert "shipped architecture of release" in out


def test_cli_json_custom_deepspeed_and_overrides(capsys, tmp_path):
    ds = tmp_path / "my_ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}))
    args = ["internvl_v2_internlm2_5_8b_full", "--gpus", "4", "--micro-batch-size", "1", "--deepspeed", str(ds)]
    d = json.loads(_run(capsys, *args, "--json"))
    assert d["gpus"] == 4 and d["workload"]["micro_batch"] == 1 and d["release_fallback"] == "InternVL2-8B"
    selected = [b for b in d["backends"] if b["selected"]]
    assert len(selected) == 1 and selected[0]["stage"] == 1 and selected[0]["offload_optimizer"]
    assert selected[0]["optimizer"] == 0 and selected[0]["cpu"] > 0
    assert d["summary"].startswith("fits in") and "ZeRO-1 offload" in d["summary"]
    total = next(p for p in d["parameters"] if p["name"] == "total")
    assert total["total"] == pytest.approx(8.08e9, rel=0.01)


def test_qlora_on_zero3_is_not_possible(capsys):
    out = _run(capsys, "internvl_v2_internlm2_5_8b_qlora", "--deepspeed", "zero3")
    assert "* ZeRO-3" in out and "n/a" in out and "not possible" in out
