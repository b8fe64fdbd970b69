"""Low-rank merging of LoRA models: Σ wᵢ·ΔWᵢ without forming the out×in matrices.

Every input layer is turned into flattened factors (up: out×r, down: r×(in·kh·kw)) with its own
scale alpha/r and the recipe weight folded into a coefficient; then, per layer:

* ``concat`` — exact: the factors are stacked (:func:`lorahub.linalg.lowrank.stack`), ranks add up.
* ``svd``    — the stacked factors are QR-factorised, the small core is SVD'd
  (:func:`lorahub.linalg.lowrank.spectrum`) and truncated to ``rank``. This is the best rank-r
  approximation of the exact sum (Eckart–Young) at O((out+in)·R² + R³) cost, R = Σ rᵢ; the full
  matrix is never formed. The Frobenius norm retained is reported per layer and overall.
* ``sum``    — the legacy "same rank, same layers" mix of factors (what kohya's merge_lora does, with
  the coefficient split as √|c| between up and down so each input's own term is exact). It is NOT the
  exact sum (cross terms Uᵢ·Dⱼ appear); its relative error is measured and reported per layer.

Inputs may have different ranks, layers present in only some of them, LoCon conv layers (flattened;
Tucker ``mid`` factors are folded into ``down`` exactly) and negative weights. LyCORIS LoHa/LoKr/full
layers have no plain factors: they are materialised (that one layer) and given exact factors by a
thin SVD, noted in the report. DoRA layers cannot be merged without the base weights and are refused.

With ``svd``, Flux.1 and SD3 LoRAs are merged per module of the family's original layout, as kohya's
svd_merge tools merge them (:func:`lorahub.formats.dit.to_original`): each input's q/k/v (Flux single
blocks: q/k/v + MLP input) are one fused layer, the weighted sum of the fused ΔW is truncated to
``rank`` once, and the result is split back into parts sharing one ``lora_A`` (kohya's writer fuses
them at ``rank``). Parts filters apply to the inputs' own (diffusers) layer keys first.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch

from lorahub.errors import LorahubError
from lorahub.formats.canonical import LoraLayer, LoraModel
from lorahub.linalg import lowrank
from lorahub.linalg.rank import whole
from lorahub.vocab import PARTS

METHODS = ("svd", "concat", "sum")


@dataclass
class MergeInput:
    """One LoRA of a merge: the model, its weight (any real number) and an optional part/layer filter."""

    model: LoraModel
    weight: float = 1.0
    parts: list[str] | None = None  # "unet" / "text_encoder" / "text_encoder_2" or fnmatch patterns on keys
    label: str = ""


class Term:
    """One input layer of a merge: contribution = coef · up @ down (flattened factors).

    Factors are converted to the compute dtype lazily, when the layer is merged, so the float64 copies
    of one layer at a time are in memory, never those of whole models.
    """

    def __init__(self, layer: LoraLayer, weight: float, shape: tuple[int, ...], source: int, dtype):
        self.layer, self.weight, self.shape, self.source, self.dtype = layer, weight, shape, source, dtype
        self._f = None

    def _factors(self):
        if self._f is None:
            up, down, scale, mat = layer_factors(self.layer, self.dtype)
            self._f = (up, down, self.weight * scale, mat)
        return self._f

    @property
    def up(self) -> torch.Tensor:  # (out, r)
        return self._factors()[0]

    @property
    def down(self) -> torch.Tensor:  # (r, in·kh·kw)
        return self._factors()[1]

    @property
    def coef(self) -> float:
        return self._factors()[2]

    @property
    def materialised(self) -> bool:
        return self.layer.kind != "lora"

    @property
    def rank(self) -> int:
        return int(self.up.shape[1]) if self.materialised else int(self.layer.rank)

    def release(self) -> None:
        self._f = None


@dataclass
class LayerReport:
    key: str
    inputs: int  # how many inputs adapt this layer
    rank_in: int  # Σ of the input ranks (stacked rank)
    rank: int  # rank written
    norm: float  # ‖Σ wᵢ ΔWᵢ‖_F (exact)
    retained: float  # ‖merged‖ kept / ‖exact‖ in the Frobenius sense (1.0 for concat)
    rel_error: float  # ‖merged − exact‖_F / ‖exact‖_F
    materialised: bool = False

    def to_dict(self) -> dict:
        return {"key": self.key, "inputs": self.inputs, "rank_in": self.rank_in, "rank": self.rank,
                "norm": self.norm, "retained": self.retained, "rel_error": self.rel_error,
                "materialised": self.materialised}


@dataclass
class MergeResult:
    model: LoraModel
    method: str
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def retained(self) -> float:
        """Overall Frobenius fraction kept: √(Σ kept² / Σ total²) over all layers."""
        tot = sum(r.norm ** 2 for r in self.layers)
        if tot == 0.0:
            return 1.0
        err = sum((r.rel_error * r.norm) ** 2 for r in self.layers)
        return math.sqrt(max(0.0, 1.0 - min(1.0, err / tot)))

    @property
    def rel_error(self) -> float:
        tot = sum(r.norm ** 2 for r in self.layers)
        if tot == 0.0:
            return 0.0
        return math.sqrt(sum((r.rel_error * r.norm) ** 2 for r in self.layers) / tot)

    def summary(self) -> dict:
        ranks = [r.rank for r in self.layers]
        return {"method": self.method, "layers": len(self.layers),
                "rank_min": min(ranks) if ranks else 0, "rank_max": max(ranks) if ranks else 0,
                "retained": self.retained, "rel_error": self.rel_error,
                "materialised_layers": sum(1 for r in self.layers if r.materialised)}

    def to_dict(self) -> dict:
        return {**self.summary(), "per_layer": [r.to_dict() for r in self.layers]}


# --------------------------------------------------------------------------------------------------
# Selecting layers


def layer_selected(key: str, parts: list[str] | None) -> bool:
    """True when ``key`` is kept by a ``parts`` filter (None keeps everything).

    A filter item is a part name (``unet``, ``text_encoder``, ``text_encoder_2``), a key prefix, or an
    fnmatch pattern on the canonical key (``unet.up_blocks.*``, ``*attn2*``).
    """
    if not parts:
        return True
    part = key.split(".", 1)[0]
    for p in parts:
        if p in PARTS:
            if part == p:
                return True
        elif key == p or key.startswith(p.rstrip(".") + ".") or fnmatch.fnmatchcase(key, p):
            return True
    return False


# --------------------------------------------------------------------------------------------------
# Factors of one layer


def _flat_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return int(shape[0]), int(math.prod(shape[1:]))


def layer_factors(layer: LoraLayer, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor, float, bool]:
    """(up (out, r), down (r, in·k·k), scale, materialised) with ΔW = scale · up @ down, flattened.

    Plain LoRA/LoCon: the stored factors (Tucker ``mid`` folded into down exactly). Other kinds: the
    layer's ΔW is materialised and factored by a thin SVD keeping the numerically non-zero part.
    """
    if layer.dora_scale is not None:
        raise LorahubError("DoRA layers cannot be merged without the base weights (dora_scale); "
                           "bake them into a checkpoint with their own tool first")
    if layer.kind == "lora":
        up = layer.up.to(dtype)
        down = layer.down.to(dtype)
        mid = layer.mid
        up2 = up.reshape(up.shape[0], -1)
        if mid is not None:
            # ΔW[o, i, h, w] = Σ_ab up[o,a] mid[a,b,h,w] down[b,i]  ->  down'[a, (i,h,w)]
            d2 = down.reshape(down.shape[0], -1)
            folded = torch.einsum("abhw,bi->aihw", mid.to(dtype), d2)
            down2 = folded.reshape(folded.shape[0], -1)
        else:
            down2 = down.reshape(down.shape[0], -1)
        return up2, down2, layer.scale, False
    d = layer.delta(dtype=dtype)
    mat = d.reshape(d.shape[0], -1)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    tol = (s[0] * max(mat.shape) * torch.finfo(dtype).eps) if s.numel() else 0.0
    k = max(1, int((s > tol).sum())) if s.numel() else 0
    r = torch.sqrt(s[:k])
    return u[:, :k] * r, r[:, None] * vh[:k], 1.0, True


def input_layers(inp: MergeInput, fuse: str | None = None) -> dict[str, LoraLayer]:
    """The layers of one input its parts filter keeps; with ``fuse`` (the inputs' family) a Flux.1/SD3
    input's q/k/v fused into the modules of the family's original layout
    (:func:`lorahub.formats.dit.to_original`; other families' layers as they are)."""
    layers = {k: v for k, v in inp.model.layers.items() if layer_selected(k, inp.parts)}
    if fuse is None:
        return layers
    from lorahub.formats.dit import to_original

    return to_original(LoraModel(layers=layers, base=fuse, arch=inp.model.arch))[0]


def collect_terms(inputs: list[MergeInput], dtype=torch.float64, fuse: str | None = None) -> dict[str, list[Term]]:
    """Per layer key, the weighted flattened factors of every input that adapts it: canonical keys, or
    with ``fuse`` (the inputs' family) Flux.1/SD3 q/k/v as the fused layers of the family's original
    layout (:func:`input_layers`)."""
    terms: dict[str, list[Term]] = {}
    for idx, inp in enumerate(inputs):
        w = float(inp.weight)
        if not math.isfinite(w):
            raise LorahubError(f"input {inp.label or idx + 1}: weight {inp.weight!r} is not a finite number")
        for key, layer in input_layers(inp, fuse).items():
            if layer.dora_scale is not None:
                raise LorahubError(f"{inp.label or f'input {idx + 1}'}: {key}: DoRA layers cannot be merged "
                                   "without the base weights (dora_scale)")
            shape = tuple(int(s) for s in layer.shape)
            terms.setdefault(key, []).append(Term(layer, w, shape, idx, dtype))
    for key, ts in terms.items():
        flats = {_flat_shape(t.shape) for t in ts}
        if len(flats) > 1:
            shapes = ", ".join(f"{inputs[t.source].label or t.source + 1}: {tuple(t.shape)}" for t in ts)
            raise LorahubError(f"{key}: the inputs adapt it with different shapes ({shapes}); "
                               "are they for the same base model?")
    return terms


def _out_shape(ts: list[Term]) -> tuple[int, ...]:
    return max((t.shape for t in ts), key=len)


def _as_layer(up2: torch.Tensor, down2: torch.Tensor, shape: tuple[int, ...], out_dtype,
              alpha: float | None = None) -> LoraLayer:
    """A plain LoRA layer with ΔW = up2 @ down2. With ``alpha`` given, the factors are rescaled by
    √(k/alpha) so that alpha/k · up · down is still ΔW: every layer of a merge then carries the same
    alpha, which loaders that drop per-layer alphas (or take the most common one) still apply right."""
    k = int(up2.shape[1])
    if alpha is None:
        alpha = float(k)
    elif k != alpha:
        c = math.sqrt(k / alpha)
        up2, down2 = up2 * c, down2 * c
    if len(shape) == 4:
        up = up2.reshape(shape[0], k, 1, 1)
        down = down2.reshape(k, *shape[1:])
    else:
        up, down = up2, down2
    return LoraLayer(kind="lora", weights={"down": down.to(out_dtype).contiguous(),
                                           "up": up.to(out_dtype).contiguous()}, alpha=float(alpha))


def _exact_norm(ts: list[Term]) -> float:
    u, d = lowrank.stack([(t.up, t.down, t.coef) for t in ts])
    return lowrank.frobenius_norm(u, d)


def _diff_norm(up_a, down_a, ts: list[Term]) -> float:
    """‖up_a·down_a − Σ coef·up·down‖_F, all factored."""
    u, d = lowrank.stack([(up_a, down_a, 1.0)] + [(t.up, t.down, -t.coef) for t in ts])
    return lowrank.frobenius_norm(u, d)


# --------------------------------------------------------------------------------------------------
# The merge


def check_families(inputs: list[MergeInput], base: str | None = None) -> str:
    """The common base family of the inputs (and ``base``), ignoring 'unknown'; refuse a mix."""
    fams: dict[str, list[str]] = {}
    for i, inp in enumerate(inputs):
        b = inp.model.base or "unknown"
        if b != "unknown":
            fams.setdefault(b, []).append(inp.label or f"input {i + 1}")
    if base and base != "unknown":
        fams.setdefault(base, []).insert(0, "the recipe's base")
    if len(fams) > 1:
        desc = "; ".join(f"{fam}: {', '.join(who)}" for fam, who in fams.items())
        raise LorahubError(f"the LoRAs are for different base families ({desc}); refusing to merge")
    return next(iter(fams), "unknown")


def validate(inputs: list[MergeInput], *, method: str = "svd", rank: int | None = None,
             base: str | None = None, compute_dtype: torch.dtype = torch.float64
             ) -> tuple[str, dict[str, list[Term]]]:
    """Every check :func:`merge` makes before computing (cheap: factors are not converted yet).
    Returns (base family, terms per layer key: the layers :func:`merge` reports, one per fused
    module of a Flux.1/SD3 svd merge)."""
    if method not in METHODS:
        raise LorahubError(f"unknown merge method {method!r} (choose {', '.join(METHODS)})")
    if not inputs:
        raise LorahubError("nothing to merge: give at least one LoRA")
    if method == "svd":
        if rank is None:
            raise LorahubError("method 'svd' needs a rank (e.g. rank 64)")
        whole(rank, "rank")
    family = check_families(inputs, base)
    terms = collect_terms(inputs, compute_dtype, fuse=family if method == "svd" else None)
    if not terms:
        raise LorahubError("the inputs have no LoRA layers to merge (check the parts filters)")
    if method == "sum":
        _check_sum(inputs, terms)
    return family, terms


def merge(inputs: list[MergeInput], *, method: str = "svd", rank: int | None = None,
          out_dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype = torch.float64,
          base: str | None = None, on_layer=None) -> MergeResult:
    """Merge ``inputs`` into one LoRA. ``rank`` is required for ``svd``; ignored by concat/sum.

    Output layers are plain LoRA layers sharing one alpha (the svd rank, else the largest layer rank),
    with the factors rescaled so that alpha/rank · up · down is the merged ΔW. With ``svd``, Flux.1/SD3
    q/k/v are merged as the fused layers of the family's original layout (reported as
    ``transformer.<original path>``, written back as parts sharing one ``lora_A``).
    ``on_layer(key)`` is called after each (reported) layer (progress).
    """
    family, terms = validate(inputs, method=method, rank=rank, base=base, compute_dtype=compute_dtype)

    # one alpha for every output layer (see _as_layer)
    if method == "svd":
        alpha = float(rank)
    elif method == "concat":
        alpha = float(max(sum(t.rank for t in ts) for ts in terms.values()))
    else:
        alpha = float(max(ts[0].rank for ts in terms.values()))
    archs = {inp.model.arch for inp in inputs}  # the inputs' shared module list names the output too
    out = LoraModel(base=family, source_format="lorahub-merge", arch=archs.pop() if len(archs) == 1 else "unknown")
    result = MergeResult(model=out, method=method)
    for key in sorted(terms):
        ts = terms[key]
        shape = _out_shape(ts)
        rank_in = sum(t.rank for t in ts)
        mat = any(t.materialised for t in ts)
        if all(t.coef == 0.0 for t in ts):
            if on_layer:
                on_layer(key)
            continue
        if method == "concat":
            norm = _exact_norm(ts)
            up2, down2 = lowrank.stack([(t.up, t.down, t.coef) for t in ts])
            rep = LayerReport(key, len(ts), rank_in, int(up2.shape[1]), norm, 1.0, 0.0, mat)
        elif method == "svd":
            up_s, down_s = lowrank.stack([(t.up, t.down, t.coef) for t in ts])
            sp = lowrank.spectrum(up_s, down_s, dtype=compute_dtype)
            k = max(1, min(int(rank), int(sp.S.numel())))
            up2, down2 = lowrank.split(sp, k)
            zero = ~up_s.ne(0).any(dim=1)  # rows no input adapts stay exactly zero (not QR rounding)
            if bool(zero.any()):
                up2 = up2.clone()
                up2[zero] = 0
            kept = lowrank.retained(sp.S, k)
            norm = float(torch.linalg.vector_norm(sp.S))
            rep = LayerReport(key, len(ts), rank_in, k, norm, kept,
                              math.sqrt(max(0.0, 1.0 - kept * kept)), mat)
        else:  # sum
            norm = _exact_norm(ts)
            ups, downs = [], []
            for t in ts:
                s = math.sqrt(abs(t.coef))
                ups.append(t.up * (s if t.coef >= 0 else -s))
                downs.append(t.down * s)
            up2, down2 = sum(ups), sum(downs)
            err = _diff_norm(up2, down2, ts)
            rel = err / norm if norm > 0 else 0.0
            rep = LayerReport(key, len(ts), rank_in, int(up2.shape[1]), norm,
                              math.sqrt(max(0.0, 1.0 - min(1.0, rel * rel))), rel, mat)
        out.layers[key] = _as_layer(up2, down2, shape, out_dtype, alpha)
        result.layers.append(rep)
        for t in ts:
            t.release()  # free this layer's compute-dtype copies
        if on_layer:
            on_layer(key)
    if method == "svd":
        from lorahub.formats.dit import to_original

        # fused layers back to their parts: back() depends only on the family's layout
        back = to_original(LoraModel(base=family, arch=out.arch))[1]
        out.layers = dict(sorted(back(out.layers).layers.items()))
    return result


def _check_sum(inputs: list[MergeInput], terms: dict[str, list[Term]]) -> None:
    n = len(inputs)
    for key, ts in terms.items():
        if len(ts) != n:
            missing = sorted({inputs[i].label or str(i + 1) for i in range(n)} -
                             {inputs[t.source].label or str(t.source + 1) for t in ts})
            raise LorahubError(f"method 'sum' needs every layer in every input; {key} is missing from "
                               f"{', '.join(missing)} (use method concat or svd)")
        if any(t.materialised for t in ts):
            raise LorahubError(f"method 'sum' needs plain LoRA layers; {key} is LyCORIS "
                               "(use method concat or svd)")
        ranks = {t.rank for t in ts}
        if len(ranks) > 1:
            raise LorahubError(f"method 'sum' needs the same rank in every input; {key} has ranks "
                               f"{sorted(ranks)} (use method concat or svd)")


def exact_delta(inputs: list[MergeInput], key: str, dtype=torch.float64) -> torch.Tensor | None:
    """Σ wᵢ ΔWᵢ of one layer, materialised (reference for tests and the bake)."""
    acc = None
    for inp in inputs:
        layer = inp.model.layers.get(key)
        if layer is None or not layer_selected(key, inp.parts):
            continue
        d = layer.delta(dtype=dtype) * float(inp.weight)
        acc = d if acc is None else acc + d.reshape(acc.shape)
    return acc
