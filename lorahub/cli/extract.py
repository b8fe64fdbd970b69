"""`lorahub extract` (LoRA from a full fine-tune) and `lorahub resize` (change a LoRA's rank).

Module level imports only typer/stdlib; torch and the ops are imported inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from lorahub.cli.app import app
from lorahub.cli.common import HomeOpt, JsonOpt, console, open_registry, print_json, progress

RankOpt = Annotated[Optional[int], typer.Option("--rank", help="Fixed rank (default 64), or the cap with a dynamic criterion.")]
EnergyOpt = Annotated[Optional[float], typer.Option("--energy", help="Dynamic rank: smallest k keeping this fraction of Σσ² (e.g. 0.9).")]
SvRatioOpt = Annotated[Optional[float], typer.Option("--sv-ratio", help="Dynamic rank: keep σᵢ ≥ σ₀ / X.")]
SvFroOpt = Annotated[Optional[float], typer.Option("--sv-fro", help="Dynamic rank: smallest k keeping this fraction of the Frobenius norm.")]
FormatOpt = Annotated[str, typer.Option("--format", help="Output dialect: kohya | diffusers | peft.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output .safetensors file.")]
RegisterOpt = Annotated[bool, typer.Option("--register", help="Add the result to the registry with its lineage.")]
TypeOpt = Annotated[Optional[str], typer.Option("--type", help="Registry type: character|style|pose|clothing|object|concept.")]
TriggerOpt = Annotated[Optional[List[str]], typer.Option("--trigger", help="Trigger word (repeat for several).")]
NameOpt = Annotated[Optional[str], typer.Option("--name", help="Registry name (default: the output file's stem).")]


def _fmt_pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _resolve_model(ref: str, home):
    """(path, registry entry or None) of a BASE/TUNED argument."""
    from lorahub.errors import LorahubError
    from lorahub.ops.models import resolve_model_ref

    try:
        return resolve_model_ref(ref), None
    except LorahubError:
        p = Path(ref).expanduser()
        if p.exists():
            raise
    reg = open_registry(home)
    entry = reg.resolve(ref)
    if entry.get("kind") not in (None, "checkpoint"):
        raise LorahubError(f"{ref}: registry entry {entry['id']} is a {entry.get('kind')}, not a checkpoint")
    return resolve_model_ref(ref, reg), entry


def _check_format(fmt: str) -> None:
    from lorahub.errors import LorahubError

    if fmt not in ("kohya", "diffusers", "peft"):
        raise LorahubError("--format must be kohya, diffusers or peft")


def _check_out(out: Path) -> None:
    from lorahub.errors import LorahubError

    if out.suffix.lower() != ".safetensors":
        raise LorahubError(f"{out}: the output must be a .safetensors file")
    if out.is_dir():
        raise LorahubError(f"{out}: is a folder")


def _register(home, out: Path, *, name, type_, triggers, base, lineage, description):
    reg = open_registry(home)
    entry, created = reg.add_file(out, name=name, type=type_, triggers=triggers or None, base=base,
                                  description=description, source="lorahub", lineage=lineage)
    return entry, created


@app.command()
def extract(
    base: Annotated[str, typer.Argument(help="Base model: diffusers folder, .safetensors checkpoint, registry ref, tiny-sd1/tiny-sdxl.")],
    tuned: Annotated[str, typer.Argument(help="Fine-tuned model (same kinds as BASE).")],
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    sv_ratio: SvRatioOpt = None,
    sv_fro: SvFroOpt = None,
    conv_rank: Annotated[Optional[int], typer.Option("--conv-rank", help="Also extract 3×3 conv layers (LoCon) at this rank (cap in dynamic mode).")] = None,
    text_encoder: Annotated[bool, typer.Option("--text-encoder/--no-text-encoder", help="Extract text encoder layers when they differ by more than --min-diff.")] = True,
    clamp_quantile: Annotated[Optional[float], typer.Option("--clamp-quantile", help="Clamp factor values at this quantile of |values| (off by default).")] = None,
    min_diff: Annotated[float, typer.Option("--min-diff", help="A text encoder whose largest weight difference is at most this is skipped.")] = 1e-4,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="Saved dtype: fp16 | bf16 | fp32.")] = "fp16",
    method: Annotated[str, typer.Option("--method", help="auto (randomized where accurate, checked) | randomized | exact.")] = "auto",
    fmt: FormatOpt = "kohya",
    out: OutOpt = None,
    register: RegisterOpt = False,
    type_: TypeOpt = None,
    trigger: TriggerOpt = None,
    name: NameOpt = None,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Extract the difference TUNED − BASE as a LoRA (SVD per layer, streamed layer by layer).

    Attention, feed-forward and projection layers of the UNet, 3×3 convs with --conv-rank, and text
    encoders that differ. Prints the Frobenius norm retained per block and overall.
    """
    from lorahub.formats.io import save_lora
    from lorahub.ops.extract import ExtractOptions, extract as run_extract, report_dict, validate

    _check_format(fmt)
    dynamic = any(x is not None for x in (energy, sv_ratio, sv_fro))
    opts = ExtractOptions(rank=rank if (rank is not None or dynamic) else 64, energy=energy,
                          sv_ratio=sv_ratio, sv_fro=sv_fro, conv_rank=conv_rank or None,
                          text_encoder=text_encoder, clamp_quantile=clamp_quantile, min_diff=min_diff,
                          device=device, dtype=dtype, method=method)
    validate(opts)
    base_path, base_entry = _resolve_model(base, home)
    tuned_path, tuned_entry = _resolve_model(tuned, home)
    if out is None:
        tag = f"r{opts.rank}" if not dynamic else (opts.dynamic or "dyn")
        stem = Path(str(tuned_path)).name.split(".")[0] if tuned_entry is None else tuned_entry["name"]
        out = Path(f"{stem}-extract-{tag}.safetensors")
    _check_out(out)

    with progress() as prog:
        task = prog.add_task("extract", total=None)

        def on_layer(i, n, lname):
            prog.update(task, completed=i, total=n, description=f"extract {lname.split('.', 1)[-1][:48]}")

        res = run_extract(base_path, tuned_path, opts, on_layer=on_layer,
                          base_name=base_entry["name"] if base_entry else base,
                          tuned_name=tuned_entry["name"] if tuned_entry else tuned)
    save_lora(res.model, out, dialect=fmt)
    report = report_dict(res)
    report["out"] = str(out)
    report["format"] = fmt
    if register:
        import json as _json

        meta = _json.loads(res.model.metadata["lorahub_extract"])
        lineage = []
        for role, entry, ref in (("base", base_entry, base), ("tuned", tuned_entry, tuned)):
            parent = entry["id"] if entry else (meta[role]["blake3"] or ref)
            lineage.append({"relation": "extracted-from", "parent": parent,
                            "detail": {"role": role, "name": meta[role]["name"], "blake3": meta[role]["blake3"],
                                       "criterion": opts.describe(),
                                       "frobenius_retained": round(res.retained, 6)}})
        entry, created = _register(home, out, name=name, type_=type_, triggers=trigger,
                                   base=res.family if res.family in ("sd1", "sd2", "sdxl") else None,
                                   lineage=lineage, description=f"extracted from {tuned} (base {base})")
        report["registered"] = {"id": entry["id"], "name": entry["name"], "created": created}
    if json_out:
        print_json(report)
        return
    _print_extract(res, report)


def _print_extract(res, report) -> None:
    from rich.table import Table

    con = console()
    t = Table(title="Frobenius norm retained per block", header_style="bold")
    for col in ("block", "layers", "rank", "retained", "randomized"):
        t.add_column(col, justify="left" if col == "block" else "right")
    for b in res.blocks():
        rk = str(b["rank_min"]) if b["rank_min"] == b["rank_max"] else f"{b['rank_min']}-{b['rank_max']}"
        t.add_row(b["block"], str(b["layers"]), rk, _fmt_pct(b["retained"]), str(b["randomized"]))
    ranks = [r.rank for r in res.layers]
    rk = str(min(ranks)) if min(ranks) == max(ranks) else f"{min(ranks)}-{max(ranks)}"
    t.add_section()
    t.add_row("total", str(len(res.layers)), rk, _fmt_pct(res.retained),
              str(sum(r.method == "randomized" for r in res.layers)))
    con.print(t)
    for n in res.notes:
        con.print(f"note: {n}")
    fb = sum(r.method == "exact-fallback" for r in res.layers)
    f64 = sum(r.float64_retry for r in res.layers)
    if fb:
        con.print(f"note: {fb} layer(s) fell back to the exact SVD (randomized result missed the optimum)")
    if f64:
        con.print(f"note: {f64} layer(s) were retried in float64 after a non-converging SVD")
    con.print(f"wrote {report['out']} ({report['format']}, {len(res.layers)} layers, "
              f"{_fmt_pct(res.retained)} of ‖ΔW‖_F retained, {res.seconds:.1f} s)")
    if "registered" in report:
        r = report["registered"]
        con.print(f"registered {r['id']} {r['name']}" + ("" if r["created"] else " (already registered)"))


@app.command()
def resize(
    lora: Annotated[str, typer.Argument(help="LoRA file or registry reference (id, name, hash prefix).")],
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    sv_ratio: SvRatioOpt = None,
    sv_fro: SvFroOpt = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="Output dialect: kohya | diffusers | peft (default: the input's).")] = None,
    out: OutOpt = None,
    register: RegisterOpt = False,
    type_: TypeOpt = None,
    trigger: TriggerOpt = None,
    name: NameOpt = None,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Reduce the rank of a LoRA (QR + small SVD of the factors; the strength is kept).

    With --energy/--sv-ratio/--sv-fro each layer gets the smallest rank meeting the criterion
    (--rank then caps it). Reports the Frobenius norm retained per layer and overall.
    """
    from lorahub.errors import LorahubError
    from lorahub.formats.io import load_lora, save_lora
    from lorahub.ops.resize import ResizeOptions, resize as run_resize

    opts = ResizeOptions(rank=rank, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro)
    opts.validate()
    p = Path(lora).expanduser()
    entry = None
    if p.is_file():
        src = p
    elif p.exists():
        raise LorahubError(f"{lora}: not a file")
    else:
        reg = open_registry(home)
        entry = reg.resolve(lora)
        src = reg.blob_path(entry)
    model = load_lora(src)
    if fmt is None:
        fmt = model.source_format if model.source_format in ("kohya", "diffusers", "peft") else "kohya"
    _check_format(fmt)
    if out is None:
        stem = entry["name"] if entry else p.name.split(".")[0]
        tag = f"r{rank}" if opts.dynamic is None else opts.dynamic.replace("_", "-")
        out = Path(f"{stem}-{tag}.safetensors")
    _check_out(out)
    if entry is None and out.resolve() == p.resolve():
        raise LorahubError(f"{out}: refusing to overwrite the input file")
    with progress() as prog:
        task = prog.add_task("resize", total=None)

        def on_layer(i, n, lname):
            prog.update(task, completed=i, total=n, description=f"resize {lname[:48]}")

        res = run_resize(model, opts, on_layer=on_layer)
    save_lora(res.model, out, dialect=fmt)
    report = {"out": str(out), "format": fmt, "criterion": opts.describe(),
              "frobenius_retained": res.retained, "notes": res.notes,
              "layers": [{"name": r.name, "old_rank": r.old_rank, "new_rank": r.new_rank,
                          "retained": r.retained} for r in res.layers]}
    if register:
        parent = entry["id"] if entry else _sha256(src)
        lineage = [{"relation": "resized-from", "parent": parent,
                    "detail": {"criterion": opts.describe(), "frobenius_retained": round(res.retained, 6),
                               "source": str(lora)}}]
        base = model.base if model.base in ("sd1", "sd2", "sdxl") else None
        reg_entry, created = _register(home, out, name=name, type_=type_ or (entry or {}).get("type"),
                                       triggers=trigger or (entry or {}).get("triggers"), base=base,
                                       lineage=lineage, description=f"resized from {lora} ({opts.describe()})")
        report["registered"] = {"id": reg_entry["id"], "name": reg_entry["name"], "created": created}
    if json_out:
        print_json(report)
        return
    from rich.table import Table

    con = console()
    t = Table(title="Resize: Frobenius norm retained per layer", header_style="bold")
    for col in ("layer", "rank", "new rank", "retained"):
        t.add_column(col, justify="left" if col == "layer" else "right")
    for r in res.layers:
        t.add_row(r.name, str(r.old_rank), str(r.new_rank), _fmt_pct(r.retained))
    t.add_section()
    t.add_row("total", "", "", _fmt_pct(res.retained))
    con.print(t)
    for n in res.notes:
        con.print(f"note: {n}")
    con.print(f"wrote {out} ({fmt}, {_fmt_pct(res.retained)} of ‖ΔW‖_F retained)")
    if "registered" in report:
        r = report["registered"]
        con.print(f"registered {r['id']} {r['name']}" + ("" if r["created"] else " (already registered)"))


def _sha256(path: Path) -> str:
    from lorahub.hashing import sha256_file

    return sha256_file(path, chunk=1 << 22)
