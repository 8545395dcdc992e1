"""Load MMEngine configs by file or by name (files under ``configs/``), with ``--cfg-options``."""

from __future__ import annotations

from pathlib import Path

from mmengine.config import Config, DictAction

from xtuner_vl.engine.deepspeed_config import CONFIG_ROOT

__all__ = ["DictAction", "find_config", "list_configs", "load_config"]


def list_configs(pattern: str | None = None) -> list[str]:
    """Names of the shipped configs (``configs/**/*.py`` minus ``_base_`` parts), filtered by substring."""
    names = sorted(p.stem for p in CONFIG_ROOT.rglob("*.py") if "_base_" not in p.parts)
    return [n for n in names if pattern is None or pattern.lower() in n.lower()]


def find_config(name_or_path: str) -> Path:
    """A path as given, or the unique shipped config with that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    matches = [p for p in CONFIG_ROOT.rglob(f"{path.stem}.py") if "_base_" not in p.parts]
    if len(matches) != 1:
        hint = ", ".join(list_configs(path.stem)[:10]) or "none"
        raise FileNotFoundError(
            f"config {name_or_path!r}: no such file and {len(matches)} shipped configs match "
            f"(similar: {hint}); see `xtuner-vl list-cfg`"
        )
    return matches[0]


def load_config(name_or_path: str, cfg_options: dict | None = None) -> Config:
    cfg = Config.fromfile(str(find_config(name_or_path)))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg
