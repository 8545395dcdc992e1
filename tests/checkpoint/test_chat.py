"""``xtuner-vl chat`` on a tiny official-format model (InternVL2-2B layout, internlm2-chat template).

Every prompt is checked by its token ids (``--prompt-log``) against the official ``InternVLChatModel.chat``
prompt, written out literally here: system block, ``(question, answer)`` turns, the question with the image
placeholders of the first turn expanded to ``<img>`` + ``<IMG_CONTEXT>`` x 256 per tile + ``</img>``.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from tests.engine.conftest import run_cli
from xtuner_vl.cli.main import main, run_captured
from xtuner_vl.dataset import ConversationError, frames_to_tiles, get_template, load_image_tiles, load_video_frames
from xtuner_vl.dataset.image import tile_count
from xtuner_vl.model import load_internvl, load_tokenizer
from xtuner_vl.model.configuration import read_config
from xtuner_vl.recipes.chat import ChatSession, chat, visual_inputs

SYSTEM = get_template("internlm2-chat").system_message  # the InternVL2 default of the official conversation.py


def _official(turns: list[tuple[str, str | None]], counts: list[int]) -> str:
    """The official internlm2-chat prompt of ``turns`` (the last answer None), images in the first question."""
    text = f"<|im_start|>system\n{SYSTEM}<|im_end|>"
    for q, a in turns:
        text += f"<|im_start|>user\n{q}<|im_end|><|im_start|>assistant\n" + ("" if a is None else f"{a}<|im_end|>")
    for n in counts:  # the official replaces the placeholders one by one, left to right
        text = text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * n + "</img>", 1)
    return text


def _records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def assets(train_assets) -> dict:
    """The tiny model and its synthetic images that tile into several tiles (+ thumbnail)."""
    model_dir, tokenizer, cfg = (
        train_assets["model"],
        load_tokenizer(train_assets["model"]),
        read_config(train_assets["model"]),
    )
    images = [
        p
        for p in sorted(train_assets["images"].iterdir())
        if tile_count(*Image.open(p).size, cfg.min_dynamic_patch, cfg.max_dynamic_patch // 2, cfg.image_size, True) > 1
    ]
    return {
        "model": model_dir,
        "images": images,
        "cfg": cfg,
        "tokenizer": tokenizer,
        "ctx": tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
    }


def _run_with_stdin(args: list[str], stdin: str) -> subprocess.CompletedProcess:
    """``xtuner-vl <args>`` in this process (the command line's own code) with ``stdin`` as its standard input."""
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        proc = run_captured(args)
    finally:
        sys.stdin = saved
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _tiles(assets: dict, image: Path, max_num: int) -> int:
    cfg = assets["cfg"]
    return len(load_image_tiles(image, cfg.min_dynamic_patch, max_num, cfg.image_size, cfg.use_thumbnail))


def test_one_shot_image_cli_streams_the_answer_to_the_official_prompt(assets, tmp_path):
    image, log = assets["images"][0], tmp_path / "log.jsonl"
    args = ["chat", str(assets["model"]), "--image", str(image), "--prompt", "What is it?", "--max-new-tokens", "6"]
    proc = run_cli(args + ["--prompt-log", str(log)])
    (record,) = _records(log)
    counts = [256 * _tiles(assets, image, assets["cfg"].max_dynamic_patch)]
    assert record["input_ids"] == assets["tokenizer"](_official([("<image>\nWhat is it?", None)], counts))["input_ids"]
    assert record["input_ids"].count(assets["ctx"]) == counts[0] > 256  # tiled + thumbnail
    assert proc.stdout.startswith("ASSISTANT: ") and proc.stdout.endswith("\n")
    assert proc.stdout[len("ASSISTANT: ") :].strip() == record["answer"] != ""  # what was streamed is the answer


def test_several_images_split_the_tile_budget_and_are_numbered(assets, tmp_path):
    images, log = assets["images"][:2], tmp_path / "log.jsonl"
    chat(assets["model"], images=[str(p) for p in images], prompt="Compare them.", max_new_tokens=3, prompt_log=log)
    (record,) = _records(log)
    budget = max(1, assets["cfg"].max_dynamic_patch // 2)
    counts = [256 * _tiles(assets, p, budget) for p in images]
    question = "Image-1: <image>\nImage-2: <image>\nCompare them."
    assert record["input_ids"] == assets["tokenizer"](_official([(question, None)], counts))["input_ids"]
    assert record["input_ids"].count(assets["ctx"]) == sum(counts)


def _write_mp4(path: Path, frames: int) -> Path:
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=10, options={"crf": "0"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            frame = np.full((48, 64, 3), i * 20, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.mark.parametrize("kind", ["folder", "mp4"])
def test_video_gives_one_tile_per_frame(assets, tmp_path, kind):
    if kind == "folder":
        video = tmp_path / "frames"
        video.mkdir()
        for i, p in enumerate(assets["images"][:3]):
            shutil.copy(p, video / f"frame_{i}{p.suffix}")
    else:
        video = _write_mp4(tmp_path / "clip.mp4", frames=12)
    log = tmp_path / "log.jsonl"
    chat(assets["model"], video=str(video), num_frames=3, prompt="What happens?", max_new_tokens=3, prompt_log=log)
    (record,) = _records(log)
    question = "Frame-1: <image>\nFrame-2: <image>\nFrame-3: <image>\nWhat happens?"  # the official training lines
    assert record["input_ids"] == assets["tokenizer"](_official([(question, None)], [256] * 3))["input_ids"]
    model = load_internvl(assets["model"], dtype=torch.float32)
    pixels, _, counts = visual_inputs(model, [], str(video), num_frames=3)
    frames = load_video_frames(video, num_frames=3, sample="middle")
    assert counts == [256] * 3 and torch.equal(pixels, frames_to_tiles(frames, assets["cfg"].image_size))
    if kind == "mp4":  # the middle frame of each of 3 segments of 12 frames: 1, 5, 9 (grey levels 20 * i)
        assert [round(float(np.asarray(f).mean()) / 20) for f in frames] == [1, 5, 9]


def test_text_only(assets, tmp_path):
    log = tmp_path / "log.jsonl"
    (answer,) = chat(assets["model"], prompt="Hello there", max_new_tokens=3, prompt_log=log)
    (record,) = _records(log)
    assert record["input_ids"] == assets["tokenizer"](_official([("Hello there", None)], []))["input_ids"]
    assert assets["ctx"] not in record["input_ids"] and record["answer"] == answer


def test_interactive_stdin_session_carries_history_and_resets(assets, tmp_path):
    image, log = assets["images"][0], tmp_path / "log.jsonl"
    args = ["chat", str(assets["model"]), "--image", str(image), "--max-new-tokens", "4", "--prompt-log", str(log)]
    proc = _run_with_stdin(args, "What is it?\nAnd now?\n/reset\nAgain?\nexit\nnever asked\n")
    first, second, third = _records(log)
    counts = [256 * _tiles(assets, image, assets["cfg"].max_dynamic_patch)]
    tok = assets["tokenizer"]
    q1 = "<image>\nWhat is it?"
    assert first["input_ids"] == tok(_official([(q1, None)], counts))["input_ids"]
    # the second prompt holds the first turn (its image included) and the first answer, then the new question
    assert second["input_ids"] == tok(_official([(q1, first["answer"]), ("And now?", None)], counts))["input_ids"]
    assert second["input_ids"].count(assets["ctx"]) == counts[0]  # the image once, in the first turn
    assert second["input_ids"][: len(first["input_ids"])] == first["input_ids"]
    # /reset: a new conversation about the same image
    assert third["input_ids"] == tok(_official([("<image>\nAgain?", None)], counts))["input_ids"]
    assert proc.stdout.count("USER: ") == 5 and proc.stdout.count("ASSISTANT: ") == 3  # stopped at exit


@pytest.mark.parametrize("inputs", [["Hi", "", "  ", "quit", "never"], ["Hi"]])
def test_interactive_ends_on_quit_or_end_of_input_and_skips_empty_lines(assets, inputs):
    lines = iter(inputs)

    def read(_: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    answers = chat(assets["model"], max_new_tokens=2, read_input=read)
    assert len(answers) == 1 and next(lines, None) == (None if inputs[-1] == "Hi" else "never")


class _Recorder(io.StringIO):
    """stdout stand-in that notes how many decoding steps had run at each write."""

    def __init__(self, steps: list[int]) -> None:
        super().__init__()
        self.steps, self.writes = steps, []

    def write(self, text: str) -> int:
        self.writes.append((len(self.steps), text))
        return super().write(text)


def _session(assets: dict, images: list[Path]) -> ChatSession:
    model = load_internvl(assets["model"], dtype=torch.float32)
    pixels, prefix, counts = visual_inputs(model, [str(p) for p in images], None)
    return ChatSession(model, assets["tokenizer"], get_template(model.template), pixels, prefix, counts)


def test_answer_streams_token_by_token_and_stops_at_the_separator(assets):
    session = _session(assets, assets["images"][:1])
    steps, calls = [], []
    session.model.language_model.register_forward_hook(lambda *_: steps.append(1))
    generate = session.model.generate
    session.model.generate = lambda *a, **kw: calls.append(kw) or generate(*a, **kw)
    out = _Recorder(steps)
    answer = session.ask("Describe it.", max_new_tokens=12, out=out)
    # the official stop first (the template separator), then the tokenizer's EOS: an answer ends at either
    tokenizer = assets["tokenizer"]
    assert calls[0]["eos_token_id"] == [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    texts = [text for _, text in out.writes if text]
    assert len({step for step, text in out.writes if text.strip()}) > 2  # written during decoding, step by step
    assert "".join(texts).strip() == answer and out.getvalue().endswith("\n")


def test_first_question_may_place_the_image_itself(assets):
    session = _session(assets, assets["images"][:1])
    with pytest.raises(ConversationError, match="2 <image>"):
        session.ask("<image> and <image>?", max_new_tokens=2, stream=False)
    assert session.history == []
    session.ask("Look: <image> what is it?", max_new_tokens=2, stream=False)
    assert session.history[0][0] == "Look: <image> what is it?"  # no prefix added, as the official
    prompt = session.prompt(session.question_text("More?"))
    assert (
        prompt.count("<img>") == 1
        and "Look: <img><IMG_CONTEXT>" in prompt
        and prompt.endswith("<|im_start|>user\nMore?<|im_end|><|im_start|>assistant\n")
    )


def test_unreadable_image_is_a_clean_cli_error(assets, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["chat", str(assets["model"]), "--image", str(bad), "--prompt", "Hi"]) == 1
    err = capsys.readouterr().err
    assert "xtuner-vl chat: error:" in err and str(bad) in err
