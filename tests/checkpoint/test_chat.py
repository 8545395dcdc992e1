"""``xtuner-vl chat`` on a tiny official-format model: one-shot, multi-turn, images and video frames."""

from __future__ import annotations

import shutil

import torch

from tests.engine.conftest import run_cli
from xtuner_vl.dataset import get_template
from xtuner_vl.model import load_internvl, load_tokenizer
from xtuner_vl.recipes.chat import ChatSession, chat, visual_inputs


def test_one_shot_with_two_images_streams_text(train_assets):
    images = sorted(train_assets["images"].iterdir())[:2]
    args = ["chat", str(train_assets["model"]), "--prompt", "Compare them.", "--max-new-tokens", "6"]
    proc = run_cli(args + [x for p in images for x in ("--image", str(p))])
    assert proc.stdout.startswith("ASSISTANT: ") and len(proc.stdout.strip()) > len("ASSISTANT:")


def test_prompt_follows_the_template_and_keeps_the_images_in_the_first_turn(train_assets):
    model = load_internvl(train_assets["model"], dtype=torch.float32)
    image = sorted(train_assets["images"].iterdir())[0]
    pixels, prefix, counts = visual_inputs(model, [str(image)], None)
    assert prefix == "<image>\n" and counts == [pixels.shape[0] * 256]
    template = get_template(model.template)
    session = ChatSession(model, load_tokenizer(train_assets["model"]), template, pixels, prefix, counts)
    first = session.ask("What is it?", max_new_tokens=3, stream=False)
    prompt = session.prompt("And now?")
    system = f"<|im_start|>system\n{template.system_message}<|im_end|>"
    image_text = "<img>" + "<IMG_CONTEXT>" * counts[0] + "</img>"
    assert prompt == (
        f"{system}<|im_start|>user\n{image_text}\nWhat is it?<|im_end|><|im_start|>assistant\n{first}<|im_end|>"
        "<|im_start|>user\nAnd now?<|im_end|><|im_start|>assistant\n"
    )
    session.ask("And now?", max_new_tokens=3, stream=False)  # the pixels are spliced again: counts agree


def test_interactive_video_chat_until_empty_line(train_assets, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, p in enumerate(sorted(train_assets["images"].iterdir())[:3]):
        shutil.copy(p, frames / f"{i:03d}{p.suffix}")
    questions = iter(["Describe the video.", "More?", ""])
    answers = chat(train_assets["model"], video=str(frames), num_frames=3, max_new_tokens=3,
                   read_input=lambda _: next(questions))
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
