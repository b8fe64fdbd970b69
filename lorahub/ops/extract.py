"""Extract a LoRA from a full fine-tune: ΔW = W_tuned − W_base, layer by layer, best rank-k factors.

Both models are read one tensor at a time through :mod:`lorahub.ops.checkpoints`, so memory stays near
one layer's working set plus the (small) output. For every adapted layer the difference matrix
(conv kernels flattened to (out, in·kh·kw)) is approximated by :func:`lorahub.linalg.lowrank.low_rank_approx`:
exact singular values from the Gram matrix, rank chosen on them (fixed or dynamic), fast randomized
factors checked against the exact truncated-SVD optimum with an exact-SVD fallback, float64 retry on
non-convergence. √S goes into both factors (up = U·√S, down = √S·Vh, alpha = rank: scale 1).

The reported Frobenius retained is measured on the factors *as saved* (after the dtype cast and any
clamp): √(1 − ‖ΔW − up·down‖²/‖ΔW‖²), per layer and overall (energy-weighted).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from lorahub.errors import LorahubError
from lorahub.ops.resize import RankCriteria

TE_LINEAR = re.compile(r"\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))\.weight$")
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@dataclass
class ExtractOptions(RankCriteria):
    rank: int | None = 64            # fixed rank, or the cap in a dynamic mode
    conv_rank: int | None = None     # None: no 3×3 conv layers (LoCon off)
    text_encoder: bool = True
    clamp_quantile: float | None = None
    min_diff: float = 1e-4
    device: str = "cpu"
    dtype: str = "fp16"              # saved dtype: fp16 | bf16 | fp32
    method: str = "auto"             # auto | randomized | exact
    tol: float = 1e-3                # allowed relative shortfall of the randomized factors

    def criterion(self, cap: int | None) -> dict:
        dyn = self.dynamic
        if dyn is None:
            return {"rank": cap}
        return {dyn: getattr(self, dyn), "max_rank": cap}

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
class ExtractResult:
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


def overall_retained(layers: list[LayerReport]) -> float:
    tot = sum(r.norm ** 2 for r in layers)
    if tot == 0:
        return 1.0
    kept = sum((r.retained ** 2) * r.norm ** 2 for r in layers)
    return math.sqrt(min(1.0, kept / tot))


def block_of(name: str) -> str:
    """Report group of a layer: unet.down_blocks.N, unet.mid_block, unet.up_blocks.N, text encoders."""
    m = re.match(r"(unet\.(down_blocks|up_blocks)\.\d+|unet\.mid_block|unet\.[a-z_]+|text_encoder_2|text_encoder)", name)
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
    if name.startswith("text_encoder") and TE_LINEAR.search(name) and len(shape) == 2:
        return "linear"
    return None


def select_layers(base, tuned, opts: ExtractOptions) -> list[tuple[str, str]]:
    conv = bool(opts.conv_rank)
    out = []
    for name in tuned.keys():
        kind = layer_kind(name, tuned.shape(name), conv)
        if kind is None:
            continue
        if name not in base:
            raise LorahubError(f"base model has no {name}: base and tuned are different architectures")
        if tuple(base.shape(name)) != tuple(tuned.shape(name)):
            raise LorahubError(f"{name}: shape {base.shape(name)} in base but {tuned.shape(name)} in tuned")
        out.append((name, kind))
    return out


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


def _clamp(up, down, q: float):
    import torch

    dist = torch.cat([up.reshape(-1), down.reshape(-1)]).abs().float()
    k = max(1, min(dist.numel(), int(math.ceil(q * dist.numel()))))
    hi = float(torch.kthvalue(dist, k).values)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def extract_layer(diff, kind: str, opts: ExtractOptions, name: str = "layer"):
    """Factor one difference tensor (out, in[, kh, kw]) -> (up, down, LayerReport) in the saved dtype."""
    import torch

    from lorahub.linalg import lowrank

    t0 = time.perf_counter()
    shape = tuple(diff.shape)
    A = diff.reshape(shape[0], -1).to(torch.float32)
    cap = opts.conv_rank if kind == "conv" else opts.rank
    try:
        ap = lowrank.low_rank_approx(A, method=opts.method, tol=opts.tol,
                                     **_crit(opts, cap))
    except ValueError as exc:
        raise LorahubError(f"{name}: {exc}") from None
    except (torch.linalg.LinAlgError, RuntimeError) as exc:
        raise LorahubError(f"{name}: SVD did not converge even in float64 ({exc})") from None
    k = ap.k
    up, down = lowrank.split(ap.spectrum, k)
    up = up.to(torch.float32)
    down = down.to(torch.float32)
    if opts.clamp_quantile is not None:
        up, down = _clamp(up, down, opts.clamp_quantile)
    save_dtype = getattr(torch, DTYPES[opts.dtype])
    up = up.to(save_dtype).cpu()
    down = down.to(save_dtype).cpu()
    # retained measured on what is saved
    total = float(torch.linalg.vector_norm(A))
    if total == 0:
        ret = 1.0
    else:
        res = A - up.to(A.device, torch.float32) @ down.to(A.device, torch.float32)
        err = float(torch.linalg.vector_norm(res))
        ret = math.sqrt(max(0.0, 1.0 - (err / total) ** 2))
        del res
    if len(shape) == 4:
        down = down.reshape(k, shape[1], shape[2], shape[3])
        up = up.reshape(shape[0], k, 1, 1)
    rep = LayerReport(name=name, shape=shape, kind=kind, rank=k, retained=ret, optimum=ap.optimum,
                      method=ap.method, float64_retry=ap.float64_retry, norm=total,
                      seconds=time.perf_counter() - t0)
    return up.contiguous(), down.contiguous(), rep


def _crit(opts: ExtractOptions, cap: int | None) -> dict:
    dyn = opts.dynamic
    if dyn is None:
        if cap is None or cap < 1:
            raise ValueError("a rank of at least 1 is needed")
        return {"rank": cap}
    return {dyn: getattr(opts, dyn), "max_rank": cap}


def validate(opts: ExtractOptions) -> None:
    from lorahub.ops.resize import validate_rank_criteria

    validate_rank_criteria(opts)
    if opts.conv_rank is not None and opts.conv_rank < 0:
        raise LorahubError("--conv-rank must be 0 (off) or more")
    if opts.clamp_quantile is not None and not 0 < opts.clamp_quantile <= 1:
        raise LorahubError("--clamp-quantile must be in (0, 1]")
    if opts.dtype not in DTYPES:
        raise LorahubError("--dtype must be fp16, bf16 or fp32")
    if opts.method not in ("auto", "randomized", "exact"):
        raise LorahubError("method must be auto, randomized or exact")
    if opts.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise LorahubError(f"--device {opts.device}: no CUDA device is available")
    elif opts.device != "cpu":
        raise LorahubError("--device must be cpu or cuda")


def _te_max_diff(base, tuned, names: list[str], device: str) -> float:
    import torch

    m = 0.0
    for n in names:
        d = tuned.get(n, torch.float32).to(device) - base.get(n, torch.float32).to(device)
        m = max(m, float(d.abs().max()) if d.numel() else 0.0)
    return m


def extract(base_path, tuned_path, opts: ExtractOptions | None = None, *,
            on_layer: Callable[[int, int, str], None] | None = None,
            base_name: str | None = None, tuned_name: str | None = None,
            hashes: bool = True) -> ExtractResult:
    """Extract tuned − base as a LoRA (canonical :class:`LoraModel`, factors in the saved dtype)."""
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
        for part in ("text_encoder", "text_encoder_2"):
            names = [n for n, _ in todo if n.startswith(part + ".")]
            if not names:
                continue
            if not opts.text_encoder:
                notes.append(f"{part}: skipped (--no-text-encoder)")
                todo = [(n, k) for n, k in todo if not n.startswith(part + ".")]
                continue
            md = _te_max_diff(base, tuned, names, opts.device)
            if md <= opts.min_diff:
                notes.append(f"{part}: skipped, largest weight difference {md:.3g} is within "
                             f"--min-diff {opts.min_diff:g}")
                todo = [(n, k) for n, k in todo if not n.startswith(part + ".")]
            else:
                notes.append(f"{part}: extracted (largest weight difference {md:.3g})")
        if not todo:
            raise LorahubError("nothing to extract: no adaptable layer differs between the models")
        model = LoraModel(base=family, source_format="extract")
        reports: list[LayerReport] = []
        unchanged = 0
        for i, (name, kind) in enumerate(todo):
            if on_layer:
                on_layer(i, len(todo), name)
            diff = tuned.get(name, torch.float32).to(opts.device)
            diff -= base.get(name, torch.float32).to(opts.device)
            if not bool(diff.any()):
                unchanged += 1
                continue
            up, down, rep = extract_layer(diff, kind, opts, name)
            del diff
            module = name[: -len(".weight")]
            rep.name = module
            model.layers[module] = LoraLayer(kind="lora", weights={"down": down, "up": up},
                                             alpha=float(rep.rank))
            reports.append(rep)
        if on_layer:
            on_layer(len(todo), len(todo), "")
        if unchanged:
            notes.append(f"{unchanged} layer(s) identical in both models: not included")
        if not reports:
            raise LorahubError("nothing to extract: the models are identical in every adaptable layer")
        info = {
            "base": {"name": base_name or str(base_path),
                     "blake3": file_blake3(base.files()) if hashes else None},
            "tuned": {"name": tuned_name or str(tuned_path),
                      "blake3": file_blake3(tuned.files()) if hashes else None},
        }
    res = ExtractResult(model=model, layers=reports, notes=notes, family=family,
                        seconds=time.perf_counter() - t0)
    model.metadata.update(extract_metadata(res, opts, info))
    return res


def extract_metadata(res: ExtractResult, opts: ExtractOptions, info: dict) -> dict[str, str]:
    ranks = [r.rank for r in res.layers]
    lin = [r.rank for r in res.layers if r.kind == "linear"]
    conv = [r.rank for r in res.layers if r.kind == "conv"]
    summary = {
        "tool": "lorahub extract",
        "base": info["base"], "tuned": info["tuned"],
        "method": f"svd ({'dynamic ' + opts.dynamic if opts.dynamic else 'fixed rank'}; randomized "
                  f"with exact check tol {opts.tol:g}, exact fallback; sqrt(S) split)",
        "criterion": opts.describe(),
        "clamp_quantile": opts.clamp_quantile,
        "dtype": opts.dtype,
        "rank_min": min(ranks), "rank_max": max(ranks),
        "frobenius_retained": round(res.retained, 6),
        "notes": res.notes,
    }
    meta = {
        "lorahub_extract": json.dumps(summary, sort_keys=True),
        "lorahub_extract_layers": json.dumps(
            {r.name: {"rank": r.rank, "retained": round(r.retained, 6), "method": r.method}
             for r in res.layers}, sort_keys=True),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(lin) if lin else max(ranks)),
        "ss_network_alpha": str(max(lin) if lin else max(ranks)),
        "ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(res.family, "unknown"),
    }
    if conv:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(max(conv)), "conv_alpha": str(max(conv))})
    return meta


def report_dict(res: ExtractResult) -> dict:
    return {"family": res.family, "layers": len(res.layers), "frobenius_retained": res.retained,
            "seconds": round(res.seconds, 3), "notes": res.notes, "blocks": res.blocks(),
            "per_layer": [{k: v for k, v in asdict(r).items() if k != "seconds"} for r in res.layers]}
