"""Load MMEngine configs by file or by name (package data under ``xtuner_vl/configs/``), with ``--cfg-options``."""

from __future__ import annotations

import ast
import difflib
from pathlib import Path

from mmengine.config import Config, DictAction

from xtuner_vl.engine.deepspeed_config import CONFIG_ROOT

__all__ = ["DictAction", "copy_config", "find_config", "list_configs", "load_config"]


def list_configs(pattern: str | None = None) -> list[str]:
    """Names of the shipped configs (``xtuner_vl/configs/**/*.py`` minus ``_base_`` parts), filtered by substring."""
    names = sorted(p.stem for p in CONFIG_ROOT.rglob("*.py") if "_base_" not in p.parts)
    return [n for n in names if pattern is None or pattern.lower() in n.lower()]


def seed_alias(name: str) -> str:
    """Our name for an xtuner (seed) config name: ``*_lora_finetune`` -> ``*_lora``, ``*_qlora_finetune`` ->
    ``*_qlora``, ``*_finetune`` (full fine-tuning) -> ``*_full``; other names as they are."""
    if not name.endswith("_finetune"):
        return name
    base = name.removesuffix("_finetune")
    return base if base.endswith(("_lora", "_qlora", "_full")) else f"{base}_full"


def find_config(name_or_path: str) -> Path:
    """A path as given, or the unique shipped config with that name (xtuner's ``*_finetune`` names too)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = seed_alias(path.stem)
    matches = [p for p in CONFIG_ROOT.rglob(f"{stem}.py") if "_base_" not in p.parts]
    if len(matches) != 1:
        names = list_configs()
        similar = difflib.get_close_matches(stem, names, n=5, cutoff=0.6) or list_configs(stem)[:5]
        raise FileNotFoundError(
            f"config {name_or_path!r}: no such file and {len(matches)} shipped configs match "
            f"(similar: {', '.join(similar) or 'none'}); see `xtuner-vl list-cfg`"
        )
    return matches[0]


def load_config(name_or_path: str, cfg_options: dict | None = None) -> Config:
    cfg = Config.fromfile(str(find_config(name_or_path)))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def copy_config(name_or_path: str, out_dir: str | Path) -> Path:
    """Copy a config to ``out_dir`` to edit it: the same text, with its ``_base_`` paths made absolute so
    the copy loads from anywhere (relative ones like ``../_base_/...`` only resolve beside the original)."""
    src = find_config(name_or_path).resolve()
    text = src.read_text(encoding="utf-8")
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_base_" for t in node.targets):
            values = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
            lines = text.splitlines(keepends=True)
            start = sum(len(x) for x in lines[: node.value.lineno - 1]) + node.value.col_offset
            end = sum(len(x) for x in lines[: node.value.end_lineno - 1]) + node.value.end_col_offset
            bases = [str((src.parent / ast.literal_eval(v)).resolve()) for v in values]
            text = text[:start] + "[\n" + "".join(f"    {b!r},\n" for b in bases) + "]" + text[end:]
            break
    dst = Path(out_dir) / src.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(text, encoding="utf-8")
    return dst
