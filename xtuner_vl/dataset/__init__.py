"""Data pipeline: LLaVA-style multi-source data -> tiles + token ids + labels -> padded batches."""

from xtuner_vl.dataset.annotations import AnnotationError, AnnotationFile
from xtuner_vl.dataset.collate import CollatedBatch, SkippedSample, collate_samples
from xtuner_vl.dataset.conversation import (
    ConversationError,
    ensure_image_placeholder,
    expand_image_tokens,
    tokenize_conversation,
)
from xtuner_vl.dataset.image import ImageError, dynamic_tiles, image_tile_budget, load_image, load_image_tiles
from xtuner_vl.dataset.internvl_dataset import InternVLDataset, SampleError, model_defaults
from xtuner_vl.dataset.samplers import DistributedRandomSampler, LengthGroupedSampler
from xtuner_vl.dataset.sources import DataSource, build_sources, repeat_indices
from xtuner_vl.dataset.templates import Template, get_template
from xtuner_vl.dataset.video import frames_to_tiles, load_video_frames

__all__ = [
    "AnnotationError",
    "AnnotationFile",
    "CollatedBatch",
    "ConversationError",
    "DataSource",
    "DistributedRandomSampler",
    "ImageError",
    "InternVLDataset",
    "LengthGroupedSampler",
    "SampleError",
    "SkippedSample",
    "Template",
    "build_sources",
    "collate_samples",
    "dynamic_tiles",
    "ensure_image_placeholder",
    "expand_image_tokens",
    "frames_to_tiles",
    "get_template",
    "image_tile_budget",
    "load_image",
    "load_image_tiles",
    "load_video_frames",
    "model_defaults",
    "repeat_indices",
    "tokenize_conversation",
]
