"""The README's first command: `xtuner-vl demo` runs end to end and held-out accuracy rises from chance."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from xtuner_vl.dataset import InternVLDataset
from xtuner_vl.dataset.image import load_image
from xtuner_vl.demo import PASS_ACCURACY
from xtuner_vl.model import load_internvl, load_tokenizer
from xtuner_vl.structures import IGNORE_INDEX
from xtuner_vl.tiny.checkpoints import make_tiny
from xtuner_vl.tiny.data import COLOURS, SMALL_SIZES, draw_scene
from xtuner_vl.tiny.quiz import CHOICES, choose_answer, make_quiz, quiz_accuracy_of_dir


@pytest.mark.slow
def test_demo_learns_the_task_end_to_end(tmp_path):
    # The default --steps: the same run as the README's command (about 4 minutes on 2 cores).
    proc = subprocess.run(
        [sys.executable, "-m", "xtuner_vl.cli.main", "demo", "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "check-data: 2800 records checked, 0 problems" in proc.stdout
    before, after = map(
        float, re.search(r"accuracy ([\d.]+)% \(untrained\) -> ([\d.]+)% \(trained\)", proc.stdout).groups()
    )
    assert before < 40 and after >= 100 * PASS_ACCURACY, proc.stdout[-3000:]
    assert "all_gather_into_tensor" not in proc.stderr  # DeepSpeed's per-step deprecation warning is filtered
    assert (tmp_path / "train" / "loss_curve.png").is_file()
    assert (tmp_path / "train" / "checkpoints" / "step-00000700" / "COMPLETE").is_file()
    official = tmp_path / "official"
    assert (official / "config.json").is_file() and (official / "model.safetensors").is_file()
    assert "xtuner-vl chat official" in proc.stdout


def _reference_choice(model, samples) -> int:
    """Restricted greedy decoding written plainly: a full forward pass (no cache) for every step."""
    start = int((samples[0].labels != IGNORE_INDEX).nonzero()[0])
    answers = [s.input_ids[start:].tolist() for s in samples]
    chosen, alive = samples[0].input_ids[:start].tolist(), list(range(len(samples)))
    while len(alive) > 1:
        step = len(chosen) - start
        logits = model(samples[0].pixel_values, torch.tensor([chosen]), image_flags=samples[0].image_flags).logits
        allowed = {answers[i][step] for i in alive if step < len(answers[i])}
        token = max(allowed, key=lambda t: float(logits[0, -1, t]))
        alive = [i for i in alive if step < len(answers[i]) and answers[i][step] == token]
        chosen.append(token)
    return alive[0]


def test_quiz_scoring_and_chance_level(tmp_path):
    """The quiz is fair: every kind offers its 4 answers, the cached restricted decoding picks what a
    plain decoder picks, and a random model is near chance (so the demo's rise is the training's doing)."""
    model_dir = make_tiny("internvl2-2b", tmp_path / "m", seed=3, logit_scale=8.0)
    quiz, images = make_quiz(tmp_path / "quiz", num_questions=30, seed=7, sizes=SMALL_SIZES)
    result = quiz_accuracy_of_dir(model_dir, quiz, images, max_dynamic_patch=1)
    assert result.num_questions == 30 and set(result.per_kind) == set(CHOICES)
    assert result.chance == pytest.approx(0.25) and result.accuracy <= 0.5

    model, tokenizer = load_internvl(model_dir, dtype=torch.float32).eval(), load_tokenizer(model_dir)
    records = [json.loads(x) for x in quiz.read_text().splitlines()]
    expanded = quiz.with_name("quiz.choices.jsonl")  # written by quiz_accuracy: one line per choice
    dataset = InternVLDataset(
        str(expanded),
        tokenizer,
        image_folders=str(images),
        model_path=model_dir,
        max_dynamic_patch=1,
        training=False,
        strict=True,
    )
    assert len(dataset) == sum(len(r["choices"]) for r in records)
    picks = []
    with torch.no_grad():
        for q in range(6):
            samples = [dataset[4 * q + k] for k in range(4)]
            picks.append(choose_answer(model, samples))
            assert picks[-1] == _reference_choice(model, samples)
    assert len(set(picks)) > 1  # not a constant answer


@pytest.mark.parametrize("shape", ["square", "circle"])
def test_scenes_are_palette_pngs_that_read_as_their_colours(tmp_path, shape):
    """A scene is written with one byte per pixel (a palette of the canvas and the shape colours) and reads back, as
    training reads every image (``convert('RGB')``), as a grey canvas with shapes of the asked colour."""
    path = tmp_path / "scene.png"
    draw_scene((640, 480), "blue", 3, "bottom right", shape).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "P"
    rgb = load_image(path)
    assert rgb.mode == "RGB" and rgb.getpixel((5, 5)) == (235, 235, 235)
    centres = [(2 * 160 + 80, 2 * 120 + 60), (3 * 160 + 80, 2 * 120 + 60), (2 * 160 + 80, 3 * 120 + 60)]
    assert [rgb.getpixel(c) for c in centres] == [COLOURS["blue"]] * 3
    assert rgb.getpixel((3 * 160 + 80, 3 * 120 + 60)) == (235, 235, 235)  # the fourth cell stays empty
    assert {colour for _, colour in rgb.getcolors()} == {(235, 235, 235), COLOURS["blue"]}
