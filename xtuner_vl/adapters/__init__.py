"""Training methods on top of the model: freezing, LoRA (peft) and QLoRA (bitsandbytes nf4)."""

from xtuner_vl.adapters.freeze import apply_freeze
from xtuner_vl.adapters.lora import VIT_LORA_TARGETS, apply_lora, lora_state_dict, merge_lora

__all__ = ["VIT_LORA_TARGETS", "apply_freeze", "apply_lora", "lora_state_dict", "merge_lora"]
