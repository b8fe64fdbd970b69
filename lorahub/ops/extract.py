"""Extract a LoRA from a full fine-tune: ΔW = W_tuned − W_base, layer by layer, best rank-k factors.

Both models are read one tensor at a time through :mod:`lorahub.ops.checkpoints`, so memory stays near
one layer's working set plus the (small) output. For every adapted layer the difference matrix
(conv kernels flattened to (out, in·kh·kw)) is approximated by :func:`lorahub.linalg.lowrank.low_rank_approx`:
exact singular values from the Gram matrix, rank chosen on them (fixed or dynamic), fast randomized
factors checked against the exact truncated-SVD optimum with an exact-SVD fallback, float64 retry on
non-convergence. √S goes into both factors (up = U·√S, down = √S·Vh, alpha = rank: scale 1).

DiT families: from diffusers folders every linear of the transformer (Flux.1, SD3, …) and the CLIP / T5
text encoders' attention and MLP linears. The diffusers modules that the family's original layout fuses
(Flux.1: q/k/v as ``img_attn.qkv`` / ``txt_attn.qkv``, single blocks' q/k/v + ``proj_mlp`` as ``linear1``;
SD3: q/k/v as ``attn.qkv``) are factored as one matrix: the parts' differences stacked in the original
row order, one SVD, then split back into parts sharing one rank-r ``lora_A`` (reported as
``transformer.<original path>``), so the kohya file holds ``lora_unet_double_blocks_N_img_attn_qkv`` at
rank r, as kohya's own Flux extraction gives it. From two Flux.1 single files in the original BFL layout
(``double_blocks.N.img_attn.qkv.weight``) every BFL module a kohya Flux LoRA adapts, fused q/k/v
factored as one matrix (what kohya's Flux LoRAs hold), then split into canonical layers that share the
fused down factor (written as kohya, they fuse back exactly). Both ways read one tensor at a time, so
a 12B-parameter pair needs about one fused weight's working set, not the models.

The reported Frobenius retained is measured on the factors *as saved* (after the dtype cast and any
clamp): √(1 − ‖ΔW − up·down‖²/‖ΔW‖²), per layer and overall (energy-weighted), in float64, next to the
float64 Eckart–Young optimum √(Σ_{i<k} σᵢ²/‖ΔW‖²) (singular values of a float64 Gram matrix).
``clamp_quantile`` applies kohya's rule (:func:`lorahub.linalg.lowrank.kohya_clamp`).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from lorahub.errors import LorahubError
from lorahub.linalg.rank import RankCriteria, finite, whole
from lorahub.outputs import Written
from lorahub.vocab import DTYPE_NAMES, DTYPES

TE_LINEAR = re.compile(r"\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2)"
                       r"|SelfAttention\.[qkvo]|DenseReluDense\.(wi|wi_0|wi_1|wo))\.weight$")  # CLIP, T5
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
DEFAULT_RANK = 64
SVD_METHODS = ("auto", "randomized", "exact")
# the numbered blocks of the DiT families' original layouts -> diffusers' (for the report's blocks)
ORIGINAL_BLOCKS = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks",
                   "joint_blocks": "transformer_blocks"}


@dataclass
class ExtractOptions(RankCriteria):
    """How to extract: the rank criteria (``rank`` defaults to 64 without a dynamic criterion, and
    caps it when given with one), LoCon conv layers, text encoders, clamping, device and saved dtype."""

    conv_rank: int | None = None     # None: no 3×3 conv layers (LoCon off)
    text_encoder: bool = True
    clamp_quantile: float | None = None
    min_diff: float = 1e-4
    device: str = "cpu"
    dtype: str = "fp16"              # saved dtype: fp16 | bf16 | fp32
    method: str = "auto"             # auto | randomized | exact
    tol: float = 1e-3                # allowed relative shortfall of the randomized factors

    def __post_init__(self) -> None:
        if self.rank is None and self.dynamic is None:
            self.rank = DEFAULT_RANK

    def describe(self) -> str:
        dyn = self.dynamic
        s = f"{dyn}={getattr(self, dyn)} (cap {self.rank or 'none'})" if dyn else f"rank={self.rank}"
        if self.conv_rank:
            s += f", conv-rank={self.conv_rank}"
        return s


@dataclass
class LayerReport:
    name: str
    shape: tuple
    kind: str          # linear | conv
    rank: int
    retained: float    # Frobenius retained by the saved factors
    optimum: float     # Eckart–Young optimum at this rank
    method: str        # exact | randomized | exact-fallback
    float64_retry: bool
    norm: float        # ‖ΔW‖_F
    seconds: float = 0.0


@dataclass
class ExtractResult(Written):
    """What :func:`extract` (and :func:`extract_lora`) made: the LoRA, a report per layer, and where
    :func:`extract_lora` wrote (``out``, ``dialect``) and registered it (``entry``, ``created``)."""

    model: object                    # LoraModel
    layers: list[LayerReport]
    notes: list[str] = field(default_factory=list)
    family: str = "unknown"
    seconds: float = 0.0

    @property
    def retained(self) -> float:
        return overall_retained(self.layers)

    def blocks(self) -> list[dict]:
        return block_summary(self.layers)

    def to_dict(self) -> dict:
        d = {"family": self.family, "layers": len(self.layers), "frobenius_retained": self.retained,
             "seconds": round(self.seconds, 3), "notes": self.notes, "blocks": self.blocks(),
             "per_layer": [{k: v for k, v in asdict(r).items() if k != "seconds"} for r in self.layers],
             "out": str(self.out) if self.out else None, "format": self.dialect}
        if self.entry is not None:
            d["registered"] = self.registered()
        return d


def overall_retained(layers: list[LayerReport]) -> float:
    tot = sum(r.norm ** 2 for r in layers)
    if tot == 0:
        return 1.0
    kept = sum((r.retained ** 2) * r.norm ** 2 for r in layers)
    return math.sqrt(min(1.0, kept / tot))


def block_of(name: str) -> str:
    """Report group of a layer: unet.down_blocks.N, unet.mid_block, unet.up_blocks.N, a DiT's
    transformer.transformer_blocks.N / transformer.single_transformer_blocks.N (BFL: double_blocks.N,
    single_blocks.N), text encoders."""
    m = re.match(r"transformer\.(double_blocks|single_blocks|joint_blocks)\.(\d+)\.", name)
    if m:  # a fused module reported by its original path: the diffusers block it sits in
        return f"transformer.{ORIGINAL_BLOCKS[m[1]]}.{m[2]}"
    m = re.match(r"(unet\.(down_blocks|up_blocks)\.\d+|unet\.mid_block|unet\.[a-z_]+"
                 r"|transformer\.(transformer_blocks|single_transformer_blocks)\.\d+|transformer"
                 r"|(double_blocks|single_blocks)\.\d+|text_encoder_3|text_encoder_2|text_encoder)", name)
    return m[1] if m else name.split(".")[0]


def block_summary(layers: list[LayerReport]) -> list[dict]:
    groups: dict[str, list[LayerReport]] = {}
    for r in layers:
        groups.setdefault(block_of(r.name), []).append(r)
    out = []
    for g, rs in groups.items():
        out.append({"block": g, "layers": len(rs), "rank_min": min(r.rank for r in rs),
                    "rank_max": max(r.rank for r in rs), "retained": overall_retained(rs),
                    "randomized": sum(r.method == "randomized" for r in rs)})
    return out


def layer_kind(name: str, shape: tuple, conv: bool) -> str | None:
    """'linear' | 'conv' | None (not adapted) for a canonical weight name and shape."""
    if not name.endswith(".weight") or len(shape) not in (2, 4):
        return None
    is_1x1 = len(shape) == 2 or (shape[2] == 1 and shape[3] == 1)
    if name.startswith("unet."):
        if ".attentions." in name:
            return "linear" if is_1x1 else None
        if conv and (".resnets." in name or ".downsamplers." in name or ".upsamplers." in name):
            if is_1x1:
                return "linear"  # time_emb_proj, conv_shortcut
            return "conv"
        return None
    if name.startswith("transformer."):  # a DiT (Flux.1, SD3, …): every linear of the transformer
        return "linear" if len(shape) == 2 else None
    if name.startswith("text_encoder") and TE_LINEAR.search(name) and len(shape) == 2:
        return "linear"
    return None


def _bfl_kind(name: str, shape: tuple) -> str | None:
    """'linear' for a weight of a Flux.1 BFL-layout file that a kohya Flux LoRA adapts (a module of
    the BFL layout: fused ``img_attn.qkv``, ``linear1``, …), else None."""
    from lorahub.formats.dit.flux import FLUX

    if not name.endswith(".weight") or len(shape) != 2:
        return None
    return "linear" if FLUX.spec(name[: -len(".weight")]) is not None else None


def select_layers(base, tuned, opts: ExtractOptions) -> list[tuple[str, str]]:
    conv = bool(opts.conv_rank)
    if (base.layout == "bfl") != (tuned.layout == "bfl"):
        raise LorahubError("one model is a Flux.1 file in the BFL layout and the other is not: give both "
                           "models in the same layout (two BFL files, or two diffusers folders)")
    out = []
    for name in tuned.keys():
        if tuned.layout == "bfl":
            kind = _bfl_kind(name, tuned.shape(name))
        else:
            kind = layer_kind(name, tuned.shape(name), conv)
        if kind is None:
            continue
        if name not in base:
            raise LorahubError(f"base model has no {name}: base and tuned are different architectures")
        if tuple(base.shape(name)) != tuple(tuned.shape(name)):
            raise LorahubError(f"{name}: shape {base.shape(name)} in base but {tuned.shape(name)} in tuned")
        out.append((name, kind))
    return out


@dataclass
class ExtractUnit:
    """What one SVD factors: one weight (``names`` of one), or the parts of a fused module of the
    family's original layout (``fused``: its original path) stacked in that layout's row order."""

    names: list[str]
    kind: str
    fused: str | None = None

    @property
    def label(self) -> str:
        """The name the report gives it: the module path, a fused module ``transformer.<original path>``."""
        return f"transformer.{self.fused}" if self.fused else self.names[0][: -len(".weight")]


def plan_units(todo: list[tuple[str, str]], family: str, arch: str, shape: Callable[[str], tuple]
               ) -> tuple[list[ExtractUnit], Callable | None]:
    """``(units, back)``: the weights to extract grouped as the family's original layout fuses them
    (:func:`lorahub.formats.dit.family_layout`: Flux.1 BFL, SD3 SAI), one unit per fused module whose
    parts are all there with the rows the layout gives them, placed at its first part; every other weight
    on its own. ``back`` (:func:`lorahub.formats.dit.to_original`'s) splits a fused layer into canonical
    parts sharing its ``lora_A``; None for families without an original layout."""
    from lorahub.formats.canonical import LoraModel
    from lorahub.formats.dit import family_layout, to_original

    model = LoraModel(base=family, arch=arch)
    lay = family_layout(model)
    if lay is None:
        return [ExtractUnit([n], k) for n, k in todo], None
    groups: dict[str, dict[int, str]] = {}
    where: dict[str, str] = {}
    for name, kind in todo:
        hit = lay.original_of(name[: -len(".weight")]) if kind == "linear" else None
        if hit is not None and len(lay.spec(hit[0]).parts) > 1:
            groups.setdefault(hit[0], {})[hit[1]] = name
            where[name] = hit[0]
    whole_groups = {}
    for orig, parts in groups.items():
        spec = lay.spec(orig)
        if len(parts) != len(spec.parts):
            continue
        names = [parts[j] for j in range(len(spec.parts))]
        shapes = [tuple(shape(n)) for n in names]
        rows, inn = sum(s[0] for s in shapes), shapes[0][1]
        if all(s[1] == inn for s in shapes) and spec.dims(rows, inn) == [s[0] for s in shapes]:
            whole_groups[orig] = names
    units, seen = [], set()
    for name, kind in todo:
        orig = where.get(name)
        if orig in whole_groups:
            if orig not in seen:
                seen.add(orig)
                units.append(ExtractUnit(whole_groups[orig], kind, fused=orig))
        else:
            units.append(ExtractUnit([name], kind))
    return units, to_original(model)[1]


def file_blake3(paths: list[Path]) -> str:
    """BLAKE3 (multi-threaded; the registry records it too and resolves it) of one file; for several
    (a diffusers folder) BLAKE3 over their hex digests in order."""
    import blake3

    digests = []
    for p in paths:
        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        buf = bytearray(1 << 24)   # plain reads, not a memory map: the file never counts as resident
        view = memoryview(buf)
        with open(p, "rb") as f:
            while n := f.readinto(buf):
                h.update(view[:n])
        digests.append(h.hexdigest())
    if len(digests) == 1:
        return digests[0]
    return blake3.blake3("".join(digests).encode()).hexdigest()


def extract_layer(diff, kind: str, opts: ExtractOptions, name: str = "layer", zero_rows: bool = False):
    """Factor one difference tensor (out, in[, kh, kw]) -> (up, down, LayerReport) in the saved dtype.

    Without a clamp √S goes into both factors; with ``clamp_quantile`` the factors are kohya's
    (up = U·S, down = Vh) clipped by :func:`lorahub.linalg.lowrank.kohya_clamp`. The reported retained
    (of the factors as saved) and optimum are computed in float64. ``zero_rows``: rows of ``diff`` that
    are all zero get exactly zero rows of ``up`` (as the optimum has them), so the unchanged part of a
    stacked fused difference adapts nothing.
    """
    import torch

    from lorahub.linalg import lowrank

    t0 = time.perf_counter()
    shape = tuple(diff.shape)
    A = diff.reshape(shape[0], -1).to(torch.float32)
    cap = opts.conv_rank if kind == "conv" else opts.rank
    if opts.dynamic is None and (cap is None or cap < 1):
        raise LorahubError(f"{name}: a rank of at least 1 is needed")
    try:
        ap = lowrank.low_rank_approx(A, method=opts.method, tol=opts.tol, **opts.criterion(cap))
    except ValueError as exc:
        raise LorahubError(f"{name}: {exc}") from None
    except (torch.linalg.LinAlgError, RuntimeError) as exc:
        raise LorahubError(f"{name}: SVD did not converge even in float64 ({exc})") from None
    k = ap.k
    sp = ap.spectrum
    if opts.clamp_quantile is not None:
        up, down, _ = lowrank.kohya_clamp((sp.U[:, :k] * sp.S[:k]).to(torch.float32),
                                          sp.Vh[:k].to(torch.float32), opts.clamp_quantile)
    else:
        up, down = lowrank.split(sp, k)
    save_dtype = getattr(torch, DTYPE_NAMES[opts.dtype])
    up = up.to(save_dtype).cpu()
    down = down.to(save_dtype).cpu()
    if zero_rows:
        up[~A.any(dim=1).cpu()] = 0
    ret = lowrank.residual_retained(A, up, down, ap.norm2)  # of what is saved, in float64
    if len(shape) == 4:
        down = down.reshape(k, shape[1], shape[2], shape[3])
        up = up.reshape(shape[0], k, 1, 1)
    rep = LayerReport(name=name, shape=shape, kind=kind, rank=k, retained=ret, optimum=ap.optimum,
                      method=ap.method, float64_retry=ap.float64_retry, norm=math.sqrt(ap.norm2),
                      seconds=time.perf_counter() - t0)
    return up.contiguous(), down.contiguous(), rep


def validate(opts: ExtractOptions) -> None:
    opts.validate()
    if opts.conv_rank is not None:
        whole(opts.conv_rank, "conv_rank", minimum=0)
    if opts.clamp_quantile is not None and not 0.5 < finite(opts.clamp_quantile, "clamp_quantile") <= 1:
        raise LorahubError(f"clamp_quantile must be in (0.5, 1], got {opts.clamp_quantile!r}")
    if finite(opts.min_diff, "min_diff") < 0:
        raise LorahubError(f"min_diff must be 0 or more, got {opts.min_diff!r}")
    if not 0 < finite(opts.tol, "tol") < 1:
        raise LorahubError(f"tol must be in (0, 1), got {opts.tol!r}")
    if opts.dtype not in DTYPES:
        raise LorahubError(f"dtype must be one of {', '.join(DTYPES)}, got {opts.dtype!r}")
    if opts.method not in SVD_METHODS:
        raise LorahubError(f"method must be one of {', '.join(SVD_METHODS)}, got {opts.method!r}")
    if opts.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise LorahubError(f"device {opts.device!r}: no CUDA device is available")
    elif opts.device != "cpu":
        raise LorahubError(f"device must be cpu or cuda, got {opts.device!r}")


def _te_max_diff(base, tuned, names: list[str], device: str) -> float:
    import torch

    m = 0.0
    for n in names:
        d = tuned.get(n, torch.float32).to(device) - base.get(n, torch.float32).to(device)
        m = max(m, float(d.abs().max()) if d.numel() else 0.0)
    return m


def extract(base_path, tuned_path, opts: ExtractOptions | None = None, *,
            on_layer: Callable[[int, int, str], None] | None = None,
            base_name: str | None = None, tuned_name: str | None = None, title: str | None = None,
            hashes: bool = True) -> ExtractResult:
    """Extract tuned − base as a LoRA (canonical :class:`LoraModel`, factors in the saved dtype).

    ``base_name`` / ``tuned_name``: how the models are recorded in the metadata (default: their file or
    folder names, see :func:`public_name`); ``title``: the ModelSpec title (default ``<tuned>-extract``)."""
    import torch

    from lorahub.formats.canonical import LoraLayer, LoraModel
    from lorahub.ops.checkpoints import open_checkpoint

    opts = opts or ExtractOptions()
    validate(opts)
    t0 = time.perf_counter()
    notes: list[str] = []
    with open_checkpoint(base_path) as base, open_checkpoint(tuned_path) as tuned:
        if base.family != tuned.family and "unknown" not in (base.family, tuned.family):
            raise LorahubError(f"base is {base.family} but tuned is {tuned.family}")
        family = tuned.family if tuned.family != "unknown" else base.family
        todo = select_layers(base, tuned, opts)
        # text encoders: extracted only when they differ by more than --min-diff
        for part in TEXT_ENCODERS:
            names = [n for n, _ in todo if n.startswith(part + ".")]
            if not names:
                continue
            if not opts.text_encoder:
                notes.append(f"{part}: skipped (text encoders not extracted)")
                todo = [(n, k) for n, k in todo if not n.startswith(part + ".")]
                continue
            md = _te_max_diff(base, tuned, names, opts.device)
            if md <= opts.min_diff:
                notes.append(f"{part}: skipped, largest weight difference {md:.3g} is within "
                             f"min_diff {opts.min_diff:g}")
                todo = [(n, k) for n, k in todo if not n.startswith(part + ".")]
            else:
                notes.append(f"{part}: extracted (largest weight difference {md:.3g})")
        if not todo:
            raise LorahubError("nothing to extract: no adaptable layer differs between the models")
        model = LoraModel(base=family, source_format="extract", arch=base.arch.name if base.arch else "unknown")
        bfl: dict = {}  # BFL-layout inputs: layers keyed by BFL module path, made canonical at the end
        if tuned.layout == "bfl":
            units, back = [ExtractUnit([n], k) for n, k in todo], None
        else:  # diffusers DiT folders: the parts of each fused module of the original layout as one
            units, back = plan_units(todo, family, model.arch, tuned.shape)
        reports: list[LayerReport] = []
        unchanged = fused = 0
        for i, unit in enumerate(units):
            if on_layer:
                on_layer(i, len(units), unit.label)
            diffs = []
            for name in unit.names:  # one unit's tensors at a time
                d = tuned.get(name, torch.float32).to(opts.device)
                d -= base.get(name, torch.float32).to(opts.device)
                diffs.append(d)
            if not any(bool(d.any()) for d in diffs):
                unchanged += len(diffs)
                continue
            diff = diffs[0] if len(diffs) == 1 else torch.cat(diffs, dim=0)
            del diffs
            up, down, rep = extract_layer(diff, unit.kind, opts, unit.label, zero_rows=unit.fused is not None)
            del diff
            rep.name = unit.label
            layer = LoraLayer(kind="lora", weights={"down": down, "up": up}, alpha=float(rep.rank))
            if unit.fused is not None:
                # parts share the one lora_A (an unchanged part's rows are zero: left out), so the
                # kohya writer fuses them back at this rank
                model.layers.update(back({unit.label: layer}).layers)
                fused += 1
            else:
                (bfl if tuned.layout == "bfl" else model.layers)[unit.label] = layer
            reports.append(rep)
        if on_layer:
            on_layer(len(units), len(units), "")
        if unchanged:
            notes.append(f"{unchanged} layer(s) identical in both models: not included")
        if fused:
            notes.append(f"{fused} fused module(s) of the {family} original layout (q/k/v"
                         f"{', single blocks q/k/v + MLP input' if family == 'flux' else ''}) extracted as one "
                         "matrix each: one rank, one lora_A shared by the parts")
        if not reports:
            raise LorahubError("nothing to extract: the models are identical in every adaptable layer")
        if bfl:
            from lorahub.formats.dit.flux import from_bfl_layers

            # one canonical layer per diffusers module; the parts of a fused module share its down
            # factor, so writing kohya fuses them back exactly (lora_unet_double_blocks_N_img_attn_qkv)
            model.layers.update(from_bfl_layers(bfl))
            notes.append(f"{len(bfl)} BFL-layout module(s) extracted (fused q/k/v kept fused: one rank each)")
        tuned_name = tuned_name or public_name(tuned_path)
        info = {
            "base": {"name": base_name or public_name(base_path),
                     "blake3": file_blake3(base.files()) if hashes else None},
            "tuned": {"name": tuned_name, "blake3": file_blake3(tuned.files()) if hashes else None},
        }
    res = ExtractResult(model=model, layers=reports, notes=notes, family=family,
                        seconds=time.perf_counter() - t0)
    model.metadata.update(extract_metadata(res, opts, info, title or f"{tuned_name}-extract"))
    return res


def extract_metadata(res: ExtractResult, opts: ExtractOptions, info: dict, title: str) -> dict[str, str]:
    """What kohya's extract_lora_from_models.py writes (:func:`lorahub.formats.kohya.derived_metadata`:
    ``ss_network_dim`` / ``ss_network_alpha``, ``Dynamic`` where the ranks differ, ``conv_dim`` for
    LoCon, ModelSpec), plus the operation (``lorahub_extract``: the models by name and BLAKE3, never by
    path) and the per-layer report (``lorahub_extract_layers``)."""
    from lorahub.formats import kohya

    ranks = [r.rank for r in res.layers]
    if opts.clamp_quantile is not None:
        split = f"U·S and Vh clamped at their joint {opts.clamp_quantile:g} quantile (kohya's rule)"
    else:
        split = "sqrt(S) split"
    summary = {
        "tool": "lorahub extract",
        "base": info["base"], "tuned": info["tuned"],
        "method": f"svd ({'dynamic ' + opts.dynamic if opts.dynamic else 'fixed rank'}; randomized "
                  f"with exact check tol {opts.tol:g}, exact fallback; {split})",
        "criterion": opts.describe(),
        "clamp_quantile": opts.clamp_quantile,
        "dtype": opts.dtype,
        "rank_min": min(ranks), "rank_max": max(ranks),
        "frobenius_retained": round(res.retained, 6),
        "notes": res.notes,
    }
    from lorahub.vocab import KOHYA_BASE_VERSIONS

    inherited = {}
    if res.family in KOHYA_BASE_VERSIONS:  # readers tell a kohya Flux/SD3 file by it at any width
        inherited["ss_base_model_version"] = KOHYA_BASE_VERSIONS[res.family]
    meta = kohya.derived_metadata(res.model, title=title, inherited=inherited)
    meta["lorahub_extract"] = json.dumps(summary, sort_keys=True)
    meta["lorahub_extract_layers"] = json.dumps(
        {r.name: {"rank": r.rank, "retained": round(r.retained, 6), "optimum": round(r.optimum, 6),
                  "method": r.method} for r in res.layers}, sort_keys=True)
    return meta


def public_name(ref, entry: dict | None = None) -> str:
    """How a model is named in anything that may leave this machine: its registry entry's name, a
    tiny model's name, else the file or folder name (never its path)."""
    from lorahub.vocab import TINY_MODELS

    if entry is not None:
        return entry["name"]
    text = str(ref)
    return text if text in TINY_MODELS else (Path(text.replace("\\", "/")).name or text)


def extract_lora(base: str | os.PathLike, tuned: str | os.PathLike, *, out: str | os.PathLike | None = None,
                 rank: int | None = None, energy: float | None = None, sv_ratio: float | None = None,
                 sv_fro: float | None = None, conv_rank: int | None = None, text_encoder: bool = True,
                 clamp_quantile: float | None = None, min_diff: float = 1e-4, device: str = "cpu",
                 dtype: str = "fp16", method: str = "auto", dialect: str = "kohya", register: bool = False,
                 name: str | None = None, type: str | None = None, triggers: list[str] | None = None,
                 force: bool = False, registry=None,
                 on_layer: Callable[[int, int, str], None] | None = None) -> ExtractResult:
    """Extract ``tuned`` − ``base`` as a LoRA and write it to ``out``.

    ``base`` / ``tuned``: a diffusers folder, a single-file .safetensors checkpoint, a registry
    checkpoint, or a built-in tiny model (tiny-sd1, tiny-sdxl, tiny-flux, tiny-sd3); Flux.1 / SD3
    transformers from diffusers folders, or Flux.1 transformers as two single files in the original BFL
    layout (the LoRA then adapts the fused BFL modules: kohya's Flux naming). The rank: a fixed ``rank`` (default 64), or one dynamic
    criterion (``energy``, ``sv_ratio``, ``sv_fro``) capped by ``rank``; ``conv_rank`` also extracts
    3×3 convs (LoCon). See :class:`ExtractOptions` for the rest. ``out`` defaults to
    ``<tuned name>-extract-<r64|energy|…>.safetensors`` in the current folder; ``register`` adds the
    result to the registry (lineage: extracted-from, one row per model). ``registry``: a Registry, a
    home folder, or None (the default home, opened only when needed).
    """
    from lorahub.formats.io import check_dialect, save_lora
    from lorahub.lineage import Parent, register_derived
    from lorahub.outputs import check_output, default_output
    from lorahub.refs import LazyRegistry, resolve_model

    opts = ExtractOptions(rank=rank, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro, conv_rank=conv_rank or None,
                          text_encoder=text_encoder, clamp_quantile=clamp_quantile, min_diff=min_diff,
                          device=device, dtype=dtype, method=method)
    validate(opts)
    check_dialect(dialect)
    with LazyRegistry.using(registry) as regs:
        b = resolve_model(base, regs)
        t = resolve_model(tuned, regs)
        if out is None:
            out = default_output(f"{t.entry['name'] if t.entry else t.path.name.split('.')[0]}-extract-{opts.tag()}",
                                 ".safetensors")
        out = check_output(out, force=force, inputs=[b.path, t.path], suffixes=(".safetensors",))
        res = extract(b.path, t.path, opts, on_layer=on_layer, base_name=public_name(b.ref, b.entry),
                      tuned_name=public_name(t.ref, t.entry), title=name or Path(out).stem)
        save_lora(res.model, out, dialect=dialect)
        res.out, res.dialect = out, dialect
        if register:
            meta = json.loads(res.model.metadata["lorahub_extract"])
            parents = [Parent(m.entry["id"] if m.entry else (meta[role]["blake3"] or m.ref),
                              {"role": role, "name": meta[role]["name"], "blake3": meta[role]["blake3"]})
                       for role, m in (("base", b), ("tuned", t))]
            res.entry, res.created = register_derived(
                regs.get(), out, relation="extracted-from", parents=parents,
                detail={"criterion": opts.describe(), "frobenius_retained": round(res.retained, 6)},
                name=name, type=type, triggers=triggers, base=res.family,
                description=f"extracted from {meta['tuned']['name']} (base {meta['base']['name']})",
                source="lorahub")
    return res
