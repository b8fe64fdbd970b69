"""`lorahub inspect`: what a LoRA file contains and how strong it is, layer by layer and block by block.

Per layer we report rank, alpha, scale, ‖ΔW‖_F, the spectral norm ‖ΔW‖₂, the effective rank (how many
singular values carry 90 % / 99 % of Σσ²) and, given base weights, the relative strength
‖ΔW‖_F / ‖W0‖_F. For plain LoRA layers (including Tucker LoCon) everything comes from the factors via
r×r Gram matrices (:func:`lorahub.linalg.lowrank.gram_singular_values`): the out×in matrix is never
formed. LoHa, LoKr and full-diff layers have no cheap low-rank form and ARE materialised (small for
the layer sizes these networks use); the per-layer record says so (``materialised: true``).

Only torch/numpy/safetensors are needed; diffusers is never imported (base weights are read straight
from the safetensors files of a diffusers folder).
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from lorahub.errors import LorahubError
from lorahub.formats.canonical import LoraLayer, LoraModel
from lorahub.formats.names import is_unmapped, map_unmapped, unmapped
from lorahub.linalg import lowrank

ENERGIES = (0.90, 0.99)

# ----------------------------------------------------------------------------------------------------
# Where a layer sits: block (rows of the summary / heat map) and layer type (columns)

_KOHYA_PREFIX = re.compile(r"^lora_(?:unet|te\d?)_")
_UNET_BLOCK = re.compile(r"^(down|up)[._]blocks[._](\d+)[._]")
_UNET_MID = re.compile(r"^mid[._]block[._]")
_TE_LAYER = re.compile(r"^(?:text[._]model[._])?encoder[._](?:layers|block)[._](\d+)[._]")
_ANY_BLOCK = re.compile(r"^([a-z0-9_]*?(?:blocks|layers|block|refiner))[._](\d+)[._]")
_TE_LABEL = {"text_encoder": "te", "text_encoder_2": "te2", "text_encoder_3": "te3"}

LAYER_TYPES = ("self-attn", "cross-attn", "attn", "ff/mlp", "proj", "resnet", "sampler", "other")


def _rest(key: str) -> tuple[str, str]:
    """(part, module path or, for an unmapped key, its kohya name without the prefix)."""
    part, _, rest = key.partition(".")
    if is_unmapped(key):
        rest = _KOHYA_PREFIX.sub("", rest)
    return part, rest


# the DiT families' own names for their numbered blocks (diffusers' names -> the family's)
FAMILY_BLOCKS = {"flux": {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"},
                 "sd3": {"transformer_blocks": "joint_blocks"}}


def block_of(key: str, family: str | None = None) -> str:
    """Block label of a canonical key: down.0 … mid … up.3 and unet.other for a UNet; te.0 …, te2.0 …,
    te3.0 …, te.other for text encoders; for any other model the numbered block the key sits in
    (``transformer_blocks.3``, ``single_transformer_blocks.10``, ``double_blocks.3`` of a kohya Flux file),
    else ``<part>.other``. Unmapped kohya keys are read through their flattened names. With ``family``
    the DiT families' blocks take their own names (:data:`FAMILY_BLOCKS`): Flux.1 ``double_blocks.N`` /
    ``single_blocks.N``, SD3 ``joint_blocks.N``."""
    label = _block_of(key)
    head, _, idx = label.rpartition(".")
    own = FAMILY_BLOCKS.get(family or "", {}).get(head)
    return f"{own}.{idx}" if own else label


def _block_of(key: str) -> str:
    part, rest = _rest(key)
    if part in _TE_LABEL:
        m = _TE_LAYER.match(rest)
        return f"{_TE_LABEL[part]}.{int(m.group(1))}" if m else f"{_TE_LABEL[part]}.other"
    m = _UNET_BLOCK.match(rest)
    if m:
        return f"{m.group(1)}.{int(m.group(2))}"
    if _UNET_MID.match(rest):
        return "mid"
    m = _ANY_BLOCK.match(rest)
    if m:
        return f"{m.group(1)}.{int(m.group(2))}"
    return f"{part}.other" if part else "other"


def block_sort_key(block: str) -> tuple:
    head, _, tail = block.rpartition(".")
    order = {"down": 0, "mid": 1, "up": 2, "unet": 3, "te": 5, "te2": 6, "te3": 7}.get(head, 4)
    if block == "mid":
        head, tail, order = "mid", "", 1
    idx = int(tail) if tail.isdigit() else 10_000
    return (order, head if order == 4 else "", idx, block)


def layer_type(key: str) -> str:
    """Coarse module type of a canonical key (the heat map's columns)."""
    _part, rest = _rest(key)
    k = "." + rest.replace("_", ".") + "."  # one separator for module paths and flattened kohya names
    if ".attn1." in k or ".self.attn." in k:
        return "self-attn"
    if ".attn2." in k or ".cross.attn." in k:
        return "cross-attn"
    if ".attn." in k or ".attention." in k or ".selfattention." in k.lower():
        return "attn"
    if any(w in k for w in (".ff.", ".mlp.", ".ffn.", ".feed.forward.", ".ff.context.", ".linear1.", ".linear2.")):
        return "ff/mlp"
    if k.endswith((".proj.in.", ".proj.out.")) and ".attentions." in k:
        return "proj"
    if ".resnets." in k:
        return "resnet"
    if ".downsamplers." in k or ".upsamplers." in k:
        return "sampler"
    return "other"


def match_layers(keys: Iterable[str], pattern: str | None) -> list[str]:
    """Keys matching PATTERN: a glob when it has * ? or [, else a substring."""
    keys = list(keys)
    if not pattern:
        return keys
    if any(c in pattern for c in "*?["):
        return [k for k in keys if fnmatch.fnmatchcase(k, pattern)]
    return [k for k in keys if pattern in k]


# ----------------------------------------------------------------------------------------------------
# Validation


def _is_finite(layer: LoraLayer) -> bool:
    for t in layer.weights.values():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return False
    if layer.alpha is not None and not math.isfinite(float(layer.alpha)):
        return False
    return True


def check_layer(key: str, layer: LoraLayer) -> None:
    """Raise LorahubError for a layer no tool can use: factor shapes that do not chain, rank 0."""
    w = layer.weights
    if layer.kind == "lora":
        if "down" not in w or "up" not in w:
            raise LorahubError(f"layer {key}: missing {'down' if 'down' not in w else 'up'} factor")
        down, up = w["down"], w["up"]
        if down.dim() < 2 or up.dim() < 2:
            raise LorahubError(f"layer {key}: factors must be matrices (down {tuple(down.shape)}, up {tuple(up.shape)})")
        if down.shape[0] == 0 or up.shape[1] == 0:
            raise LorahubError(f"layer {key}: rank 0 (down {tuple(down.shape)}, up {tuple(up.shape)})")
        if up.shape[1] != down.shape[0]:
            raise LorahubError(f"layer {key}: up {tuple(up.shape)} and down {tuple(down.shape)} do not chain "
                               f"(rank {up.shape[1]} vs {down.shape[0]})")
        if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            raise LorahubError(f"layer {key}: conv up factor must be 1×1, got {tuple(up.shape)}")
        if "mid" in w:
            mid = w["mid"]
            if mid.dim() != 4 or mid.shape[0] != up.shape[1] or mid.shape[1] != down.shape[0]:
                raise LorahubError(f"layer {key}: Tucker mid {tuple(mid.shape)} does not fit "
                                   f"up {tuple(up.shape)} / down {tuple(down.shape)}")
        return
    if layer.kind == "loha":
        for a, b in (("w1a", "w1b"), ("w2a", "w2b")):
            if a not in w or b not in w:
                raise LorahubError(f"layer {key}: LoHa factor {a if a not in w else b} missing")
            if w[a].shape[1] != w[b].shape[0] or w[b].shape[0] == 0:
                raise LorahubError(f"layer {key}: LoHa {a} {tuple(w[a].shape)} and {b} {tuple(w[b].shape)} "
                                   "do not chain" + (" (rank 0)" if w[b].shape[0] == 0 else ""))
        return
    if layer.kind == "lokr":
        for n in ("1", "2"):
            if f"w{n}a" in w and f"w{n}b" in w:
                a, b = w[f"w{n}a"], w[f"w{n}b"]
                if a.shape[1] != b.shape[0] or b.shape[0] == 0:
                    raise LorahubError(f"layer {key}: LoKr w{n}a {tuple(a.shape)} and w{n}b {tuple(b.shape)} do not chain")
        return
    if layer.kind == "full":
        if "diff" not in w:
            raise LorahubError(f"layer {key}: full layer without its diff tensor")
        return
    raise LorahubError(f"layer {key}: unknown layer kind {layer.kind!r}")


# ----------------------------------------------------------------------------------------------------
# Spectra


def as_factors(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(up, down, scale) with ΔW = scale·up·down (conv flattened by the caller), or None for kinds
    without a low-rank factored form (LoHa, LoKr, full)."""
    w = layer.weights
    if layer.kind != "lora":
        return None
    up, down = w["up"], w["down"]
    if "mid" in w:
        # Tucker LoCon: ΔW = up ×₁ mid ×₂ down. Fold mid into down: M[a, i, h, w] = Σ_b mid[a, b, h, w]·down[b, i]
        # is only r×in×kh×kw — still no out×in matrix.
        d2 = down.to(torch.float32).reshape(down.shape[0], -1)
        down = torch.einsum("abhw,bi->aihw", w["mid"].to(torch.float32), d2)
    return up, down, layer.scale


def layer_singular_values(layer: LoraLayer) -> tuple[torch.Tensor, bool]:
    """(singular values of ΔW, descending float64; whether ΔW had to be materialised).

    Non-finite factors give non-finite values (callers check ``torch.isfinite``)."""
    f = as_factors(layer)
    if f is not None:
        up, down, scale = f
        gu, gd = lowrank.grams(up, down)
        # Any NaN/Inf in a factor shows on its Gram's diagonal (Σ x²): a free finiteness check.
        if not (bool(torch.isfinite(gu.diagonal()).all()) and bool(torch.isfinite(gd.diagonal()).all())):
            return torch.full((min(gu.shape[0], 1),), float("nan"), dtype=torch.float64), False
        return lowrank.singular_values_from_grams(gu, gd, scale), False
    # LoHa / LoKr / full: no cheap factored form — materialise ΔW (layer-sized, float32).
    try:
        d = layer.delta(torch.float32)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise LorahubError(f"{layer.kind} layer with inconsistent factors: {exc}") from None
    d = d.reshape(d.shape[0], -1)
    return torch.linalg.svdvals(d).to(torch.float64), True


@dataclass
class LayerStats:
    key: str
    block: str
    type: str
    kind: str
    shape: list[int]
    rank: int
    alpha: float | None
    scale: float
    params: int
    dtype: str
    fro: float | None
    spectral: float | None
    eff_rank_90: int | None
    eff_rank_99: int | None
    base_fro: float | None = None
    rel_strength: float | None = None
    finite: bool = True
    materialised: bool = False
    dora: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def effective_rank(S: torch.Tensor, energy: float) -> int:
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    return lowrank.effective_rank(S, energy)


def layer_stats(key: str, layer: LoraLayer, base_weight: torch.Tensor | None = None,
                family: str | None = None) -> LayerStats:
    check_layer(key, layer)
    # Plain LoRA factors are checked for NaN/Inf through their Grams (layer_singular_values);
    # the other kinds (and alpha) here.
    finite = _is_finite(layer) if layer.kind != "lora" else (
        layer.alpha is None or math.isfinite(float(layer.alpha)))
    try:
        shape = [int(s) for s in layer.shape]
    except (ValueError, KeyError):
        shape = []
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in layer.weights.values()})
    st = LayerStats(key=key, block=block_of(key, family), type=layer_type(key), kind=layer.kind, shape=shape,
                    rank=layer.rank, alpha=None if layer.alpha is None else float(layer.alpha),
                    scale=layer.scale, params=layer.parameter_count(), dtype="/".join(dtypes),
                    fro=None, spectral=None, eff_rank_90=None, eff_rank_99=None, finite=finite,
                    materialised=layer.kind != "lora", dora=layer.dora_scale is not None)
    if not finite:
        return st
    try:
        S, mat = layer_singular_values(layer)
    except LorahubError as exc:
        raise LorahubError(f"layer {key}: {exc}") from None
    st.materialised = mat
    if not bool(torch.isfinite(S).all()):
        st.finite = False
        return st
    st.fro = float(torch.sqrt(torch.sum(S * S)))
    st.spectral = float(S[0]) if S.numel() else 0.0
    st.eff_rank_90 = effective_rank(S, ENERGIES[0])
    st.eff_rank_99 = effective_rank(S, ENERGIES[1])
    if base_weight is not None:
        b = float(torch.linalg.vector_norm(base_weight.to(torch.float64)))
        st.base_fro = b
        st.rel_strength = st.fro / b if b > 0 else None
    return st


# ----------------------------------------------------------------------------------------------------
# Base weights (for relative strength)


def open_base(ref: str, registry=None):
    """The model ``ref`` (see :func:`lorahub.refs.resolve_model`) opened for streaming reads by
    canonical name (:class:`lorahub.ops.checkpoints.Checkpoint`); close it after use."""
    from lorahub.ops.checkpoints import open_checkpoint
    from lorahub.refs import resolve_model

    return open_checkpoint(resolve_model(ref, registry).path)


def _flat2(shape) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    return (shape[0], math.prod(shape[1:]))


# ----------------------------------------------------------------------------------------------------
# Metadata worth showing

_META_FIELDS = [
    ("title", ("modelspec.title", "ssmd_display_name", "ss_output_name")),
    ("author", ("modelspec.author", "ssmd_author")),
    ("trigger", ("modelspec.trigger_phrase", "ssmd_keywords")),
    ("architecture", ("modelspec.architecture",)),
    ("base_model_name", ("ss_sd_model_name",)),
    ("base_model_version", ("ss_base_model_version",)),
    ("network_module", ("ss_network_module",)),
    ("network_dim", ("ss_network_dim",)),
    ("network_alpha", ("ss_network_alpha",)),
    ("network_args", ("ss_network_args",)),
    ("resolution", ("ss_resolution", "modelspec.resolution")),
    ("epochs", ("ss_num_epochs",)),
    ("epoch", ("ss_epoch",)),
    ("steps", ("ss_steps", "ss_max_train_steps")),
    ("train_images", ("ss_num_train_images",)),
    ("batch_size", ("ss_total_batch_size", "ss_batch_size_per_device")),
    ("learning_rate", ("ss_learning_rate",)),
    ("unet_lr", ("ss_unet_lr",)),
    ("text_encoder_lr", ("ss_text_encoder_lr",)),
    ("optimizer", ("ss_optimizer",)),
    ("lr_scheduler", ("ss_lr_scheduler",)),
    ("clip_skip", ("ss_clip_skip",)),
    ("mixed_precision", ("ss_mixed_precision",)),
    ("seed", ("ss_seed",)),
    ("training_started", ("ss_training_started_at",)),
    ("comment", ("ss_training_comment",)),
]

MAX_SHOWN = 400  # characters of one metadata value kept


def _clip(v: str) -> str:
    v = v.replace("\n", " ").strip()
    return v if len(v) <= MAX_SHOWN else v[: MAX_SHOWN - 1] + "…"


def _loads(raw: str | None):
    if not raw or len(raw) > 16 * 1024 * 1024:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def tag_frequency(meta: dict[str, str]) -> list[tuple[str, int]]:
    """Training tags with counts summed over dataset folders, most frequent first (ss_tag_frequency)."""
    freq = _loads(meta.get("ss_tag_frequency"))
    counts: Counter = Counter()
    if isinstance(freq, dict):
        for tags in freq.values():
            if not isinstance(tags, dict):
                continue
            for tag, n in tags.items():
                if isinstance(tag, str) and isinstance(n, (int, float)) and not isinstance(n, bool):
                    t = tag.strip()
                    if t:
                        counts[t] += int(n)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def dataset_dirs(meta: dict[str, str]) -> list[dict]:
    """Training folders with repeats and image counts (ss_dataset_dirs, else ss_datasets subsets)."""
    out = []
    dd = _loads(meta.get("ss_dataset_dirs"))
    if isinstance(dd, dict):
        for name, info in dd.items():
            info = info if isinstance(info, dict) else {}
            out.append({"dir": str(name), "repeats": info.get("n_repeats"), "images": info.get("img_count")})
    if not out:
        ds = _loads(meta.get("ss_datasets"))
        if isinstance(ds, list):
            for d in ds:
                subs = d.get("subsets") if isinstance(d, dict) else None
                for sub in subs if isinstance(subs, list) else []:
                    if isinstance(sub, dict) and sub.get("image_dir"):
                        out.append({"dir": str(sub.get("image_dir")), "repeats": sub.get("num_repeats"),
                                    "images": sub.get("img_count")})
    return out


def metadata_summary(meta: dict[str, str]) -> dict:
    fields: dict[str, str] = {}
    for label, keys in _META_FIELDS:
        for k in keys:
            v = meta.get(k)
            if isinstance(v, str) and v.strip() and v.strip() != "None":
                fields[label] = _clip(v)
                break
    return {"fields": fields, "tags": tag_frequency(meta), "datasets": dataset_dirs(meta),
            "keys": len(meta)}


# ----------------------------------------------------------------------------------------------------
# Whole-model report


def _value_summary(values: list[float | None]) -> dict | float | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    lo, hi = min(vals), max(vals)
    if lo == hi:
        return lo
    return {"min": lo, "median": statistics.median(vals), "max": hi}


def block_summary(stats: list[LayerStats]) -> list[dict]:
    groups: dict[str, list[LayerStats]] = {}
    for s in stats:
        groups.setdefault(s.block, []).append(s)
    out = []
    for block in sorted(groups, key=block_sort_key):
        g = groups[block]
        ok = [s for s in g if s.fro is not None]
        energy = sum(s.fro ** 2 for s in ok)
        base = [s for s in ok if s.base_fro]
        rel = None
        if base:
            rel = math.sqrt(sum(s.fro ** 2 for s in base)) / math.sqrt(sum(s.base_fro ** 2 for s in base))
        out.append({
            "block": block,
            "layers": len(g),
            "params": sum(s.params for s in g),
            "fro_total": math.sqrt(energy) if ok else None,
            "fro_mean": (sum(s.fro for s in ok) / len(ok)) if ok else None,
            "spectral_max": max((s.spectral for s in ok), default=None),
            "eff_rank_90_mean": (sum(s.eff_rank_90 for s in ok) / len(ok)) if ok else None,
            "rel_strength": rel,
            "nonfinite": sum(1 for s in g if not s.finite),
            "types": sorted({s.type for s in g}, key=LAYER_TYPES.index),
        })
    return out


def grid(stats: list[LayerStats], *, relative: bool = False) -> dict:
    """Heat-map data: rows = blocks, cols = layer types, cell = √Σ‖ΔW‖²_F (or its ratio to √Σ‖W0‖²_F)."""
    rows = sorted({s.block for s in stats}, key=block_sort_key)
    cols = [t for t in LAYER_TYPES if any(s.type == t for s in stats)]
    num = {(r, c): 0.0 for r in rows for c in cols}
    den = {(r, c): 0.0 for r in rows for c in cols}
    count = {(r, c): 0 for r in rows for c in cols}
    for s in stats:
        if s.fro is None:
            continue
        if relative and not s.base_fro:
            continue
        num[(s.block, s.type)] += s.fro ** 2
        den[(s.block, s.type)] += (s.base_fro or 0.0) ** 2
        count[(s.block, s.type)] += 1
    values = []
    for r in rows:
        row = []
        for c in cols:
            if count[(r, c)] == 0:
                row.append(None)
            elif relative:
                row.append(math.sqrt(num[(r, c)]) / math.sqrt(den[(r, c)]) if den[(r, c)] > 0 else None)
            else:
                row.append(math.sqrt(num[(r, c)]))
        values.append(row)
    return {"rows": rows, "cols": cols, "values": values,
            "quantity": "‖ΔW‖_F / ‖W0‖_F" if relative else "‖ΔW‖_F (root of summed squares)"}


def _file_facts(path: Path | None) -> dict:
    facts: dict = {"file": str(path) if path else None, "size": None}
    if path is not None:
        try:
            facts["size"] = Path(path).stat().st_size
        except OSError:
            pass
    return facts


def inspect_model(model: LoraModel, *, path: Path | None = None, layers: str | None = None,
                  base=None, base_ref: str | None = None,
                  on_layer: Callable[[str], None] | None = None, fmt: str | None = None) -> dict:
    """Everything `lorahub inspect` shows, as a JSON-ready dict. ``base``: an open
    :class:`~lorahub.ops.checkpoints.Checkpoint` (see :func:`open_base`) for relative strengths."""
    keys = list(model.layers)
    # Validate every layer up front: a malformed file is an error, whatever --layers selects.
    for k in keys:
        check_layer(k, model.layers[k])
    selected = match_layers(keys, layers)
    if layers and not selected:
        raise LorahubError(f"layer pattern {layers!r} matches none of the {len(keys)} layers")
    warnings: list[str] = list(model.notes)
    stats: list[LayerStats] = []
    missing_base: list[str] = []
    for k in selected:
        layer = model.layers[k]
        w0 = None
        if base is not None:
            w0 = base.get(k + ".weight") if k + ".weight" in base else None
            if w0 is None:
                missing_base.append(k)
            else:
                try:
                    lshape = layer.shape
                except (ValueError, KeyError):
                    lshape = None
                if lshape is not None and _flat2(w0.shape) != _flat2(lshape):
                    raise LorahubError(f"layer {k} is {tuple(lshape)} but the base model's weight is "
                                       f"{tuple(w0.shape)}: this LoRA is not for {base_ref or 'that model'}")
        stats.append(layer_stats(k, layer, w0, model.base))
        if on_layer is not None:
            on_layer(k)
    bad = [s.key for s in stats if not s.finite]
    if bad:
        warnings.append(f"{len(bad)} layer(s) contain NaN/Inf weights; their norms are not reported: "
                        + ", ".join(bad[:5]) + (" …" if len(bad) > 5 else ""))
    if base is not None and missing_base:
        if len(missing_base) == len(selected):
            raise LorahubError(f"none of the LoRA's layers exist in {base_ref}: "
                               "this LoRA is not for that model")
        warnings.append(f"{len(missing_base)} layer(s) not found in the base model {base_ref}: "
                        + ", ".join(missing_base[:5]) + (" …" if len(missing_base) > 5 else ""))
    dora = sum(1 for s in stats if s.dora)
    if dora:
        warnings.append(f"{dora} DoRA layer(s): norms describe up·down only (the magnitude vector "
                        "needs the base weights to apply)")
    ranks = [layer.rank for layer in model.layers.values()]
    alphas = [layer.alpha if layer.alpha is not None else float(layer.rank) for layer in model.layers.values()]
    scales = [layer.scale for layer in model.layers.values()]
    emb = {tok: {enc: {"shape": list(t.shape),
                       "norms": [float(x) for x in torch.linalg.vector_norm(
                           t.to(torch.float64).reshape(-1, t.shape[-1]), dim=-1)] if t.dim() else []}
                 for enc, t in encs.items()} for tok, encs in model.embeddings.items()}
    params = sum(layer.parameter_count() for layer in model.layers.values()) + sum(
        t.numel() for encs in model.embeddings.values() for t in encs.values())
    ok = [s for s in stats if s.fro is not None]
    report = {
        **_file_facts(path),
        "format": fmt or model.source_format,
        "base": model.base,
        "arch": model.arch,
        "unmapped_layers": len(unmapped(keys)),
        "kind": model.kind,
        "parts": model.parts(),
        "layers": len(keys),
        "layers_shown": len(selected),
        "layer_filter": layers,
        "rank": ({"min": min(ranks), "median": statistics.median(ranks), "max": max(ranks)} if ranks else None),
        "alpha": _value_summary(alphas),
        "scale": _value_summary(scales),
        "parameters": params,
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for layer in model.layers.values()
                          for t in layer.weights.values()}),
        "materialised_layers": sum(1 for s in stats if s.materialised),
        "embeddings": emb,
        "base_model": base_ref,
        "totals": {
            "fro": math.sqrt(sum(s.fro ** 2 for s in ok)) if ok else None,
            "spectral_max": max((s.spectral for s in ok), default=None),
        },
        "metadata": metadata_summary(model.metadata),
        "warnings": warnings,
        "per_layer": [s.to_dict() for s in stats],
        "blocks": block_summary(stats),
        "grid": grid(stats, relative=base is not None and any(s.base_fro for s in stats)),
    }
    return report


def stats_from_report(report: dict) -> list[LayerStats]:
    return [LayerStats(**d) for d in report["per_layer"]]


# ----------------------------------------------------------------------------------------------------
# The inspect workflow: a reference in, a report out


@dataclass
class InspectResult:
    """What :func:`inspect_lora` found: the file, its registry entry, the loaded model and the report
    (everything ``lorahub inspect`` shows; see :func:`inspect_model`), and the heat map written."""

    path: Path
    entry: dict | None
    model: LoraModel
    report: dict
    plot: Path | None = None

    @property
    def warnings(self) -> list[str]:
        return self.report["warnings"]

    def to_dict(self) -> dict:
        d = dict(self.report)
        if self.entry is not None:
            d["entry"] = {"id": self.entry["id"], "name": self.entry["name"]}
        if self.plot is not None:
            d["plot"] = str(self.plot)
        return d


def inspect_lora(lora: str | os.PathLike, *, base: str | None = None, layers: str | None = None,
                 plot: str | os.PathLike | None = None, force: bool = False, registry=None,
                 on_layer: Callable[[int, int, str], None] | None = None) -> InspectResult:
    """Inspect the LoRA ``lora`` (a file or a registry reference).

    ``base``: a model (see :func:`lorahub.refs.resolve_model`) to report ‖ΔW‖/‖W0‖ against.
    ``layers``: only layers whose canonical key matches (a glob, else a substring). ``plot``: write a
    heat-map PNG of strength by block and layer type there. ``on_layer(i, n, key)`` reports progress.
    """
    from lorahub.formats.detect import detect
    from lorahub.formats.io import load_lora
    from lorahub.outputs import check_output
    from lorahub.refs import LazyRegistry, resolve_lora

    with LazyRegistry.using(registry) as regs:
        src = resolve_lora(lora, regs)
        if plot is not None:
            plot = check_output(plot, force=force, suffixes=(".png",))
        model = load_lora(src.path)
        base_w = open_base(base, regs) if base else None
        try:
            if base_w is not None and unmapped(model.layers) and base_w.arch is not None:
                # kohya names no built-in table holds: the base model's own module list maps them
                left = map_unmapped(model, base_w.arch)
                model.notes = [f"{len(left)} layer(s) are not modules of {base}: kept under their kohya names"
                               + (f", e.g. {left[0]}" if left else "")] if left else []
            n = len(match_layers(model.layers, layers))
            done = iter(range(1, n + 1))
            report = inspect_model(model, path=src.path, layers=layers, base=base_w, base_ref=base,
                                   on_layer=(lambda k: on_layer(next(done), n, k)) if on_layer else None,
                                   fmt=model.source_format if model.source_format != "unknown"
                                   else detect(src.path).format)
        finally:
            if base_w is not None:
                base_w.close()
    res = InspectResult(path=src.path, entry=src.entry, model=model, report=report)
    if plot is not None:
        from lorahub.ops.heatmap import render

        res.plot = render(report["grid"], plot, title=f"{src.entry['name'] if src.entry else src.path.name}: "
                                                      "strength by block and layer type")
    return res
