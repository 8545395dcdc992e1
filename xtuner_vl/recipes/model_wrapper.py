"""The config's ``model = dict(type=..., ...)``: registered wrappers that turn an official InternVL directory
into the model the optimizer trains (load, freeze, QLoRA, LoRA, checkpointing).

A config names the wrapper by its registered name or by the class itself (MMEngine's ``type=``). Subclass
:class:`InternVLChat` and register it (``@MODELS.register_module()``) to change how a model is prepared, e.g.
another freezing rule: training, ``estimate`` and ``convert`` all go through :meth:`InternVLChat.apply_method`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from xtuner_vl.recipes.settings import FreezeSettings, LoraSettings, QuantizationSettings, parse_section
from xtuner_vl.registry import MODELS

if TYPE_CHECKING:  # torch, peft and the model are imported when a model is built, not when a config is read
    import torch

    from xtuner_vl.model import InternVLChatModel

__all__ = ["InternVLChat", "build_model_wrapper", "resolve_dtype"]

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}
_QUANT_TYPES = ("nf4",)
# The flat keys of configs written before the registry shape, and where each one went.
_MOVED = {
    "freeze_vit": "freeze=dict(vit=...)",
    "freeze_mlp": "freeze=dict(mlp=...)",
    "freeze_llm": "freeze=dict(llm=...)",
    "unfreeze_vit_layers": "freeze=dict(unfreeze_vit_layers=...)",
    "unfreeze_lm_head": "freeze=dict(unfreeze_lm_head=...)",
    "llm_lora_rank": "lora=dict(llm_rank=...)",
    "vit_lora_rank": "lora=dict(vit_rank=...)",
    "lora_alpha": "lora=dict(alpha=...)",
    "lora_dropout": "lora=dict(dropout=...)",
    "llm_lora_targets": "lora=dict(llm_targets=...)",
    "quantize_llm": "quantization=dict(llm='nf4')",
}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` = bf16 on CUDA, fp32 on CPU (the dtype of weights, autocast and DeepSpeed alike)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"model.dtype must be auto, bf16 or fp32, got {name!r}")
    return getattr(torch, _DTYPES[name])


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    import torch

    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _section(cls: type, value: Any, name: str) -> Any:
    """A nested section: a dict from the config (checked by ``parse_section``) or an instance already."""
    return value if isinstance(value, cls) else parse_section(cls, dict(value), name)


@MODELS.register_module()
@dataclass
class InternVLChat:
    """An official InternVL (1.5 / 2) directory prepared for training.

    Args:
        path: the release directory (config.json, weights, tokenizer).
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``bf16`` or ``fp32``.
        attn_implementation: None picks flash_attention_2 when it imports, else torch_varlen (CUDA) / sdpa.
        freeze: :class:`FreezeSettings` fields.
        lora: :class:`LoraSettings` fields; None: no adapters (full fine-tuning of what is not frozen).
        quantization: :class:`QuantizationSettings` fields (QLoRA, needs ``lora.llm_rank``); None: none.
        gradient_checkpointing: recompute the LLM's (and a trained ViT's) layers in the backward pass.
        drop_path_rate: the ViT's stochastic depth; None keeps the checkpoint's.
        router_aux_loss_coef: MoE LLMs: weight of the router load-balancing loss in the training loss; None
            keeps the checkpoint's rule (``llm_config.router_aux_loss_coef`` when ``output_router_logits``, else
            0, as the InternVL 3.5 code). The loss is logged either way.
    """

    path: str
    dtype: str = "auto"
    attn_implementation: str | None = None
    freeze: FreezeSettings = field(default_factory=FreezeSettings)
    lora: LoraSettings | None = None
    quantization: QuantizationSettings | None = None
    gradient_checkpointing: bool = True
    drop_path_rate: float | None = None
    router_aux_loss_coef: float | None = None

    def __post_init__(self) -> None:
        self.freeze = _section(FreezeSettings, self.freeze or {}, "model.freeze")
        if self.lora is not None:
            self.lora = _section(LoraSettings, self.lora, "model.lora")
        if self.quantization is not None:
            self.quantization = _section(QuantizationSettings, self.quantization, "model.quantization")
        self._check()

    # -- what the settings mean ------------------------------------------------------------------
    @property
    def llm_lora_rank(self) -> int:
        return self.lora.llm_rank if self.lora else 0

    @property
    def vit_lora_rank(self) -> int:
        return self.lora.vit_rank if self.lora else 0

    @property
    def method(self) -> str:
        """``full``, ``lora`` or ``qlora``: what a checkpoint of this run holds (recorded in meta.json)."""
        if self.quantization is not None:
            return "qlora"
        return "lora" if self.llm_lora_rank or self.vit_lora_rank else "full"

    def lora_alphas(self) -> dict[str, float]:
        """LoRA alpha per wrapped part (``language_model`` / ``vision_model``), as peft applies it."""
        ranks = {"language_model": self.llm_lora_rank, "vision_model": self.vit_lora_rank}
        return {part: float(self.lora.alpha or 2 * rank) for part, rank in ranks.items() if rank}

    def _check(self) -> None:
        """Refuse wrong types and contradictory settings before anything is loaded."""
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"config model.path must be a directory path, got {self.path!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(
                f"config model.gradient_checkpointing must be true/false, got {self.gradient_checkpointing!r}"
            )
        coef = self.router_aux_loss_coef
        if coef is not None and (isinstance(coef, bool) or not isinstance(coef, int | float) or coef < 0):
            raise ValueError(f"config model.router_aux_loss_coef must be a number >= 0 or None, got {coef!r}")
        if self.quantization is not None and self.quantization.llm not in _QUANT_TYPES:
            raise ValueError(
                f"config model.quantization.llm must be one of {_QUANT_TYPES}, got {self.quantization.llm!r}"
            )
        if self.freeze.unfreeze_vit_layers and self.vit_lora_rank:
            raise ValueError(
                "model.freeze.unfreeze_vit_layers and model.lora.vit_rank: those layers' linears would train both "
                "fully and through LoRA; use one of them"
            )
        if self.quantization is not None and not self.llm_lora_rank:
            raise ValueError(
                "model.quantization (QLoRA) needs model.lora.llm_rank > 0: 4-bit weights cannot be trained"
            )

    # -- building --------------------------------------------------------------------------------
    def build(self, device: torch.device, ds_config: Mapping[str, Any] | None = None) -> InternVLChatModel:
        """The model ready for the optimizer: frozen weights in the load dtype (bf16 stays bf16); trainable
        full weights in fp32 when training without DeepSpeed bf16 (see the backends).

        How the weights arrive depends on the run: with a ZeRO-3 ``ds_config`` (the completed DeepSpeed config)
        each parameter is partitioned across the ranks as it is read (``engine/zero3_load.py``); with QLoRA each
        LLM linear is quantized to nf4 on ``device`` as it is read; otherwise the whole model is loaded on
        ``device``. All three give the same model.
        """
        from xtuner_vl.adapters.qlora import nf4_loader
        from xtuner_vl.engine.deepspeed_config import zero_stage
        from xtuner_vl.model import load_internvl
        from xtuner_vl.model.loader import open_checkpoint, stream_into

        dtype = resolve_dtype(self.dtype, device)
        if ds_config is not None and zero_stage(dict(ds_config)) == 3:
            from xtuner_vl.engine.zero3_load import load_partitioned, prepare_for_engine

            stream = open_checkpoint(self.path, attn_implementation=self.attn_implementation)
            model = self.apply_method(load_partitioned(stream, ds_config, dtype, device), dtype)
            prepare_for_engine(model, ds_config)
            return model
        if self.quantization is not None:
            stream = open_checkpoint(self.path, attn_implementation=self.attn_implementation)
            place = nf4_loader(stream.model.language_model, _compute_dtype(dtype), device)
            return self.apply_method(stream_into(stream, dtype, device, place), dtype)
        model = load_internvl(self.path, dtype=dtype, attn_implementation=self.attn_implementation, device=device)
        return self.apply_method(model, dtype)

    def apply_method(self, model: InternVLChatModel, dtype: torch.dtype, quantize: bool = True) -> InternVLChatModel:
        """Drop path, freezing, QLoRA, LoRA and checkpointing on a loaded (or meta) ``model``.

        ``quantize=False`` skips the nf4 quantization (bitsandbytes cannot quantize meta tensors) but keeps
        every other step, so ``estimate`` and ``convert`` see the same trainable parameters as training.
        """
        from xtuner_vl.adapters import apply_freeze, apply_lora
        from xtuner_vl.adapters.qlora import quantize_llm_nf4
        from xtuner_vl.model.intern_vit import set_drop_path_rate

        f = self.freeze
        if self.drop_path_rate is not None:
            set_drop_path_rate(model.vision_model, self.drop_path_rate)
        if self.router_aux_loss_coef is not None:
            model.router_aux_loss_coef = float(self.router_aux_loss_coef)
        apply_freeze(model, f.vit, f.mlp, f.llm, f.unfreeze_vit_layers, f.unfreeze_lm_head)
        if self.quantization is not None and quantize:  # a no-op where the loader already quantized (build)
            quantize_llm_nf4(model.language_model, compute_dtype=_compute_dtype(dtype))
        if self.lora is not None and (self.llm_lora_rank or self.vit_lora_rank):
            lora = self.lora
            apply_lora(model, lora.llm_rank, lora.vit_rank, lora.alpha, lora.dropout, lora.llm_targets)
            # peft freezes everything it wraps but the adapters; an explicit unfreeze_lm_head still holds (the
            # official script sets `lm_head.requires_grad` before wrapping, where it has no effect).
            if f.unfreeze_lm_head:
                model.language_model.get_output_embeddings().requires_grad_(True)
        if self.gradient_checkpointing:
            vit_trains = not f.vit or bool(self.vit_lora_rank) or f.unfreeze_vit_layers > 0
            model.gradient_checkpointing_enable(vit=vit_trains)
        return model.train()


def build_model_wrapper(cfg: Mapping[str, Any] | None, **overrides: Any) -> InternVLChat:
    """Build the config's ``model`` section through the ``MODELS`` registry; one clear line on a bad section.

    ``overrides`` replace fields of the section (e.g. ``path=`` in tests and tools).
    """
    values = {**dict(cfg or {}), **overrides}
    if not values:
        raise ValueError("config has no `model` section: model = dict(type='InternVLChat', path=...)")
    moved = [f"{k} -> {_MOVED[k]}" for k in values if k in _MOVED]
    if moved:
        raise ValueError(f"config section 'model': key(s) moved in the registry shape: {'; '.join(moved)}")
    values.setdefault("type", "InternVLChat")
    kind = values["type"]
    cls = MODELS.get(kind) if isinstance(kind, str) else kind
    if cls is None:
        raise ValueError(
            f"config model.type {kind!r} is not a registered model wrapper; known: {sorted(MODELS.module_dict)}"
        )
    if dataclasses.is_dataclass(cls):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - {"type"})
        if unknown:
            raise ValueError(f"config section 'model': unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        return MODELS.build(values)
    except TypeError as e:  # a wrong argument (dataclass __init__), or a wrong type in a nested section
        message = str(e)
        raise ValueError(message if message.startswith("config") else f"config section 'model': {message}") from None
