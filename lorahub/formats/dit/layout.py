"""An original DiT layout (Flux.1's BFL layout, SD3's SAI MMDiT layout) and its map to diffusers module
paths, in both directions, through fused layers (:mod:`lorahub.formats.dit.fused`).

A :class:`Layout` lists, per kind of numbered block, the original module suffixes and the diffusers
modules each stands for, plus the top-level modules. Paths on the original side have no prefix
(``double_blocks.3.img_attn.qkv``); on the diffusers side they are canonical keys (``transformer.…``).
kohya's names are the original paths with dots as underscores after ``lora_unet_``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from lorahub.errors import FormatError
from lorahub.formats.canonical import LoraLayer
from lorahub.formats.dit.fused import Fused, fuse_layers, split_layer

PART = "transformer"


@dataclass
class Block:
    """Numbered blocks: ``orig`` (``double_blocks``) <-> ``canon`` (``transformer_blocks``), and per
    original suffix the fused module it is."""

    orig: str
    canon: str
    modules: dict[str, Fused]


@dataclass
class Layout:
    """A family's original layout: its numbered ``blocks``, its ``top``-level modules, and ``special``
    (block, index, suffix, fused) -> the fused module to use at that index (SD3's last block)."""

    name: str
    blocks: list[Block]
    top: dict[str, Fused]                       # original path -> parts as paths under the transformer
    # special(block, index, suffix, fused) -> the Fused to use there (SD3's last block differs)
    special: Callable | None = None
    _index: dict = field(default_factory=dict, repr=False)

    # ----- lookups ---------------------------------------------------------------------------------
    def index(self) -> dict[str, tuple[str, int]]:
        """Relative canonical template -> (original template, part position); templates hold ``{i}``."""
        if not self._index:
            for b in self.blocks:
                for suffix, f in b.modules.items():
                    for j, p in enumerate(f.parts):
                        self._index[f"{b.canon}.{{i}}.{p}"] = (f"{b.orig}.{{i}}.{suffix}", j)
            for orig, f in self.top.items():
                for j, p in enumerate(f.parts):
                    self._index[p] = (orig, j)
        return self._index

    def spec(self, orig: str) -> Fused | None:
        """The fused module an original path is (None when the layout has no such module)."""
        if orig in self.top:
            return self.top[orig]
        for b in self.blocks:
            m = re.fullmatch(re.escape(b.orig) + r"\.(\d+)\.(.+)", orig)
            if m and m[2] in b.modules:
                f = b.modules[m[2]]
                return self.special(b, int(m[1]), m[2], f) if self.special else f
        return None

    def canonical_parts(self, orig: str) -> list[str]:
        """Canonical keys of the parts of original module ``orig``."""
        f = self.spec(orig)
        if f is None:
            raise FormatError(f"{orig}: not a module of the {self.name} layout")
        if orig in self.top:
            return [f"{PART}.{p}" for p in f.parts]
        for b in self.blocks:
            m = re.fullmatch(re.escape(b.orig) + r"\.(\d+)\.(.+)", orig)
            if m:
                return [f"{PART}.{b.canon}.{m[1]}.{p}" for p in f.parts]
        raise FormatError(f"{orig}: not a module of the {self.name} layout")

    def original_of(self, key: str) -> tuple[str, int] | None:
        """(original path, part position) of canonical key ``key`` (``transformer.…``), None if none."""
        part, _, rest = key.partition(".")
        if part != PART:
            return None
        idx = self.index()
        if rest in idx:
            return idx[rest]
        for b in self.blocks:
            m = re.fullmatch(re.escape(b.canon) + r"\.(\d+)\.(.+)", rest)
            if m:
                hit = idx.get(f"{b.canon}.{{i}}.{m[2]}")
                if hit is not None:
                    return hit[0].replace("{i}", m[1]), hit[1]
        return None

    def from_kohya(self, kname: str) -> str | None:
        """Original path of kohya name ``lora_unet_<flattened path>`` (None when the layout has none)."""
        if not kname.startswith("lora_unet_"):
            return None
        flat = kname[len("lora_unet_"):]
        for orig in self.top:
            if orig.replace(".", "_") == flat:
                return orig
        for b in self.blocks:
            m = re.fullmatch(re.escape(b.orig.replace(".", "_")) + r"_(\d+)_(.+)", flat)
            if m:
                suffix = next((s for s in b.modules if s.replace(".", "_") == m[2]), None)
                if suffix is not None:
                    return f"{b.orig}.{m[1]}.{suffix}"
        return None

    # ----- conversions -----------------------------------------------------------------------------
    def to_original(self, layers: dict[str, LoraLayer]) -> dict[str, LoraLayer]:
        """Transformer layers (canonical keys) as layers keyed by original path, fused where the layout
        fuses (exact; ``extra["fusion"]`` on fused layers). Keys outside the transformer are ignored; a
        transformer module the layout lacks is a FormatError."""
        groups: dict[str, dict[int, LoraLayer]] = {}
        for key, layer in layers.items():
            if not key.startswith(PART + "."):
                continue
            hit = self.original_of(key)
            if hit is None:
                raise FormatError(f"{key}: no module of the {self.name} layout stands for it")
            groups.setdefault(hit[0], {})[hit[1]] = layer
        out = {}
        for orig, parts in groups.items():
            f = self.spec(orig)
            out[orig] = fuse_layers([parts.get(j) for j in range(len(f.parts))], f, orig)
        return out

    def from_original(self, layers: dict[str, LoraLayer]) -> dict[str, LoraLayer]:
        """Layers keyed by original path as canonical layers (one per diffusers module, exact)."""
        out = {}
        for orig, layer in layers.items():
            f = self.spec(orig)
            if f is None:
                raise FormatError(f"{orig}: not a module of the {self.name} layout")
            for key, part in zip(self.canonical_parts(orig), split_layer(layer, f, orig)):
                if part is not None:
                    out[key] = part
        return out
