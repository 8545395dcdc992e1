"""Typed view of an official InternVL ``config.json`` that keeps the raw dict for saving.

Defaults are those of the official ``InternVLChatConfig`` / ``InternVisionConfig`` classes, so a
config.json that omits a field behaves as the official code would (``ps_version`` defaults to v1).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["InternVLConfig", "VisionConfig", "SUPPORTED_LLM_ARCHS", "read_config"]

SUPPORTED_LLM_ARCHS = (
    "InternLM2ForCausalLM",
    "Phi3ForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "GptOssForCausalLM",
    "LlamaForCausalLM",
)


@dataclass
class VisionConfig:
    """InternViT hyper-parameters (official ``InternVisionConfig`` defaults)."""

    hidden_size: int = 3200
    num_hidden_layers: int = 48
    num_attention_heads: int = 25
    intermediate_size: int = 12800
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = False
    qk_normalization: bool = True
    norm_type: str = "rms_norm"
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path_rate: float = 0.0
    initializer_factor: float = 0.1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        names = cls.__dataclass_fields__.keys()
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if cfg.norm_type not in ("rms_norm", "layer_norm"):
            raise ValueError(f"vision_config.norm_type must be rms_norm or layer_norm, got {cfg.norm_type!r}")
        return cfg


@dataclass
class InternVLConfig:
    """The fields of an ``internvl_chat`` config.json that shape the model, plus the raw dict.

    ``raw`` is the file's content untouched; :func:`xtuner_vl.model.save_official` writes it back, so
    every field of the source release survives a load/save round trip.
    """

    raw: dict[str, Any]
    vision: VisionConfig
    llm_config: dict[str, Any]
    select_layer: int = -1
    force_image_size: int | None = None
    downsample_ratio: float = 0.5
    template: str | None = None
    dynamic_image_size: bool = False
    use_thumbnail: bool = False
    ps_version: str = "v1"
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    use_backbone_lora: int = 0
    use_llm_lora: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> InternVLConfig:
        for key in ("vision_config", "llm_config"):
            if not isinstance(raw.get(key), dict):
                raise ValueError(f"{source}: field {key!r} is missing or not an object")
        llm = raw["llm_config"]
        archs = llm.get("architectures") or [None]
        if archs[0] not in SUPPORTED_LLM_ARCHS:
            raise ValueError(
                f"{source}: llm_config.architectures[0] is {archs[0]!r}; supported: {', '.join(SUPPORTED_LLM_ARCHS)}"
            )
        names = set(cls.__dataclass_fields__) - {"raw", "vision", "llm_config", "extra"}
        kwargs = {k: raw[k] for k in names if k in raw}
        cfg = cls(raw=copy.deepcopy(raw), vision=VisionConfig.from_dict(raw["vision_config"]), llm_config=llm, **kwargs)
        if cfg.ps_version not in ("v1", "v2"):
            raise ValueError(f"{source}: ps_version must be 'v1' or 'v2', got {cfg.ps_version!r}")
        return cfg

    @property
    def llm_arch(self) -> str:
        return self.llm_config["architectures"][0]

    @property
    def image_size(self) -> int:
        return self.force_image_size or self.vision.image_size

    @property
    def num_image_token(self) -> int:
        """Tokens each 448px tile contributes after pixel shuffle (256 for the official models)."""
        return int((self.image_size // self.vision.patch_size) ** 2 * self.downsample_ratio**2)


def read_config(model_dir: str | Path) -> InternVLConfig:
    """Read ``model_dir/config.json`` of an official InternVL release."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; is {model_dir} an InternVL model directory?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    return InternVLConfig.from_dict(raw, source=str(path))
