"""Load MMEngine configs by file or by name (package data under ``xtuner_vl/configs/``), with ``--cfg-options``."""

from __future__ import annotations

import ast
import difflib
from pathlib import Path
from typing import Any

from mmengine.config import Config, DictAction

from xtuner_vl.engine.deepspeed_config import CONFIG_ROOT

__all__ = ["DictAction", "copy_config", "dump_config", "find_config", "list_configs", "load_config", "render_config"]


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


# Where each top-level section goes in a copied config, with the comment that opens its block.
_SECTIONS = (
    ("model", "the release directory and the training method (full / LoRA / QLoRA)", ("model_path", "model")),
    ("data", "LLaVA-style sources: annotation files, image folders, repeat times", ("train_dataset",)),
    ("evaluation", "evaluation during training", ("eval_dataset", "evaluation")),
    ("optimization", "optimizer and schedule", ("optim", "schedule")),
    ("loading", "data loading and packing", ("dataloader",)),
    ("runtime", "checkpoints, logging, seed, DeepSpeed", ("runtime",)),
)
_WIDTH = 100


def _render(value: Any, indent: int, names: dict[str, str]) -> str:
    """``value`` as Python source in the config style: ``dict(k=v)``, lists, literals; long ones broken."""
    if isinstance(value, str) and value in names:
        return names[value]  # e.g. model.path written as the model_path variable it came from
    if isinstance(value, dict):
        items = [f"{k}={_render(v, indent + 4, names)}" for k, v in value.items()]
        one = f"dict({', '.join(items)})"
        if len(one) + indent <= _WIDTH and "\n" not in one:
            return one
        pad = " " * (indent + 4)
        return "dict(\n" + "".join(f"{pad}{i},\n" for i in items) + " " * indent + ")"
    if isinstance(value, (list, tuple)):
        items = [_render(v, indent + 4, names) for v in value]
        open_, close = ("[", "]") if isinstance(value, list) else ("(", ",)" if len(value) == 1 else ")")
        one = open_ + ", ".join(items) + close
        if len(one) + indent <= _WIDTH and "\n" not in one:
            return one
        pad = " " * (indent + 4)
        return open_ + "\n" + "".join(f"{pad}{i},\n" for i in items) + " " * indent + close.lstrip(",")
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    raise TypeError(f"{value!r} has no literal form")


def _leaf_header(text: str) -> list[str]:
    """The comment lines that open a config file (its description and official-recipe citation)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def render_config(cfg: Config, source: Path) -> str:
    """The merged config (every ``_base_`` folded in) as one file that reads top to bottom: model, data,
    evaluation, optimization, loading, runtime, then anything else; ``model.path`` written as ``model_path``."""
    values = cfg.to_dict()
    names = {values["model_path"]: "model_path"} if isinstance(values.get("model_path"), str) else {}
    out = [*_leaf_header(source.read_text(encoding="utf-8"))]
    out.append(f"# Copied by `xtuner-vl copy-cfg` from {source.name}, the base files it builds on merged in: every")
    out.append("# setting of the run is in this file. Field reference: docs/en/config.md.")
    blocks = [*_SECTIONS, ("other", "other settings", tuple(k for k in values if k not in _ALL_SECTION_KEYS))]
    for _, comment, keys in blocks:
        present = [k for k in keys if k in values]
        if not present:
            continue
        out += ["", f"# --- {comment}"]
        for key in present:
            local = {} if key == "model_path" else names
            out.append(f"{key} = {_render(values[key], 0, local)}")
    return "\n".join(out) + "\n"


_ALL_SECTION_KEYS = {k for _, _, keys in _SECTIONS for k in keys}


def copy_config(name_or_path: str, out_dir: str | Path) -> Path:
    """Copy a config to ``out_dir`` to edit it, as one self-contained file (:func:`render_config`) that loads
    from anywhere. A config whose values have no literal form (a class as ``type=``) is copied as written
    instead, its ``_base_`` paths made absolute."""
    src = find_config(name_or_path).resolve()
    dst = Path(out_dir) / src.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        text = render_config(Config.fromfile(str(src)), src)
    except TypeError:
        text = _with_absolute_bases(src)
    dst.write_text(text, encoding="utf-8")
    return dst


def _with_absolute_bases(src: Path) -> str:
    """The config's text with its ``_base_`` paths made absolute (relative ones only resolve beside it)."""
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
    return text


def _registered_names(value: Any, where: str, modules: set[str]) -> Any:
    """``value`` with every class given as ``type=`` replaced by its registered name (a saved config is text);
    the classes' modules are added to ``modules``."""
    from xtuner_vl.registry import DATASETS, MODELS

    if isinstance(value, dict):
        return {k: _registered_names(v, f"{where}.{k}", modules) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_registered_names(v, where, modules) for v in value)
    if isinstance(value, type):
        for registry in (MODELS, DATASETS):
            name = next((n for n, cls in registry.module_dict.items() if cls is value), None)
            if name is not None:
                modules.add(value.__module__)
                return name
        raise ValueError(
            f"config {where}: the class {value.__module__}.{value.__qualname__} is not registered, so the run's config "
            "cannot be saved with it; register it (@MODELS.register_module() / @DATASETS.register_module()) and name it"
        )
    return value


def dump_config(cfg: Config, path: str | Path) -> Path:
    """Write the config a run really used (``--cfg-options`` applied) to ``path``, for resume and convert.

    Classes given as ``type=`` are written as their registered names, their modules added to ``custom_imports``
    so that loading the copy registers them again.
    """
    modules: set[str] = set()
    for key in list(cfg.keys()):
        cfg[key] = _registered_names(cfg[key], key, modules)
    modules -= {"xtuner_vl.recipes.model_wrapper", "xtuner_vl.dataset.internvl_dataset"}  # the registries' own
    if modules:
        imports = dict(cfg.get("custom_imports") or {})
        imports["imports"] = sorted(set(imports.get("imports") or []) | modules)
        cfg["custom_imports"] = imports
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(cfg.pretty_text, encoding="utf-8")  # what Config.dump writes for a .py file
    tmp.replace(path)  # never a half-written config beside the checkpoints
    return path
