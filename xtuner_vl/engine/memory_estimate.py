"""Closed-form per-GPU memory of one training step: model states per ZeRO stage, and activations.

Pure arithmetic on plain numbers (no torch, no model), so every term can be checked by hand.

**Model states** (bytes per GPU, ``T`` trainable parameters, ``F`` bytes of frozen weights as stored,
``n`` data-parallel ranks), following what each backend really keeps:

- stage 0 = plain PyTorch DDP (our torch backend): trainable weights are fp32 masters (4T), fp32
  gradients (4T) plus DDP's bucket copy (4T when n > 1), AdamW exp_avg + exp_avg_sq (8T).
- DeepSpeed bf16, stage k (1: optimizer states, 2: + gradients, 3: + parameters partitioned over n):
  weights 2T + F (/n at stage 3), bf16 gradients 2T (/n from stage 2), optimizer fp32 master +
  exp_avg + exp_avg_sq = 12T/n. Stage 3 also gathers the largest module's full weights and gradients
  (2 + 2 bytes per parameter, as DeepSpeed's ``estimate_zero3_model_states_mem_needs``; the
  gradient part only for a module that trains).
  ``offload_optimizer`` moves the optimizer states and the fp32 gradient partition (4T/n) to CPU;
  ``offload_param`` also moves the partitioned weights (2T + F)/n to CPU.
- fp32 training (``model.dtype='fp32'``): no separate master copy (weights 4T, gradients 4T, AdamW 8T).

Communication buckets, CUDA context and allocator fragmentation are not included.

**Loading** (bytes per GPU while the checkpoint is read, before the optimizer exists; ``B`` = the base
weights as they will be stored: the load dtype, nf4 packed where QLoRA quantizes):

- ZeRO-3: each parameter is partitioned as it is read (``xtuner_vl/engine/zero3_load.py``): B/n plus
  the largest parameter, whole on every rank while it is broadcast and split (``offload_param``: only
  that parameter on the GPU, B/n on the CPU).
- QLoRA: each LLM linear is quantized on the GPU as it is read: B plus the largest such linear in the
  load dtype, the one being quantized.
- otherwise the whole model is loaded on every GPU: B.

**Activations** (bytes per token of one layer, bf16 elements ``e`` = 2) are the tensors autograd saves
for backward, as measured with ``torch.autograd.graph.saved_tensors_hooks`` on the real layers
(see ``tests/engine/test_estimate.py``), for SDPA attention on a padded batch:

- RMSNorm (LLM, InternViT-6B): fp32 input copy 4h + fp32 1/rms 4, + e*h normalised input if its
  weight trains. LayerNorm (InternViT-300M, ``mlp1``): e*h input + mean and 1/std (2 x ``stat_bytes``).
- a linear layer keeps its input (e * in_features, once per shared input) only if its weight trains
  or LoRA without dropout reads it; a frozen or 4-bit linear keeps nothing.
- LoRA per target: e*r (lora_A output) + in_features * (dropout mask + e) when dropout > 0.
- LLM attention: q, k and v as SDPA receives them (e*a*d each; k and v are expanded to all a query
  heads when there are fewer KV heads; a fused MHA qkv projection keeps its whole output e*(a+2kv)*d
  alive through the v view), the output e*a*d, fp32 log-sum-exp 4a, a copy of the output for
  ``o_proj`` when ``o_proj`` reads its input (flash-attention 2 and Phi-3 make one), and SDPA's own
  float copy of the padding mask, e*s per token of an s-token row. The o_proj copy is counted for every
  family by default (``attn_out_copy``; exact for Phi-3, e*a*d above the SDPA figure of InternLM2 / Qwen2
  / Llama). flash-attention 2 keeps no mask and k, v at kv heads: the SDPA figure bounds it from above.
- LLM SwiGLU MLP: gate (SiLU input), SiLU output and up projection, 3 x e*i.
- ViT attention: the qkv output e*3D (q, k, v are views of it), with qk-normalisation the two norms
  and the new q, k (2 x e*D); output e*D, log-sum-exp 4 x heads; ls1 / ls2 keep their input e*D each
  when they train; GELU input e*I.

With gradient checkpointing a checkpointed stack keeps one hidden state per layer boundary (e*h per
token per layer) plus one layer's activations while that layer is recomputed in backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "ATTN_IN",
    "ATTN_OUT",
    "MLP_IN",
    "MLP_DOWN",
    "GiB",
    "LinearSpec",
    "LayerSpec",
    "ActivationSettings",
    "ParamBytes",
    "ZeroSetup",
    "StateMemory",
    "nf4_bytes",
    "norm_bytes",
    "layer_activation_bytes",
    "projector_activation_bytes",
    "stack_activation_bytes",
    "logits_bytes",
    "model_state_bytes",
    "load_bytes",
]

GiB = 1024**3
ATTN_IN, ATTN_OUT, MLP_IN, MLP_DOWN = "attn_in", "attn_out", "mlp_in", "mlp_down"


@dataclass(frozen=True)
class LinearSpec:
    """One linear layer of a transformer block: which input it reads and how it trains."""

    group: str  # ATTN_IN (qkv), ATTN_OUT (o_proj / proj), MLP_IN (gate, up / fc1), MLP_DOWN (down / fc2)
    in_features: int
    out_features: int
    trainable: bool  # the base weight trains (full fine-tune)
    lora_rank: int = 0


@dataclass(frozen=True)
class LayerSpec:
    """One transformer block: an LLM decoder layer or an InternViT encoder layer."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    linears: tuple[LinearSpec, ...]
    rms_norm: bool  # RMSNorm (fp32 statistics) or LayerNorm
    norm_trainable: bool
    vision: bool = False
    qk_norm: bool = False  # InternViT-6B (full width), Qwen3 (per head)
    layer_scale_trainable: bool = False  # InternViT ls1 / ls2


@dataclass(frozen=True)
class ActivationSettings:
    """Element sizes of the saved tensors. Defaults: bf16 training on CUDA."""

    elem: int = 2  # bytes of an activation element (bf16)
    lora_dropout: float = 0.05
    mask_bytes: int = 1  # dropout mask element (bool on CUDA; the input dtype on CPU)
    stat_bytes: int = 4  # LayerNorm mean / 1/std element (fp32 on CUDA; the input dtype on CPU)
    attn_out_copy: bool = True  # o_proj reads a copy of the attention output (flash-attention 2, Phi-3)
    mask_seq_len: int = 0  # row length s of the padded batch: each LLM layer's SDPA keeps a [s, s] float mask


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of one bitsandbytes nf4 weight: packed 4-bit values plus its quantization state.

    Two values per byte; one absmax per ``blocksize`` values, itself quantized to uint8 with double
    quantization (fp32 absmax per 256 blocks, a 256-entry fp32 code and an fp32 offset), else fp32;
    the 16-entry fp32 nf4 code. About 0.516 bytes per parameter with double quantization, 0.5625 without.
    """
    blocks = math.ceil(numel / blocksize)
    state = 16 * 4  # nf4 code
    if double_quant:
        state += blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + 4
    else:
        state += blocks * 4
    return math.ceil(numel / 2) + state


def norm_bytes(width: int, rms: bool, trainable: bool, a: ActivationSettings) -> int:
    """Saved bytes per token of one norm layer (see the module docstring)."""
    if rms:
        return 4 * width + 4 + (a.elem * width if trainable else 0)
    return a.elem * width + 2 * a.stat_bytes


def _saves_input(linears: list[LinearSpec], a: ActivationSettings) -> bool:
    return any(lin.trainable or (lin.lora_rank and a.lora_dropout == 0) for lin in linears)


def _linear_bytes(spec: LayerSpec, a: ActivationSettings) -> int:
    groups = {g: [lin for lin in spec.linears if lin.group == g] for g in (ATTN_IN, ATTN_OUT, MLP_IN, MLP_DOWN)}
    total = sum(a.elem * spec.hidden for g in (ATTN_IN, MLP_IN) if _saves_input(groups[g], a))
    if _saves_input(groups[MLP_DOWN], a):
        total += a.elem * spec.intermediate
    if not spec.vision and a.attn_out_copy and _saves_input(groups[ATTN_OUT], a):
        total += a.elem * spec.heads * spec.head_dim
    for lin in spec.linears:
        if lin.lora_rank:
            total += a.elem * lin.lora_rank + (lin.in_features * (a.mask_bytes + a.elem) if a.lora_dropout > 0 else 0)
    return total


def _attention_mlp_bytes(spec: LayerSpec, a: ActivationSettings) -> int:
    e, q_width = a.elem, spec.heads * spec.head_dim
    if spec.vision:
        total = 3 * e * spec.hidden + e * spec.hidden + 4 * spec.heads + e * spec.intermediate
        if spec.qk_norm:
            total += 2 * (norm_bytes(spec.hidden, True, spec.norm_trainable, a) + e * spec.hidden)
        if spec.layer_scale_trainable:
            total += 2 * e * spec.hidden
        return total
    fused_qkv = sum(lin.group == ATTN_IN for lin in spec.linears) == 1
    if spec.kv_heads < spec.heads or not fused_qkv:
        v = e * q_width  # repeat_kv copy, or a separate v projection's output
    else:
        v = e * (spec.heads + 2 * spec.kv_heads) * spec.head_dim  # v is a view of the fused qkv output
    mask = e * a.mask_seq_len  # b*s*s elements over b*s tokens
    qk_norm = 0
    if spec.qk_norm:  # per-head RMSNorms of q and k: fp32 inputs and one fp32 statistic per head
        width, rows = (spec.heads + spec.kv_heads) * spec.head_dim, spec.heads + spec.kv_heads
        qk_norm = 4 * width + 4 * rows + (e * width if spec.norm_trainable else 0)
    return 2 * e * q_width + v + e * q_width + 4 * spec.heads + 3 * e * spec.intermediate + mask + qk_norm


def layer_activation_bytes(spec: LayerSpec, a: ActivationSettings) -> int:
    """Bytes saved for backward per token by one block (two norms, attention, MLP, LoRA)."""
    norms = 2 * norm_bytes(spec.hidden, spec.rms_norm, spec.norm_trainable, a)
    return norms + _linear_bytes(spec, a) + _attention_mlp_bytes(spec, a)


def projector_activation_bytes(in_width: int, out_width: int, trainable: bool, a: ActivationSettings) -> int:
    """Bytes per image token saved by ``mlp1`` = LayerNorm(in) -> Linear(in, out) -> GELU -> Linear(out, out)."""
    total = norm_bytes(in_width, False, trainable, a) + a.elem * out_width  # GELU input
    if trainable:
        total += a.elem * in_width + a.elem * out_width  # the two linear inputs
    return total


def stack_activation_bytes(
    layer_bytes: int, layers: int, tokens: int, hidden: int, checkpointing: bool, a: ActivationSettings
) -> int:
    """Activations of ``layers`` identical blocks over ``tokens`` tokens.

    Without checkpointing every layer keeps ``layer_bytes`` per token. With it, one hidden state per
    layer boundary (e*hidden per token) plus one layer's activations during its recompute.
    """
    if layers == 0:
        return 0
    if checkpointing:
        return layers * a.elem * hidden * tokens + layer_bytes * tokens
    return layers * layer_bytes * tokens


def logits_bytes(rows: int, positions: int, vocab: int, a: ActivationSettings) -> int:
    """The loss's logits buffer: logits are computed only at the ``positions`` (per row) whose next token
    is trained; bf16 logits (kept until backward ends) plus, for the trained tokens, the fp32 copy and
    fp32 log-softmax of the cross-entropy (all kept positions of all rows counted as trained)."""
    return rows * positions * vocab * (a.elem + 4 + 4)


@dataclass(frozen=True)
class ParamBytes:
    """What the model states depend on."""

    trainable: int  # parameters the optimizer updates
    frozen_bytes: int  # bytes of the frozen weights as stored (bf16: 2 per parameter, nf4 packed)
    largest_module: int  # parameters of the largest module (ZeRO-3 gathers one at a time)
    largest_trainable_module: int = 0  # the same among modules that train (their full gradients)
    base_bytes: int = 0  # the weights as loaded, before adapters: load dtype, nf4 packed where quantized
    largest_param: int = 0  # elements of the largest base parameter (ZeRO-3 holds it whole while loading)
    largest_quantized: int = 0  # elements of the largest linear QLoRA quantizes while loading (0: no QLoRA)


@dataclass(frozen=True)
class ZeroSetup:
    """A data-parallel backend: stage 0 = plain PyTorch DDP, 1-3 = DeepSpeed ZeRO stages."""

    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False

    @property
    def label(self) -> str:
        if self.stage == 0:
            return "DDP (no ZeRO)"
        off = " + param" if self.offload_param else ""
        return f"ZeRO-{self.stage}" + (f" offload (optim{off})" if self.offload_optimizer else "")


@dataclass(frozen=True)
class StateMemory:
    """Bytes per GPU of weights, gradients and optimizer states, and per rank on CPU (offload); ``load``: the
    peak per GPU while the checkpoint loads, an earlier moment than the training step (not in :attr:`gpu`)."""

    weights: int
    grads: int
    optimizer: int
    cpu: int = 0
    load: int = 0

    @property
    def gpu(self) -> int:
        return self.weights + self.grads + self.optimizer


def load_bytes(p: ParamBytes, z: ZeroSetup, gpus: int, bf16: bool = True) -> int:
    """Peak bytes per GPU while the checkpoint loads with backend ``z`` (see the module docstring)."""
    elem = 2 if bf16 else 4
    if z.stage == 3:
        whole = elem * p.largest_param
        return whole if z.offload_param else p.base_bytes // gpus + whole
    return p.base_bytes + elem * p.largest_quantized


def model_state_bytes(p: ParamBytes, z: ZeroSetup, gpus: int, bf16: bool = True) -> StateMemory:
    """Model states per GPU for backend ``z`` on ``gpus`` data-parallel ranks (see the module docstring)."""
    t, n = p.trainable, gpus
    if z.stage == 0:
        grads = 4 * t + (4 * t if n > 1 else 0)  # fp32 grads + DDP bucket copy
        return StateMemory(weights=4 * t + p.frozen_bytes, grads=grads, optimizer=8 * t, load=load_bytes(p, z, n, bf16))
    w_bytes, master = (2, 4) if bf16 else (4, 0)
    weights = w_bytes * t + p.frozen_bytes
    grads = w_bytes * t // (n if z.stage >= 2 else 1)
    optimizer = (master + 8) * t // n
    cpu = 0
    if z.stage == 3:
        weights //= n
        gathered = w_bytes * p.largest_module
        if z.offload_param:
            cpu += weights
            weights = 0
        weights += gathered
        grads += w_bytes * p.largest_trainable_module
    if z.offload_optimizer:
        cpu += optimizer + 4 * t // n  # optimizer states and the fp32 gradient partition
        optimizer = 0
        grads = w_bytes * p.largest_trainable_module if z.stage == 3 else 0
    return StateMemory(weights, grads, optimizer, cpu, load_bytes(p, z, n, bf16))
