"""Export LoRA adapters as peft adapter directories, loadable onto the official model structure.

Layout of the output directory:

- ``llm_adapter/`` and/or ``vit_adapter/``: ``adapter_config.json`` + ``adapter_model.safetensors``
  for ``PeftModel.from_pretrained(model.language_model | model.vision_model, dir)``.
- ``non_lora_trainables.safetensors``: what the run trained without LoRA (e.g. ``mlp1``), under the
  official key names, to ``load_state_dict(..., strict=False)`` into the base model.

LoRAs on parameters (GPT-OSS's fused experts, peft's ``target_parameters``) keep peft's own names, nested
``base_layer`` included, and the run's config lists ``target_parameters``: peft rebuilds the same wrappers on load.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from xtuner_vl.checkpoint.delta import TrainedDelta
from xtuner_vl.checkpoint.trained import CheckpointError, materialize

__all__ = ["ADAPTER_DIRS", "NON_LORA_FILE", "export_adapters"]

ADAPTER_DIRS = {"language_model": "llm_adapter", "vision_model": "vit_adapter"}
NON_LORA_FILE = "non_lora_trainables.safetensors"


def _adapter_state(delta: TrainedDelta, part: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """peft's saved key names: the module path inside the PeftModel, adapter name dropped."""
    state = {}
    for key, pair in delta.loras.items():
        module = delta.lora_names[key]
        if not module.startswith(part + "."):
            continue
        inner = module[len(part) + 1 :]
        state[f"{inner}.lora_A.weight"] = materialize(pair.a).to(dtype).contiguous()
        state[f"{inner}.lora_B.weight"] = materialize(pair.b).to(dtype).contiguous()
    return state


def export_adapters(
    delta: TrainedDelta,
    lora_configs: Mapping[str, LoraConfig],
    out_dir: str | Path,
    base_dir: str | Path,
    dtype: torch.dtype = torch.float32,
) -> list[Path]:
    """Write one peft adapter directory per LoRA-trained part plus the non-LoRA trainables.

    Args:
        delta: the checkpoint's delta (:func:`xtuner_vl.checkpoint.delta.split_delta`).
        lora_configs: ``"language_model"`` / ``"vision_model"`` -> the LoraConfig the run trained with.
        out_dir: output directory.
        base_dir: recorded as ``base_model_name_or_path``.
        dtype: dtype of the written tensors.

    Returns:
        The files and directories written.

    Raises:
        CheckpointError: the checkpoint holds no LoRA weights.
    """
    if not delta.loras:
        raise CheckpointError("the checkpoint holds no LoRA weights (a full fine-tune); use --format official")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for part, config in lora_configs.items():
        state = _adapter_state(delta, part, dtype)
        if not state:
            continue
        target = out / ADAPTER_DIRS[part]
        target.mkdir(exist_ok=True)
        config = copy.deepcopy(config)
        config.base_model_name_or_path = str(base_dir)
        config.inference_mode = True
        config.save_pretrained(str(target))
        save_file(state, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
        written.append(target)
    if delta.replacements:
        rest = {k: materialize(v).to(dtype).contiguous() for k, v in delta.replacements.items()}
        save_file(rest, str(out / NON_LORA_FILE), metadata={"format": "pt"})
        written.append(out / NON_LORA_FILE)
    return written
