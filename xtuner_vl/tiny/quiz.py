"""Held-out multiple-choice questions on synthetic scenes, and a model's accuracy on them.

Each question (colour, count or position of the squares of a new scene, the kinds in turn) offers
every possible answer of its kind: 4 colours, counts 1-4, 4 quadrants. The model answers by greedy
decoding restricted to the choices (:func:`choose_answer`), so an untrained model scores near chance
(25%) and a model that has learnt the task near 100%. Prompts are built by :class:`InternVLDataset`
exactly as in training (template, tiling, ``<IMG_CONTEXT>`` expansion), from an ordinary LLaVA
``.jsonl`` whose lines also carry ``kind`` and ``choices``.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xtuner_vl.dataset import InternVLDataset
from xtuner_vl.model import InternVLChatModel, load_internvl, load_tokenizer
from xtuner_vl.structures import IGNORE_INDEX, Sample
from xtuner_vl.tiny.data import (
    COLOURS,
    POSITIONS,
    QUESTIONS,
    SIZES,
    image_folder,
    single_image_record,
    write_jsonl,
)

__all__ = ["QuizResult", "choose_answer", "make_quiz", "quiz_accuracy", "quiz_accuracy_of_dir"]

CHOICES = {"colour": list(COLOURS), "count": ["1", "2", "3", "4"], "position": list(POSITIONS)}


@dataclass
class QuizResult:
    """Accuracy over all questions and per question kind, with the chance level of the quiz."""

    accuracy: float
    per_kind: dict[str, float]
    chance: float
    num_questions: int

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {v:.0%}" for k, v in sorted(self.per_kind.items()))
        return f"{self.accuracy:.1%} of {self.num_questions} ({kinds}; chance {self.chance:.0%})"


def make_quiz(
    out_dir: str | Path, num_questions: int = 60, seed: int = 1234, sizes: tuple[tuple[int, int], ...] = SIZES
) -> tuple[Path, Path]:
    """Write held-out questions to ``out_dir/quiz.jsonl`` (+ ``images/``); returns (file, image folder)."""
    folder = image_folder(out_dir)
    rng = random.Random(seed)
    records = []
    for i in range(num_questions):
        kind = list(QUESTIONS)[i % len(QUESTIONS)]
        rec = single_image_record(rng, f"q{i:05d}.png", folder, sizes=sizes, kinds=[kind])
        records.append({"id": i, **rec, "kind": kind, "choices": CHOICES[kind]})
    return write_jsonl(Path(out_dir) / "quiz.jsonl", records), folder


def _with_answer(record: dict, answer: str) -> dict:
    conv = [dict(t) for t in record["conversations"]]
    conv[-1]["value"] = answer
    return {k: v for k, v in record.items() if k not in ("kind", "choices")} | {"conversations": conv}


def _answer_start(sample: Sample) -> int:
    trained = (sample.labels != IGNORE_INDEX).nonzero()
    if not len(trained):
        raise ValueError("a quiz sample has no supervised answer token")
    return int(trained[0])


@torch.no_grad()
def choose_answer(model: InternVLChatModel, samples: list[Sample]) -> int:
    """Greedy decoding restricted to the choices: the index of the sample whose answer the model gives.

    ``samples`` are one question with each possible answer (the same prompt). From the end of the
    prompt, each step takes the most likely next token among those that continue a remaining choice
    (the answer tokens and the closing separator, as training supervises them), until one choice is
    left. Unlike summed log-likelihoods this is not biased towards answers of fewer tokens.
    """
    start = _answer_start(samples[0])
    prompt = samples[0].input_ids[:start]
    if any(_answer_start(s) != start or not torch.equal(s.input_ids[:start], prompt) for s in samples):
        raise ValueError("the choices of a quiz question do not share their prompt")
    answers = [s.input_ids[start:].tolist() for s in samples]
    if len({tuple(a) for a in answers}) != len(answers):
        raise ValueError("two choices of a quiz question have the same tokens")
    device = next(model.parameters()).device
    pixels = samples[0].pixel_values.to(device, model.mlp1[1].weight.dtype)
    out = model(pixels, prompt[None].to(device), image_flags=samples[0].image_flags.to(device), use_cache=True)
    alive, step = list(range(len(answers))), 0
    while len(alive) > 1:
        logits = out.logits[0, -1]
        allowed = sorted({answers[i][step] for i in alive if step < len(answers[i])})
        token = allowed[int(logits[allowed].argmax())]
        alive = [i for i in alive if step < len(answers[i]) and answers[i][step] == token]
        out = model(None, torch.tensor([[token]], device=device), use_cache=True, past_key_values=out.cache)
        step += 1
    return alive[0]


def quiz_accuracy(
    model: InternVLChatModel,
    tokenizer: Any,
    model_dir: str | Path,
    quiz_path: str | Path,
    image_folder: str | Path,
    max_dynamic_patch: int = 6,
) -> QuizResult:
    """Answer every question of the quiz with ``model``; prompts and tiles are built as in training, with
    the template and tiling of ``model_dir``'s config.json and ``max_dynamic_patch`` tiles per image."""
    quiz_path = Path(quiz_path)
    records = [json.loads(x) for x in quiz_path.read_text(encoding="utf-8").splitlines() if x.strip()]
    expanded = quiz_path.with_name(quiz_path.stem + ".choices.jsonl")
    write_jsonl(expanded, [_with_answer(r, c) for r in records for c in r["choices"]])
    dataset = InternVLDataset(
        str(expanded),
        tokenizer,
        image_folders=str(image_folder),
        model_path=model_dir,
        max_dynamic_patch=max_dynamic_patch,
        training=False,
        strict=True,
    )
    was_training = model.training
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    start = 0
    for r in records:
        samples = [dataset[start + k] for k in range(len(r["choices"]))]
        start += len(r["choices"])
        best = choose_answer(model, samples)
        hits[r["kind"]].append(r["choices"][best] == r["conversations"][-1]["value"])
    model.train(was_training)
    flat = [h for v in hits.values() for h in v]
    chance = sum(1 / len(r["choices"]) for r in records) / len(records)
    return QuizResult(sum(flat) / len(flat), {k: sum(v) / len(v) for k, v in hits.items()}, chance, len(flat))


def quiz_accuracy_of_dir(
    model_dir: str | Path, quiz_path: str | Path, image_folder: str | Path, max_dynamic_patch: int = 6
) -> QuizResult:
    """Load an official-format directory with our loader (fp32, CPU) and run :func:`quiz_accuracy`."""
    model = load_internvl(model_dir, dtype=torch.float32)
    return quiz_accuracy(model, load_tokenizer(model_dir), model_dir, quiz_path, image_folder, max_dynamic_patch)
