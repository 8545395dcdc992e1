"""FLOPs a training step needs, from the model's shapes and from what it trains; and GPU peak FLOP/s.

Counted like ``torch.utils.flop_counter``: 2 FLOPs per multiply-add of every matrix product (linear
layers, the patch convolution, attention scores and values); elementwise work is not counted. Per
sample of ``tokens`` tokens, ``tiles`` real tiles and ``trained`` trained tokens:

- forward: every linear of the ViT on ``tiles * (patches + 1)`` tokens, the patch convolution on
  ``tiles * patches``, ``mlp1`` on ``tiles * num_image_token``, the LLM on ``tokens`` and the output head
  on ``trained`` only (the loss computes logits at trained positions); attention ``4 * s^2 * d`` per layer
  and sequence (``s``: the ViT's patches + 1, or the sample's tokens; ``d``: query heads x head dim),
  halved for the LLM's causal attention unless ``causal=False``;
- backward: a linear's weight gradient when the weight trains (LoRA A and B are linears of their own)
  and its input gradient when something before it trains, each as much as its forward; attention's
  backward is twice its forward wherever gradients flow through it.

"Before" follows the forward order: ``vision_model``, ``mlp1``, ``language_model``, and inside a module
its norms, then its other submodules in registration order, then its own parameters (pre-norm blocks
register their norms last; the ViT's class and position embeddings come after the patch convolution).
Embeddings made to require grad (transformers' ``enable_input_require_grads``, which LoRA sets) count
as trained. So a frozen ViT costs only its forward, and a frozen LLM under a trained ``mlp1`` still pays
for its input gradients. ``tests/engine/test_flops.py`` checks the count against ``FlopCounterMode`` on
real steps of seven methods (full, LoRA, ViT + LLM LoRA, frozen projector, frozen LLM, last ViT layer,
head only).

MFU here is these FLOPs per second of the real samples (padding and dummy tiles excluded) over the
device's dense bf16 peak (:func:`peak_bf16_flops`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from xtuner_vl.structures import IGNORE_INDEX, Batch

__all__ = ["PEAK_BF16_TFLOPS", "TrainingFlops", "batch_shapes", "peak_bf16_flops", "sample_shapes"]

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s from the vendor data sheets, matched against
# torch.cuda.get_device_name() in this order (first substring that matches wins).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM
    ("H800", 989.4),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU from its name (``torch.cuda.get_device_name()``), None if unknown."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


@dataclass
class _Walk:
    """Per-part FLOPs per token (forward; weight grads; input grads) and attention layers by backward."""

    forward: dict[str, float] = field(default_factory=dict)
    weight_grad: dict[str, float] = field(default_factory=dict)
    input_grad: dict[str, float] = field(default_factory=dict)
    attention: dict[str, list[bool]] = field(default_factory=dict)
    flows: bool = False  # does the current activation carry a gradient?

    def add(self, part: str, flops_per_token: float, trains: bool) -> None:
        self.forward[part] = self.forward.get(part, 0.0) + flops_per_token
        self.weight_grad[part] = self.weight_grad.get(part, 0.0) + (flops_per_token if trains else 0.0)
        self.input_grad[part] = self.input_grad.get(part, 0.0) + (flops_per_token if self.flows else 0.0)


_ATTENTION_NAMES = ("attn", "attention", "self_attn")


class TrainingFlops:
    """FLOPs of one training step of ``model`` (an ``InternVLChatModel`` with its method applied)."""

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        vision, llm = config.vision, model.language_model.config
        self.vit_tokens = (config.image_size // vision.patch_size) ** 2  # patches per tile (class token apart)
        self.image_tokens = config.num_image_token
        self.vit_width = vision.num_attention_heads * (vision.hidden_size // vision.num_attention_heads)
        heads = llm.num_attention_heads
        self.llm_width = heads * (getattr(llm, "head_dim", None) or llm.hidden_size // heads)
        self._head = model.language_model.get_output_embeddings()
        walk = _Walk()
        for part in ("vision_model", "mlp1", "language_model"):
            self._visit(getattr(model, part), part if part != "language_model" else "llm", walk)
        self.walk = walk

    def _visit(self, module: nn.Module, part: str, walk: _Walk, name: str = "") -> None:
        if module is self._head and part == "llm":
            part = "head"
        # Pre-norm blocks register their norms after the sublayers they feed: visit norms first.
        for child_name, child in sorted(module.named_children(), key=lambda c: "norm" not in c[0]):
            self._visit(child, part, walk, child_name)
        trains = any(p.requires_grad for p in module.parameters(recurse=False))
        # transformers' enable_input_require_grads (set with LoRA) makes the embeddings' output need grad.
        trains = trains or any(
            getattr(hook, "__name__", "") == "make_inputs_require_grads" for hook in module._forward_hooks.values()
        )
        if isinstance(module, nn.Linear):
            walk.add(part, 2.0 * module.in_features * module.out_features, module.weight.requires_grad)
        elif isinstance(module, nn.Conv2d):  # the patch embedding: one output vector per patch
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1] // module.groups
            walk.add("patch", 2.0 * fan_in * module.out_channels, module.weight.requires_grad)
        walk.flows = walk.flows or trains
        if name in _ATTENTION_NAMES:
            walk.attention.setdefault(part, []).append(walk.flows)

    def sample(self, tokens: int, tiles: int, trained: int, causal: bool = True) -> float:
        """Forward + backward FLOPs of one sample of ``tokens`` tokens, ``tiles`` real tiles, ``trained``
        trained tokens (labels other than -100 after the shift)."""
        return self.total(tokens, tokens * tokens, tiles, trained, causal)

    def total(self, tokens: int, squares: int, tiles: int, trained: int, causal: bool = True) -> float:
        """FLOPs of samples whose token counts sum to ``tokens`` and whose squares sum to ``squares``
        (attention is per sample), with ``tiles`` real tiles and ``trained`` trained tokens in all."""
        counts = {
            "patch": tiles * self.vit_tokens,
            "vision_model": tiles * (self.vit_tokens + 1),
            "mlp1": tiles * self.image_tokens,
            "llm": tokens,
            "head": trained,
        }
        w = self.walk
        flops = sum(
            (w.forward.get(p, 0.0) + w.weight_grad.get(p, 0.0) + w.input_grad.get(p, 0.0)) * n
            for p, n in counts.items()
        )
        vit_seq = self.vit_tokens + 1
        for part, seq_squares, width in (
            ("vision_model", tiles * vit_seq * vit_seq, self.vit_width),
            ("llm", squares * (0.5 if causal else 1.0), self.llm_width),
        ):
            forward = 4.0 * seq_squares * width
            flops += sum(forward * (3.0 if backward else 1.0) for backward in w.attention.get(part, []))
        return flops

    def of_batch(self, batch: Batch, causal: bool = True) -> float:
        """FLOPs the real samples of a collated batch need (padding and dummy tiles excluded); packed
        rows count each sample's attention on its own."""
        return self.total(*batch_shapes(batch), causal=causal)


def batch_shapes(batch: Batch) -> tuple[int, int, int, int]:
    """``(tokens, sum of squared sample lengths, real tiles, trained tokens)`` of a collated batch."""
    mask = batch.attention_mask.bool()
    if batch.position_ids is not None:  # packed: a sample starts where its position ids restart at 0
        positions = batch.position_ids[mask]
        starts = torch.nonzero(positions == 0).flatten()
        lengths = torch.diff(starts, append=torch.tensor([positions.numel()], device=starts.device))
    else:
        lengths = mask.sum(1)
    trained = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    return int(lengths.sum()), int((lengths.long() ** 2).sum()), int(batch.image_flags.sum()), trained


def sample_shapes(input_ids: torch.Tensor, labels: torch.Tensor, image_flags: torch.Tensor) -> tuple[int, int, int]:
    """``(tokens, real tiles, trained tokens)`` of one unpadded sample, for :meth:`TrainingFlops.sample`."""
    return int(input_ids.numel()), int(image_flags.sum()), int((labels[1:] != IGNORE_INDEX).sum())
