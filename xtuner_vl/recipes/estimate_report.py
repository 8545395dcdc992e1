"""Text and JSON forms of an :class:`~xtuner_vl.recipes.estimate.Estimate`."""

from __future__ import annotations

import textwrap
from dataclasses import asdict
from typing import Any

from xtuner_vl.engine.memory_estimate import GiB, StateMemory, ZeroSetup
from xtuner_vl.recipes.estimate import Estimate

__all__ = ["summary_line", "format_estimate", "estimate_to_dict"]


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _elem(e: Estimate) -> int:
    return 2 if e.dtype == "bf16" else 4


def _best(e: Estimate) -> tuple[ZeroSetup, StateMemory]:
    return min(((z, s) for z, s in e.states if s is not None), key=lambda zs: e.total(zs[1], True))


def summary_line(e: Estimate) -> str:
    """``fits in X GiB per GPU with ZeRO-k + checkpointing ...`` for the backend the run uses."""
    chosen = dict(e.states)[e.selected]
    where = f"{e.gpus} GPU{'s' if e.gpus > 1 else ''}, micro-batch {e.workload.micro_batch}"
    best_z, best_s = _best(e)
    best = f"least: {best_z.label} + checkpointing, {_gib(e.total(best_s, True))} GiB"
    if chosen is None:
        return f"{e.selected.label} is not possible for this method ({where}); {best}"
    ckpt = " + checkpointing" if e.checkpointing else " without checkpointing"
    other = e.total(chosen, not e.checkpointing)
    alt = f"{_gib(other)} GiB {'without' if e.checkpointing else 'with'} checkpointing"
    fits = _gib(e.total(chosen, e.checkpointing))
    load = f"loading peaks at {_gib(chosen.load)} GiB"
    return f"fits in {fits} GiB per GPU with {e.selected.label}{ckpt} ({where}); {alt}; {load}; {best}"


def _param_rows(e: Estimate) -> list[str]:
    rows = [f"  {'':26}{'total':>17}{'trainable':>17}{'weights GiB':>14}"]
    for c in e.counts[:-1]:
        nf4 = f"  ({c.nf4_params:,} in nf4)" if c.nf4_params else ""
        base_bytes = c.stored_bytes - _elem(e) * c.lora
        rows.append(f"  {c.name:26}{c.total - c.lora:>17,}{c.trainable - c.lora:>17,}{_gib(base_bytes):>14}{nf4}")
    for c in e.counts[:-1]:
        if c.lora:
            rows.append(f"  {'LoRA on ' + c.name:26}{c.lora:>17,}{c.lora:>17,}{_gib(_elem(e) * c.lora):>14}")
    t = e.counts[-1]
    share = f"{t.total / 1e9:.3f}B, {100 * t.trainable / max(t.total, 1):.2f}% trainable"
    if t.active != t.total:  # MoE
        share += f"; {t.active / 1e9:.3f}B active per token"
    rows.append(f"  {'total':26}{t.total:>17,}{t.trainable:>17,}{_gib(t.stored_bytes):>14}  ({share})")
    return rows


def _memory_rows(e: Estimate) -> list[str]:
    rows = []
    for key, label in (("checkpointing", "with checkpointing"), ("no_checkpointing", "without checkpointing")):
        parts = e.activations[key]
        detail = ", ".join(f"{k} {_gib(v)}" for k, v in parts.items())
        rows.append(f"  activations {label:22} {_gib(sum(parts.values())):>8}   ({detail})")
    head = ("backend", "weights", "grads", "optimizer", "total+ckpt", "total-ckpt", "CPU/rank", "load peak")
    rows.append(f"  {head[0]:30}" + "".join(f"{h:>12}" for h in head[1:]))
    for z, s in e.states:
        mark = "*" if z == e.selected else " "
        if s is None:
            rows.append(f"{mark} {z.label:30}{'n/a':>12}")
            continue
        cells = (s.weights, s.grads, s.optimizer, e.total(s, True), e.total(s, False), s.cpu, s.load)
        rows.append(f"{mark} {z.label:30}" + "".join(f"{_gib(c):>12}" for c in cells))
    return rows


def _notes(e: Estimate) -> list[str]:
    d, w = e.details, e.workload
    layer = []
    if "llm_layer_bytes" in d:
        layer.append(f"LLM {d['llm_layer_bytes']:,} B/token/layer x {d['llm_layers']} layers")
    if "vit_layer_bytes" in d:
        layer.append(f"ViT {d['vit_layer_bytes']:,} B/token/layer x {d['vit_layers_storing']} layers")
    if "mlp1_token_bytes" in d:
        layer.append(f"mlp1 {d['mlp1_token_bytes']:,} B/image token")
    frozen_vit = "" if "vit_layer_bytes" in d else " A frozen ViT without LoRA stores nothing."
    return [
        "* the backend this run uses (--deepspeed, else the config's runtime.deepspeed; none = DDP).",
        "Model states: DDP = torch backend, fp32 master weights and grads (+ DDP bucket copy), AdamW 8 B/param;"
        " ZeRO-k = DeepSpeed bf16, weights 2 B/param (frozen as stored), grads 2 B (/GPUs from ZeRO-2),"
        " fp32 master + exp_avg + exp_avg_sq 12 B/GPUs; ZeRO-3 also shards the weights and gathers the"
        f" largest module ({d['largest_module']:,} params; + its grads if it trains); offload moves the"
        " optimizer states and fp32 grads (ZeRO-3: and weights) to CPU. Buckets, CUDA context and fragmentation"
        " not included.",
        "Activations: what autograd saves for backward (SDPA on a padded batch; closed form in"
        f" xtuner_vl/engine/memory_estimate.py): {'; '.join(layer) or 'nothing trains'}. With gradient"
        " checkpointing a stack keeps one hidden state per layer boundary plus one layer's activations"
        f" while it is recomputed.{frozen_vit}",
        _load_note(e),
        f"Workload: {w.micro_batch} rows x {w.max_length:,} tokens (every row at max_length); every row one image"
        f" of {w.tiles_per_row} tiles x {w.tokens_per_tile} ViT tokens ({w.image_tokens_per_tile} LLM tokens each).",
        f"Logits: computed only at positions whose next token is trained: {w.trained_positions:,} per row"
        " (default: max_length minus the image tokens; --trained-tokens sets it), x vocab x (2 B bf16 logits"
        " + 4 B fp32 copy + 4 B fp32 log-softmax).",
        *e.notes,
    ]


def _load_note(e: Estimate) -> str:
    d = e.details
    text = (
        "Load peak: per GPU while the checkpoint is read, before training (an earlier moment than the totals)."
        " ZeRO-3 partitions each weight as it is read: 1/GPUs of the weights plus the largest parameter"
        f" ({d['largest_param']:,} params) whole while it is split (offload_param: only that parameter); the"
        " other backends load the whole model on every GPU"
    )
    if d["largest_quantized"]:
        text += (
            f", with the LLM linears in nf4 and the largest of them ({d['largest_quantized']:,} params) in the"
            " load dtype while it is quantized"
        )
    return text + (
        ". Host memory while loading: ZeRO-3 and QLoRA read one tensor at a time (under ZeRO-3 only rank 0"
        " reads); the other backends read the whole checkpoint on every rank."
    )


def format_estimate(e: Estimate) -> str:
    """The report ``xtuner-vl estimate`` prints."""
    model = e.model_path
    if e.release is not None:
        model += f"  (no config.json there: using the shipped architecture of release {e.release})"
    lines = [
        f"xtuner-vl estimate: {e.config}",
        f"model:    {model}",
        f"method:   {e.method}",
        f"training: {e.dtype} (model.dtype={e.dtype_setting!r}), {e.gpus} GPU(s), "
        f"micro-batch {e.workload.micro_batch}, gradient checkpointing {'on' if e.checkpointing else 'off'}",
        "",
        "Parameters",
        *_param_rows(e),
        "",
        f"Per-GPU memory (GiB), {e.gpus} GPU(s)",
        *_memory_rows(e),
        "",
        f"Summary: {summary_line(e)}",
        "",
        "Notes:",
        *(textwrap.fill(n, 116, initial_indent="  - ", subsequent_indent="    ") for n in _notes(e)),
    ]
    return "\n".join(lines)


def estimate_to_dict(e: Estimate) -> dict[str, Any]:
    """A JSON-ready dict of everything in the report (bytes as integers)."""
    states = []
    for z, s in e.states:
        row: dict[str, Any] = {"backend": z.label, **asdict(z), "selected": z == e.selected, "possible": s is not None}
        if s is not None:
            row.update(asdict(s), total_checkpointing=e.total(s, True), total_no_checkpointing=e.total(s, False))
        states.append(row)
    return {
        "config": e.config,
        "model_path": e.model_path,
        "release_fallback": e.release,
        "method": e.method,
        "dtype": e.dtype,
        "dtype_setting": e.dtype_setting,
        "gpus": e.gpus,
        "gradient_checkpointing": e.checkpointing,
        "parameters": [asdict(c) for c in e.counts],
        "workload": asdict(e.workload),
        "activations": e.activations,
        "backends": states,
        "details": e.details,
        "summary": summary_line(e),
        "notes": _notes(e),
    }
