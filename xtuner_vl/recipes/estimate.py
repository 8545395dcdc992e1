"""``xtuner-vl estimate``: parameter counts and per-GPU memory of a config, from the config alone.

The model is built on the meta device with the trainer's own code (:meth:`InternVLChat.apply_method`: freezing,
LoRA, QLoRA's choice of layers, checkpointing), so nothing is read or downloaded. When ``model.path``
has no config.json, the shipped architecture of the release named like the path is used (see
``xtuner_vl/model/release_configs``). The formulas are in :mod:`xtuner_vl.engine.memory_estimate`;
the text report is written by :mod:`xtuner_vl.recipes.estimate_report`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer, ParamWrapper
from torch import nn

from xtuner_vl.adapters.qlora import nf4_targets
from xtuner_vl.engine import memory_estimate as me
from xtuner_vl.engine.deepspeed_config import load_deepspeed_config
from xtuner_vl.model import InternVLChatModel, build_empty_model
from xtuner_vl.model.moe import ExpertLinears, expert_modules
from xtuner_vl.model.releases import resolve_model_config
from xtuner_vl.recipes.config import find_config, load_config
from xtuner_vl.recipes.model_wrapper import InternVLChat, build_model_wrapper, resolve_dtype
from xtuner_vl.recipes.settings import (
    DataLoaderSettings,
    RuntimeSettings,
    ScheduleSettings,
    parse_section,
)
from xtuner_vl.registry import DATASETS

__all__ = ["ModuleCount", "Workload", "Estimate", "estimate", "build_meta_model", "count_parameters", "layer_spec"]

PARTS = ("vision_model", "mlp1", "language_model")
# Which input each linear of a block reads, by the official module names of every family.
_GROUPS = {
    **dict.fromkeys(("wqkv", "q_proj", "k_proj", "v_proj", "qkv_proj", "qkv"), me.ATTN_IN),
    **dict.fromkeys(("wo", "o_proj", "proj"), me.ATTN_OUT),
    **dict.fromkeys(("w1", "w3", "gate_proj", "up_proj", "gate_up_proj", "fc1"), me.MLP_IN),
    **dict.fromkeys(("w2", "down_proj", "fc2"), me.MLP_DOWN),
}
_STANDARD = [me.ZeroSetup(0), me.ZeroSetup(1), me.ZeroSetup(2), me.ZeroSetup(3)]
_STANDARD += [me.ZeroSetup(2, offload_optimizer=True), me.ZeroSetup(3, offload_optimizer=True, offload_param=True)]


@dataclass
class ModuleCount:
    """Parameters of one part of the model; ``total`` and ``trainable`` include its LoRA adapters, which
    ``lora`` also gives apart. ``stored_bytes``: the weights in the training dtype, nf4 ones packed."""

    name: str
    total: int = 0
    trainable: int = 0
    lora: int = 0
    nf4_params: int = 0  # parameters held in 4-bit (QLoRA)
    active: int = 0  # of ``total``, those a token runs through (MoE: num_experts_per_tok of the experts)
    stored_bytes: int = 0  # frozen weights in their training dtype or nf4 packing; LoRA in the training dtype


@dataclass
class Workload:
    """What one micro-batch holds, as the activation estimate assumes it."""

    micro_batch: int
    max_length: int
    tiles_per_row: int  # max_dynamic_patch (+1 thumbnail); packed rows: the pack's tile budget
    tokens_per_tile: int  # ViT tokens (patches + CLS)
    image_tokens_per_tile: int  # LLM tokens after pixel shuffle
    trained_positions: int  # logits computed per row


@dataclass
class Estimate:
    """Everything ``xtuner-vl estimate`` prints (and ``--json`` dumps)."""

    config: str
    model_path: str
    release: str | None  # the shipped release used because model_path has no config.json
    method: str
    dtype: str  # what training on a GPU uses: bf16 or fp32
    dtype_setting: str  # model.dtype as configured ('auto' -> bf16 on CUDA)
    gpus: int
    checkpointing: bool
    counts: list[ModuleCount]
    workload: Workload
    activations: dict[str, dict[str, int]]  # "checkpointing" / "no_checkpointing" -> part -> bytes
    states: list[tuple[me.ZeroSetup, me.StateMemory | None]]  # None: not possible (QLoRA on ZeRO-3)
    selected: me.ZeroSetup
    details: dict[str, int] = field(default_factory=dict)  # per-layer bytes per token, layer counts
    notes: list[str] = field(default_factory=list)

    def total(self, state: me.StateMemory, checkpointing: bool) -> int:
        key = "checkpointing" if checkpointing else "no_checkpointing"
        return state.gpu + sum(self.activations[key].values())


def build_meta_model(s: InternVLChat) -> tuple[InternVLChatModel, str | None, set[int]]:
    """The model on the meta device with the method of ``s`` applied, the fallback release (or None),
    and the ids of the weights QLoRA would hold in nf4 (counted analytically: bitsandbytes cannot
    quantize meta tensors)."""
    config, release = resolve_model_config(s.path)
    model = build_empty_model(config, attn_implementation="sdpa")
    nf4 = {id(lin.weight) for _, _, lin in nf4_targets(model.language_model)} if s.quantization else set()
    with torch.device("meta"):  # LoRA layers are created on meta too (no allocation, no init)
        model = s.apply_method(model, torch.bfloat16, quantize=False)
    return model, release, nf4


def _idle_experts(model: nn.Module) -> dict[int, int]:
    """Parameter id -> how many of its elements a token does not run through: per expert container, the experts
    past ``num_experts_per_tok`` (all experts have one size). Per-expert linears (Qwen3-MoE, adapters included)
    count whole; fused 3-D expert weights (GPT-OSS, expert first) count that share of their elements."""
    config = _unwrap(model.language_model).config
    top_k, experts = getattr(config, "num_experts_per_tok", 0), getattr(config, "num_local_experts", 0)
    idle = {}
    for m in expert_modules(model.language_model):
        if isinstance(m, ExpertLinears):
            idle.update({id(p): p.numel() for expert in list(m)[top_k:] for p in expert.parameters()})
        else:
            idle.update({id(p): p.numel() * (experts - top_k) // experts for p in m.parameters(recurse=False)})
    for m in _fused_expert_loras(model.language_model):  # A holds r rows, B r columns per expert
        adapters = [*m.lora_A.parameters(), *m.lora_B.parameters()]
        idle.update({id(p): p.numel() * (experts - top_k) // experts for p in adapters})
    return idle


def _fused_expert_loras(module: nn.Module) -> list[ParamWrapper]:
    """peft's LoRAs on fused 3-D expert weights (``target_parameters``, GPT-OSS) in ``module``."""
    return [m for m in module.modules() if isinstance(m, ParamWrapper) and m.num_experts > 1]


def _folded_expert_bytes(layer: nn.Module, top_k: int, elem: int) -> tuple[int, int]:
    """``(per token, per layer)`` bytes the fused-expert LoRAs of ``layer`` add to its activations, adapters in the
    training dtype (tests/model/test_gpt_oss.py measures them): each forward folds its adapter into the whole expert
    weight (peft's ``ParamWrapper``: ``W + s * A^T B^T``), and each expert's matmul keeps that folded copy and its
    input (``top_k`` rows of ``in_features`` per token) for backward."""
    loras = _fused_expert_loras(layer)
    return sum(elem * top_k * m.in_features for m in loras), sum(elem * m.get_param().numel() for m in loras)


def count_parameters(model: nn.Module, nf4: set[int], elem: int) -> list[ModuleCount]:
    """Per-part counts of ``model`` (``vision_model``, ``mlp1``, ``language_model``) plus a total row."""
    counts = {name: ModuleCount(name) for name in PARTS}
    idle = _idle_experts(model)
    for name, p in model.named_parameters():
        c = counts[name.split(".", 1)[0]]
        c.total += p.numel()
        c.active += p.numel() - idle.get(id(p), 0)
        c.trainable += p.numel() if p.requires_grad else 0
        c.lora += p.numel() if "lora_" in name else 0
        if id(p) in nf4:
            c.nf4_params += p.numel()
            c.stored_bytes += me.nf4_bytes(p.numel())
        else:
            c.stored_bytes += elem * p.numel()
    rows = list(counts.values())
    total = ModuleCount("total")
    for c in rows:
        for key in ("total", "trainable", "lora", "nf4_params", "active", "stored_bytes"):
            setattr(total, key, getattr(total, key) + getattr(c, key))
    return rows + [total]


def _unwrap(module: nn.Module) -> nn.Module:
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def layer_spec(
    layer: nn.Module,
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    vision: bool,
    head_dim: int | None = None,
    active_experts: int | None = None,
) -> me.LayerSpec:
    """The :class:`LayerSpec` of one built block: its linears (with LoRA ranks and trainability), norms.

    ``head_dim`` defaults to ``hidden // heads``; Qwen3 sets its own (its config's ``head_dim``). In a MoE block
    each token runs through ``active_experts`` experts: only that many experts' linears hold its activations."""
    linears, norm_trainable, rms = [], False, False
    for name, mod in layer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        expert = name.split(".experts.", 1)[1].split(".", 1)[0] if ".experts." in name else None
        if expert is not None and expert.isdigit() and int(expert) >= (active_experts or 0):
            continue
        if isinstance(mod, ParamWrapper):
            continue  # a LoRA on fused expert weights, not a linear: _folded_expert_bytes
        if isinstance(mod, LoraLayer):
            base, rank = mod.get_base_layer(), mod.r["default"]
            linears.append(
                me.LinearSpec(_GROUPS[leaf], base.in_features, base.out_features, base.weight.requires_grad, rank)
            )
        elif type(mod) is nn.Linear and leaf in _GROUPS:
            linears.append(me.LinearSpec(_GROUPS[leaf], mod.in_features, mod.out_features, mod.weight.requires_grad))
        elif "norm" in leaf and leaf not in ("q_norm", "k_norm"):
            rms = rms or not isinstance(mod, nn.LayerNorm)
            norm_trainable = norm_trainable or any(p.requires_grad for p in mod.parameters())
    ls = [p for n, p in layer.named_parameters() if n in ("ls1", "ls2")]
    return me.LayerSpec(
        hidden=hidden,
        intermediate=intermediate,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim or hidden // heads,
        linears=tuple(linears),
        rms_norm=rms,
        norm_trainable=norm_trainable,
        vision=vision,
        # InternViT-6B normalizes q and k over the full width; Qwen3 per head (self_attn.q_norm / k_norm).
        qk_norm=hasattr(getattr(layer, "attn" if vision else "self_attn", None), "q_norm"),
        layer_scale_trainable=any(p.requires_grad for p in ls),
    )


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _activations(
    model: InternVLChatModel, w: Workload, ckpt: bool, a: me.ActivationSettings, details: dict[str, int]
) -> dict[str, int]:
    """Activation bytes per part for one micro-batch (see :mod:`xtuner_vl.engine.memory_estimate`);
    the per-layer figures go to ``details``."""
    vit, lm = _unwrap(model.vision_model), _unwrap(model.language_model)
    vit_layers = list(vit.encoder.layers)
    first = 0 if _trains(vit.embeddings) else next((i for i, x in enumerate(vit_layers) if _trains(x)), len(vit_layers))
    vit_stores = len(vit_layers) - first
    mlp_stores = _trains(model.mlp1) or vit_stores > 0
    vc, lc = vit.config, lm.config
    out: dict[str, int] = {}
    vit_tokens = w.micro_batch * w.tiles_per_row * w.tokens_per_tile
    if vit_stores:
        heads = vc.num_attention_heads
        spec = layer_spec(vit_layers[-1], vc.hidden_size, vc.intermediate_size, heads, heads, vision=True)
        per_layer = details["vit_layer_bytes"] = me.layer_activation_bytes(spec, a)
        details["vit_layers_storing"] = vit_stores
        out["vision_model"] = me.stack_activation_bytes(per_layer, vit_stores, vit_tokens, vc.hidden_size, ckpt, a)
    if mlp_stores:
        image_tokens = w.micro_batch * w.tiles_per_row * w.image_tokens_per_tile
        mlp_in = model.mlp1[0].normalized_shape[0]
        per_token = me.projector_activation_bytes(mlp_in, lc.hidden_size, _trains(model.mlp1), a)
        details["mlp1_token_bytes"] = per_token
        out["mlp1"] = image_tokens * per_token
    if mlp_stores or _trains(lm):
        tokens, layers = w.micro_batch * w.max_length, lm.model.layers
        heads, kv = lc.num_attention_heads, lc.num_key_value_heads or lc.num_attention_heads
        head_dim = getattr(lc, "head_dim", None)
        top_k = getattr(lc, "num_experts_per_tok", None)
        # MoE: a token's gated intermediate is top_k experts' (Qwen3-MoE: moe_intermediate_size each; GPT-OSS:
        # intermediate_size each, its experts fused weights that no LinearSpec lists)
        intermediate = (
            top_k * getattr(lc, "moe_intermediate_size", lc.intermediate_size) if top_k else lc.intermediate_size
        )
        spec = layer_spec(layers[0], lc.hidden_size, intermediate, heads, kv, False, head_dim, top_k)
        token_folded, layer_folded = _folded_expert_bytes(layers[0], top_k or 0, a.elem)
        per_layer = details["llm_layer_bytes"] = me.layer_activation_bytes(spec, a) + token_folded
        details["llm_layers"] = len(layers)
        stack = me.stack_activation_bytes(per_layer, len(layers), tokens, lc.hidden_size, ckpt, a)
        if layer_folded:  # one layer's folded expert weights while it is recomputed, else every layer's
            details["llm_folded_expert_bytes"] = layer_folded
            stack += layer_folded * (1 if ckpt else len(layers))
        final_norm = tokens * me.norm_bytes(lc.hidden_size, True, _trains(lm.model.norm), a)
        head_trains = _trains(lm.get_output_embeddings())
        head = a.elem * lc.hidden_size * w.micro_batch * w.trained_positions if head_trains else 0
        out["language_model"] = stack + final_norm + head
    out["logits"] = me.logits_bytes(w.micro_batch, w.trained_positions, lc.vocab_size, a)
    return out


def _zero_setup(name: str | None) -> me.ZeroSetup:
    if name is None:
        return me.ZeroSetup(0)
    zero = load_deepspeed_config(name).get("zero_optimization", {})

    def off(key: str) -> bool:
        return str(zero.get(key, {}).get("device", "none")).lower() in ("cpu", "nvme")

    return me.ZeroSetup(int(zero.get("stage", 0)), off("offload_optimizer"), off("offload_param"))


def _param_bytes(model: nn.Module, total: ModuleCount, elem: int, nf4: set[int]) -> me.ParamBytes:
    """Trainable parameters, frozen bytes, the largest modules ZeRO-3 gathers (their own parameters), and
    what loading holds: the base weights, the largest base parameter, the largest layer QLoRA quantizes."""
    # ZeRO-3 gathers a module's own parameters, a leaf module's (MoE expert lists) all of them at once
    own = [list(m.parameters(recurse=getattr(m, "zero3_leaf", False))) for m in model.modules()]
    largest = max(sum(p.numel() for p in ps) for ps in own)
    largest_trainable = max(sum(p.numel() for p in ps if p.requires_grad) for ps in own)
    base = [p for name, p in model.named_parameters() if "lora_" not in name]
    return me.ParamBytes(
        total.trainable,
        total.stored_bytes - elem * total.trainable,
        largest,
        largest_trainable,
        base_bytes=total.stored_bytes - elem * total.lora,
        largest_param=max(p.numel() for p in base),
        largest_quantized=max((p.numel() for p in base if id(p) in nf4), default=0),
    )


def _workload(cfg, s: InternVLChat, model: InternVLChatModel, mbs: int, trained: int | None) -> Workload:
    data = dict(cfg.get("train_dataset") or {})
    kind = data.get("type", "InternVLDataset")  # the dataset's own defaults for what the config leaves out
    defaults = inspect.signature(kind if isinstance(kind, type) else DATASETS.get(kind)).parameters
    data = {k: data.get(k, defaults[k].default) for k in ("max_length", "max_dynamic_patch", "use_thumbnail")}
    loader = parse_section(DataLoaderSettings, cfg.get("dataloader"), "dataloader")
    mc = model.config
    max_length, max_patch = int(data["max_length"]), int(data["max_dynamic_patch"])
    thumbnail = mc.use_thumbnail if data.get("use_thumbnail") is None else data["use_thumbnail"]
    per_image = mc.num_image_token
    tiles = max_patch + (1 if thumbnail and max_patch > 1 else 0)
    if loader.pack:  # a packed row: pack_length tokens, up to pack_max_tiles tiles bounded by its token budget
        max_length = loader.pack_length
        tiles = min(loader.pack_max_tiles or max_length, max_length // per_image)
    positions = trained if trained is not None else max(1, max_length - tiles * per_image)
    vit_tokens = (mc.image_size // mc.vision.patch_size) ** 2 + 1
    return Workload(mbs, max_length, tiles, vit_tokens, per_image, min(positions, max_length))


def estimate(
    config: str,
    gpus: int = 8,
    deepspeed: str | None = None,
    micro_batch_size: int | None = None,
    cfg_options: dict | None = None,
    trained_tokens: int | None = None,
) -> Estimate:
    """Parameter counts and per-GPU memory of ``config`` on ``gpus`` data-parallel GPUs.

    ``deepspeed`` overrides the config's backend (a preset name or JSON path); ``trained_tokens`` the
    assumed number of trained positions per row (default: ``max_length`` minus one full-tile image).
    """
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if trained_tokens is not None and trained_tokens < 1:
        raise ValueError(f"--trained-tokens must be >= 1, got {trained_tokens}")
    cfg = load_config(config, cfg_options)
    s = build_model_wrapper(cfg.get("model"))
    sched = parse_section(ScheduleSettings, cfg.get("schedule"), "schedule")
    runtime = parse_section(RuntimeSettings, cfg.get("runtime"), "runtime")
    bf16 = resolve_dtype(s.dtype, torch.device("cuda")) == torch.bfloat16
    model, release, nf4 = build_meta_model(s)
    w = _workload(cfg, s, model, micro_batch_size or sched.micro_batch_size, trained_tokens)
    # the dropout peft applies (none on an LLM with LoRA on parameters, see xtuner_vl/adapters/lora.py)
    peft_parts = [m for m in (model.language_model, model.vision_model) if hasattr(m, "peft_config")]
    dropout = max((m.peft_config["default"].lora_dropout for m in peft_parts), default=0.0)
    act = me.ActivationSettings(elem=2 if bf16 else 4, lora_dropout=dropout, mask_seq_len=w.max_length)
    counts = count_parameters(model, nf4, act.elem)
    details: dict[str, int] = {}
    activations = {
        "checkpointing": _activations(model, w, True, act, details),
        "no_checkpointing": _activations(model, w, False, act, details),
    }
    params = _param_bytes(model, counts[-1], act.elem, nf4)
    selected = _zero_setup(deepspeed or runtime.deepspeed)
    setups = _STANDARD + ([selected] if selected not in _STANDARD else [])
    states = [
        (z, None if s.quantization and z.stage == 3 else me.model_state_bytes(params, z, gpus, bf16)) for z in setups
    ]
    notes = []
    if "llm_folded_expert_bytes" in details:
        notes.append(
            "LoRA on fused experts: each layer's forward folds the adapters into its whole expert weights and keeps"
            f" that copy for backward ({details['llm_folded_expert_bytes']:,} B per layer, counted in the LLM's"
            " activations: every layer's without checkpointing, one layer's with it)"
        )
    if s.quantization:
        notes.append("QLoRA: 4-bit weights cannot be sharded by ZeRO-3 (n/a rows); nf4 counted at its packed size")
    return Estimate(
        config=find_config(config).stem,
        model_path=s.path,
        release=release,
        method=_method_text(s),
        dtype="bf16" if bf16 else "fp32",
        dtype_setting=s.dtype,
        gpus=gpus,
        checkpointing=s.gradient_checkpointing,
        counts=counts,
        workload=w,
        activations=activations,
        states=states,
        selected=selected,
        details={
            **details,
            "largest_module": params.largest_module,
            "largest_param": params.largest_param,
            "largest_quantized": params.largest_quantized,
        },
        notes=notes,
    )


def _method_text(s: InternVLChat) -> str:
    parts = []
    if s.llm_lora_rank:
        parts.append(f"{'QLoRA (nf4 LLM)' if s.quantization else 'LoRA'} r{s.llm_lora_rank} on the LLM")
    if s.vit_lora_rank:
        parts.append(f"LoRA r{s.vit_lora_rank} on the ViT")
    f = s.freeze
    frozen = [n for n, frozen in (("ViT", f.vit), ("mlp1", f.mlp), ("LLM", f.llm)) if frozen]
    if not s.llm_lora_rank and not s.vit_lora_rank:
        parts.append("full fine-tune")
    parts.append("frozen: " + (", ".join(frozen) if frozen else "nothing"))
    if f.unfreeze_vit_layers:
        parts.append(f"last {f.unfreeze_vit_layers} ViT layers trained")
    return "; ".join(parts)
