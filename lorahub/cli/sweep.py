"""`lorahub sweep`, `lorahub render`, `lorahub previews`: see what a LoRA does.

Module level imports only typer/stdlib; torch/diffusers load inside the commands.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from lorahub.cli.app import ForceOpt, app
from lorahub.cli.common import HomeOpt, JsonOpt, console, print_json
from lorahub.cli.steps import steps as steps_bar

BaseOpt = Annotated[str, typer.Option("--base", help="Base model: tiny-sd1, tiny-sdxl, tiny-flux, tiny-sd3, a "
                                                     "diffusers folder (SD1/SD2/SDXL, Flux.1, SD3), a single-file "
                                                     ".safetensors SD checkpoint, or a registry checkpoint.")]
PromptOpt = Annotated[List[str], typer.Option("--prompt", "-p", help="Prompt (repeat for several rows).")]
SeedsOpt = Annotated[str, typer.Option("--seeds", help="Seeds, comma-separated; one row per prompt × seed.")]
StepsOpt = Annotated[int, typer.Option("--steps", min=1, max=1000, help="Denoising steps.")]
SizeOpt = Annotated[int, typer.Option("--size", min=8, max=4096, help="Image width and height (multiple of 8).")]
GuidanceOpt = Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale (1 = off); for "
                                                             "Flux.1, the distilled guidance the model takes.")]
NegativeOpt = Annotated[Optional[str], typer.Option("--negative", help="Negative prompt.")]
SchedulerOpt = Annotated[Optional[str], typer.Option(
    "--scheduler", help="ddim, ddpm, pndm, lms, euler, euler_a, heun, dpm++, dpm_single, unipc, or a "
                        "diffusers scheduler class name (default: the model's own).")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch", min=1, help="Images per batched pipeline call "
                                                                        "(default 16).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="fp32, fp16 or bf16 (default: the model's).")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="Local diffusers folder of the same "
                                                                    "architecture, for a single-file checkpoint.")]
ImageOpt = Annotated[Optional[Path], typer.Option("--image", help="Init image: inpaint (with --mask).")]
MaskOpt = Annotated[Optional[Path], typer.Option("--mask", help="Inpainting mask (white = repaint).")]
NoTriggerOpt = Annotated[bool, typer.Option("--no-trigger", help="Do not prepend the entry's trigger words.")]


def _quiet() -> None:
    """Keep diffusers/transformers progress bars and advisories off the terminal (one-line errors only)."""
    import os
    import warnings

    for var, val in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                     ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(var, val)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def _numbers(text: str, flag: str, kind=float, example: str = "0,0.5,1") -> list:
    """``--alphas 0,0.5,1`` / ``--seeds 1,2``: comma-separated numbers."""
    from lorahub.errors import LorahubError

    try:
        return [kind(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise LorahubError(f"{flag} {text!r}: give {'integers' if kind is int else 'numbers'} separated by "
                           f"commas, e.g. {example}") from None


def _warn(res) -> None:
    for w in res.warnings:
        console(stderr=True).print(f"warning: {w}")


@app.command()
def sweep(
    refs: Annotated[List[str], typer.Argument(help="LoRA: registry id, name or hash prefix, or a file; give two "
                                                   "for a 2-D grid α₁ × α₂.", metavar="ID [ID2]")],
    base: BaseOpt,
    prompt: PromptOpt,
    alphas: Annotated[str, typer.Option("--alphas", help="Strengths (columns), comma-separated.")] = "0,0.25,0.5,0.75,1",
    alphas2: Annotated[Optional[str], typer.Option("--alphas2", help="Strengths of the second LoRA (rows; "
                                                                     "default: --alphas).")] = None,
    seeds: SeedsOpt = "1,2",
    steps: StepsOpt = 25,
    size: SizeOpt = 512,
    guidance: GuidanceOpt = 7.5,
    negative: NegativeOpt = None,
    scheduler: SchedulerOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Grid PNG to write.")] = Path("grid.png"),
    gif: Annotated[Optional[Path], typer.Option("--gif", help="Also write an animation cycling α (.gif or "
                                                              ".webp).")] = None,
    batch: BatchOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = None,
    config: ConfigOpt = None,
    image: ImageOpt = None,
    mask: MaskOpt = None,
    no_trigger: NoTriggerOpt = False,
    no_preview: Annotated[bool, typer.Option("--no-preview", help="Do not store the grid as a preview of the "
                                                                  "registry entry.")] = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Render an α sweep of a LoRA (α=0 is the base model, α=1 the full LoRA) as a labelled grid.

    Columns are the strengths, rows prompt × seed; every image of a row shares its seed, initial noise and
    scheduler. All strengths (and classifier-free guidance) run in one batched UNet call per step: the
    LoRA is a side branch whose strength is a per-sample tensor, never re-loaded or re-fused per α.
    """
    from lorahub.ops.sweep import sweep as run

    a1 = _numbers(alphas, "--alphas")
    a2 = _numbers(alphas2, "--alphas2") if alphas2 is not None else None
    _quiet()
    with steps_bar(f"sweep {' × '.join(refs)}") as on_batch:
        res = run(refs, base, prompt, alphas=a1, alphas2=a2, seeds=_numbers(seeds, "--seeds", int, "1,2"),
                  steps=steps, size=size, guidance=guidance, negative=negative, scheduler=scheduler, out=out,
                  animation=gif, batch=batch, device=device, dtype=dtype, config=config, image=image, mask=mask,
                  add_triggers=not no_trigger, store_preview=not no_preview, force=force, registry=home,
                  on_batch=on_batch)
    _warn(res)
    if json_out:
        print_json(res.to_dict())
        return
    c = console()
    c.print(f"wrote {out} ({res.rows} rows × {res.columns} columns, {len(res.images)} images)")
    if gif is not None:
        c.print(f"wrote {gif}")
    if res.previews:
        c.print(f"stored {len(res.previews)} preview(s) in the registry")


@app.command()
def render(
    refs: Annotated[List[str], typer.Argument(help="LoRAs as ID[:α] (α defaults to 1); registry references or "
                                                   "files; textual-inversion entries add their token.",
                                              metavar="ID[:α] ...")],
    base: BaseOpt,
    prompt: PromptOpt,
    seeds: SeedsOpt = "1",
    steps: StepsOpt = 25,
    size: SizeOpt = 512,
    guidance: GuidanceOpt = 7.5,
    negative: NegativeOpt = None,
    scheduler: SchedulerOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Image to write; with several prompts/seeds, "
                                                    "<stem>-<n><suffix>.")] = Path("render.png"),
    batch: BatchOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = None,
    config: ConfigOpt = None,
    image: ImageOpt = None,
    mask: MaskOpt = None,
    no_trigger: NoTriggerOpt = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Render images with one or more LoRAs at chosen strengths (ID:0.8 OTHER:0.5)."""
    from lorahub.ops.recipe import parse_inline
    from lorahub.ops.sweep import render as run

    loras = [(x.ref, x.weight) for x in map(parse_inline, refs)]
    _quiet()
    with steps_bar("render") as on_batch:
        res = run(loras, base, prompt, seeds=_numbers(seeds, "--seeds", int, "1,2"), steps=steps, size=size,
                  guidance=guidance, negative=negative, scheduler=scheduler, out=out, batch=batch, device=device,
                  dtype=dtype, config=config, image=image, mask=mask, add_triggers=not no_trigger, force=force,
                  registry=home, on_batch=on_batch)
    _warn(res)
    if json_out:
        print_json(res.to_dict())
    else:
        for f in res.files:
            console().print(f"wrote {f['file']}")


@app.command()
def previews(
    ref: Annotated[str, typer.Argument(help="Registry id, name or hash prefix.", metavar="ID")],
    export: Annotated[Optional[Path], typer.Option("--export", help="Copy the preview images into DIR.")] = None,
    open_: Annotated[bool, typer.Option("--open", help="Open the newest preview with the system viewer.")] = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """List the preview images of an entry (sweep grids, animations, imported covers); export or open them."""
    from lorahub.ops.sweep import export_previews
    from lorahub.registry import Registry

    with Registry.open(home, create=False) as reg:
        entry = reg.resolve(ref)
        items = reg.previews(entry["id"])
        exported = ([str(p) for p in export_previews(reg, entry["id"], export, force=force)]
                    if export is not None else [])
    if open_ and items:
        typer.launch(items[-1]["path"])
    if json_out:
        print_json({"entry": {"id": entry["id"], "name": entry["name"]}, "previews": items, "exported": exported})
        return
    c = console()
    if not items:
        c.print(f"{entry['name']} ({entry['id']}) has no previews; make one with `lorahub sweep {entry['id']} ...`")
        return
    from rich.table import Table

    t = Table(title=f"previews of {entry['name']} ({entry['id']})")
    for col in ("#", "kind", "size", "type", "added", "made with", "file"):
        t.add_column(col)
    for p in items:
        prm = p.get("params") or {}
        made = ""
        if prm:
            bits = [str(prm.get("base", ""))]
            if prm.get("alphas") is not None:
                bits.append("α " + ",".join(f"{a:g}" for a in prm["alphas"]))
            if prm.get("steps"):
                bits.append(f"{prm['steps']} steps")
            made = " · ".join(b for b in bits if b)
        t.add_row(str(p["id"]), str(p["kind"]), f"{p.get('width')}×{p.get('height')}", str(p.get("ext") or ""),
                  str(p.get("added_at") or "")[:19], made, p["path"])
    c.print(t)
    for f in exported:
        c.print(f"exported {f}")
    if export is not None and not exported:
        sys.stderr.write("nothing to export\n")
