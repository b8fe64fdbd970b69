"""`lorahub sweep`, `lorahub render`, `lorahub previews`: see what a LoRA does.

Module level imports only typer/stdlib; torch/diffusers load inside the commands.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from lorahub.cli.app import app
from lorahub.cli.common import HomeOpt, JsonOpt, console, open_registry, print_json, progress

BaseOpt = Annotated[str, typer.Option("--base", help="Base model: tiny-sd1, tiny-sdxl, a diffusers folder, a "
                                                     "single-file .safetensors checkpoint, or a registry checkpoint.")]
PromptOpt = Annotated[List[str], typer.Option("--prompt", "-p", help="Prompt (repeat for several rows).")]
SeedsOpt = Annotated[str, typer.Option("--seeds", help="Seeds, comma-separated; one row per prompt × seed.")]
StepsOpt = Annotated[int, typer.Option("--steps", min=1, max=1000, help="Denoising steps.")]
SizeOpt = Annotated[int, typer.Option("--size", min=8, max=4096, help="Image width and height (multiple of 8).")]
GuidanceOpt = Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale (1 = off).")]
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
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def _loras(refs: list[str], home) -> tuple[list, list[dict | None], list[str], list[list[str]]]:
    """(LoraModel, registry entry or None, display name, triggers) for every reference."""
    from lorahub.errors import LorahubError

    try:
        from lorahub.formats.io import load_lora
    except ImportError:
        raise LorahubError("reading LoRA files needs lorahub.formats.io, which is not installed") from None
    models, entries, names, triggers = [], [], [], []
    reg = None
    for ref in refs:
        p = Path(ref).expanduser()
        if p.is_file():
            entry, path, name, trig = None, p, p.stem, []
        elif "/" in ref or "\\" in ref or p.suffix.lower() in (".safetensors", ".pt", ".bin", ".ckpt"):
            raise LorahubError(f"{ref}: no such file")
        else:
            if reg is None:
                reg = open_registry(home)
            entry = reg.resolve(ref)
            path = reg.blob_path(entry)
            name, trig = entry["name"], list(entry.get("triggers") or [])
            if entry.get("kind") == "checkpoint":
                raise LorahubError(f"{ref}: is a checkpoint, not a LoRA (use it as --base)")
        models.append(load_lora(path))
        entries.append(entry)
        names.append(name)
        triggers.append(trig)
    return models, entries, names, triggers


def _pipeline(base: str, home, *, device: str, dtype: str | None, config: Path | None, inpaint: bool):
    from lorahub.ops.models import TINY, load_pipeline

    registry = None
    if base not in TINY and not Path(base).expanduser().exists():
        registry = open_registry(home)
    return load_pipeline(base, registry=registry, device=device, dtype=dtype, config=config, inpaint=inpaint)


def _inpaint_inputs(image: Path | None, mask: Path | None, size: int):
    from lorahub.errors import LorahubError

    if image is None and mask is None:
        return None, None
    if image is None or mask is None:
        raise LorahubError("inpainting needs both --image and --mask")
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in (image, mask):
        try:
            with Image.open(p) as im:
                out.append(im.convert("RGB" if p is image else "L").resize((size, size)))
        except (OSError, UnidentifiedImageError):
            raise LorahubError(f"{p}: not a readable image") from None
    return out[0], out[1]


def _check_size(size: int) -> None:
    from lorahub.errors import LorahubError

    if size % 8:
        raise LorahubError(f"--size {size}: must be a multiple of 8")


def _apply(models, names, triggers, base, home, *, device, dtype, config, inpaint, scheduler, no_trigger):
    """Load the pipeline, install the LoRAs as per-sample side branches; returns (pipe, handle,
    words to prepend to prompts: the entries' triggers and the embeddings' tokens)."""
    from lorahub.ops.apply import apply_loras
    from lorahub.ops.sweep import set_scheduler

    pipe = _pipeline(base, home, device=device, dtype=dtype, config=config, inpaint=inpaint)
    set_scheduler(pipe, scheduler)
    handle = apply_loras(pipe, models, names)
    _warn_unmatched(handle, names)
    if no_trigger:
        return pipe, handle, []
    return pipe, handle, [t for ts in triggers for t in ts] + [t for ts in handle.tokens for t in ts]


def _warn_unmatched(handle, names) -> None:
    for slot, missing in enumerate(handle.unmatched):
        if missing:
            console(stderr=True).print(f"warning: {names[slot]}: {len(missing)} layer(s) match no module of this "
                                       f"base model and are skipped (e.g. {missing[0]})")


def _make_renderer(pipe, handle, *, steps, size, guidance, negative, batch, image, mask, device):
    from lorahub.ops.sweep import run_samples

    def render(samples, label):
        with progress() as prog:
            task = prog.add_task(label, total=len(samples))
            return run_samples(pipe, handle, samples, batch=batch or 16, steps=steps, height=size, width=size,
                               guidance=guidance, negative=negative, output_type="pil",
                               generator_device="cpu", image=image, mask=mask,
                               on_batch=lambda n: prog.advance(task, n))
    return render


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
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Render an α sweep of a LoRA (α=0 is the base model, α=1 the full LoRA) as a labelled grid.

    Columns are the strengths, rows prompt × seed; every image of a row shares its seed, initial noise and
    scheduler. All strengths (and classifier-free guidance) run in one batched UNet call per step: the
    LoRA is a side branch whose strength is a per-sample tensor, never re-loaded or re-fused per α.
    """
    from lorahub.errors import LorahubError

    if len(refs) > 2:
        raise LorahubError("sweep takes one LoRA (1-D strip) or two (2-D grid α₁ × α₂)")
    _check_size(size)
    from lorahub.ops.sweep import parse_alphas, parse_seeds, plan_sweep, with_trigger

    a1 = parse_alphas(alphas)
    a2 = parse_alphas(alphas2) if alphas2 is not None else (a1 if len(refs) == 2 else None)
    if a2 is not None and len(refs) == 1:
        raise LorahubError("--alphas2 needs a second LoRA")
    seed_list = parse_seeds(seeds)
    if not prompt:
        raise LorahubError("give at least one --prompt")
    for p in [out] + ([gif] if gif else []):
        if p.suffix.lower() not in (".png", ".gif", ".webp", ".jpg", ".jpeg"):
            raise LorahubError(f"{p}: use a .png/.jpg/.webp file for --out and .gif/.webp for --gif")
    if gif is not None and gif.suffix.lower() not in (".gif", ".webp"):
        raise LorahubError(f"--gif {gif}: animations are .gif or .webp")
    img, msk = _inpaint_inputs(image, mask, size)
    _quiet()
    models, entries, names, triggers = _loras(refs, home)
    for m, n in zip(models, names):
        if not m.layers:
            raise LorahubError(f"{n}: a textual-inversion embedding has no strength to sweep; use `lorahub render`")
    pipe, handle, words = _apply(models, names, triggers, base, home, device=device, dtype=dtype,
                                 config=config, inpaint=img is not None, scheduler=scheduler,
                                 no_trigger=no_trigger)

    from lorahub.ops.grid import format_alpha, make_animation, make_grid, save_animation, save_image

    prompts = [with_trigger(p, words) for p in prompt]
    samples = plan_sweep(prompts, seed_list, a1, a2)
    render = _make_renderer(pipe, handle, steps=steps, size=size, guidance=guidance, negative=negative,
                            batch=batch, image=img, mask=msk, device=device)
    images = render(samples, f"sweep {' × '.join(names)}")
    handle.remove()

    n_rows = max(s.row for s in samples) + 1
    cells = [[None] * len(a1) for _ in range(n_rows)]
    row_labels = [""] * n_rows
    for s, im in zip(samples, images):
        cells[s.row][s.col] = im
        lab = f"{prompt[s.meta['prompt_index']]}\nseed {s.seed}"
        if len(refs) == 2:
            lab += f"\n{names[1]} α={format_alpha(s.alphas[1])}"
        row_labels[s.row] = lab
    col_labels = [f"α={format_alpha(a)}" for a in a1]
    title = f"{' × '.join(names)} on {base} · {steps} steps · cfg {guidance:g} · {size}px"
    params = {"loras": [{"name": n, "id": e["id"] if e else None} for n, e in zip(names, entries)],
              "base": base, "prompts": prompts, "alphas": a1, "alphas2": a2, "seeds": seed_list, "steps": steps,
              "size": size, "guidance": guidance, "negative": negative,
              "scheduler": type(pipe.scheduler).__name__, "dtype": str(pipe.unet.dtype).replace("torch.", ""),
              "device": device, "inpaint": img is not None, "triggers": [] if no_trigger else [t for ts in triggers for t in ts]}
    grid = make_grid(cells, col_labels, row_labels, title=title, col_axis=f"{names[0]}  α",
                     row_axis="prompt · seed" + (f" · {names[1]} α" if len(refs) == 2 else ""))
    save_image(grid, out, params)
    written = {"grid": str(out)}
    if gif is not None:
        save_animation(make_animation(cells, col_labels, row_labels, title=f"{names[0]}"), gif)
        written["animation"] = str(gif)

    previews = []
    if not no_preview and any(entries):
        reg = open_registry(home)
        for e in entries:
            if e is None:
                continue
            previews.append(reg.add_preview(e["id"], out, kind="grid", params=params))
            if gif is not None:
                previews.append(reg.add_preview(e["id"], gif, kind="animation", params=params))
    report = {"files": written, "images": len(images), "rows": n_rows, "columns": len(a1),
              "layers_applied": handle.applied, "layers_skipped": [len(u) for u in handle.unmatched],
              "previews": [{"entry": p.get("entry_id"), "id": p.get("id"), "kind": p.get("kind")} for p in previews
                           if isinstance(p, dict)],
              "params": params}
    if json_out:
        print_json(report)
    else:
        c = console()
        c.print(f"wrote {out} ({n_rows} rows × {len(a1)} columns, {len(images)} images)")
        if gif is not None:
            c.print(f"wrote {gif}")
        if previews:
            c.print(f"stored {len(previews)} preview(s) in the registry")


def _parse_weighted(ref: str) -> tuple[str, float]:
    from lorahub.errors import LorahubError

    head, sep, tail = ref.rpartition(":")
    if sep and head:
        try:
            a = float(tail)
        except ValueError:
            return ref, 1.0
        if a != a or abs(a) == float("inf"):
            raise LorahubError(f"{ref}: the strength must be a finite number")
        return head, a
    return ref, 1.0


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
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Render images with one or more LoRAs at chosen strengths (ID:0.8 OTHER:0.5)."""
    from lorahub.errors import LorahubError

    _check_size(size)
    from lorahub.ops.sweep import Sample, parse_seeds, with_trigger
    from lorahub.ops.grid import save_image

    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise LorahubError(f"--out {out}: use .png, .jpg or .webp")
    pairs = [_parse_weighted(r) for r in refs]
    seed_list = parse_seeds(seeds)
    img, msk = _inpaint_inputs(image, mask, size)
    _quiet()
    models, entries, names, triggers = _loras([p[0] for p in pairs], home)
    pipe, handle, words = _apply(models, names, triggers, base, home, device=device, dtype=dtype,
                                 config=config, inpaint=img is not None, scheduler=scheduler,
                                 no_trigger=no_trigger)
    strengths = tuple(a for _, a in pairs)
    samples = [Sample(with_trigger(p, words), s, strengths) for p in prompt for s in seed_list]
    run = _make_renderer(pipe, handle, steps=steps, size=size, guidance=guidance, negative=negative,
                         batch=batch, image=img, mask=msk, device=device)
    images = run(samples, "render")
    handle.remove()
    files = []
    for i, (s, im) in enumerate(zip(samples, images)):
        dest = out if len(images) == 1 else out.with_name(f"{out.stem}-{i + 1}{out.suffix}")
        params = {"loras": [{"name": n, "alpha": a, "id": e["id"] if e else None}
                            for n, a, e in zip(names, strengths, entries)],
                  "base": base, "prompt": s.prompt, "seed": s.seed, "steps": steps, "size": size,
                  "guidance": guidance, "negative": negative, "scheduler": type(pipe.scheduler).__name__}
        save_image(im, dest, params)
        files.append({"file": str(dest), "prompt": s.prompt, "seed": s.seed})
    if json_out:
        print_json({"files": files, "loras": [{"name": n, "alpha": a} for n, a in zip(names, strengths)]})
    else:
        for f in files:
            console().print(f"wrote {f['file']}")


@app.command()
def previews(
    ref: Annotated[str, typer.Argument(help="Registry id, name or hash prefix.", metavar="ID")],
    export: Annotated[Optional[Path], typer.Option("--export", help="Copy the preview images into DIR.")] = None,
    open_: Annotated[bool, typer.Option("--open", help="Open the newest preview with the system viewer.")] = False,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """List the preview images of an entry (sweep grids, animations, imported covers); export or open them."""
    from lorahub.errors import LorahubError
    from lorahub.fsutil import atomic_write_bytes

    reg = open_registry(home)
    entry = reg.resolve(ref)
    items = reg.previews(entry["id"])
    exported = []
    if export is not None:
        if export.exists() and not export.is_dir():
            raise LorahubError(f"--export {export}: not a folder")
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in entry["name"]) or entry["id"]
        for p in items:
            src = Path(p["path"])
            if not src.is_file():
                raise LorahubError(f"preview {p['id']} of {entry['name']} is missing from the store; run `lorahub verify`")
            dest = export / f"{safe}-{p['id']}-{p['kind']}.{p.get('ext') or 'png'}"
            atomic_write_bytes(dest, src.read_bytes())
            exported.append(str(dest))
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
