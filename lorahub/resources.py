"""Locate the data folders shipped with lorahub (migrations, fixture configs).

In a source checkout (editable install) they are the top-level ``registry/`` and ``fixtures/``
folders; in a wheel they are force-included as ``lorahub/_registry`` and ``lorahub/_fixtures``.
"""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _find(packaged: str, source: str) -> Path:
    for cand in (_PKG / packaged, _PKG.parent / source):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"lorahub data folder {source!r} is missing from this installation")


def migrations_dir() -> Path:
    return _find("_registry", "registry") / "migrations"


def fixtures_dir() -> Path:
    return _find("_fixtures", "fixtures")
