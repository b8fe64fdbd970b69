"""Commands `inspect` and `diff`: what is in a LoRA, and how two LoRAs overlap.

Only typer/rich/stdlib at module level; torch and the ops modules are imported inside the commands.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lorahub.cli.app import ForceOpt, app
from lorahub.cli.common import HomeOpt, JsonOpt, console, print_json, styled
from lorahub.cli.steps import steps

LayersOpt = Annotated[Optional[str], typer.Option(
    "--layers", help="Only layers whose canonical key matches: a glob (unet.up_blocks.*attn2*) or a substring.")]


def _f(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1e4 or abs(v) < 1e-3:
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def _size(n) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _summary_value(v) -> str:
    if isinstance(v, dict):
        return f"{_f(v.get('min'))} / {_f(v.get('median'))} / {_f(v.get('max'))} (min/median/max)"
    return _f(v)


_ABBREV = (("text_encoder_2.text_model.encoder.layers.", "te2.layers."), ("text_encoder.text_model.encoder.layers.", "te.layers."),
           ("text_encoder_2.encoder.layers.", "te2.layers."), ("text_encoder.encoder.layers.", "te.layers."),
           ("unet.", ""), ("down_blocks.", "down."), ("up_blocks.", "up."), ("mid_block.", "mid."),
           ("attentions.", "attn."), ("transformer_blocks.", "tb."), ("resnets.", "res."))


def short_key(key: str) -> str:
    """Compact display form of a canonical key (tables only; --json keeps the full keys)."""
    for a, b in _ABBREV:
        key = key.replace(a, b)
    return key


def _out():
    out = console()
    if not out.is_terminal:  # piped: do not squeeze tables into 80 columns
        out.width = 200
    return out


def _warn(lines: list[str]) -> None:
    err = console(stderr=True)
    for w in lines:
        err.print(styled(("WARNING:", "bold red"), f" {w}"))


@app.command("inspect")
def inspect_cmd(
    ref: Annotated[str, typer.Argument(metavar="ID|FILE", help="A LoRA file, or a registry id/name/hash prefix.")],
    json_out: JsonOpt = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a heat-map PNG of strength by block and layer type.")] = None,
    layers: LayersOpt = None,
    base: Annotated[Optional[str], typer.Option(
        "--base", help="Base model (tiny-sd1, tiny-sdxl, tiny-flux, tiny-sd3, diffusers folder, checkpoint, registry ref): adds ‖ΔW‖/‖W0‖; "
                       "its own module list maps kohya names no built-in table holds.")] = None,
    top: Annotated[int, typer.Option("--top", help="Strongest layers listed when --layers is not given (0: all).")] = 12,
    force: ForceOpt = False,
    home: HomeOpt = None,
) -> None:
    """Summarise a LoRA: format, ranks, metadata, and per-layer/per-block norms, spectral norms,
    effective ranks (computed from the factors, never the full matrices)."""
    from lorahub.ops.inspect import inspect_lora

    with steps("inspecting") as on_layer:
        res = inspect_lora(ref, base=base, layers=layers, plot=plot, force=force, registry=home, on_layer=on_layer)
    _warn(res.warnings)
    report = res.to_dict()
    if json_out:
        print_json(report)
        return
    _print_report(report, layers=layers, top=top)


def _print_report(r: dict, *, layers: Optional[str], top: int) -> None:
    from rich.table import Table

    out = _out()
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    rows = [
        ("file", r.get("file")),
        ("entry", f"{r['entry']['id']} ({r['entry']['name']})" if r.get("entry") else None),
        ("format", r["format"]), ("base", r["base"]), ("kind", r["kind"]),
        ("parts", ", ".join(r["parts"]) or "–"),
        ("layers", f"{r['layers']}" + (f" ({r['layers_shown']} match {layers!r})" if layers else "")),
        ("rank", _summary_value(r["rank"])), ("alpha", _summary_value(r["alpha"])),
        ("scale", _summary_value(r["scale"])),
        ("parameters", f"{r['parameters']:,}"), ("dtypes", ", ".join(r["dtypes"]) or "–"),
        ("file size", _size(r.get("size"))),
        ("‖ΔW‖_F total", _f(r["totals"]["fro"])), ("max ‖ΔW‖₂", _f(r["totals"]["spectral_max"])),
    ]
    if r["embeddings"]:
        rows.append(("embeddings", "; ".join(
            f"{tok} " + ", ".join(f"{enc} {'×'.join(map(str, e['shape']))} (‖v‖ " + ", ".join(_f(n, 3) for n in e["norms"][:8])
                                  + (" …" if len(e["norms"]) > 8 else "") + ")" for enc, e in encs.items())
            for tok, encs in r["embeddings"].items())))
    if r["materialised_layers"]:
        rows.append(("note", f"{r['materialised_layers']} LyCORIS/full layer(s) materialised to compute their spectra"))
    if r.get("base_model"):
        rows.append(("base model", r["base_model"]))
    if r.get("unmapped_layers"):
        rows.append(("unmapped", f"{r['unmapped_layers']} layer(s) under their kohya names (no module list maps them)"))
    for k, v in rows:
        if v is not None:
            t.add_row(k, str(v))
    meta = r["metadata"]
    for k, v in meta["fields"].items():
        t.add_row(k.replace("_", " "), v)
    if meta["tags"]:
        t.add_row("training tags", ", ".join(f"{tag} ({n})" for tag, n in meta["tags"][:15])
                  + (f", … {len(meta['tags']) - 15} more" if len(meta["tags"]) > 15 else ""))
    if meta["datasets"]:
        t.add_row("datasets", "; ".join(
            f"{d['dir']}" + (f" ×{d['repeats']}" if d.get("repeats") is not None else "")
            + (f" ({d['images']} images)" if d.get("images") is not None else "") for d in meta["datasets"]))
    if r.get("plot"):
        t.add_row("heat map", r["plot"])
    out.print(t)

    rel = r.get("base_model") is not None
    if r["blocks"]:
        bt = Table(title="per block", title_justify="left")
        for c in ("block", "layers", "params", "‖ΔW‖_F (√Σ²)", "mean ‖ΔW‖_F", "max ‖ΔW‖₂", "mean eff. rank 90%"):
            bt.add_column(c, justify="left" if c == "block" else "right", no_wrap=True)
        if rel:
            bt.add_column("‖ΔW‖/‖W0‖", justify="right")
        for b in r["blocks"]:
            row = [b["block"], str(b["layers"]), f"{b['params']:,}", _f(b["fro_total"]), _f(b["fro_mean"]),
                   _f(b["spectral_max"]), _f(b["eff_rank_90_mean"], 3)]
            if rel:
                row.append(_f(b["rel_strength"]))
            bt.add_row(*row)
        out.print(bt)

    per = r["per_layer"]
    shown = per
    title = "per layer"
    if not layers and top and len(per) > top:
        shown = sorted([p for p in per if p["fro"] is not None], key=lambda p: -p["fro"])[:top]
        shown += [p for p in per if p["fro"] is None][: max(0, top - len(shown))]
        title = f"strongest {len(shown)} of {len(per)} layers (--layers PATTERN or --top 0 for all; --json for full keys)"
    if shown:
        lt = Table(title=title, title_justify="left")
        for c in ("layer", "kind", "shape", "rank", "alpha", "scale", "‖ΔW‖_F", "‖ΔW‖₂", "eff 90%", "eff 99%"):
            lt.add_column(c, justify="left" if c in ("layer", "kind") else "right",
                          overflow="fold", no_wrap=c != "layer")
        if rel:
            lt.add_column("‖ΔW‖/‖W0‖", justify="right")
        for p in shown:
            row = [short_key(p["key"]), p["kind"] + (" (NaN/Inf!)" if not p["finite"] else ""), "×".join(map(str, p["shape"])),
                   str(p["rank"]), "=rank" if p["alpha"] is None else _f(p["alpha"]), _f(p["scale"]), _f(p["fro"]), _f(p["spectral"]),
                   _f(p["eff_rank_90"]), _f(p["eff_rank_99"])]
            if rel:
                row.append(_f(p["rel_strength"]))
            lt.add_row(*row)
        out.print(lt)


@app.command("diff")
def diff_cmd(
    a: Annotated[str, typer.Argument(metavar="A", help="First LoRA (file or registry ref).")],
    b: Annotated[str, typer.Argument(metavar="B", help="Second LoRA (file or registry ref).")],
    json_out: JsonOpt = False,
    layers: LayersOpt = None,
    top: Annotated[int, typer.Option("--top", help="Layers listed (most shared energy first; 0: all).")] = 20,
    home: HomeOpt = None,
) -> None:
    """Compare two LoRAs layer by layer: cosine similarity and norm ratio of ΔW, overlap of their
    principal directions, and layers only one of them adapts (all from the factors)."""
    from lorahub.ops.diff import diff_loras

    with steps("comparing") as on_layer:
        d = diff_loras(a, b, layers=layers, registry=home, on_layer=on_layer)
    _warn(d.warnings)
    res = d.to_dict()
    if json_out:
        print_json(res)
        return
    pa, pb, s = d.a, d.b, d.summary
    from rich.table import Table

    out = _out()
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("A", f"{pa} ({s['layers_a']} layers)")
    t.add_row("B", f"{pb} ({s['layers_b']} layers)")
    t.add_row("shared layers", f"{s['common']} ({s['compared']} compared); only in A: {s['only_a']}, only in B: {s['only_b']}")
    if s["energy_a_shared"] is not None:
        t.add_row("energy in shared layers", f"A {s['energy_a_shared']:.1%}, B {s['energy_b_shared']:.1%}")
    t.add_row("overall cosine", _f(s["cosine"]))
    t.add_row("mean |cosine|", _f(s["abs_cosine_mean"]))
    t.add_row("norm ratio ‖B‖/‖A‖", _f(s["norm_ratio"]))
    t.add_row("subspace overlap", f"{_f(s['overlap'])} (out {_f(s['overlap_out'])}, in {_f(s['overlap_in'])}; "
              f"chance {_f(s['chance'])})")
    t.add_row("verdict", s["verdict"])
    out.print(t)
    per = [p for p in res["per_layer"]]
    per.sort(key=lambda p: -((p["norm_a"] or 0.0) * (p["norm_b"] or 0.0)))
    if top and len(per) > top:
        per = per[:top]
    if per:
        lt = Table(title=f"shared layers ({len(per)} of {s['common']}, strongest first)", title_justify="left")
        for c in ("layer", "cosine", "‖B‖/‖A‖", "overlap out", "overlap in", "chance", "status"):
            lt.add_column(c, justify="left" if c in ("layer", "status") else "right",
                          overflow="fold", no_wrap=c != "layer")
        for p in per:
            ch = None if p["chance_out"] is None else (p["chance_out"] + p["chance_in"]) / 2
            lt.add_row(short_key(p["key"]), _f(p["cosine"], 3), _f(p["norm_ratio"], 3), _f(p["overlap_out"], 3),
                       _f(p["overlap_in"], 3), _f(ch, 2), p["status"])
        out.print(lt)
    for label, keys in (("only in A", res["only_a"]), ("only in B", res["only_b"])):
        if keys:
            shown = keys[:10]
            out.print(styled((label, "bold"), f" ({len(keys)}): " + ", ".join(shown) + (" …" if len(keys) > 10 else "")))
    sys.stdout.flush()
