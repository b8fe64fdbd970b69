"""Batched α sweeps: every strength of a row (and classifier-free guidance) in one denoiser call per step.

The denoiser is the UNet of SD1/SD2/SDXL pipelines or the transformer of Flux.1 / SD3 pipelines; the
side branches sit on its linears (and convs) and on the text encoders' (CLIP and T5) linears alike.

The LoRA(s) are installed once as side branches (:mod:`lorahub.ops.apply`) whose strength is a
per-sample tensor. A batch of samples (prompt, seed, α…) is rendered by one call of the diffusers
pipeline itself, fed with

* prompt embeddings computed by the pipeline's own ``encode_prompt`` while the text-encoder branches
  hold the same per-sample α vector (so the text-encoder part of the LoRA follows α too, for the
  positive and the negative prompt, as ``set_adapters`` does);
* initial latents drawn per sample exactly as the pipeline draws them (``randn_tensor`` of a
  (1, C, h, w) shape from ``torch.Generator(device).manual_seed(seed)``; for DiT pipelines their own
  ``prepare_latents`` of one sample, packed for Flux), and that same generator per
  sample for any later noise of the scheduler; every sample of a row shares its seed, initial noise
  and scheduler, so only α changes along a row.

Inside the pipeline the UNet (SD3: the transformer) sees ``[uncond…, cond…]`` of 2·N samples and the
branches tile the α vector to match; Flux.1's distilled guidance is a transformer input, so its batch
is N. DiT prompts go through T5 at the T5 tokenizer's own length (:func:`t5_length`). The denoising
loop, guidance and scheduler are diffusers' own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lorahub.errors import LorahubError

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpm_single": "DPMSolverSinglestepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def set_scheduler(pipe, name: str | None) -> None:
    """Swap the pipeline's scheduler for ``name`` (short name or diffusers class name), same config."""
    if not name:
        return
    import diffusers

    cls_name = SCHEDULERS.get(name.lower(), name)
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not cls_name.endswith("Scheduler"):
        raise LorahubError(f"unknown scheduler {name!r} (one of {', '.join(SCHEDULERS)} or a diffusers class name)")
    flow = "FlowMatch" in type(pipe.scheduler).__name__
    if flow != ("FlowMatch" in cls_name):
        raise LorahubError(f"scheduler {name!r} does not fit this model: it is trained for "
                           f"{'flow matching (FlowMatch… schedulers)' if flow else 'noise prediction'}")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


@dataclass
class Sample:
    """One image of a sweep: its prompt, seed, strengths (one per LoRA) and grid position."""

    prompt: str
    seed: int
    alphas: tuple[float, ...]
    row: int = 0
    col: int = 0
    meta: dict = field(default_factory=dict)


def plan_sweep(prompts: list[str], seeds: list[int], alphas: list[float],
               alphas2: list[float] | None = None) -> list[Sample]:
    """Rows = prompt × seed (× α₂ for two LoRAs), columns = α (α₁)."""
    samples = []
    row = 0
    for p_i, prompt in enumerate(prompts):
        for seed in seeds:
            for a2 in (alphas2 if alphas2 is not None else [None]):
                for col, a in enumerate(alphas):
                    al = (float(a),) if a2 is None else (float(a), float(a2))
                    samples.append(Sample(prompt, int(seed), al, row, col,
                                          {"prompt_index": p_i, "alpha2": a2}))
                row += 1
    return samples


def _initial(pipe, seed: int, height: int, width: int, dtype, device, generator_device: str):
    from diffusers.utils.torch_utils import randn_tensor
    import torch

    g = torch.Generator(device=generator_device).manual_seed(int(seed))
    if getattr(pipe, "transformer", None) is not None:
        # DiT pipelines: the pipeline's own prepare_latents for one sample (Flux packs 2×2 patches)
        c = pipe.transformer.config.in_channels
        if _family(pipe) == "flux":
            c //= 4
        lat = pipe.prepare_latents(1, c, int(height), int(width), dtype, torch.device(device), g, None)
        return g, lat[0] if isinstance(lat, tuple) else lat
    c = pipe.unet.config.in_channels
    if c == 9:  # inpainting UNet: noise has the VAE latent width
        c = pipe.vae.config.latent_channels
    shape = (1, c, int(height) // pipe.vae_scale_factor, int(width) // pipe.vae_scale_factor)
    return g, randn_tensor(shape, generator=g, device=torch.device(device), dtype=dtype)


def _family(pipe) -> str:
    from lorahub.ops.models import family_of_pipeline

    return family_of_pipeline(pipe)


def t5_length(pipe) -> int | None:
    """The T5 prompt length a DiT pipeline is driven with: its T5 tokenizer's ``model_max_length``,
    capped by the pipeline's default (Flux 512, SD3 256); None for pipelines without T5."""
    fam = _family(pipe)
    tok = getattr(pipe, {"flux": "tokenizer_2", "sd3": "tokenizer_3"}.get(fam, ""), None)
    if tok is None:
        return None
    return min(int(tok.model_max_length), 512 if fam == "flux" else 256)


def _embed(pipe, prompts: list[str], negatives: list[str] | None, do_cfg: bool, device) -> dict:
    fam = _family(pipe)
    if fam == "flux":
        if negatives is not None:
            raise LorahubError("Flux.1 models use guidance distillation: a negative prompt is not used")
        pe, ppe, _ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1,
                                           max_sequence_length=t5_length(pipe))
        return {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}
    if fam == "sd3":
        pe, npe, ppe, nppe = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                num_images_per_prompt=1, do_classifier_free_guidance=do_cfg,
                                                negative_prompt=negatives, max_sequence_length=t5_length(pipe))
        out = {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}
        if do_cfg:
            out.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=nppe)
        return out
    if getattr(pipe, "transformer", None) is not None:
        raise LorahubError(f"rendering {fam} models is not supported (Flux.1, SD3 and the SD UNet families are)")
    if fam == "sdxl":
        pe, npe, ppe, nppe = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                do_classifier_free_guidance=do_cfg, negative_prompt=negatives)
        out = {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}
        if do_cfg:
            out.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=nppe)
        return out
    pe, npe = pipe.encode_prompt(prompts, device, 1, do_cfg, negative_prompt=negatives)
    out = {"prompt_embeds": pe}
    if do_cfg:
        out["negative_prompt_embeds"] = npe
    return out


def render_batch(pipe, handle, samples: list[Sample], *, steps: int, height: int, width: int,
                 guidance: float = 7.5, negative: str | None = None, output_type: str = "pil",
                 generator_device: str = "cpu", image=None, mask=None, extra_call_kwargs: dict | None = None):
    """Render ``samples`` in ONE pipeline call (one batched UNet call per step). Returns the images."""
    import torch

    if not samples:
        return []
    device = pipe._execution_device
    n_slots = len(handle.names) if handle is not None else 0

    def set_scales(rows):
        if handle is not None:
            for slot in range(n_slots):
                handle.set_scale(slot, [a[slot] if slot < len(a) else 1.0 for a in rows])

    from lorahub.ops.models import denoiser

    fam = _family(pipe)
    # Flux.1's guidance is an input of the transformer (distilled), not a second batch half
    do_cfg = guidance > 1.0 and fam != "flux" and getattr(denoiser(pipe).config, "time_cond_proj_dim", None) is None
    # the text encoder sees each distinct (prompt, α…) once (seeds repeat them), at its per-sample α
    keys = [(s.prompt, tuple(s.alphas)) for s in samples]
    uniq = list(dict.fromkeys(keys))
    where = torch.tensor([uniq.index(k) for k in keys])
    set_scales([a for _, a in uniq])
    negatives = [negative] * len(uniq) if negative is not None else None
    with torch.no_grad():
        kwargs = _embed(pipe, [p for p, _ in uniq], negatives, do_cfg, device)
    kwargs = {k: v.index_select(0, where.to(v.device)) for k, v in kwargs.items()}
    set_scales([s.alphas for s in samples])  # the UNet sees every sample (and the CFG halves)
    gens, lats = [], []
    for s in samples:
        g, lat = _initial(pipe, s.seed, height, width, kwargs["prompt_embeds"].dtype, device, generator_device)
        gens.append(g)
        lats.append(lat)
    call = dict(kwargs, latents=torch.cat(lats), generator=gens, num_inference_steps=steps,
                guidance_scale=guidance, height=height, width=width, output_type=output_type)
    if t5_length(pipe) is not None:
        call["max_sequence_length"] = t5_length(pipe)
    if image is not None:
        call.update(image=image, mask_image=mask)
    if extra_call_kwargs:
        call.update(extra_call_kwargs)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**call)
    return list(out.images)


def run_samples(pipe, handle, samples: list[Sample], *, batch: int | None = None, on_batch=None, **kw):
    """Render every sample, ``batch`` at a time (default: all at once). Images in sample order."""
    batch = max(1, int(batch or len(samples) or 1))
    images = []
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        images.extend(render_batch(pipe, handle, chunk, **kw))
        if on_batch is not None:
            on_batch(len(chunk))
    return images


def check_alphas(alphas, what: str = "alphas") -> list[float]:
    """The strengths as floats: at least one, all finite."""
    vals = [float(v) for v in alphas]
    if not vals:
        raise LorahubError(f"{what}: give at least one strength")
    if any(v != v or abs(v) == float("inf") for v in vals):
        raise LorahubError(f"{what}: strengths must be finite numbers")
    return vals


def check_seeds(seeds) -> list[int]:
    """The seeds as ints: at least one, each in [0, 2**63)."""
    vals = [int(v) for v in seeds]
    if not vals:
        raise LorahubError("seeds: give at least one seed")
    if any(v < 0 or v >= 2 ** 63 for v in vals):
        raise LorahubError("seeds: seeds must be between 0 and 2**63-1")
    return vals


def with_trigger(prompt: str, triggers: list[str]) -> str:
    """Prepend trigger words not already in the prompt."""
    missing = [t for t in triggers if t and t.lower() not in prompt.lower()]
    return ", ".join(missing + [prompt]) if missing else prompt


# --------------------------------------------------------------------------------------------------
# The sweep and render workflows: references in, images (and registry previews) out

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
ANIMATION_SUFFIXES = (".gif", ".webp")


@dataclass
class SweepResult:
    """What :func:`sweep` wrote: the grid (and animation) files, the images (PIL, in sample order),
    the grid's shape, how many layers each LoRA applied or skipped, the registry previews stored,
    and the parameters (also stored in the PNG and with the previews)."""

    files: dict
    images: list
    rows: int
    columns: int
    layers_applied: list[int]
    layers_skipped: list[int]
    previews: list[dict]
    params: dict
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"files": self.files, "images": len(self.images), "rows": self.rows, "columns": self.columns,
                "layers_applied": self.layers_applied, "layers_skipped": self.layers_skipped,
                "previews": [{"entry": p.get("entry_id"), "id": p.get("id"), "kind": p.get("kind")}
                             for p in self.previews],
                "params": self.params}


@dataclass
class RenderResult:
    """What :func:`render` wrote: one file per prompt × seed (``file``, ``prompt``, ``seed``), the
    LoRAs with their strengths, and the images (PIL)."""

    files: list[dict]
    loras: list[dict]
    images: list = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"files": self.files, "loras": [{"name": x["name"], "alpha": x["alpha"]} for x in self.loras]}


def _inpaint_inputs(image, mask, size: int):
    """(init image, mask) resized to ``size``: paths or PIL images; both or neither."""
    if image is None and mask is None:
        return None, None
    if image is None or mask is None:
        raise LorahubError("inpainting needs both an image and a mask")
    from PIL import Image, UnidentifiedImageError

    out = []
    for p, mode in ((image, "RGB"), (mask, "L")):
        if isinstance(p, Image.Image):
            out.append(p.convert(mode).resize((size, size)))
            continue
        try:
            with Image.open(p) as im:
                out.append(im.convert(mode).resize((size, size)))
        except (OSError, UnidentifiedImageError):
            raise LorahubError(f"{p}: not a readable image") from None
    return out[0], out[1]


def _check_size(size: int, steps: int) -> None:
    if size < 8 or size % 8:
        raise LorahubError(f"size {size}: must be a multiple of 8")
    if steps < 1:
        raise LorahubError("steps must be at least 1")


class _Session:
    """The LoRAs loaded, then (:meth:`install`) installed into the base pipeline as per-sample side
    branches."""

    def __init__(self, refs: list, regs):
        from lorahub.formats.io import load_lora
        from lorahub.refs import resolve_lora

        self.loras = [resolve_lora(r, regs) for r in refs]
        self.models = [load_lora(x.path) for x in self.loras]
        self.names = [x.name for x in self.loras]

    def install(self, base: str, regs, *, device: str, dtype, config, inpaint: bool, scheduler: str | None,
                add_triggers: bool) -> None:
        from lorahub.ops.apply import apply_loras
        from lorahub.ops.models import load_pipeline

        self.pipe = load_pipeline(base, registry=regs, device=device, dtype=dtype, config=config, inpaint=inpaint)
        set_scheduler(self.pipe, scheduler)
        self.handle = apply_loras(self.pipe, self.models, self.names)
        self.warnings = [f"{self.names[slot]}: {len(missing)} layer(s) match no module of this base model and are "
                         f"skipped (e.g. {missing[0]})" for slot, missing in enumerate(self.handle.unmatched) if missing]
        self.triggers = [t for x in self.loras for t in x.triggers] if add_triggers else []
        self.words = self.triggers + ([t for ts in self.handle.tokens for t in ts] if add_triggers else [])

    def render(self, samples: list[Sample], *, batch, on_batch, **kw):
        total, done = len(samples), 0

        def step(n):
            nonlocal done
            done += n
            if on_batch is not None:
                on_batch(done, total)

        try:
            return run_samples(self.pipe, self.handle, samples, batch=batch or 16, output_type="pil",
                               generator_device="cpu", on_batch=step, **kw)
        finally:
            self.handle.remove()


def sweep(loras: list, base: str, prompts: list[str], *, alphas=(0, 0.25, 0.5, 0.75, 1), alphas2=None,
          seeds=(1, 2), steps: int = 25, size: int = 512, guidance: float = 7.5, negative: str | None = None,
          scheduler: str | None = None, out="grid.png", animation=None, batch: int | None = None,
          device: str = "cpu", dtype: str | None = None, config=None, image=None, mask=None,
          add_triggers: bool = True, store_preview: bool = True, force: bool = False, registry=None,
          on_batch=None) -> SweepResult:
    """Render an α sweep of one LoRA (columns α, rows prompt × seed) or two (rows also α₂) as a
    labelled grid; α=0 is the base model, α=1 the full LoRA.

    ``loras``: one or two references (files or registry entries). ``base``: the model (tiny-sd1,
    tiny-sdxl, tiny-flux, tiny-sd3, a diffusers folder — SD1/SD2/SDXL, Flux.1 or SD3 —, a single-file
    SD checkpoint with ``config`` = a local diffusers folder of the same architecture, or a registry
    checkpoint). Flux.1 takes ``guidance`` as its distilled guidance (no negative prompt); inpainting
    is for the SD UNet families. ``alphas2`` defaults to ``alphas`` for two
    LoRAs. Every image of a row shares its seed, initial noise and scheduler; all strengths (and
    classifier-free guidance) run in one batched UNet call per step. ``animation``: also write a .gif or
    .webp cycling α. ``add_triggers`` prepends the entries' trigger words (and embedding tokens);
    ``store_preview`` stores the grid as a preview of every registry entry swept. ``image`` + ``mask``:
    inpaint. ``on_batch(done, total)`` reports progress.
    """
    from lorahub.outputs import check_output
    from lorahub.refs import LazyRegistry

    loras = list(loras)
    if len(loras) not in (1, 2):
        raise LorahubError("sweep takes one LoRA (1-D strip) or two (2-D grid α₁ × α₂)")
    _check_size(size, steps)
    a1 = check_alphas(alphas)
    if alphas2 is not None and len(loras) == 1:
        raise LorahubError("alphas2 needs a second LoRA")
    a2 = check_alphas(alphas2, "alphas2") if alphas2 is not None else (a1 if len(loras) == 2 else None)
    seed_list = check_seeds(seeds)
    prompts = list(prompts)
    if not prompts:
        raise LorahubError("give at least one prompt")
    out = check_output(out, force=force, suffixes=IMAGE_SUFFIXES)
    if animation is not None:
        animation = check_output(animation, force=force, suffixes=ANIMATION_SUFFIXES)
    img, msk = _inpaint_inputs(image, mask, size)
    from lorahub.ops.grid import format_alpha, make_animation, make_grid, save_animation, save_image
    from lorahub.ops.models import denoiser

    with LazyRegistry.using(registry) as regs:
        s = _Session(loras, regs)
        for m, n in zip(s.models, s.names):
            if not m.layers:
                raise LorahubError(f"{n}: a textual-inversion embedding has no strength to sweep; render it instead")
        s.install(base, regs, device=device, dtype=dtype, config=config, inpaint=img is not None,
                  scheduler=scheduler, add_triggers=add_triggers)
        names = s.names
        full = [with_trigger(p, s.words) for p in prompts]
        samples = plan_sweep(full, seed_list, a1, a2)
        applied, skipped = s.handle.applied, [len(u) for u in s.handle.unmatched]
        images = s.render(samples, batch=batch, on_batch=on_batch, steps=steps, height=size, width=size,
                          guidance=guidance, negative=negative, image=img, mask=msk)
        n_rows = max(x.row for x in samples) + 1
        cells = [[None] * len(a1) for _ in range(n_rows)]
        row_labels = [""] * n_rows
        for x, im in zip(samples, images):
            cells[x.row][x.col] = im
            lab = f"{prompts[x.meta['prompt_index']]}\nseed {x.seed}"
            if len(loras) == 2:
                lab += f"\n{names[1]} α={format_alpha(x.alphas[1])}"
            row_labels[x.row] = lab
        col_labels = [f"α={format_alpha(a)}" for a in a1]
        title = f"{' × '.join(names)} on {base} · {steps} steps · cfg {guidance:g} · {size}px"
        params = {"loras": [{"name": n, "id": x.entry["id"] if x.entry else None} for n, x in zip(names, s.loras)],
                  "base": base, "prompts": full, "alphas": a1, "alphas2": a2, "seeds": seed_list, "steps": steps,
                  "size": size, "guidance": guidance, "negative": negative,
                  "scheduler": type(s.pipe.scheduler).__name__, "dtype": str(denoiser(s.pipe).dtype).replace("torch.", ""),
                  "device": device, "inpaint": img is not None, "triggers": s.triggers}
        grid = make_grid(cells, col_labels, row_labels, title=title, col_axis=f"{names[0]}  α",
                         row_axis="prompt · seed" + (f" · {names[1]} α" if len(loras) == 2 else ""))
        save_image(grid, out, params)
        files = {"grid": str(out)}
        if animation is not None:
            save_animation(make_animation(cells, col_labels, row_labels, title=f"{names[0]}"), animation)
            files["animation"] = str(animation)
        previews = []
        if store_preview and any(x.entry for x in s.loras):
            reg = regs.get()
            for x in s.loras:
                if x.entry is None:
                    continue
                previews.append(reg.add_preview(x.entry["id"], out, kind="grid", params=params))
                if animation is not None:
                    previews.append(reg.add_preview(x.entry["id"], animation, kind="animation", params=params))
    return SweepResult(files=files, images=images, rows=n_rows, columns=len(a1), layers_applied=applied,
                       layers_skipped=skipped, previews=previews, params=params, warnings=s.warnings)


def render(loras: list, base: str, prompts: list[str], *, seeds=(1,), steps: int = 25, size: int = 512,
           guidance: float = 7.5, negative: str | None = None, scheduler: str | None = None, out="render.png",
           batch: int | None = None, device: str = "cpu", dtype: str | None = None, config=None, image=None,
           mask=None, add_triggers: bool = True, force: bool = False, registry=None,
           on_batch=None) -> RenderResult:
    """Render images with one or more LoRAs at chosen strengths.

    ``loras``: references, or (reference, strength) pairs (strength 1 by default); textual-inversion
    entries add their token. One image per prompt × seed: ``out`` when there is one, else
    ``<stem>-<n><suffix>`` beside it. See :func:`sweep` for ``base`` and the other options.
    """
    from lorahub.outputs import check_output
    from lorahub.refs import LazyRegistry

    pairs = [(x, 1.0) if isinstance(x, (str, os.PathLike)) else (x[0], float(x[1])) for x in loras]
    strengths = tuple(check_alphas([a for _, a in pairs], "strengths")) if pairs else ()
    _check_size(size, steps)
    seed_list = check_seeds(seeds)
    prompts = list(prompts)
    if not prompts:
        raise LorahubError("give at least one prompt")
    out = Path(out)
    n_images = len(prompts) * len(seed_list)
    dests = [out if n_images == 1 else out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(n_images)]
    dests = [check_output(d, force=force, suffixes=IMAGE_SUFFIXES[:4]) for d in dests]
    img, msk = _inpaint_inputs(image, mask, size)
    from lorahub.ops.grid import save_image

    with LazyRegistry.using(registry) as regs:
        s = _Session([r for r, _ in pairs], regs)
        s.install(base, regs, device=device, dtype=dtype, config=config, inpaint=img is not None,
                  scheduler=scheduler, add_triggers=add_triggers)
        samples = [Sample(with_trigger(p, s.words), sd, strengths) for p in prompts for sd in seed_list]
        images = s.render(samples, batch=batch, on_batch=on_batch, steps=steps, height=size, width=size,
                          guidance=guidance, negative=negative, image=img, mask=msk)
    loras_out = [{"name": n, "alpha": a, "id": x.entry["id"] if x.entry else None}
                 for n, a, x in zip(s.names, strengths, s.loras)]
    files = []
    for dest, smp, im in zip(dests, samples, images):
        params = {"loras": loras_out, "base": base, "prompt": smp.prompt, "seed": smp.seed, "steps": steps,
                  "size": size, "guidance": guidance, "negative": negative,
                  "scheduler": type(s.pipe.scheduler).__name__}
        save_image(im, dest, params)
        files.append({"file": str(dest), "prompt": smp.prompt, "seed": smp.seed})
    return RenderResult(files=files, loras=loras_out, images=images, warnings=s.warnings)


def export_previews(registry, ref: str, folder: str | os.PathLike, *, force: bool = False) -> list[Path]:
    """Copy the preview images of the entry ``ref`` into ``folder`` as
    ``<entry name>-<preview id>-<kind>.<ext>`` (names made safe); returns the files written. Files
    already there are replaced only with ``force`` (otherwise nothing is written)."""
    from lorahub.fsutil import atomic_write_bytes
    from lorahub.outputs import check_output
    from lorahub.vocab import safe_filename

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LorahubError(f"{folder}: not a folder")
    entry = registry.resolve(ref)
    stem = safe_filename(entry["name"], default=entry["id"])
    plan = []
    for p in registry.previews(entry["id"]):
        src = Path(p["path"])
        if not src.is_file():
            raise LorahubError(f"preview {p['id']} of {entry['name']} is missing from the store; run `lorahub verify`")
        dest = check_output(folder / f"{stem}-{p['id']}-{p['kind']}.{p.get('ext') or 'png'}", force=force)
        plan.append((src, dest))
    return [atomic_write_bytes(dest, src.read_bytes()) for src, dest in plan]
