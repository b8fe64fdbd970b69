"""Change the rank of an existing LoRA without forming any full matrix.

For a plain (or conv/LoCon) layer ΔW = scale·up·down, the singular values and vectors come from thin QR
factorisations of the two factors plus an SVD of the r×r core (:func:`lorahub.linalg.lowrank.spectrum`);
the new factors keep √S on both sides (:func:`lowrank.split`). The strength is kept: the new alpha is
``old_scale · new_rank`` so that up·down·alpha/rank still equals the truncated ΔW.

Rank selection (:func:`lowrank.choose_rank`): a fixed rank, or the *smallest* k meeting a dynamic
criterion (energy, sv_ratio, sv_fro), always capped by the layer's own size (never an index error when
a layer has fewer singular values than asked). LyCORIS layers (LoHa, LoKr, full diffs, Tucker LoCon) are
materialised (they are small) and re-factored by an exact SVD into plain LoRA layers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from lorahub.errors import LorahubError


def validate_rank_criteria(opts) -> None:
    """Check the rank options shared by resize and extract (``rank``, ``energy``, ``sv_ratio``, ``sv_fro``)."""
    dyn = [k for k in ("energy", "sv_ratio", "sv_fro") if getattr(opts, k) is not None]
    if len(dyn) > 1:
        raise LorahubError("give at most one of --energy, --sv-ratio, --sv-fro")
    if not dyn and opts.rank is None:
        raise LorahubError("give --rank, or a dynamic criterion (--energy, --sv-ratio, --sv-fro)")
    if opts.rank is not None and opts.rank < 1:
        raise LorahubError("--rank must be at least 1")
    if opts.energy is not None and not 0 < opts.energy <= 1:
        raise LorahubError("--energy must be in (0, 1]")
    if opts.sv_fro is not None and not 0 < opts.sv_fro <= 1:
        raise LorahubError("--sv-fro must be in (0, 1]")
    if opts.sv_ratio is not None and opts.sv_ratio < 1:
        raise LorahubError("--sv-ratio must be at least 1")


@dataclass
class RankCriteria:
    """A fixed rank, or one dynamic criterion capped by ``rank`` (shared by resize and extract)."""

    rank: int | None = None        # fixed rank, or the cap with a dynamic criterion
    energy: float | None = None
    sv_ratio: float | None = None
    sv_fro: float | None = None

    @property
    def dynamic(self) -> str | None:
        for k in ("energy", "sv_ratio", "sv_fro"):
            if getattr(self, k) is not None:
                return k
        return None

    def validate(self) -> None:
        validate_rank_criteria(self)


@dataclass
class ResizeOptions(RankCriteria):
    def criterion(self) -> dict:
        dyn = self.dynamic
        if dyn is None:
            return {"rank": self.rank}
        return {dyn: getattr(self, dyn), "max_rank": self.rank}

    def describe(self) -> str:
        dyn = self.dynamic
        return f"{dyn}={getattr(self, dyn)}" + (f" (cap {self.rank})" if self.rank else "") if dyn \
            else f"rank={self.rank}"


@dataclass
class ResizeLayer:
    name: str
    old_rank: int
    new_rank: int
    retained: float   # Frobenius fraction of the layer's ΔW kept
    norm: float       # ‖ΔW‖_F (with the scale)
    how: str          # factored | materialised


@dataclass
class ResizeResult:
    model: object
    layers: list[ResizeLayer]
    notes: list[str] = field(default_factory=list)

    @property
    def retained(self) -> float:
        tot = sum(r.norm ** 2 for r in self.layers)
        if tot == 0:
            return 1.0
        return math.sqrt(min(1.0, sum(r.norm ** 2 * r.retained ** 2 for r in self.layers) / tot))


def resize_layer(layer, opts: ResizeOptions):
    """Resize one canonical layer -> (new LoraLayer, ResizeLayer without name)."""
    import torch

    from lorahub.formats.canonical import LoraLayer
    from lorahub.linalg import lowrank

    if layer.kind == "lora" and layer.mid is None:
        shape = tuple(layer.shape)
        up, down = layer.up, layer.down
        out_dtype = up.dtype if up.is_floating_point() else torch.float32
        sp = lowrank.spectrum(up, down, 1.0)     # unscaled product; the scale goes to alpha
        old_scale = layer.scale
        how = "factored"
    else:
        d = layer.delta(torch.float64)
        shape = tuple(d.shape)
        out_dtype = next(iter(layer.weights.values())).dtype
        A = d.reshape(d.shape[0], -1)
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        sp = lowrank.Spectrum(U=U, S=S, Vh=Vh)
        old_scale = 1.0
        how = "materialised"
    S = sp.S
    k = lowrank.choose_rank(S, **opts.criterion()) if S.numel() else 0
    if k == 0:
        raise LorahubError("layer has no singular values")
    new_up, new_down = lowrank.split(sp, k)
    if len(shape) == 4:
        new_down = new_down.reshape(k, shape[1], shape[2], shape[3])
        new_up = new_up.reshape(shape[0], k, 1, 1)
    new = LoraLayer(kind="lora", weights={"down": new_down.to(out_dtype).contiguous(),
                                          "up": new_up.to(out_dtype).contiguous()},
                    alpha=float(old_scale * k), dora_scale=layer.dora_scale)
    norm = float(torch.sqrt((S.to(torch.float64) ** 2).sum())) * abs(old_scale)
    return new, ResizeLayer(name="", old_rank=layer.rank, new_rank=k, retained=lowrank.retained(S, k),
                            norm=norm, how=how)


def resize(model, opts: ResizeOptions, *, on_layer=None) -> ResizeResult:
    """Resize every layer of a canonical :class:`LoraModel`; embeddings are carried over unchanged."""
    from lorahub.formats.canonical import LoraModel

    opts.validate()
    if not model.layers:
        raise LorahubError("this file has no LoRA layers to resize (an embedding?)")
    out = LoraModel(embeddings=dict(model.embeddings), metadata=dict(model.metadata), base=model.base,
                    source_format=model.source_format)
    if hasattr(model, "arch"):
        out.arch = model.arch
    if hasattr(model, "extra") and isinstance(getattr(model, "extra"), dict):
        out.extra = dict(model.extra)
    reports: list[ResizeLayer] = []
    notes: list[str] = []
    n = len(model.layers)
    for i, (name, layer) in enumerate(model.layers.items()):
        if on_layer:
            on_layer(i, n, name)
        try:
            new, rep = resize_layer(layer, opts)
        except LorahubError as exc:
            raise LorahubError(f"{name}: {exc}") from None
        rep.name = name
        out.layers[name] = new
        reports.append(rep)
    if on_layer:
        on_layer(n, n, "")
    materialised = sum(r.how == "materialised" for r in reports)
    if materialised:
        notes.append(f"{materialised} LyCORIS/Tucker layer(s) re-factored as plain LoRA layers")
    if opts.rank and not opts.dynamic:
        below = sum(r.old_rank < opts.rank or r.new_rank < opts.rank for r in reports)
        if below:
            notes.append(f"{below} layer(s) have fewer than {opts.rank} singular values: kept at their size")
    res = ResizeResult(model=out, layers=reports, notes=notes)
    ranks = [r.new_rank for r in reports]
    out.metadata["lorahub_resize"] = json.dumps({
        "tool": "lorahub resize", "criterion": opts.describe(),
        "method": "QR of both factors + SVD of the r×r core; sqrt(S) split; alpha = old scale × new rank",
        "rank_min": min(ranks), "rank_max": max(ranks),
        "old_rank_max": max(r.old_rank for r in reports),
        "frobenius_retained": round(res.retained, 6),
        "layers": {r.name: {"rank": r.new_rank, "retained": round(r.retained, 6)} for r in reports},
    }, sort_keys=True)
    for key in ("ss_network_dim", "ss_network_alpha"):
        out.metadata.pop(key, None)
    if not opts.dynamic:
        out.metadata["ss_network_dim"] = str(max(ranks))
    return res
