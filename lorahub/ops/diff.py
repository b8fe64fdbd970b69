"""`lorahub diff A B`: do two LoRAs touch the same weights in the same directions?

For every layer both files adapt we report
  * cosine similarity  ⟨ΔW_A, ΔW_B⟩_F / (‖ΔW_A‖_F·‖ΔW_B‖_F)   (sign matters: −1 means they cancel),
  * norm ratio         ‖ΔW_B‖_F / ‖ΔW_A‖_F,
  * subspace overlap   of the principal output (column) and input (row) directions: with Ua, Ub the
    orthonormal left singular vectors that carry 90 % of each update's energy,
    ‖Uaᵀ·Ub‖²_F / min(ka, kb) ∈ [0, 1]; two random subspaces score about max(ka, kb)/n ("chance").
Two updates can have cosine ≈ 0 yet share their subspaces (different mixes of the same directions):
the overlap answers "will merging them interfere?", the cosine "do they push the same way?".

Plain LoRA layers are handled from the factors only (r_A×r_B Gram products, QR of the factors);
LoHa/LoKr/full layers are materialised.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorahub.errors import LorahubError
from lorahub.formats.canonical import LoraLayer, LoraModel
from lorahub.linalg import lowrank
from lorahub.ops.inspect import (ENERGIES, _flat2, _is_finite, as_factors, block_of, check_layer,
                                 effective_rank, layer_type, match_layers)

OVERLAP_ENERGY = ENERGIES[0]


@dataclass
class LayerDiff:
    key: str
    block: str
    type: str
    status: str  # "ok" | "shape-mismatch" | "nonfinite" | "zero"
    shape_a: list[int]
    shape_b: list[int]
    norm_a: float | None = None
    norm_b: float | None = None
    cosine: float | None = None
    norm_ratio: float | None = None  # ‖B‖/‖A‖
    overlap_out: float | None = None
    overlap_in: float | None = None
    chance_out: float | None = None
    chance_in: float | None = None
    k_a: int | None = None
    k_b: int | None = None
    materialised: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _shape(layer: LoraLayer) -> list[int]:
    try:
        return [int(s) for s in layer.shape]
    except (ValueError, KeyError):
        return []


def _principal(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    k = effective_rank(S, OVERLAP_ENERGY)
    return U[:, :k], Vh[:k].T, k


def _factored_pair(fa, fb) -> dict:
    ua, da, sa = fa
    ub, db, sb = fb
    ua2, da2 = lowrank.as_matrices(ua.to(torch.float32), da.to(torch.float32))
    ub2, db2 = lowrank.as_matrices(ub.to(torch.float32), db.to(torch.float32))
    na = lowrank.frobenius_norm(ua2, da2, sa)
    nb = lowrank.frobenius_norm(ub2, db2, sb)
    ip = lowrank.inner_product(ua2, da2, ub2, db2, sa, sb, dtype=torch.float64)
    out = {"norm_a": na, "norm_b": nb, "inner": ip}
    if na > 0 and nb > 0:
        spa = lowrank.spectrum(ua2, da2, sa, dtype=torch.float64)
        spb = lowrank.spectrum(ub2, db2, sb, dtype=torch.float64)
        out["pa"] = _principal(spa.U, spa.S, spa.Vh)
        out["pb"] = _principal(spb.U, spb.S, spb.Vh)
    return out


def _dense_pair(la: LoraLayer, lb: LoraLayer) -> dict:
    # LoHa / LoKr / full: no factored form, materialise both updates (layer-sized).
    a = la.delta(torch.float64)
    b = lb.delta(torch.float64)
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    na = float(torch.linalg.vector_norm(a))
    nb = float(torch.linalg.vector_norm(b))
    out = {"norm_a": na, "norm_b": nb, "inner": float(torch.sum(a * b))}
    if na > 0 and nb > 0:
        Ua, Sa, Vha = torch.linalg.svd(a, full_matrices=False)
        Ub, Sb, Vhb = torch.linalg.svd(b, full_matrices=False)
        out["pa"] = _principal(Ua, Sa, Vha)
        out["pb"] = _principal(Ub, Sb, Vhb)
    return out


def diff_layer(key: str, la: LoraLayer, lb: LoraLayer, family: str | None = None) -> LayerDiff:
    check_layer(key, la)
    check_layer(key, lb)
    sa, sb = _shape(la), _shape(lb)
    d = LayerDiff(key=key, block=block_of(key, family), type=layer_type(key), status="ok", shape_a=sa, shape_b=sb)
    if not sa or not sb or _flat2(sa) != _flat2(sb):
        d.status = "shape-mismatch"
        return d
    if not (_is_finite(la) and _is_finite(lb)):
        d.status = "nonfinite"
        return d
    fa, fb = as_factors(la), as_factors(lb)
    if fa is not None and fb is not None:
        r = _factored_pair(fa, fb)
    else:
        try:
            r = _dense_pair(la, lb)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise LorahubError(f"layer {key}: inconsistent factors: {exc}") from None
        d.materialised = True
    d.norm_a, d.norm_b = r["norm_a"], r["norm_b"]
    if d.norm_a == 0.0 or d.norm_b == 0.0:
        d.status = "zero"
        d.norm_ratio = (d.norm_b / d.norm_a) if d.norm_a > 0 else None
        return d
    d.cosine = max(-1.0, min(1.0, r["inner"] / (d.norm_a * d.norm_b)))
    d.norm_ratio = d.norm_b / d.norm_a
    (ua, va, ka), (ub, vb, kb) = r["pa"], r["pb"]
    d.k_a, d.k_b = ka, kb
    d.overlap_out = lowrank.subspace_overlap(ua, ub)
    d.overlap_in = lowrank.subspace_overlap(va, vb)
    out_dim, in_dim = _flat2(sa)
    d.chance_out = min(1.0, max(ka, kb) / out_dim)
    d.chance_in = min(1.0, max(ka, kb) / in_dim)
    return d


def verdict(summary: dict) -> str:
    """One line answering "do these two LoRAs touch the same directions?"."""
    if summary["common"] == 0:
        return "no layers in common: the two LoRAs adapt disjoint modules (no interference when merged)"
    cos = summary["cosine"]
    ov = summary["overlap"]
    ch = summary["chance"]
    if cos is None or ov is None:
        return "nothing comparable: the shared layers are zero, non-finite or of different shapes"
    if abs(cos) >= 0.5:
        way = "the same way" if cos > 0 else "opposite ways (they largely cancel)"
        return (f"strongly aligned: the updates push {way} (cosine {cos:+.2f}); merging them mostly "
                "changes the overall strength")
    if ov >= max(0.5, 4 * ch):
        return (f"same directions, different mixes: principal subspaces overlap {ov:.3g} (chance {ch:.3g}) "
                f"though the cosine is {cos:+.2f}; merging will interfere")
    if ov < max(0.1, 2 * ch) and abs(cos) < 0.1:
        return (f"independent: subspace overlap {ov:.3g} (chance {ch:.3g}) and cosine {cos:+.2f} are both "
                "small; merging should not interfere much")
    return (f"partial overlap: subspace overlap {ov:.3g} (chance {ch:.3g}), cosine {cos:+.2f}; expect some "
            "interference when merging")


def diff_models(a: LoraModel, b: LoraModel, *, layers: str | None = None, on_layer=None) -> dict:
    keys_a = match_layers(a.layers, layers)
    keys_b = match_layers(b.layers, layers)
    set_b = set(keys_b)
    set_a = set(keys_a)
    common = [k for k in keys_a if k in set_b]
    only_a = [k for k in keys_a if k not in set_b]
    only_b = [k for k in keys_b if k not in set_a]
    for k in only_a:
        check_layer(k, a.layers[k])
    for k in only_b:
        check_layer(k, b.layers[k])
    diffs: list[LayerDiff] = []
    for k in common:
        diffs.append(diff_layer(k, a.layers[k], b.layers[k], a.base if a.base == b.base else None))
        if on_layer is not None:
            on_layer(k)
    ok = [d for d in diffs if d.status == "ok"]
    ea = sum(d.norm_a ** 2 for d in ok)
    eb = sum(d.norm_b ** 2 for d in ok)
    inner = sum(d.cosine * d.norm_a * d.norm_b for d in ok)
    w = [d.norm_a * d.norm_b for d in ok]
    wsum = sum(w)

    def wmean(vals):
        return sum(wi * v for wi, v in zip(w, vals)) / wsum if wsum > 0 else None

    overlap = wmean([(d.overlap_out + d.overlap_in) / 2 for d in ok])
    chance = wmean([(d.chance_out + d.chance_in) / 2 for d in ok])
    summary = {
        "layers_a": len(keys_a),
        "layers_b": len(keys_b),
        "common": len(common),
        "compared": len(ok),
        "only_a": len(only_a),
        "only_b": len(only_b),
        "shape_mismatch": sum(1 for d in diffs if d.status == "shape-mismatch"),
        "nonfinite": sum(1 for d in diffs if d.status == "nonfinite"),
        "zero": sum(1 for d in diffs if d.status == "zero"),
        # cosine of the two updates seen as one long vector over the compared layers
        "cosine": (inner / math.sqrt(ea * eb)) if ea > 0 and eb > 0 else None,
        "abs_cosine_mean": wmean([abs(d.cosine) for d in ok]),
        "norm_ratio": math.sqrt(eb / ea) if ea > 0 else None,
        "overlap": overlap,
        "overlap_out": wmean([d.overlap_out for d in ok]),
        "overlap_in": wmean([d.overlap_in for d in ok]),
        "chance": chance,
        "energy_a_shared": None,
        "energy_b_shared": None,
    }
    # Share of each LoRA's total energy that lies in layers the other one also adapts.
    def _energy(model: LoraModel, keys: list[str]) -> float:
        from lorahub.ops.inspect import layer_singular_values

        tot = 0.0
        for k in keys:
            layer = model.layers[k]
            if not _is_finite(layer):
                continue
            f = as_factors(layer)
            if f is not None:
                tot += lowrank.frobenius_norm(*f, dtype=torch.float32) ** 2
            else:
                S, _ = layer_singular_values(layer)
                tot += float(torch.sum(S * S))
        return tot

    if ok:
        rest_a = _energy(a, only_a)
        rest_b = _energy(b, only_b)
        summary["energy_a_shared"] = ea / (ea + rest_a) if ea + rest_a > 0 else None
        summary["energy_b_shared"] = eb / (eb + rest_b) if eb + rest_b > 0 else None
    summary["verdict"] = verdict(summary)
    return {
        "summary": summary,
        "per_layer": [d.to_dict() for d in diffs],
        "only_a": only_a,
        "only_b": only_b,
        "layer_filter": layers,
    }


@dataclass
class DiffResult:
    """What :func:`diff_loras` found: the two files and the comparison (see :func:`diff_models`),
    with warnings about comparing LoRAs of different base models."""

    a: Path
    b: Path
    report: dict
    warnings: list[str] = field(default_factory=list)

    @property
    def summary(self) -> dict:
        return self.report["summary"]

    def to_dict(self) -> dict:
        return {**self.report, "a": str(self.a), "b": str(self.b)}


def diff_loras(a: str | os.PathLike, b: str | os.PathLike, *, layers: str | None = None, registry=None,
               on_layer=None) -> DiffResult:
    """Compare the LoRAs ``a`` and ``b`` (files or registry references) layer by layer: cosine
    similarity, norm ratio, overlap of principal directions, layers only one of them adapts.
    ``layers``: only layers whose canonical key matches. ``on_layer(i, n, key)`` reports progress."""
    from lorahub.formats.io import load_lora
    from lorahub.refs import LazyRegistry, resolve_lora

    with LazyRegistry.using(registry) as regs:
        ra, rb = resolve_lora(a, regs), resolve_lora(b, regs)
    ma, mb = load_lora(ra.path), load_lora(rb.path)
    n = len(set(ma.layers) & set(mb.layers))
    done = iter(range(1, n + 1))
    report = diff_models(ma, mb, layers=layers,
                         on_layer=(lambda k: on_layer(next(done), n, k)) if on_layer else None)
    s = report["summary"]
    warnings = []
    if "unknown" not in (ma.base, mb.base) and ma.base != mb.base:
        warnings.append(f"A is a {ma.base} LoRA and B a {mb.base} LoRA: layers with the same name differ in meaning")
    if s["shape_mismatch"]:
        warnings.append(f"{s['shape_mismatch']} shared layer(s) have different shapes (different base models?)")
    if s["nonfinite"]:
        warnings.append(f"{s['nonfinite']} shared layer(s) contain NaN/Inf weights and were skipped")
    return DiffResult(ra.path, rb.path, report, warnings)
