"""Small pieces the backbone tests share: stored weight keys, one image + text sample, a short training run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from xtuner_vl.model.weights import tensor_shapes, weight_files


def weight_keys(path: Path) -> set[str]:
    """Every key the checkpoint directory ``path`` stores (from the file headers)."""
    return set().union(*(tensor_shapes(file) for file in weight_files(path)))


def image_text_inputs(model, seq: int = 24, high: int = 300) -> dict[str, torch.Tensor]:
    """One sample: 3 text ids, one tile of ``<IMG_CONTEXT>``, ``seq - 3`` more text ids (seeded, below ``high``)."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(20, high, (seq,), generator=g)
    ids = torch.cat([text[:3], torch.full((model.num_image_token,), model.img_context_token_id), text[3:]])[None]
    return {
        "pixel_values": torch.randn(1, 3, 448, 448, generator=g),
        "input_ids": ids,
        "image_flags": torch.ones(1, dtype=torch.long),
    }


def answer_labels(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Labels of :func:`image_text_inputs` training the text after the image."""
    labels = inputs["input_ids"].clone()
    labels[:, : 3 + model.num_image_token] = -100
    return labels


def train_tiny(config: str, model_path: Path, tmp_path: Path, monkeypatch: Any) -> tuple[Path, list[dict]]:
    """``xtuner-vl train`` of the tiny config ``config`` (e.g. ``tiny_internvl2_lora``) in this process: 8 synthetic
    samples, 3 epochs. Returns the work dir and the training log's records."""
    from xtuner_vl.engine.deepspeed_config import CONFIG_ROOT
    from xtuner_vl.recipes.train import train
    from xtuner_vl.tiny.data import make_synthetic_dataset

    data, images = make_synthetic_dataset(tmp_path / "data", num_samples=8, seed=1)
    monkeypatch.setenv("XTUNER_VL_CACHE", str(tmp_path / "cache"))
    options = {
        "model.path": str(model_path),
        "train_dataset.data_paths": [str(data)],
        "train_dataset.image_folders": [str(images)],
        "schedule.epochs": 3,
        "runtime.save_steps": 100,
    }
    work = train(str(CONFIG_ROOT / "tiny" / f"{config}.py"), work_dir=str(tmp_path / "work"), cfg_options=options)
    return work, [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]


def assert_reloads_alike(model, source: Path, out: Path, inputs: dict[str, torch.Tensor]) -> None:
    """``save_official`` of ``model`` keeps ``source``'s weight keys, and both the plain and the streaming load of
    the saved directory give bitwise ``model``'s logits on ``inputs``."""
    from xtuner_vl.model import load_internvl, save_official
    from xtuner_vl.model.loader import open_checkpoint, stream_into

    with torch.no_grad():
        logits = model(**inputs).logits
    save_official(model, out, source_dir=source, dtype=torch.float32)
    assert weight_keys(out) == weight_keys(source)
    for again in (load_internvl(out, dtype=torch.float32), stream_into(open_checkpoint(out), torch.float32, "cpu")):
        with torch.no_grad():
            assert torch.equal(again(**inputs).logits, logits)
