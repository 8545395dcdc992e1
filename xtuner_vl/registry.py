"""One MMEngine registry per kind of object; used only where configs are built."""

from __future__ import annotations

from mmengine.registry import Registry

__all__ = ["MODELS", "DATASETS", "TOKENIZERS", "SAMPLERS", "build"]

MODELS = Registry("model", locations=["xtuner_vl.model"])
TOKENIZERS = Registry("tokenizer", locations=["xtuner_vl.model"])
DATASETS = Registry("dataset", locations=["xtuner_vl.dataset"])
SAMPLERS = Registry("sampler", locations=["xtuner_vl.dataset"])


def build(registry: Registry, cfg: dict | object) -> object:
    """Build ``cfg`` (a dict with ``type``: a registered name or the class/function itself)."""
    if not isinstance(cfg, dict):
        return cfg
    return registry.build(cfg)
