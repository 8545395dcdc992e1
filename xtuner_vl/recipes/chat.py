"""``xtuner-vl chat``: talk to an official-format InternVL directory (our loader, no remote code).

Images are tiled as in training (dynamic tiles + thumbnail, the model's ``max_dynamic_patch`` split
across the images), a video gives one tile per frame (``Frame-k: <image>`` lines, as in the official
training data), and the answer is streamed to stdout token by token as it is generated. The prompt and
the stopping rule are those of the official ``InternVLChatModel.chat``:

- the MPT prompt of the checkpoint's template: system block (the release's default system message, or
  config.json's ``system_message``), every earlier ``(question, answer)`` turn, the question, the assistant
  header; tokenized once, with the tokenizer's own special tokens (BOS for InternLM2 / Phi-3);
- the first question of a conversation gets the image placeholders in front (``<image>\\n``, or
  ``Image-k: <image>\\n`` per image, then ``Frame-k: <image>\\n`` per frame) unless it already holds
  ``<image>``; later questions carry none. The tiles are passed again every turn and fill the first
  question's ``<image>`` slots, as the official history does;
- greedy decoding that stops at the template's separator token (the official sets ``eos_token_id`` to it;
  the tokenizer's EOS only when the separator is not one token); the answer is the text before the
  separator, stripped, and it enters the history.

``internvl3_5_gpt_oss`` (harmony): past answers are written ``<|start|>assistant<|channel|>final<|message|>`` +
answer + ``<|end|>``, and the prompt ends with that whole header, where the official ``chat`` stops at
``<|start|>assistant`` and lets the model write ``<|channel|>final<|message|>`` (trained, and the only channel
its system message allows); the official history answers keep the header text the model wrote, so past turns are
the same. Decoding stops at ``<|return|>`` (the official ``eos_token_id``) or ``<|end|>``.

Interactive mode: ``exit``, ``quit`` or end of input stop, ``/reset`` starts a new conversation about the
same images, empty lines are ignored. ``prompt_log`` appends one JSON line per turn (prompt text, its token
ids, the answer) for checking a template.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers.generation.streamers import BaseStreamer

from xtuner_vl.dataset import (
    ConversationError,
    expand_image_tokens,
    frames_to_tiles,
    get_template,
    image_tile_budget,
    load_image_tiles,
    load_video_frames,
)
from xtuner_vl.dataset.conversation import IMAGE_PLACEHOLDER
from xtuner_vl.dataset.templates import Template
from xtuner_vl.model import InternVLChatModel, load_internvl, load_tokenizer
from xtuner_vl.structures import IMG_CONTEXT_TOKEN

__all__ = ["ChatSession", "chat", "official_prompt", "visual_inputs"]

_QUIT = ("exit", "quit")
_RESET = "/reset"


def image_placeholders(num_images: int) -> str:
    """The first question's placeholders for ``num_images`` images: ``<image>\n`` for one, ``Image-k: <image>\n``
    lines for several (the official ``chat``)."""
    if num_images == 1:
        return "<image>\n"
    return "".join(f"Image-{k + 1}: <image>\n" for k in range(num_images))


def visual_inputs(
    model: InternVLChatModel, images: Sequence[str], video: str | None, num_frames: int = 8
) -> tuple[torch.Tensor | None, str, list[int]]:
    """Tiles of the images and video frames, the prefix of placeholders for the first question, and the
    ``<IMG_CONTEXT>`` count of each placeholder."""
    cfg = model.config
    tiles, prefix, counts = [], "", []
    if images:
        budget = image_tile_budget(cfg.max_dynamic_patch, len(images))
        for path in images:
            t = load_image_tiles(path, cfg.min_dynamic_patch, budget, cfg.image_size, cfg.use_thumbnail)
            tiles.append(t)
            counts.append(t.shape[0] * model.num_image_token)
        prefix += image_placeholders(len(images))
    if video is not None:
        frames = load_video_frames(video, num_frames=num_frames, sample="middle")
        tiles.append(frames_to_tiles(frames, cfg.image_size))
        counts += [model.num_image_token] * len(frames)
        prefix += "".join(f"Frame-{i + 1}: <image>\n" for i in range(len(frames)))
    return (torch.cat(tiles) if tiles else None), prefix, counts


def official_prompt(
    template: Template, history: Sequence[tuple[str, str]], question: str, counts: Sequence[int]
) -> str:
    """The prompt of the official ``chat``: system, past turns, ``question``, the assistant header (for
    ``internvl3_5_gpt_oss`` with the ``final`` channel header the official leaves to the model).

    The ``<image>`` placeholders, all in the conversation's first question, become ``<img>`` +
    ``<IMG_CONTEXT>`` x count + ``</img>``; placeholders typed in later questions stay text, as in the official
    (which replaces only the first ``len(counts)`` occurrences).

    Raises:
        ConversationError: the first question does not hold exactly ``len(counts)`` placeholders.
    """
    turns = [*history, (question, None)]
    first = turns[0][0]
    if counts or IMAGE_PLACEHOLDER in first:
        turns[0] = (expand_image_tokens(first, counts), turns[0][1])
    t = template
    text = t.system_template.format(system_message=t.system_message) + t.sep
    for q, a in turns:
        text += t.roles[0] + q + t.sep + t.roles[1] + ("" if a is None else a + t.sep)
    return text


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class _TokenStreamer(BaseStreamer):
    """Writes the answer to ``out`` as each token is generated (``TextStreamer`` waits for word ends).

    The tokens so far are decoded as a whole, so pieces that depend on their neighbours (sentencepiece's
    leading space, byte-fallback characters) come out right. Trailing byte pieces (``<0xNN>``) are held back
    until a non-byte token follows: a run of them decodes as one group, invalid bytes each as U+FFFD, so only a
    closed run is final. A trailing U+FFFD (a byte-level BPE character still missing bytes) is held back too.
    """

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.tokens: list[int] = []
        self.shown = 0
        self.prompt_seen = False

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _closed(self) -> list[int]:
        """The tokens up to the last one that is not a byte piece."""
        end = len(self.tokens)  # only the trailing pieces are looked at: each call is O(bytes held back)
        while end and _BYTE_PIECE.fullmatch(str(self.tokenizer.convert_ids_to_tokens(self.tokens[end - 1]))):
            end -= 1
        return self.tokens[:end]

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt ids (none here: it runs on embeddings)
            self.prompt_seen = True
            return
        self.tokens.extend(value.reshape(-1).tolist())
        text = self._text(self._closed())
        end = len(text.rstrip("\ufffd"))
        if end > self.shown:
            self.out.write(text[self.shown : end])
            self.out.flush()
            self.shown = end

    def end(self) -> None:
        self.out.write(self._text(self.tokens)[self.shown :] + "\n")
        self.out.flush()


def stop_token_ids(tokenizer: Any, template: Template) -> list[int]:
    """The ids that end an answer: the template's separator token (where the official ``chat`` stops: ``sep2``, our
    ``last_sep``, ``<|return|>`` for ``internvl3_5_gpt_oss``), then ``sep`` where that differs (``<|end|>``), then
    the tokenizer's EOS, so a model that ends with any of them never runs on."""
    ids: list[int] = []
    for text in (template.last_sep, template.sep):
        token = None if text is None else tokenizer.convert_tokens_to_ids(text.strip())
        if isinstance(token, int) and token != tokenizer.unk_token_id and token not in ids:
            ids.append(token)
    eos = tokenizer.eos_token_id
    return ids + ([eos] if eos is not None and eos not in ids else [])


@dataclass
class ChatSession:
    """A multi-turn conversation with one model; the images belong to the first question.

    Attributes:
        prompt_log: when set, each turn appends ``{"prompt", "input_ids", "answer"}`` as one JSON line.
    """

    model: InternVLChatModel
    tokenizer: Any
    template: Template
    pixel_values: torch.Tensor | None = None
    prefix: str = ""
    counts: list[int] = field(default_factory=list)
    history: list[tuple[str, str]] = field(default_factory=list)
    prompt_log: TextIO | None = None

    def question_text(self, question: str) -> str:
        """``question`` as it enters the prompt: the first one of a conversation gets the placeholders in front,
        unless it already holds ``<image>``."""
        if self.history or not self.counts or IMAGE_PLACEHOLDER in question:
            return question
        return self.prefix + question

    def prompt(self, question: str) -> str:
        """The full prompt for ``question`` (already passed through :meth:`question_text`)."""
        return official_prompt(self.template, self.history, question, self.counts)

    def reset(self) -> None:
        """Forget the earlier turns: the next question starts a new conversation about the same images."""
        self.history.clear()

    def ask(self, question: str, max_new_tokens: int = 512, stream: bool = True, out: TextIO | None = None) -> str:
        """Answer ``question`` greedily, streaming the text to ``out`` (stdout) when ``stream``.

        Returns:
            The answer (also appended to the history).

        Raises:
            ConversationError: a first question whose ``<image>`` count differs from the images and frames.
        """
        question = self.question_text(question)
        prompt = self.prompt(question)
        enc = self.tokenizer(prompt, return_tensors="pt")
        device = next(self.model.parameters()).device
        stop = stop_token_ids(self.tokenizer, self.template)
        streamer = _TokenStreamer(self.tokenizer, out or sys.stdout) if stream else None
        pixels = None if self.pixel_values is None else self.pixel_values.to(device, self.model.mlp1[1].weight.dtype)
        pad = self.tokenizer.pad_token_id
        out_ids = self.model.generate(
            pixels,
            enc.input_ids.to(device),
            attention_mask=enc.attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=stop[0] if pad is None else pad,
            streamer=streamer,
        )
        answer = self.tokenizer.decode(out_ids[0], skip_special_tokens=True).split(self.template.sep.strip())[0].strip()
        self.history.append((question, answer))
        if self.prompt_log is not None:
            shown = prompt.replace(IMG_CONTEXT_TOKEN, "")  # the official verbose print, without 256 x n tokens
            record = {"prompt": shown, "input_ids": enc.input_ids[0].tolist(), "answer": answer}
            self.prompt_log.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.prompt_log.flush()
        return answer


def _interactive(session: ChatSession, read_input: Callable[[str], str], max_new_tokens: int) -> list[str]:
    answers = []
    while True:
        try:
            question = read_input("USER: ").strip()
        except EOFError:
            print()
            return answers
        if question in _QUIT:
            return answers
        if question == _RESET:
            session.reset()
            print("(new conversation)")
            continue
        if not question:
            continue
        print("ASSISTANT: ", end="", flush=True)
        try:
            answers.append(session.ask(question, max_new_tokens))
        except ConversationError as e:  # a typo in the placeholders should not end the session
            print(f"\nerror: {e}", file=sys.stderr)


def chat(
    model_dir: str | Path,
    images: Sequence[str] = (),
    video: str | None = None,
    prompt: str | None = None,
    max_new_tokens: int = 512,
    num_frames: int = 8,
    read_input: Callable[[str], str] = input,
    prompt_log: str | Path | None = None,
    system_message: str | None = None,
) -> list[str]:
    """One-shot with ``prompt``, otherwise interactive until ``exit``, ``quit`` or end of input. ``system_message``
    replaces the checkpoint's (a text, or a preset name such as ``internvl3_5_thinking``).

    Returns:
        The answers, in order.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_internvl(model_dir, dtype=dtype, device=device)
    if model.template is None:
        raise ValueError(f"{model_dir}/config.json names no template")
    system = system_message if system_message is not None else model.config.raw.get("system_message")
    template = get_template(model.template, system)
    pixels, prefix, counts = visual_inputs(model, images, video, num_frames)
    log = open(prompt_log, "a", encoding="utf-8") if prompt_log is not None else None  # noqa: SIM115
    try:
        session = ChatSession(model, load_tokenizer(model_dir), template, pixels, prefix, counts, prompt_log=log)
        if prompt is not None:
            print("ASSISTANT: ", end="", flush=True)
            return [session.ask(prompt, max_new_tokens)]
        return _interactive(session, read_input, max_new_tokens)
    finally:
        if log is not None:
            log.close()
