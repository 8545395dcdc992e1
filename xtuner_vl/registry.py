"""The MMEngine registries that configs build from: ``model = dict(type=...)`` and ``*_dataset = dict(type=...)``."""

from __future__ import annotations

from mmengine.registry import Registry

__all__ = ["MODELS", "DATASETS"]

# Model wrappers (xtuner_vl/recipes/model_wrapper.py): an official directory prepared for training.
MODELS = Registry("model", locations=["xtuner_vl.recipes.model_wrapper"])
# Datasets (xtuner_vl/dataset/internvl_dataset.py): LLaVA-style sources tokenized with the model's template.
DATASETS = Registry("dataset", locations=["xtuner_vl.dataset"])
