"""The InternVL supervised fine-tuning dataset: multi-source LLaVA-style data, lazily decoded.

Start-up scans the annotation files only; each ``__getitem__`` (in a DataLoader worker) decodes one
record, loads and tiles its images (or video frames), and tokenizes the conversation. A bad record
becomes a :class:`SkippedSample` (deterministic: the same record is always skipped), which the
trainer counts and logs; ``strict=True`` raises instead (used by ``xtuner-vl check-data``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from xtuner_vl.dataset.annotations import AnnotationError
from xtuner_vl.dataset.collate import SkippedSample
from xtuner_vl.dataset.conversation import ConversationError, ensure_image_placeholder, tokenize_conversation
from xtuner_vl.dataset.image import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    dynamic_tiles,
    image_tile_budget,
    load_image,
    load_image_tiles,
    tile_count,
    tiles_to_tensor,
)
from xtuner_vl.dataset.lengths import file_hash, source_stats
from xtuner_vl.dataset.native import native_resampler
from xtuner_vl.dataset.sources import DataSource, build_sources, repeat_indices
from xtuner_vl.dataset.templates import Template, get_template
from xtuner_vl.dataset.video import frames_to_tiles, load_video_frames
from xtuner_vl.registry import DATASETS
from xtuner_vl.structures import IMG_CONTEXT_TOKEN, Sample

__all__ = ["InternVLDataset", "SampleError", "model_defaults"]


class SampleError(ValueError):
    """A record that cannot become a training sample; the message names file:line and the field."""


def model_defaults(model_path: str | Path) -> dict[str, Any]:
    """Data settings an official checkpoint's config.json fixes: template, tokens per tile, tiling."""
    cfg = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    image_size = cfg.get("force_image_size") or cfg["vision_config"]["image_size"]
    ratio = cfg.get("downsample_ratio", 0.5)
    return {
        "template": cfg.get("template"),
        "image_size": image_size,
        "num_image_token": int((image_size // cfg["vision_config"]["patch_size"]) ** 2 * ratio**2),
        "use_thumbnail": cfg.get("use_thumbnail", True),
    }


def _no_pixels(tiles: int) -> torch.Tensor:
    """Stand-in for ``tiles`` tiles whose pixels were not built (``build_record(..., pixels=False)``)."""
    return torch.empty(tiles, 3, 0, 0)


@DATASETS.register_module()
class InternVLDataset(Dataset):
    """LLaVA-style json/jsonl sources -> tokenized :class:`Sample` objects.

    Args:
        data_paths: one or several ``.json`` (list) / ``.jsonl`` annotation files.
        tokenizer: the model's tokenizer (``xtuner_vl.model.load_tokenizer``).
        image_folders: one folder per source (or one for all); None = paths as written.
        repeat_times: scalar or per source; fractions are exact (3.5 = 3 copies + a seeded half).
        template: chat template name or object; None = ``model_path``'s config.json ``template``.
        model_path: checkpoint directory supplying template / tiling defaults.
        max_length: longest token sequence; longer samples lose tiles until they fit, else are skipped.
        min_dynamic_patch, max_dynamic_patch: tile budget per sample (split across its images).
        source_max_dynamic_patch: per-source budget overrides (None = the global one).
        use_thumbnail: append the whole image as a last tile when an image has several tiles.
        seed: seeds the fractional repeats and video frame sampling.
        training: random video frames when True, middle frames when False.
        allow_path_escape: allow image paths that resolve outside their source's image folder.
        max_image_pixels: refuse larger images (decompression bombs).
        strict: raise on a bad record instead of returning a SkippedSample.
    """

    def __init__(
        self,
        data_paths: str | Sequence[str],
        tokenizer: Any,
        image_folders: str | None | Sequence[str | None] = None,
        repeat_times: float | Sequence[float] = 1.0,
        template: str | Template | None = None,
        model_path: str | Path | None = None,
        max_length: int = 4096,
        min_dynamic_patch: int = 1,
        max_dynamic_patch: int = 6,
        source_max_dynamic_patch: int | None | Sequence[int | None] = None,
        use_thumbnail: bool | None = None,
        image_size: int | None = None,
        num_image_token: int | None = None,
        system_message: str | None = None,
        template_version: str = "internvl2",
        min_num_frames: int = 8,
        max_num_frames: int = 32,
        seed: int = 0,
        training: bool = True,
        allow_path_escape: bool = False,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        strict: bool = False,
    ) -> None:
        defaults = model_defaults(model_path) if model_path is not None else {}
        template = template if template is not None else defaults.get("template")
        if template is None:
            raise ValueError("no template: pass template= or model_path= (its config.json names one)")
        self.template = (
            template
            if isinstance(template, Template)
            else get_template(template, system_message=system_message, version=template_version)
        )
        self.tokenizer = tokenizer
        self.image_size = image_size or defaults.get("image_size", 448)
        self.num_image_token = num_image_token or defaults.get("num_image_token", 256)
        self.use_thumbnail = use_thumbnail if use_thumbnail is not None else defaults.get("use_thumbnail", True)
        self.max_length, self.seed, self.training, self.strict = max_length, seed, training, strict
        self.min_dynamic_patch, self.max_dynamic_patch = min_dynamic_patch, max_dynamic_patch
        self.min_num_frames, self.max_num_frames = min_num_frames, max_num_frames
        self.allow_path_escape, self.max_image_pixels = allow_path_escape, max_image_pixels
        self.sources: list[DataSource] = build_sources(
            data_paths, image_folders, repeat_times, source_max_dynamic_patch
        )
        per_source = [repeat_indices(len(s.annotations), s.repeat_times, seed, i) for i, s in enumerate(self.sources)]
        self.source_of = np.concatenate([np.full(len(r), i, dtype=np.int32) for i, r in enumerate(per_source)])
        self.record_of = np.concatenate(per_source)
        self._stats: tuple[np.ndarray, np.ndarray] | None = None
        native_resampler()  # build and check it here, once, before data loader workers are forked

    def __len__(self) -> int:
        return len(self.record_of)

    def source_fingerprints(self) -> dict[str, str]:
        """Annotation file -> SHA-256 of its content (a resume refuses changed data by these)."""
        return {str(s.annotations.path): file_hash(s.annotations.path) for s in self.sources}

    def locate(self, index: int) -> tuple[DataSource, int]:
        """The source and record number behind dataset index ``index``."""
        return self.sources[int(self.source_of[index])], int(self.record_of[index])

    def __getitem__(self, index: int) -> Sample | SkippedSample:
        source, record = self.locate(index)
        try:
            return self.build_sample(index)
        except (AnnotationError, ImageError, ConversationError, SampleError) as e:
            if self.strict:
                raise
            return SkippedSample(str(source.annotations.path), source.annotations.line_of(record), str(e))

    # -- building one sample -------------------------------------------------------------------
    def build_sample(self, index: int) -> Sample:
        """Build the sample at ``index``, raising on any problem with its record."""
        source, record = self.locate(index)
        return self.build_record(source, record, index)

    def build_record(self, source: DataSource, record: int, index: int = -1, pixels: bool = True) -> Sample:
        """Build the sample of ``source``'s record number ``record``, raising on any problem;
        every error message starts with ``file:line`` of the record and names the field.

        ``pixels=False`` (``check-data``) reads and checks everything the same way but leaves the tiles' pixels
        out: ``pixel_values`` is ``[tiles, 3, 0, 0]``, with the tile count and flags training would get (resizing
        into tiles is most of a record's time and cannot fail on an image that decoded)."""
        where = f"{source.annotations.path}:{source.annotations.line_of(record)}"
        item = source.annotations.record(record)
        field = "video" if item.get("video") is not None else "image"
        try:
            return self._build(item, source, index, where, pixels)
        except ImageError as e:
            raise SampleError(f"{where}: field {field!r}: {e}") from e
        except ConversationError as e:
            raise SampleError(f"{where}: field 'conversations': {e}") from e

    def _build(self, item: dict, source: DataSource, index: int, where: str, pixels: bool = True) -> Sample:
        conversations = item.get("conversations")
        if not isinstance(conversations, list) or not conversations:
            raise SampleError(f"{where}: field 'conversations' is missing, empty or not a list")
        budget = source.max_dynamic_patch or self.max_dynamic_patch
        if item.get("video") is not None:
            return self._video_sample(item, conversations, source, index, where, pixels)
        images = item.get("image")
        if images is None or images == []:
            return self._text_only_sample(conversations, source, index, where, pixels)
        paths = [images] if isinstance(images, str) else images
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise SampleError(f"{where}: field 'image' must be a path or a list of paths")
        loaded = [load_image(self._resolve(p, source, where), self.max_image_pixels) for p in paths]
        conversations = ensure_image_placeholder(conversations, len(loaded))
        budget = image_tile_budget(budget, len(loaded))
        return self._fit_tiles(conversations, loaded, budget, source, index, where, pixels)

    def _resolve(self, path: str, source: DataSource, where: str) -> Path:
        if source.image_folder is None:
            return Path(path)
        folder = source.image_folder.resolve()
        full = (folder / path).resolve()
        if not self.allow_path_escape and not full.is_relative_to(folder):
            raise SampleError(f"{where}: image path {path!r} escapes its image folder {folder} (allow_path_escape)")
        return full

    def _fit_tiles(
        self, conversations, images: list[Image.Image], budget: int, source, index, where, pixels: bool = True
    ) -> Sample:
        """Tile every image with ``budget`` tiles at most; while the sample is over max_length, lower
        the budget (never cut inside image tokens); at 1 tile per image give up."""
        for max_num in range(budget, 0, -1):
            max_num = max(max_num, self.min_dynamic_patch)
            tiles = [
                tile_count(im.width, im.height, self.min_dynamic_patch, max_num, self.image_size, self.use_thumbnail)
                for im in images
            ]
            ids, labels = tokenize_conversation(
                conversations, self.tokenizer, self.template, [t * self.num_image_token for t in tiles]
            )
            if len(ids) <= self.max_length:
                tensors = [
                    load_image_tiles(im, self.min_dynamic_patch, max_num, self.image_size, self.use_thumbnail)
                    if pixels
                    else _no_pixels(n)
                    for im, n in zip(images, tiles, strict=True)
                ]
                values = torch.cat(tensors)
                flags = torch.ones(len(values), dtype=torch.long)
                return Sample(ids, labels, values, flags, source.name, index, tiles_reduced=max_num < budget)
        raise SampleError(f"{where}: {len(ids)} tokens with one tile per image, over max_length={self.max_length}")

    def _video_sample(self, item, conversations, source, index, where, pixels: bool = True) -> Sample:
        path = item["video"]
        if not isinstance(path, str):
            raise SampleError(f"{where}: field 'video' must be a path")
        rng = random.Random(self.seed * 1_000_003 + index)
        frames = load_video_frames(
            self._resolve(path, source, where),
            min_frames=self.min_num_frames,
            max_frames=self.max_num_frames,
            sample="rand" if self.training else "middle",
            rng=rng,
            max_pixels=self.max_image_pixels,
        )
        first = dict(conversations[0])
        value = first.get("value", "")
        if "<video>" not in value:
            value = "<video>\n" + value
        while True:
            lines = "\n".join(f"Frame-{i + 1}: <image>" for i in range(len(frames)))
            conv = [{**first, "value": value.replace("<video>\n", lines + "\n")}, *conversations[1:]]
            ids, labels = tokenize_conversation(
                conv, self.tokenizer, self.template, [self.num_image_token] * len(frames)
            )
            if len(ids) <= self.max_length:
                values = frames_to_tiles(frames, self.image_size) if pixels else _no_pixels(len(frames))
                return Sample(ids, labels, values, torch.ones(len(frames), dtype=torch.long), source.name, index)
            if len(frames) == 1:
                raise SampleError(f"{where}: {len(ids)} tokens with one frame, over max_length={self.max_length}")
            frames = frames[::2] if len(frames) > 2 else frames[:1]  # halve the frame rate and retry

    def _text_only_sample(self, conversations, source, index, where, pixels: bool = True) -> Sample:
        """A text-only sample: one dummy white tile (flag 0), as the official pure-text items."""
        ids, labels = tokenize_conversation(conversations, self.tokenizer, self.template, [])
        if len(ids) > self.max_length:
            raise SampleError(f"{where}: text-only sample of {len(ids)} tokens is over max_length={self.max_length}")
        white = Image.new("RGB", (224, 224), (255, 255, 255))
        dummy = (
            tiles_to_tensor(dynamic_tiles(white, 1, 1, self.image_size, self.use_thumbnail), self.image_size)
            if pixels
            else _no_pixels(1)
        )
        return Sample(ids, labels, dummy, torch.zeros(len(dummy), dtype=torch.long), source.name, index)

    def length_stats(self, num_workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per dataset index: (token length or its estimate, has image/video), for length grouping.

        Read from each record's ``length`` field when present, else estimated once in parallel and
        cached by file content hash (see :mod:`xtuner_vl.dataset.lengths`).
        """
        if self._stats is None:
            minimal = [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]
            base_tokens = len(tokenize_conversation(minimal, self.tokenizer, self.template, [])[0])
            per_source = [
                source_stats(
                    s,
                    self.num_image_token,
                    s.max_dynamic_patch or self.max_dynamic_patch,
                    self.min_dynamic_patch,
                    self.use_thumbnail,
                    self.image_size,
                    self.max_num_frames,
                    base_tokens,
                    num_workers,
                )
                for s in self.sources
            ]
            lengths = np.concatenate([st[0][self.record_of[self.source_of == i]] for i, st in enumerate(per_source)])
            modal = np.concatenate([st[1][self.record_of[self.source_of == i]] for i, st in enumerate(per_source)])
            self._stats = (lengths, modal)
        return self._stats

    @property
    def img_context_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
