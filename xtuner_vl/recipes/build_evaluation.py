"""The evaluation during training of a config's ``evaluation`` and ``eval_dataset`` (engine: ``Evaluator``).

:func:`check_evaluation` runs before anything is loaded and names the field at fault; :func:`build_evaluator`
runs once the backend exists. A prompt is the one ``xtuner-vl chat`` builds (``chat.official_prompt``, greedy
decoding, the answer cut at the template's separator) in the training data's template and tiling, which
``convert`` writes into the converted ``config.json``; generation also stops at the tokenizer's EOS, which a
barely trained model may emit before any separator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from xtuner_vl.dataset import ImageError, image_tile_budget, load_image_tiles
from xtuner_vl.dataset.collate import CollatedBatch
from xtuner_vl.dataset.conversation import IMAGE_PLACEHOLDER
from xtuner_vl.dataset.templates import resolve_system_message
from xtuner_vl.engine.backend import Backend
from xtuner_vl.engine.dist import DistInfo
from xtuner_vl.engine.evaluation import EvalChat, EvalLossData, EvalPrompt, Evaluator
from xtuner_vl.recipes.chat import image_placeholders, official_prompt, stop_token_ids
from xtuner_vl.recipes.settings import EvaluationSettings

__all__ = ["build_evaluator", "check_evaluation", "eval_dataset_args", "eval_prompts"]

# eval_dataset's own sources; every other argument defaults to train_dataset's.
_SOURCE_KEYS = ("data_paths", "image_folders", "repeat_times", "source_max_dynamic_patch")
_PROMPT_KEYS = ("image", "text")
_DOCS = "docs/en/training.md#evaluation-during-training"


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _image_paths(prompt: Mapping[str, Any], where: str) -> list[str]:
    image = prompt.get("image")
    paths = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(paths, (list, tuple)) or not all(isinstance(p, str) for p in paths):
        raise ValueError(f"config {where}.image must be a path or a list of paths, got {image!r}")
    return list(paths)


def _check_prompt(prompt: Any, where: str) -> None:
    if not isinstance(prompt, Mapping):
        raise ValueError(f"config {where} must be dict(text=..., image=...), got {prompt!r}")
    if unknown := sorted(set(prompt) - set(_PROMPT_KEYS)):
        raise ValueError(f"config {where}: unknown key(s) {unknown}; known: {list(_PROMPT_KEYS)}")
    text = prompt.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"config {where}.text must be a non-empty string, got {text!r}")
    paths = _image_paths(prompt, where)
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"config {where}.image: no such file {path!r}")
    if IMAGE_PLACEHOLDER in text and text.count(IMAGE_PLACEHOLDER) != len(paths):
        raise ValueError(f"config {where}.text holds {text.count(IMAGE_PLACEHOLDER)} <image> for {len(paths)} images")


def check_evaluation(s: EvaluationSettings | None, eval_dataset: Mapping[str, Any] | None) -> None:
    """Refuse an evaluation setup that cannot run, in one line naming the field (before anything is loaded).

    Args:
        s: the parsed ``evaluation`` section; None when the config has none (evaluation off).
        eval_dataset: the config's ``eval_dataset``, or None.

    Raises:
        ValueError: the first problem found.
    """
    if s is None:
        if eval_dataset is not None:
            raise ValueError(
                f"config eval_dataset is set without an evaluation section: add evaluation = "
                f"dict(interval=...) ({_DOCS})"
            )
        return
    if not _positive_int(s.interval):
        raise ValueError(
            f"config evaluation.interval must be a whole number of optimizer steps >= 1, got {s.interval!r}"
        )
    if s.max_samples is not None and not _positive_int(s.max_samples):
        raise ValueError(f"config evaluation.max_samples must be a whole number >= 1 or None, got {s.max_samples!r}")
    if not _positive_int(s.max_new_tokens):
        raise ValueError(f"config evaluation.max_new_tokens must be a whole number >= 1, got {s.max_new_tokens!r}")
    if s.system is not None and not isinstance(s.system, str):
        raise ValueError(f"config evaluation.system must be a string or None, got {s.system!r}")
    if not isinstance(s.prompts, (list, tuple)):
        raise ValueError(f"config evaluation.prompts must be a list of dict(text=..., image=...), got {s.prompts!r}")
    for i, prompt in enumerate(s.prompts):
        _check_prompt(prompt, f"evaluation.prompts[{i}]")
    if eval_dataset is None:
        if not s.prompts:
            raise ValueError(
                f"config evaluation: nothing to evaluate; set eval_dataset, evaluation.prompts or both ({_DOCS})"
            )
        return
    if not isinstance(eval_dataset, Mapping) or not eval_dataset.get("data_paths"):
        raise ValueError(f"config eval_dataset needs data_paths (its own annotation files), got {eval_dataset!r}")
    paths = eval_dataset["data_paths"]
    for path in [paths] if isinstance(paths, str) else paths:
        if not Path(path).is_file():
            raise ValueError(f"config eval_dataset.data_paths: no such file {path!r}")


def eval_dataset_args(train_dataset: Mapping[str, Any], eval_dataset: Mapping[str, Any]) -> dict[str, Any]:
    """``eval_dataset``'s arguments: its own sources, every other argument (type, template, lengths, tiling)
    defaulting to ``train_dataset``'s so eval samples are built as training builds them; middle video frames
    (``training=False``) unless set."""
    inherited = {k: v for k, v in train_dataset.items() if k not in _SOURCE_KEYS}
    return {**inherited, "training": False, **eval_dataset}


def eval_prompts(s: EvaluationSettings, dataset: Any) -> list[EvalPrompt]:
    """``s.prompts`` as token ids and tiles, in the template, tiling and tokenizer of ``dataset`` (an
    ``InternVLDataset``), with the placeholders of ``xtuner-vl chat`` (``chat.visual_inputs``)."""
    template = (
        dataset.template
        if s.system is None
        else dataclasses.replace(dataset.template, system_message=resolve_system_message(s.system))
    )
    prompts = []
    for i, prompt in enumerate(s.prompts):
        where = f"evaluation.prompts[{i}]"
        paths, text = _image_paths(prompt, where), prompt["text"]
        tiles, budget = [], image_tile_budget(dataset.max_dynamic_patch, max(len(paths), 1))
        for path in paths:
            try:
                tiles.append(
                    load_image_tiles(path, dataset.min_dynamic_patch, budget, dataset.image_size, dataset.use_thumbnail)
                )
            except ImageError as e:
                raise ValueError(f"config {where}.image: {e}") from e
        if paths and IMAGE_PLACEHOLDER not in text:
            text = image_placeholders(len(paths)) + text
        counts = [t.shape[0] * dataset.num_image_token for t in tiles]
        ids = dataset.tokenizer(official_prompt(template, [], text, counts), return_tensors="pt").input_ids
        prompts.append(EvalPrompt(prompt["text"], tuple(paths), ids, torch.cat(tiles) if tiles else None))
    return prompts


def build_evaluator(
    s: EvaluationSettings,
    eval_set: Any | None,
    train_set: Any,
    collate: Callable[[list[Any]], CollatedBatch],
    backend: Backend,
    dist_info: DistInfo,
    total_steps: int,
    micro_batch_size: int,
    num_workers: int,
) -> Evaluator:
    """The run's :class:`Evaluator`: the eval loss over ``eval_set`` (batched like training, by ``collate``) when
    given, the prompts of ``s`` in ``train_set``'s template and tiling when any."""
    loss_data = (
        None if eval_set is None else EvalLossData(eval_set, collate, micro_batch_size, s.max_samples, num_workers)
    )
    chat = None
    if s.prompts:
        tokenizer, template = train_set.tokenizer, train_set.template
        stops = stop_token_ids(tokenizer, template)
        sep = template.sep.strip()

        def decode(ids: Sequence[int]) -> str:  # as ``xtuner-vl chat``: the text before the separator, stripped
            return tokenizer.decode(list(ids), skip_special_tokens=True).split(sep)[0].strip()

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
        chat = EvalChat(eval_prompts(s, train_set), stops, pad, decode, s.max_new_tokens)
    return Evaluator(backend, dist_info, s.interval, total_steps, loss_data, chat)
