"""Batched α sweeps: every strength of a row (and classifier-free guidance) in one UNet call per step.

The LoRA(s) are installed once as side branches (:mod:`lorahub.ops.apply`) whose strength is a
per-sample tensor. A batch of samples (prompt, seed, α…) is rendered by one call of the diffusers
pipeline itself, fed with

* prompt embeddings computed by the pipeline's own ``encode_prompt`` while the text-encoder branches
  hold the same per-sample α vector (so the text-encoder part of the LoRA follows α too, for the
  positive and the negative prompt, as ``set_adapters`` does);
* initial latents drawn per sample exactly as the pipeline draws them (``randn_tensor`` of a
  (1, C, h, w) shape from ``torch.Generator(device).manual_seed(seed)``), and that same generator per
  sample for any later noise of the scheduler; every sample of a row shares its seed, initial noise
  and scheduler, so only α changes along a row.

Inside the pipeline the UNet sees ``[uncond…, cond…]`` of 2·N samples and the branches tile the
α vector to match. The denoising loop, guidance and scheduler are diffusers' own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


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
    c = pipe.unet.config.in_channels
    if c == 9:  # inpainting UNet: noise has the VAE latent width
        c = pipe.vae.config.latent_channels
    shape = (1, c, int(height) // pipe.vae_scale_factor, int(width) // pipe.vae_scale_factor)
    return g, randn_tensor(shape, generator=g, device=torch.device(device), dtype=dtype)


def _embed(pipe, prompts: list[str], negatives: list[str] | None, do_cfg: bool, device) -> dict:
    if is_sdxl(pipe):
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

    do_cfg = guidance > 1.0 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
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


def parse_alphas(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise LorahubError(f"--alphas {text!r}: give numbers separated by commas, e.g. 0,0.5,1") from None
    if not vals:
        raise LorahubError("--alphas: give at least one strength")
    if any(v != v or abs(v) == float("inf") for v in vals):
        raise LorahubError("--alphas: strengths must be finite numbers")
    return vals


def parse_seeds(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise LorahubError(f"--seeds {text!r}: give integers separated by commas, e.g. 1,2") from None
    if not vals:
        raise LorahubError("--seeds: give at least one seed")
    if any(v < 0 or v >= 2 ** 63 for v in vals):
        raise LorahubError("--seeds: seeds must be between 0 and 2**63-1")
    return vals


def with_trigger(prompt: str, triggers: list[str]) -> str:
    """Prepend trigger words not already in the prompt."""
    missing = [t for t in triggers if t and t.lower() not in prompt.lower()]
    return ", ".join(missing + [prompt]) if missing else prompt


__all__ = ["SCHEDULERS", "Sample", "parse_alphas", "parse_seeds", "plan_sweep", "render_batch",
           "run_samples", "set_scheduler", "with_trigger"]
