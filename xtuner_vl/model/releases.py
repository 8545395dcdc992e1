"""Shipped architectures of the official releases, for tools that need a model's shape without its files.

``release_configs/<name>.json`` holds the official ``config.json`` fields of each release (sources in the
README beside them). Nothing here reads weights; :func:`resolve_model_config` prefers a real
``config.json`` and falls back to a shipped one only when the directory does not exist locally.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xtuner_vl.model.configuration import InternVLConfig, read_config

__all__ = ["RELEASE_DIR", "release_names", "release_config", "resolve_model_config"]

RELEASE_DIR = Path(__file__).resolve().parent / "release_configs"


def release_names() -> list[str]:
    """Names of the shipped release architectures (the Hugging Face repository names)."""
    return sorted(p.stem for p in RELEASE_DIR.glob("*.json"))


def release_config(name: str) -> dict[str, Any] | None:
    """The official config.json fields of release ``name`` (case-insensitive), or None if not shipped.

    Our own keys (``_release``, ``_model_card_size_b``) are kept; :func:`InternVLConfig.from_dict` ignores them.
    """
    for stem in release_names():
        if stem.lower() == name.lower():
            return json.loads((RELEASE_DIR / f"{stem}.json").read_text(encoding="utf-8"))
    return None


def resolve_model_config(model_path: str | Path) -> tuple[InternVLConfig, str | None]:
    """``model_path``'s config.json, else the shipped release named like its basename.

    Returns the config and, when the fallback was used, the release name. Raises FileNotFoundError
    when neither exists.
    """
    path = Path(model_path)
    if (path / "config.json").is_file():
        return read_config(path), None
    raw = release_config(path.name)
    if raw is None:
        raise FileNotFoundError(
            f"{path / 'config.json'} does not exist and {path.name!r} is not a shipped release "
            f"({', '.join(release_names())}); point model.path at a downloaded release directory"
        )
    return InternVLConfig.from_dict(raw, source=f"shipped release {raw['_release']}"), raw["_release"]
