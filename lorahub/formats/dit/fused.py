"""Fused layers: one module of a DiT's original layout standing for several diffusers modules.

Flux.1's BFL layout fuses q/k/v into one ``qkv`` linear (and q/k/v + the MLP input into ``linear1`` in
single blocks); SD3's SAI layout fuses q/k/v the same way. A LoRA on a fused module is one layer whose
``up`` stacks the parts' rows; in canonical form (diffusers module paths) it is one layer per part.

Both directions are exact (ΔW of every part unchanged):

* **split** (:func:`split_layer`): each part takes its rows of ``up``. When the up-matrix is
  block-diagonal (each part's rows use their own contiguous range of rank columns, as a fused layer made
  from separately trained parts is), each part takes its own columns of ``up`` and rows of ``down``, with
  alpha scaled so alpha/rank is unchanged. Otherwise every part keeps the *same* ``down`` tensor (one
  object, so writing back recognises the sharing) and the fused layer's alpha.
* **fuse** (:func:`fuse_layers`): parts that share one ``down`` (equal tensors) and one scale fuse into
  one layer of the same rank with the ups stacked (bit for bit what was split). Parts with different
  ``down`` fuse into one layer of rank Σr whose up is block-diagonal (zero blocks): still exact, and the
  result says so (``extra["fusion"] == "block-diagonal"``). A missing part is zero rows.

A ``swap`` module (adaLN modulations whose (shift, scale) halves diffusers stores as (scale, shift))
has its up rows' halves swapped in both directions (the map is its own inverse).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lorahub.errors import FormatError
from lorahub.formats.canonical import LoraLayer


@dataclass(frozen=True)
class Fused:
    """One module of an original layout and the diffusers modules (``parts``, paths relative to the
    block) it stands for. ``dims(out, in) -> rows per part``; ``swap``: swap the halves of ``up``."""

    parts: tuple[str, ...]
    dims: Callable[[int, int], list[int]] | None = None
    swap: bool = False


def one(path: str, swap: bool = False) -> Fused:
    """An original module standing for one diffusers module (``swap``: its ``up`` halves swapped)."""
    return Fused((path,), swap=swap)


def thirds(out: int, inn: int) -> list[int]:
    """q, k, v of equal size."""
    return [out // 3] * 3


def qkv_mlp(out: int, inn: int) -> list[int]:
    """q, k, v of the model width (= in-features) and the rest for the MLP (Flux.1's ``linear1``)."""
    return [inn, inn, inn, out - 3 * inn]


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(a; b) -> (b; a) along rows: the (shift, scale) order of the original layouts vs diffusers'."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _copy(layer: LoraLayer, weights: dict, alpha) -> LoraLayer:
    return LoraLayer(kind=layer.kind, weights=weights, alpha=alpha, dora_scale=layer.dora_scale,
                     extra={k: v for k, v in layer.extra.items() if k in ("alpha_dtype", "alpha_shape")})


def single(layer: LoraLayer, swap: bool) -> LoraLayer:
    """A one-part module: the same layer (its up's halves swapped when ``swap``)."""
    if not swap:
        return layer
    if layer.kind != "lora" or layer.up.dim() != 2:
        raise FormatError(f"a {layer.kind} layer on an adaLN modulation cannot be reordered")
    return _copy(layer, {**layer.weights, "up": swap_halves(layer.up)}, layer.alpha)


def _plain(layer: LoraLayer, where: str) -> None:
    if layer.kind != "lora" or layer.mid is not None or layer.down.dim() != 2 or layer.dora_scale is not None:
        raise FormatError(f"{where}: only plain LoRA layers can be split or fused (this one is "
                          f"{'DoRA' if layer.dora_scale is not None else layer.kind})")


def _nonzero(u: torch.Tensor) -> bool:
    """True when ``u`` holds a non-zero value (its first and last columns are looked at first)."""
    return bool(u[:, 0].ne(0).any()) or bool(u[:, -1].ne(0).any()) or bool(u.ne(0).any())


def _block_columns(ups: list[torch.Tensor], rank: int) -> list[tuple[int, int]] | None:
    """Column ranges [a, b) each part's rows use, when they are contiguous, disjoint, in part order and
    cover every rank column (a block-diagonal up); else None."""
    ranges = []
    for u in ups:
        nz = torch.nonzero(u.ne(0).any(dim=0)).flatten()
        if nz.numel() == 0:
            return None
        a, b = int(nz[0]), int(nz[-1]) + 1
        if b - a != nz.numel():
            return None
        ranges.append((a, b))
    if ranges[0][0] != 0 or ranges[-1][1] != rank:
        return None
    if any(ranges[i][1] != ranges[i + 1][0] for i in range(len(ranges) - 1)):
        return None
    return ranges


def split_layer(layer: LoraLayer, spec: Fused, where: str) -> list[LoraLayer | None]:
    """The parts of a fused layer (see the module docstring), in ``spec.parts`` order; None for a part
    whose rows of ``up`` are all zero while others are not (it adapts nothing: the fused module of a
    LoRA without that part)."""
    if len(spec.parts) == 1:
        return [single(layer, spec.swap)]
    _plain(layer, where)
    up, down = layer.up, layer.down
    dims = spec.dims(int(up.shape[0]), int(down.shape[1]))
    if sum(dims) != up.shape[0] or any(d <= 0 for d in dims):
        raise FormatError(f"{where}: up has {up.shape[0]} rows, which do not split into "
                          f"{'/'.join(p.rsplit('.', 1)[-1] for p in spec.parts)}")
    ups = list(torch.split(up, dims, dim=0))
    used = [_nonzero(u) for u in ups]
    if not any(used):  # an all-zero layer (a fresh LoRA): every part, as stored
        used = [True] * len(ups)
    live = [u for u, keep in zip(ups, used) if keep]
    r = int(down.shape[0])
    # block-diagonal needs the first live part off the last column and the last one off the first
    # (two cheap column checks settle the usual dense up before any full scan)
    maybe = len(live) > 1 and r >= len(live) and not bool(live[0][:, -1].ne(0).any()) \
        and not bool(live[-1][:, 0].ne(0).any())
    cols = _block_columns(live, r) if maybe else None
    out: list[LoraLayer | None] = []
    it = iter(cols or [])
    for u, keep in zip(ups, used):
        if not keep:
            out.append(None)
        elif cols is not None:
            a, b = next(it)
            alpha = None if layer.alpha is None else layer.alpha * (b - a) / r
            out.append(_copy(layer, {"down": down[a:b].contiguous(), "up": u[:, a:b].contiguous()}, alpha))
        else:
            out.append(_copy(layer, {"down": down, "up": u.contiguous()}, layer.alpha))
    return out


def fuse_layers(parts: list[LoraLayer | None], spec: Fused, where: str) -> LoraLayer:
    """One layer for a fused module from its parts (None: a part without a layer, zero rows).
    ``extra["fusion"]`` says ``shared`` (one down, same rank) or ``block-diagonal`` (rank Σr), and
    ``extra["fused_ranks"]`` the parts' ranks."""
    if len(spec.parts) == 1:
        return single(parts[0], spec.swap)
    present = [p for p in parts if p is not None]
    if not present:
        raise FormatError(f"{where}: no part to fuse")
    for p in present:
        _plain(p, where)
    first = present[0]
    inn = int(first.down.shape[1])
    dtype = first.up.dtype
    for p in present[1:]:
        dtype = torch.promote_types(dtype, p.up.dtype)
        if int(p.down.shape[1]) != inn:
            raise FormatError(f"{where}: parts adapt inputs of different widths")
    # rows of every part (missing ones from the present parts' sizes)
    rows = []
    for j, p in enumerate(parts):
        if p is not None:
            rows.append(int(p.up.shape[0]))
        else:
            rows.append(_missing_rows(spec, j, parts, inn))
    ranks = [p.rank if p is not None else 0 for p in parts]
    extra = {k: v for k, v in first.extra.items() if k in ("alpha_dtype", "alpha_shape")}
    shared = all(p.down.shape == first.down.shape and p.down.dtype == first.down.dtype
                 and p.scale == first.scale and p.alpha == first.alpha
                 and (p.down is first.down or torch.equal(p.down, first.down)) for p in present[1:])
    if shared:
        r = first.rank
        ups = [p.up.to(dtype) if p is not None else torch.zeros(rows[j], r, dtype=dtype)
               for j, p in enumerate(parts)]
        layer = LoraLayer("lora", {"down": first.down, "up": torch.cat(ups, dim=0)}, alpha=first.alpha, extra=extra)
        layer.extra.update(fusion="shared", fused_ranks=ranks)
        return layer
    scales = {p.scale for p in present}
    common = scales.pop() if len(scales) == 1 else 1.0
    total = sum(ranks)
    down = torch.cat([p.down.to(dtype) for p in present], dim=0)
    up = torch.zeros(sum(rows), total, dtype=dtype)
    r0 = c0 = 0
    for j, p in enumerate(parts):
        if p is not None:
            u = p.up.to(dtype)
            if p.scale != common:
                u = u * (p.scale / common)
            up[r0:r0 + rows[j], c0:c0 + p.rank] = u
            c0 += p.rank
        r0 += rows[j]
    alpha = None if all(p.alpha is None for p in present) and common == 1.0 else common * total
    layer = LoraLayer("lora", {"down": down, "up": up}, alpha=alpha, extra=extra)
    layer.extra.update(fusion="block-diagonal", fused_ranks=ranks)
    return layer


def _missing_rows(spec: Fused, j: int, parts, inn: int) -> int:
    """Rows of a part with no layer: the model width for q/k/v, four times it for Flux's MLP."""
    if spec.dims is thirds:
        return next(int(p.up.shape[0]) for p in parts if p is not None)
    if spec.dims is qkv_mlp:
        return inn if j < 3 else 4 * inn
    raise FormatError("cannot size a missing part")
