"""One resolver for "a registry reference or a file": LoRAs (:func:`resolve_lora`) and base models
(:func:`resolve_model`).

A reference that names an existing file (or folder, for a model) is that file. One with a path
separator that names nothing is reported as a missing file. Anything else is a registry reference
(id, name, original file name or stem, hash prefix), resolved by
:meth:`lorahub.registry.Registry.resolve`; one that looks like a file name (a LoRA suffix:
:func:`lorahub.vocab.looks_like_path`) and matches no entry is reported as a missing file too. The
registry is opened only when a reference needs it (:class:`LazyRegistry`), and never created to look
a reference up, so work on plain files never creates a registry home.

:func:`parse_weighted` is the one parser of a reference with a strength: ``REF``, ``REF:0.8`` and the
webui prompt tokens ``<lora:NAME:0.8>`` / ``<lyco:NAME:0.8>``, so a prompt's LoRA list can be pasted
as is.

Standard library only at module level.
"""

from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator

from lorahub.errors import LorahubError, NotFound
from lorahub.vocab import TINY_MODELS, has_separator, looks_like_path

MODEL_HINT = ("a diffusers folder, a .safetensors checkpoint, a registry checkpoint, or a built-in tiny model "
              f"({', '.join(TINY_MODELS)})")


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

    def get(self, *, create: bool = True):
        """The registry (opened now if needed). ``create=False``: a home without a registry raises
        :class:`~lorahub.errors.NotFound` instead of being created (looking a reference up)."""
        if self._reg is None:
            from lorahub.registry import Registry

            self._reg = Registry.open(self._home, create=create)
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
        if has_separator(ref):
            raise NotFound(f"{ref}: no such file")
        reg = _lookup_registry(regs, ref)
        entry = reg.resolve(ref)
        if entry.get("kind") == "checkpoint":
            raise LorahubError(f"{ref}: is a checkpoint, not a LoRA")
        return LoraRef(ref, Path(reg.blob_path(entry)), entry, list(entry.get("triggers") or []))


def _lookup_registry(regs: LazyRegistry, ref: str):
    """The registry to look ``ref`` up in; when there is none, say what ``ref`` was not found as."""
    try:
        return regs.get(create=False)
    except NotFound:
        if looks_like_path(ref):
            raise NotFound(f"{ref}: no such file") from None
        raise NotFound(f"no registry entry matches {ref!r} (there is no registry yet)") from None


@dataclass
class WeightedRef:
    """A reference with a strength (:func:`parse_weighted`)."""

    ref: str
    weight: float = 1.0


_PROMPT_TOKEN = re.compile(r"^<\s*(lora|lyco)\s*:(.*)>$", re.IGNORECASE | re.DOTALL)


def _weight(text: str, spec: str) -> float:
    try:
        w = float(text)
    except ValueError:
        raise LorahubError(f"{spec!r}: weight {text!r} is not a number") from None
    if not math.isfinite(w):
        raise LorahubError(f"{spec!r}: weight {text!r} is not a finite number")
    return w


def parse_weighted(spec: str) -> WeightedRef:
    """``REF`` (weight 1), ``REF:WEIGHT`` (the weight after the last colon; a file path that holds a
    colon is taken whole), or a webui prompt token ``<lora:NAME>``, ``<lora:NAME:WEIGHT>``,
    ``<lyco:NAME:WEIGHT>`` (NAME is usually the file stem, which :func:`resolve_lora` accepts).
    Tokens with a separate text-encoder weight or named arguments are refused: lorahub applies one
    strength per LoRA."""
    text = str(spec).strip()
    m = _PROMPT_TOKEN.match(text)
    if m is not None:
        fields = [f.strip() for f in m.group(2).split(":")]
        name = fields[0]
        if not name:
            raise LorahubError(f"{spec!r}: the token names no LoRA")
        if len(fields) == 1:
            return WeightedRef(name)
        if len(fields) > 2 or "=" in fields[1]:
            raise LorahubError(f"{spec!r}: give one strength (<{m.group(1)}:NAME:0.8>); separate text-encoder "
                               "and UNet strengths are not supported")
        return WeightedRef(name, _weight(fields[1], spec))
    ref, sep, w = text.rpartition(":")
    if not sep:
        return WeightedRef(text)
    if not ref:
        raise LorahubError(f"{spec!r}: give REF:WEIGHT, e.g. miku:0.8")
    try:
        return WeightedRef(ref, _weight(w, spec))
    except LorahubError:
        if Path(text).exists():  # a path that happens to contain a colon
            return WeightedRef(text)
        raise


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
    """Resolve ``ref`` to a model: a built-in tiny model (tiny-sd1, tiny-sdxl, tiny-flux, tiny-sd3; built on first use), a diffusers folder, a
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
        try:
            reg = regs.get(create=False)
        except NotFound:
            raise NotFound(f"{ref}: no such model file or folder, and no registry yet (give {MODEL_HINT})") from None
        entry = reg.resolve(ref)
        if entry.get("kind") not in (None, "checkpoint"):
            raise LorahubError(f"{ref}: registry entry {entry['id']} is a {entry.get('kind')}, not a checkpoint")
        return ModelRef(ref, Path(reg.blob_path(entry)), entry)


def needs_registry(ref: str | os.PathLike, *, folder: Path | None = None, model: bool = False) -> bool:
    """True when resolving ``ref`` would look in the registry (it names no file, folder or tiny model;
    a LoRA file name without a folder may be a registered file's name)."""
    ref = str(ref)
    if model and ref in TINY_MODELS:
        return False
    p = Path(ref).expanduser()
    if folder is not None and not p.is_absolute() and (folder / p).exists():
        return False
    if p.exists():
        return False
    return not (looks_like_path(ref) if model else has_separator(ref))
