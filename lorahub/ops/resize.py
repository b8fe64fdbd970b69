"""Change the rank of an existing LoRA without forming any full matrix.

For a plain (or conv/LoCon) layer ΔW = scale·up·down, the singular values and vectors come from thin QR
factorisations of the two factors plus an SVD of the r×r core (:func:`lorahub.linalg.lowrank.spectrum`);
the new factors keep √S on both sides (:func:`lowrank.split`). The strength is kept: the new alpha is
``old_scale · new_rank`` so that up·down·alpha/rank still equals the truncated ΔW.

Rank selection (:func:`lorahub.linalg.rank.choose_rank`): a fixed rank, or the *smallest* k meeting a dynamic
criterion (energy, sv_ratio, sv_fro), always capped by the layer's own size (never an index error when
a layer has fewer singular values than asked). LyCORIS layers (LoHa, LoKr, full diffs, Tucker LoCon) are
materialised (they are small) and re-factored by an exact SVD into plain LoRA layers.

Flux.1 and SD3 LoRAs are resized per module of the family's original layout, as kohya's tools resize
them (:func:`lorahub.formats.dit.to_original`): q/k/v (Flux single blocks: q/k/v + MLP input) are one
fused layer whose ΔW gets its best rank-k approximation, then split back into parts sharing one
``lora_A``, so kohya's writer fuses them at rank k (not 3k).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from lorahub.errors import LorahubError
from lorahub.linalg.rank import RankCriteria
from lorahub.outputs import Written


@dataclass
class ResizeOptions(RankCriteria):
    """The rank to resize to: a fixed ``rank``, or a dynamic criterion capped by ``rank``."""


@dataclass
class ResizeLayer:
    name: str
    old_rank: int
    new_rank: int
    retained: float   # Frobenius fraction of the layer's ΔW kept
    norm: float       # ‖ΔW‖_F (with the scale)
    how: str          # factored | materialised


@dataclass
class ResizeResult(Written):
    """What :func:`resize` (and :func:`resize_lora`) made: the model, a report per layer, and where
    :func:`resize_lora` wrote (``out``, ``dialect``) and registered it (``entry``, ``created``)."""

    model: object
    layers: list[ResizeLayer]
    notes: list[str] = field(default_factory=list)
    criterion: str = ""

    @property
    def retained(self) -> float:
        tot = sum(r.norm ** 2 for r in self.layers)
        if tot == 0:
            return 1.0
        return math.sqrt(min(1.0, sum(r.norm ** 2 * r.retained ** 2 for r in self.layers) / tot))

    def to_dict(self) -> dict:
        d = {"out": str(self.out) if self.out else None, "format": self.dialect, "criterion": self.criterion,
             "frobenius_retained": self.retained, "notes": self.notes,
             "layers": [{"name": r.name, "old_rank": r.old_rank, "new_rank": r.new_rank, "retained": r.retained}
                        for r in self.layers]}
        if self.entry is not None:
            d["registered"] = self.registered()
        return d


def resize_layer(layer, opts: ResizeOptions):
    """Resize one canonical layer -> (new LoraLayer, ResizeLayer without name)."""
    import torch

    from lorahub.formats.canonical import LoraLayer
    from lorahub.linalg import lowrank
    from lorahub.linalg.rank import choose_rank

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
    k = choose_rank(S, **opts.criterion()) if S.numel() else 0
    if k == 0:
        raise LorahubError("layer has no singular values")
    new_up, new_down = lowrank.split(sp, k)
    if how == "factored":
        # rows of ΔW that are zero stay exactly zero (rounding in the QR leaves ~1e-17 there): a fused
        # layer's missing part is still missing after the resize
        zero = ~up.reshape(up.shape[0], -1).ne(0).any(dim=1)
        if bool(zero.any()):
            new_up = new_up.clone()
            new_up[zero] = 0
    if len(shape) == 4:
        new_down = new_down.reshape(k, shape[1], shape[2], shape[3])
        new_up = new_up.reshape(shape[0], k, 1, 1)
    new = LoraLayer(kind="lora", weights={"down": new_down.to(out_dtype).contiguous(),
                                          "up": new_up.to(out_dtype).contiguous()},
                    alpha=float(old_scale * k), dora_scale=layer.dora_scale)
    norm = float(torch.sqrt((S.to(torch.float64) ** 2).sum())) * abs(old_scale)
    return new, ResizeLayer(name="", old_rank=layer.rank, new_rank=k, retained=lowrank.retained(S, k),
                            norm=norm, how=how)


def resize(model, opts: ResizeOptions, *, on_layer=None, title: str | None = None) -> ResizeResult:
    """Resize every layer of a canonical :class:`LoraModel`; embeddings are carried over unchanged.

    Flux.1/SD3 q/k/v are resized as the fused layers of the family's original layout (one rank-k
    layer each, reported as ``transformer.<original path>``; see the module docstring).

    The result's metadata is what kohya's resize_lora.py writes (:func:`lorahub.formats.kohya.derived_metadata`:
    the new ``ss_network_dim`` / ``ss_network_alpha``, ``Dynamic`` where layers differ, the training
    comment, ModelSpec with ``title`` (default: the input's)), the input's training metadata
    (:func:`kept_metadata`) and the operation (``lorahub_resize``).
    """
    from lorahub.formats import kohya
    from lorahub.formats.dit import to_original

    opts.validate()
    if not model.layers:
        raise LorahubError("this file has no LoRA layers to resize (an embedding?)")
    layers, back = to_original(model)
    reports: list[ResizeLayer] = []
    notes: list[str] = []
    resized = {}
    n = len(layers)
    for i, (name, layer) in enumerate(layers.items()):
        if on_layer:
            on_layer(i, n, name)
        try:
            new, rep = resize_layer(layer, opts)
        except LorahubError as exc:
            raise LorahubError(f"{name}: {exc}") from None
        rep.name = name
        resized[name] = new
        reports.append(rep)
    if on_layer:
        on_layer(n, n, "")
    out = back(resized)
    materialised = sum(r.how == "materialised" for r in reports)
    if materialised:
        notes.append(f"{materialised} LyCORIS/Tucker layer(s) re-factored as plain LoRA layers")
    if opts.rank and not opts.dynamic:
        below = sum(r.old_rank < opts.rank or r.new_rank < opts.rank for r in reports)
        if below:
            notes.append(f"{below} layer(s) have fewer than {opts.rank} singular values: kept at their size")
    res = ResizeResult(model=out, layers=reports, notes=notes, criterion=opts.describe())
    ranks = [r.new_rank for r in reports]
    old_max = max(r.old_rank for r in reports)
    inherited = kept_metadata(model.metadata)
    dyn = opts.dynamic
    # kohya's resize_lora.py wording for the training comment
    note = (f"Dynamic resize with {dyn}: {getattr(opts, dyn)} from {old_max}" if dyn
            else f"dimension is resized from {old_max} to {opts.rank}")
    meta = kohya.derived_metadata(out, title=title or inherited.get("modelspec.title") or "LoRA", inherited=inherited)
    meta["ss_training_comment"] = kohya.training_comment(inherited, note)
    meta["lorahub_resize"] = json.dumps({
        "tool": "lorahub resize", "criterion": opts.describe(),
        "method": "QR of both factors + SVD of the r×r core; sqrt(S) split; alpha = old scale × new rank",
        "rank_min": min(ranks), "rank_max": max(ranks),
        "old_rank_max": old_max,
        "frobenius_retained": round(res.retained, 6),
        "layers": {r.name: {"rank": r.new_rank, "retained": round(r.retained, 6)} for r in reports},
    }, sort_keys=True)
    out.metadata = meta
    return res


# lorahub's per-layer records of an earlier operation: they describe the input's layers, not the result's
STALE_RECORDS = ("lorahub_resize", "lorahub_extract_layers")
# kohya fields naming a model file: kohya records the file name, never a local path
FILE_NAME_FIELDS = ("ss_sd_model_name", "ss_vae_name")


def kept_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The input's metadata that still describes a result made from it (kohya's training metadata,
    ModelSpec, lorahub's extract record), without lorahub's per-layer records of earlier operations;
    model paths in kohya's fields are reduced to file names (as kohya writes them)."""
    import ntpath

    out = {k: v for k, v in metadata.items() if k not in STALE_RECORDS}
    for k in FILE_NAME_FIELDS:
        if isinstance(out.get(k), str):
            out[k] = ntpath.basename(out[k])  # either separator
    return out


def resize_lora(lora: str | os.PathLike, *, rank: int | None = None, energy: float | None = None,
                sv_ratio: float | None = None, sv_fro: float | None = None, out: str | os.PathLike | None = None,
                dialect: str | None = None, register: bool = False, name: str | None = None,
                type: str | None = None, triggers: list[str] | None = None, force: bool = False,
                registry=None, on_layer=None) -> ResizeResult:
    """Resize the LoRA ``lora`` (a file or a registry reference) and write it to ``out``.

    The rank: a fixed ``rank``, or one dynamic criterion (``energy``, ``sv_ratio``, ``sv_fro``; see
    :class:`lorahub.linalg.rank.RankCriteria`) capped by ``rank``. ``out`` defaults to
    ``<name>-<r8|energy|sv-ratio|sv-fro>.safetensors`` in the current folder; ``dialect`` to the input's
    own (kohya when it has none of kohya | diffusers | peft). ``register`` adds the result to the
    registry (lineage: resized-from), with the input entry's type and triggers unless given.
    ``registry``: a Registry, a home folder, or None (the default home, opened only when needed).
    ``on_layer(i, n, name)`` reports progress.
    """
    from lorahub.formats.io import check_dialect, load_lora, save_lora
    from lorahub.lineage import Parent, register_derived
    from lorahub.outputs import check_output, default_output
    from lorahub.refs import LazyRegistry, resolve_lora
    from lorahub.vocab import DIALECTS

    opts = ResizeOptions(rank=rank, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro)
    opts.validate()
    if dialect is not None:
        check_dialect(dialect)
    with LazyRegistry.using(registry) as regs:
        src = resolve_lora(lora, regs)
        model = load_lora(src.path)
        if dialect is None:
            dialect = model.source_format if model.source_format in DIALECTS else "kohya"
        out = check_output(out if out is not None else default_output(f"{src.name}-{opts.tag()}", ".safetensors"),
                           force=force, inputs=[src.path], suffixes=(".safetensors",))
        res = resize(model, opts, on_layer=on_layer, title=name or Path(out).stem)
        save_lora(res.model, out, dialect=dialect)
        res.out, res.dialect = out, dialect
        if register:
            entry = src.entry or {}
            res.entry, res.created = register_derived(
                regs.get(), out, relation="resized-from", parents=[Parent(src.parent)],
                detail={"criterion": res.criterion, "frobenius_retained": round(res.retained, 6),
                        "source": src.name},
                name=name, type=type or entry.get("type"), triggers=triggers or entry.get("triggers"),
                base=model.base, description=f"resized from {src.name} ({res.criterion})", source="lorahub")
    return res
