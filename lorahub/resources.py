"""Data shipped with lorahub: model configs (package data) and the registry's SQL migrations.

* ``lorahub/data/configs/real/*.json`` — the published SD1.5 / SD2.1 / SDXL UNet and CLIP text-encoder
  configs (no weights): every kohya file is read through the module names built from them.
* ``lorahub/data/configs/tiny/*.json`` — the tiny test/demo pipelines (:mod:`lorahub.tiny`).

Both are package data read with :mod:`importlib.resources`, the same way from a checkout and a wheel.
The migrations live in the top-level ``registry/migrations`` folder of the source tree; a wheel
carries them as ``lorahub/_registry/migrations``.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_GROUPS = ("real", "tiny")
_PKG = Path(__file__).resolve().parent


def _configs(group: str):
    from importlib.resources import files

    if group not in CONFIG_GROUPS:
        raise ValueError(f"unknown config group {group!r} (one of {', '.join(CONFIG_GROUPS)})")
    return files("lorahub") / "data" / "configs" / group


def model_config(group: str, name: str) -> dict:
    """The JSON model config ``name`` (without ``.json``) of ``group`` (``real`` or ``tiny``)."""
    return json.loads((_configs(group) / f"{name}.json").read_text(encoding="utf-8"))


def model_config_files(group: str) -> dict[str, bytes]:
    """Every config file of ``group``: ``{file name: bytes}``, sorted by name (for cache fingerprints)."""
    items = sorted((t for t in _configs(group).iterdir() if t.name.endswith(".json")), key=lambda t: t.name)
    return {t.name: t.read_bytes() for t in items}


def migrations_dir() -> Path:
    """The folder of the numbered registry migrations (``NNNN_name.sql``)."""
    for cand in (_PKG / "_registry" / "migrations", _PKG.parent / "registry" / "migrations"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError("the registry migrations are missing from this lorahub installation")
