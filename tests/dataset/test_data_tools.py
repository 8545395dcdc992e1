"""check-data and preview-data through the CLI on generated data with planted problems."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.engine.conftest import run_cli
from xtuner_vl.engine.deepspeed_config import CONFIG_ROOT
from xtuner_vl.tiny.data import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
CONFIG = CONFIG_ROOT / "tiny" / "tiny_internvl2_lora.py"


@pytest.fixture(scope="module")
def planted(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    data, images = make_synthetic_dataset(root / "good", num_samples=12, seed=2)
    Image.new("RGB", (4, 4)).save(images / "tiny.png")
    bad_lines = [
        "{not json",
        json.dumps(
            {
                "image": "gone.png",
                "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
            }
        ),
        json.dumps({"conversations": [{"from": "human", "value": "q"}]}),
        json.dumps(
            {
                "image": "tiny.png",
                "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
            }
        ),
    ]
    bad = root / "bad.jsonl"
    bad.write_text("\n".join(bad_lines) + "\n")
    return tiny_ckpt("internvl2-2b"), data, bad, images


def _options(model, data_paths, images) -> list[str]:
    return [
        f"model.path={model}",
        f"train_dataset.data_paths={json.dumps([str(p) for p in data_paths])}",
        f"train_dataset.image_folders={json.dumps([str(images)] * len(data_paths))}",
        "train_dataset.repeat_times=[2.5,1]",
    ]


def _run(args, model, data_paths, images, cwd):
    """check-data in a fresh interpreter: it forks its worker processes."""
    opts = _options(model, data_paths, images)
    return subprocess.run(
        [sys.executable, "-m", "xtuner_vl.cli.main", *args, "--cfg-options", *opts],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("workers", ["2", "1"])
def test_check_data_reports_every_problem_with_file_and_line(planted, tmp_path, workers):
    """The same report from worker processes and from this process alone (``--workers 1``, nothing forked)."""
    model, data, bad, images = planted
    args = ["check-data", str(CONFIG), "--workers", workers, "--report", str(tmp_path / "r.txt")]
    if workers == "1":
        proc = run_cli([*args, "--cfg-options", *_options(model, [data, bad], images)], check=False)
    else:
        proc = _run(args, model, [data, bad], images, tmp_path)
    out = proc.stdout
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "records 12, after repeats 30, usable 12, problems 0" in out
    assert "records 4, after repeats 4, usable 1, problems 3" in out
    assert f"{bad}:1: invalid JSON" in out
    assert f"{bad}:2: field 'image'" in out and "gone.png" in out
    assert f"{bad}:3: field 'conversations'" in out
    assert "token lengths:" in out and "real tiles per sample:" in out
    assert (tmp_path / "r.txt").read_text().strip().endswith("16 records checked, 3 problems")


def test_preview_data_writes_grid_and_marked_prompt(planted, tmp_path):
    model, data, _, images = planted
    out = tmp_path / "s.png"
    args = ["preview-data", str(CONFIG), "--index", "1", "--out", str(out), "--cfg-options"]
    proc = run_cli(args + _options(model, [data, data], images), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "s.txt").read_text()
    assert "<|im_start|>assistant\n[[" in text and "<|im_end|>]]" in text  # answer + sep trained
    assert "<IMG_CONTEXT>x256" in text or "<IMG_CONTEXT>x" not in text
    img = Image.open(out)
    assert img.width >= 224 and img.height > 224
