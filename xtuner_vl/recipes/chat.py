"""``xtuner-vl chat``: talk to an official-format InternVL directory (our loader, no remote code).

Images are tiled as in training (dynamic tiles + thumbnail, the model's ``max_dynamic_patch`` split
across the images), a video gives one tile per frame (``Frame-k: <image>`` lines), the prompt follows
the model's template as the official ``chat`` does, and generated text is streamed to stdout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TextStreamer

from xtuner_vl.dataset import (
    expand_image_tokens,
    frames_to_tiles,
    get_template,
    image_tile_budget,
    load_image_tiles,
    load_video_frames,
)
from xtuner_vl.dataset.templates import Template
from xtuner_vl.model import InternVLChatModel, load_internvl, load_tokenizer

__all__ = ["ChatSession", "chat", "visual_inputs"]

_QUIT = {"", "exit", "quit"}


def visual_inputs(
    model: InternVLChatModel, images: Sequence[str], video: str | None, num_frames: int = 8
) -> tuple[torch.Tensor | None, str, list[int]]:
    """Tiles of the images and video frames, the prefix of placeholders for the first question, and the
    ``<IMG_CONTEXT>`` count of each placeholder."""
    cfg = model.config
    tiles, prefix, counts = [], "", []
    if images:
        budget = image_tile_budget(cfg.max_dynamic_patch, len(images))
        for i, path in enumerate(images):
            t = load_image_tiles(path, cfg.min_dynamic_patch, budget, cfg.image_size, cfg.use_thumbnail)
            tiles.append(t)
            counts.append(t.shape[0] * model.num_image_token)
            prefix += "<image>\n" if len(images) == 1 else f"Image-{i + 1}: <image>\n"
    if video is not None:
        frames = load_video_frames(video, num_frames=num_frames, sample="middle")
        tiles.append(frames_to_tiles(frames, cfg.image_size))
        counts += [model.num_image_token] * len(frames)
        prefix += "".join(f"Frame-{i + 1}: <image>\n" for i in range(len(frames)))
    return (torch.cat(tiles) if tiles else None), prefix, counts


@dataclass
class ChatSession:
    """A multi-turn conversation with one model; the images belong to the first question."""

    model: InternVLChatModel
    tokenizer: object
    template: Template
    pixel_values: torch.Tensor | None = None
    prefix: str = ""
    counts: list[int] = field(default_factory=list)
    history: list[tuple[str, str]] = field(default_factory=list)

    def prompt(self, question: str) -> str:
        """The official ``MPT`` prompt: system, past turns, the question, the assistant header."""
        t = self.template
        text = t.system_template.format(system_message=t.system_message) + t.sep
        for q, a in [*self.history, (question, None)]:
            text += t.roles[0] + q + t.sep + t.roles[1] + ("" if a is None else a + t.sep)
        return expand_image_tokens(text, self.counts)

    def ask(self, question: str, max_new_tokens: int = 512, stream: bool = True) -> str:
        """Answer ``question`` (greedy), streaming the text to stdout when ``stream``; returns the answer."""
        question = question if self.history else self.prefix + question
        prompt = self.prompt(question)
        enc = self.tokenizer(prompt, return_tensors="pt")
        device = next(self.model.parameters()).device
        stop = [self.tokenizer.eos_token_id]
        sep_id = self.tokenizer.convert_tokens_to_ids(self.template.sep.strip())
        if isinstance(sep_id, int) and sep_id != self.tokenizer.unk_token_id:
            stop.append(sep_id)
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        pixels = None if self.pixel_values is None else self.pixel_values.to(device, self.model.mlp1[1].weight.dtype)
        out = self.model.generate(
            pixels,
            enc.input_ids.to(device),
            attention_mask=enc.attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stop[0],
            streamer=streamer,
        )
        answer = self.tokenizer.decode(out[0], skip_special_tokens=True).split(self.template.sep.strip())[0].strip()
        self.history.append((question, answer))
        return answer


def chat(
    model_dir: str | Path,
    images: Sequence[str] = (),
    video: str | None = None,
    prompt: str | None = None,
    max_new_tokens: int = 512,
    num_frames: int = 8,
    read_input: Callable[[str], str] = input,
) -> list[str]:
    """One-shot with ``prompt``, otherwise an interactive loop until an empty line, ``exit`` or ``quit``.

    Returns:
        The answers, in order.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_internvl(model_dir, dtype=dtype, device=device)
    if model.template is None:
        raise ValueError(f"{model_dir}/config.json names no template")
    pixels, prefix, counts = visual_inputs(model, images, video, num_frames)
    session = ChatSession(model, load_tokenizer(model_dir), get_template(model.template), pixels, prefix, counts)
    if prompt is not None:
        print("ASSISTANT: ", end="", flush=True)
        return [session.ask(prompt, max_new_tokens)]
    answers = []
    while True:
        try:
            question = read_input("USER: ")
        except EOFError:
            return answers
        if question.strip() in _QUIT:
            return answers
        print("ASSISTANT: ", end="", flush=True)
        answers.append(session.ask(question, max_new_tokens))
