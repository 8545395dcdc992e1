"""InternVL model core: official architecture and on-disk format on transformers 5, no remote code."""

from xtuner_vl.model.configuration import InternVLConfig, VisionConfig, read_config
from xtuner_vl.model.internvl import IGNORE_INDEX, InternVLChatModel, InternVLOutput, pixel_shuffle
from xtuner_vl.model.llm import LORA_TARGETS
from xtuner_vl.model.loader import build_empty_model, load_internvl
from xtuner_vl.model.saver import save_official
from xtuner_vl.model.tokenizer import img_context_token_id, load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "InternVLChatModel",
    "InternVLConfig",
    "InternVLOutput",
    "LORA_TARGETS",
    "VisionConfig",
    "build_empty_model",
    "img_context_token_id",
    "load_internvl",
    "load_tokenizer",
    "pixel_shuffle",
    "read_config",
    "save_official",
]
