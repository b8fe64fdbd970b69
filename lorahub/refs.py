"""One resolver for "a registry reference or a file": LoRAs (:func:`resolve_lora`) and base models
(:func:`resolve_model`).

A reference that names an existing file (or folder, for a model) is that file. One that *looks like*
a path (a separator, or a LoRA file suffix: :func:`lorahub.vocab.looks_like_path`) but names nothing is
reported as a missing file. Anything else is a registry reference (id, name, hash prefix), resolved by
:meth:`lorahub.registry.Registry.resolve`. The registry is opened only when a reference needs it
(:class:`LazyRegistry`), so work on plain files never creates a registry home.

Standard library only at module level.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator

from lorahub.errors import LorahubError, NotFound
from lorahub.vocab import TINY_MODELS, looks_like_path

MODEL_HINT = "a diffusers folder, a .safetensors checkpoint, a registry checkpoint, tiny-sd1 or tiny-sdxl"


class LazyRegistry:
    """A registry given by the caller, or opened from a home folder the first time it is needed.

    ``source``: an open :class:`~lorahub.registry.Registry`, a home folder, or None (the default home,
    ``$LORAHUB_HOME`` or ``~/.lorahub``). :meth:`close` closes only a registry this object opened.
    """

    def __init__(self, source=None):
        from_registry = source is not None and not isinstance(source, (str, os.PathLike))
        self._reg = source if from_registry else None
        self._home = None if from_registry else source
        self._owned = False

    @classmethod
    @contextmanager
    def using(cls, source) -> Iterator["LazyRegistry"]:
        """``with LazyRegistry.using(registry) as regs:`` -- a registry opened here is closed on exit;
        a LazyRegistry passed in is used as it is (its owner closes it)."""
        if isinstance(source, LazyRegistry):
            yield source
            return
        with cls(source) as regs:
            yield regs

    @property
    def is_open(self) -> bool:
        return self._reg is not None

    def get(self):
        """The registry (opened now if needed)."""
        if self._reg is None:
            from lorahub.registry import Registry

            self._reg = Registry.open(self._home)
            self._owned = True
        return self._reg

    def close(self) -> None:
        if self._owned and self._reg is not None:
            self._reg.close()
            self._reg, self._owned = None, False

    def __enter__(self) -> "LazyRegistry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class LoraRef:
    """A resolved LoRA reference."""

    ref: str                  # as given
    path: Path                # the file to read (a registry entry's stored blob)
    entry: dict | None = None  # the registry entry, when the reference named one (or the file is registered)
    triggers: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """Display name: the entry's name, else the file's stem."""
        return self.entry["name"] if self.entry else self.path.stem

    @cached_property
    def sha256(self) -> str:
        if self.entry:
            return self.entry["sha256"]
        from lorahub.hashing import sha256_file

        return sha256_file(self.path)

    @property
    def parent(self) -> str:
        """What lineage records as the parent: the entry id, else the file's SHA-256."""
        return self.entry["id"] if self.entry else self.sha256


def resolve_lora(ref: str | os.PathLike, registry=None, *, folder: Path | None = None,
                 match_registered: bool = False) -> LoraRef:
    """Resolve ``ref`` to a LoRA / embedding file.

    ``registry``: a :class:`LazyRegistry`, a Registry, a home folder or None (default home).
    ``folder``: relative paths are tried there first (a recipe's folder), then in the current folder.
    ``match_registered``: when the registry is already open, a file that is registered gets its entry.
    """
    ref = str(ref)
    p = Path(ref).expanduser()
    candidates = [folder / p] if folder is not None and not p.is_absolute() else []
    with LazyRegistry.using(registry) as regs:
        for c in candidates + [p]:
            if c.is_file():
                out = LoraRef(ref, c)
                entry = regs.get().find_sha256(out.sha256) if match_registered and regs.is_open else None
                if entry is not None:
                    out.entry, out.triggers = entry, list(entry.get("triggers") or [])
                return out
            if c.exists():
                raise LorahubError(f"{ref}: is a folder, not a LoRA file")
        if looks_like_path(ref):
            raise NotFound(f"{ref}: no such file")
        reg = regs.get()
        entry = reg.resolve(ref)
        if entry.get("kind") == "checkpoint":
            raise LorahubError(f"{ref}: is a checkpoint, not a LoRA")
        return LoraRef(ref, Path(reg.blob_path(entry)), entry, list(entry.get("triggers") or []))


@dataclass
class ModelRef:
    """A resolved base-model reference."""

    ref: str
    path: Path                 # a diffusers folder or a single-file checkpoint
    entry: dict | None = None  # the registry checkpoint entry, when the reference named one

    @property
    def name(self) -> str:
        return self.entry["name"] if self.entry else self.ref


def resolve_model(ref: str | os.PathLike, registry=None) -> ModelRef:
    """Resolve ``ref`` to a model: tiny-sd1 / tiny-sdxl (built on first use), a diffusers folder, a
    single-file checkpoint, or a registry checkpoint entry. Nothing is downloaded."""
    ref = str(ref)
    if ref in TINY_MODELS:
        from lorahub import tiny

        return ModelRef(ref, tiny.ensure(TINY_MODELS[ref]))
    p = Path(ref).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "model_index.json").exists() and not (p / "config.json").exists():
            raise LorahubError(f"{ref}: folder is not a diffusers model (no model_index.json)")
        return ModelRef(ref, p)
    if looks_like_path(ref):
        raise NotFound(f"{ref}: no such model file or folder (give {MODEL_HINT})")
    with LazyRegistry.using(registry) as regs:
        reg = regs.get()
        entry = reg.resolve(ref)
        if entry.get("kind") not in (None, "checkpoint"):
            raise LorahubError(f"{ref}: registry entry {entry['id']} is a {entry.get('kind')}, not a checkpoint")
        return ModelRef(ref, Path(reg.blob_path(entry)), entry)


def needs_registry(ref: str | os.PathLike, *, folder: Path | None = None, model: bool = False) -> bool:
    """True when resolving ``ref`` would look in the registry (it names no file, folder or tiny model)."""
    ref = str(ref)
    if model and ref in TINY_MODELS:
        return False
    p = Path(ref).expanduser()
    if folder is not None and not p.is_absolute() and (folder / p).exists():
        return False
    return not p.exists() and not looks_like_path(ref)
