"""Cheap checks of a training setup, run by the launcher before torchrun starts any rank.

A missing model directory or data file found by every rank means one traceback per rank and torchrun's
``ChildFailedError`` report; found here it is one line. Nothing heavy is imported: no transformers, tokenizer
or DeepSpeed (only torch, which MMEngine's registry loads for its logger); only file names and sizes are read.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from xtuner_vl.recipes.config import find_config, load_config
from xtuner_vl.recipes.model_wrapper import InternVLChat, build_model_wrapper

__all__ = ["preflight"]

# The layouts transformers' `from_pretrained` reads (transformers/utils/constants: SAFE_WEIGHTS_NAME, ...).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# A LoRA / QLoRA checkpoint holds the adapters, the trained projector and their optimizer state: its size
# depends on ranks and targets, so only a nearly full file system is refused up front.
LORA_CHECKPOINT_BYTES = 64 * 1024


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _model_problems(path: Path) -> list[str]:
    if not path.is_dir():
        return [f"model directory {path} does not exist (model.path)"]
    problems = []
    if not (path / "config.json").is_file():
        problems.append(f"model directory {path} has no config.json")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        problems.append(f"model directory {path} has no weights (one of {', '.join(WEIGHT_FILES)})")
    # The files a slow (sentencepiece / tiktoken-style) or fast tokenizer loads from.
    has_vocab = any((path / n).is_file() for n in ("tokenizer.model", "tokenizer.json")) or all(
        (path / n).is_file() for n in ("vocab.json", "merges.txt")
    )
    if not has_vocab or not (path / "tokenizer_config.json").is_file():
        problems.append(
            f"model directory {path} has no complete tokenizer (tokenizer.model, tokenizer.json or "
            "vocab.json + merges.txt, and tokenizer_config.json)"
        )
    return problems


def _as_list(value: str | None | Sequence[str | None]) -> list[str | None]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _data_problems(dataset: dict, section: str = "train_dataset") -> list[str]:
    problems = [
        f"data file {p} does not exist ({section}.data_paths)"
        for p in _as_list(dataset.get("data_paths"))
        if p is not None and not Path(p).is_file()
    ]
    problems += [
        f"image folder {f} does not exist ({section}.image_folders)"
        for f in dict.fromkeys(_as_list(dataset.get("image_folders")))  # a folder shared by sources: once
        if f is not None and not Path(f).is_dir()
    ]
    return problems


def _checkpoint_bytes(model: InternVLChat) -> tuple[int, str]:
    """A lower bound of one checkpoint's size, and what it is."""
    if model.llm_lora_rank > 0 or model.vit_lora_rank > 0:
        return LORA_CHECKPOINT_BYTES, "the LoRA minimum"
    # Full fine-tuning saves every weight (plus optimizer state, not counted): the weight files are a lower bound.
    path = Path(model.path)
    files = [*path.glob("*.safetensors"), *path.glob("pytorch_model*.bin")]
    return sum(f.stat().st_size for f in files if f.is_file()), "the model's weight files"


def _work_dir_problems(work: Path, model: InternVLChat) -> list[str]:
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return [f"work dir {work} cannot be created: {e.strerror or e}"]
    if not os.access(work, os.W_OK | os.X_OK):
        return [f"work dir {work} is not writable"]
    needed, what = _checkpoint_bytes(model)
    free = shutil.disk_usage(work).free
    if free < needed:
        return [
            f"work dir {work}: {_size(free)} free on its file system, one checkpoint needs at least "
            f"{_size(needed)} ({what})"
        ]
    return []


def preflight(config: str, work_dir: str | None, cfg_options: dict | None) -> list[str]:
    """Check that ``xtuner-vl train`` can start: the config parses, the model directory, data files and image
    folders exist, the work dir is writable with room for one checkpoint. Creates the work dir if missing.

    Args:
        config: a config file or a shipped config name.
        work_dir: ``--work-dir``; None: ``work_dirs/<config name>``, as ``train`` uses.
        cfg_options: the ``--cfg-options`` overrides.

    Returns:
        One line per problem; empty when the setup looks right.
    """
    try:
        cfg = load_config(config, cfg_options)
        model = build_model_wrapper(cfg.get("model"))
    except Exception as e:  # any parse failure (syntax, unknown key, bad _base_) becomes the one line
        message = str(e) if isinstance(e, (OSError, ValueError)) else f"config {config}: {type(e).__name__}: {e}"
        return [" ".join(message.split())]  # one line, whatever the parser's layout
    problems = _model_problems(Path(model.path)) + _data_problems(dict(cfg.get("train_dataset") or {}))
    problems += _data_problems(dict(cfg.get("eval_dataset") or {}), "eval_dataset")
    work = Path(work_dir or Path("work_dirs") / find_config(config).stem)
    return problems + _work_dir_problems(work, model)
