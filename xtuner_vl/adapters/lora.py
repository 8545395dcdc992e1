"""LoRA on the LLM and/or the ViT with peft, on the official target modules.

Wrapping follows the official ``wrap_llm_lora`` / ``wrap_backbone_lora`` (peft's ``get_peft_model``
on ``language_model`` / ``vision_model``), so adapter keys match an official checkpoint saved with
``use_llm_lora`` / ``use_backbone_lora``.

A target that names a parameter rather than a module (GPT-OSS's fused experts, ``mlp.experts.gate_up_proj`` /
``mlp.experts.down_proj``) goes to peft's ``target_parameters`` (``peft.tuners.lora.layer.ParamWrapper``: per expert a
rank-r A and B, nested wrappers where one module has two targeted parameters). peft refuses dropout there ("does not
work with lora_dropout != 0": dropout cannot be factored out of a weight delta), so such an LLM adapter trains
without dropout on all its targets; a configured dropout is then ignored on the LLM with one warning (the ViT adapter
keeps it).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from xtuner_vl.model.llm import LORA_TARGETS
from xtuner_vl.model.moe import is_moe

__all__ = ["VIT_LORA_TARGETS", "apply_lora", "merge_lora", "lora_state_dict"]

VIT_LORA_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]

logger = logging.getLogger(__name__)


def _split_targets(llm: nn.Module, targets: list[str]) -> tuple[list[str], list[str]]:
    """``(target_modules, target_parameters)``: a target naming a parameter of ``llm`` (whole name or a dotted
    suffix, as peft matches both) is a parameter target, any other a module target."""
    names = [name for name, _ in llm.named_parameters()]
    params = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
    return [t for t in targets if t not in params], params


@contextlib.contextmanager
def _per_expert_targets(llm: nn.Module) -> Iterator[None]:
    """Keep peft from retargeting a MoE LLM's LoRA to fused expert tensors while it wraps ``llm``.

    With transformers 5, peft rewrites the targets of MoE model types (``qwen3_moe``, ...) from the per-expert
    ``gate_proj`` / ``up_proj`` / ``down_proj`` of transformers 4 to the fused 3-D parameters transformers 5 builds
    (``peft/utils/transformers_weight_conversion.py``). Our Qwen3-MoE keeps the per-expert linears of the
    official checkpoints (:mod:`xtuner_vl.model.moe`), so that rewrite would leave every expert without LoRA.
    peft keys it on ``config.model_type``, which is hidden for the duration of the wrap (narrowly: this one
    attribute, restored at once)."""
    config = llm.config
    if not is_moe(llm):
        yield
        return
    config.model_type = None
    try:
        yield
    finally:
        del config.model_type  # back to the class's own value


def apply_lora(
    model: nn.Module,
    llm_rank: int = 0,
    vit_rank: int = 0,
    alpha: int | None = None,
    dropout: float = 0.05,
    llm_targets: list[str] | None = None,
    vit_targets: list[str] | None = None,
) -> nn.Module:
    """Wrap ``model.language_model`` (``llm_rank`` > 0) and/or ``model.vision_model`` (``vit_rank`` > 0)
    with LoRA adapters. ``alpha`` defaults to 2 x rank (official). Base weights are frozen by peft and
    keep their dtype (no upcast of the frozen LLM)."""
    if llm_rank:
        modules, params = _split_targets(model.language_model, llm_targets or LORA_TARGETS[model.config.llm_arch])
        llm_dropout = 0.0 if params else dropout
        if llm_dropout != dropout:
            logger.warning(
                "LoRA on the LLM trains without dropout (model.lora.dropout=%s applies to a ViT adapter only): "
                "peft cannot apply dropout to the adapters of the parameters %s",
                dropout,
                params,
            )
        cfg = LoraConfig(
            r=llm_rank,
            lora_alpha=alpha or 2 * llm_rank,
            lora_dropout=llm_dropout,
            target_modules=modules,
            target_parameters=params or None,
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():
            # peft reads transformers' `is_gradient_checkpointing`, renamed in transformers 5 (a
            # FutureWarning per process that says nothing to our users); only that warning is hidden.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            with _per_expert_targets(model.language_model):
                model.language_model = get_peft_model(model.language_model, cfg)
        # Inputs are embeddings we build; make them require grad so checkpointed layers backpropagate.
        model.language_model.enable_input_require_grads()
    if vit_rank:
        cfg = LoraConfig(
            r=vit_rank,
            lora_alpha=alpha or 2 * vit_rank,
            lora_dropout=dropout,
            target_modules=vit_targets or VIT_LORA_TARGETS,
        )
        model.vision_model = get_peft_model(model.vision_model, cfg)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights, under their full names in ``model``."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and unwrap, restoring the official key names."""
    for part in ("language_model", "vision_model"):
        module = getattr(model, part)
        if isinstance(module, PeftModel):
            setattr(model, part, module.merge_and_unload())
    return model
