"""`lorahub extract` (LoRA from a full fine-tune) and `lorahub resize` (change a LoRA's rank).

Module level imports only typer/stdlib; torch and the ops are imported inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from lorahub.cli.app import ForceOpt, app
from lorahub.cli.common import HomeOpt, JsonOpt, console, print_json
from lorahub.cli.steps import steps

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


def _print_registered(con, res) -> None:
    if res.entry is not None:
        con.print(f"registered {res.entry['id']} {res.entry['name']}" + ("" if res.created else " (already registered)"))


@app.command()
def extract(
    base: Annotated[str, typer.Argument(help="Base model: diffusers folder, .safetensors checkpoint, registry ref, tiny-sd1/tiny-sdxl/tiny-flux/tiny-sd3.")],
    tuned: Annotated[str, typer.Argument(help="Fine-tuned model (same kinds as BASE).")],
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    sv_ratio: SvRatioOpt = None,
    sv_fro: SvFroOpt = None,
    conv_rank: Annotated[Optional[int], typer.Option("--conv-rank", help="Also extract 3×3 conv layers (LoCon) at this rank (cap in dynamic mode).")] = None,
    text_encoder: Annotated[bool, typer.Option("--text-encoder/--no-text-encoder", help="Extract text encoder layers when they differ by more than --min-diff.")] = True,
    clamp_quantile: Annotated[Optional[float], typer.Option("--clamp-quantile", help="Clamp as kohya's extract_lora_from_models.py does: up = U·S and down = Vh clipped to ± their joint Q-quantile (e.g. 0.99; in (0.5, 1]). Off by default.")] = None,
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
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Extract the difference TUNED − BASE as a LoRA (SVD per layer, streamed layer by layer).

    Attention, feed-forward and projection layers of the UNet, 3×3 convs with --conv-rank, and text
    encoders that differ. Prints the Frobenius norm retained per block and overall.
    """
    from lorahub.ops.extract import extract_lora

    with steps("extract") as on_layer:
        res = extract_lora(base, tuned, out=out, rank=rank, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro,
                           conv_rank=conv_rank, text_encoder=text_encoder, clamp_quantile=clamp_quantile,
                           min_diff=min_diff, device=device, dtype=dtype, method=method, dialect=fmt,
                           register=register, name=name, type=type_, triggers=trigger, force=force,
                           registry=home, on_layer=on_layer)
    if json_out:
        print_json(res.to_dict())
        return
    _print_extract(res)


def _print_extract(res) -> None:
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
    con.print(f"wrote {res.out} ({res.dialect}, {len(res.layers)} layers, "
              f"{_fmt_pct(res.retained)} of ‖ΔW‖_F retained, {res.seconds:.1f} s)")
    _print_registered(con, res)


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
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Reduce the rank of a LoRA (QR + small SVD of the factors; the strength is kept).

    With --energy/--sv-ratio/--sv-fro each layer gets the smallest rank meeting the criterion
    (--rank then caps it). Reports the Frobenius norm retained per layer and overall.
    """
    from lorahub.ops.resize import resize_lora

    with steps("resize") as on_layer:
        res = resize_lora(lora, rank=rank, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro, out=out, dialect=fmt,
                          register=register, name=name, type=type_, triggers=trigger, force=force, registry=home,
                          on_layer=on_layer)
    if json_out:
        print_json(res.to_dict())
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
    con.print(f"wrote {res.out} ({res.dialect}, {_fmt_pct(res.retained)} of ‖ΔW‖_F retained)")
    _print_registered(con, res)
