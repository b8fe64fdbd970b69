"""Load diffusers pipelines offline from a model reference (:func:`lorahub.refs.resolve_model`).

MODEL is one of: ``tiny-sd1`` / ``tiny-sdxl`` / ``tiny-flux`` / ``tiny-sd3`` (the built-in tiny fixture
pipelines), a diffusers
folder, a single-file checkpoint (``.safetensors``), or a registry reference (id, name, hash prefix)
of a checkpoint entry. Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

from lorahub.errors import LorahubError


def resolve_model_ref(ref: str, registry=None) -> Path:
    """Path of the model ``ref`` names (:func:`lorahub.refs.resolve_model`)."""
    from lorahub.refs import resolve_model

    return resolve_model(ref, registry).path


def family_of_pipeline(pipe) -> str:
    """The pipeline's shape: ``flux`` / ``sd3`` (or another DiT family) for a pipeline with a
    transformer, ``sdxl`` for a UNet with two text encoders, else ``sd1`` (its base family is
    ``lorahub.formats.names.arch_of_pipeline(pipe).family``)."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        from lorahub.formats.families import family_of_class

        return family_of_class(type(transformer).__name__) or "unknown"
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd1"


def denoiser(pipe):
    """The pipeline's denoising model: its ``transformer`` (Flux, SD3, …) or its ``unet``."""
    transformer = getattr(pipe, "transformer", None)
    return transformer if transformer is not None else pipe.unet


def arch_of_model(ref: str, registry=None, *, config=None):
    """The module list of the model ``ref`` (:func:`lorahub.refs.resolve_model`), derived from its own
    configs on the meta device (:mod:`lorahub.formats.names`): a diffusers folder's, or for a
    single-file checkpoint those of ``config`` (a diffusers folder of the same architecture), else the
    built-in table of the checkpoint's family (SD1/SD2/SDXL)."""
    from lorahub.formats import names

    path = resolve_model_ref(ref, registry)
    if path.is_dir():
        return names.arch_of_folder(path)
    if config is not None:
        return names.arch_of_folder(Path(config).expanduser())
    family, _inpaint = checkpoint_family(path)
    return names.get_arch(family)


def checkpoint_family(path: Path) -> tuple[str, bool]:
    """(sd1|sd2|sdxl, is_inpainting) of a single-file (original layout) checkpoint, from its header."""
    from lorahub.formats.header import read_header

    if path.suffix.lower() not in ("", ".safetensors"):
        raise LorahubError(f"{path}: only .safetensors single-file checkpoints are loaded (never pickles)")
    hdr = read_header(path)
    keys = hdr.tensors
    if any(k.startswith(("conditioner.embedders.", "model.diffusion_model.label_emb.")) for k in keys):
        family = "sdxl"
    elif any(k.startswith("cond_stage_model.model.") for k in keys):
        family = "sd2"
    elif any(k.startswith("cond_stage_model.transformer.") for k in keys) or \
            any(k.startswith("model.diffusion_model.") for k in keys):
        family = "sd1"
    else:
        raise LorahubError(f"{path}: not a Stable Diffusion single-file checkpoint (no model.diffusion_model.* keys)")
    first = keys.get("model.diffusion_model.input_blocks.0.0.weight")
    inpaint = first is not None and len(first.shape) == 4 and first.shape[1] == 9
    return family, inpaint


def _single_file_pipeline(path: Path, *, config: Path | None, dtype, inpaint: bool):
    import tempfile

    import diffusers

    family, is_inpaint_model = checkpoint_family(path)
    if config is None:
        raise LorahubError(f"{path}: a single-file checkpoint needs a config: a local diffusers folder of the same "
                           "architecture (nothing is downloaded)")
    config = Path(config).expanduser()
    if not (config / "model_index.json").exists():
        raise LorahubError(f"{config}: the config must be a diffusers folder (with model_index.json)")
    xl = family == "sdxl"
    if inpaint or is_inpaint_model:
        cls = diffusers.StableDiffusionXLInpaintPipeline if xl else diffusers.StableDiffusionInpaintPipeline
    else:
        cls = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    kwargs = {"config": str(config), "local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    kwargs.update(_components_missing_from(path, config, family, dtype))
    src = path
    with tempfile.TemporaryDirectory(prefix="lorahub-ckpt-") as tmp:
        if path.suffix.lower() != ".safetensors":  # registry blobs have no suffix; diffusers goes by it
            src = Path(tmp) / "model.safetensors"
            src.symlink_to(path.resolve())
        try:
            return cls.from_single_file(str(src), **kwargs)
        except LorahubError:
            raise
        except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds; report one line
            raise LorahubError(f"{path}: cannot load this checkpoint with config {config}: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def _components_missing_from(path: Path, config: Path, family: str, dtype) -> dict:
    """Components whose weights the single file lacks (e.g. no VAE), loaded from the config folder."""
    from lorahub.formats.header import read_header

    keys = list(read_header(path).tensors)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    wanted = {"vae": has("first_stage_model.")}
    if family == "sdxl":
        wanted["text_encoder"] = has("conditioner.embedders.0.")
        wanted["text_encoder_2"] = has("conditioner.embedders.1.")
    else:
        wanted["text_encoder"] = has("cond_stage_model.")
    # diffusers recognises SDXL's CLIP-L only next to the OpenCLIP tower: without it, read CLIP-L ourselves
    own_clip_l = family == "sdxl" and wanted["text_encoder"] and not wanted["text_encoder_2"]
    if own_clip_l:
        wanted["text_encoder"] = False
    out = {}
    for name, present in wanted.items():
        if present or not (config / name).is_dir():
            continue
        kw = {"local_files_only": True}
        if dtype is not None:
            kw["dtype"] = dtype
        if name == "vae":
            from diffusers import AutoencoderKL

            out[name] = AutoencoderKL.from_pretrained(str(config / name), **kw)
        else:
            import transformers

            cfg = __import__("json").loads((config / name / "config.json").read_text())
            cls = getattr(transformers, (cfg.get("architectures") or ["CLIPTextModel"])[0])
            out[name] = cls.from_pretrained(str(config / name), **kw)
    if own_clip_l and "text_encoder" in out:
        _load_hf_clip(out["text_encoder"], path, "conditioner.embedders.0.transformer.")
    return out


def _load_hf_clip(model, path: Path, prefix: str) -> None:
    """Overwrite a transformers CLIP text model's weights with the file's HF-layout tensors under prefix."""
    from safetensors import safe_open

    own = model.state_dict()
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix):]
            if name not in own and name.startswith("text_model."):
                name = name[len("text_model."):]
            if name not in own:
                continue  # e.g. position_ids buffers
            t = f.get_tensor(key)
            if tuple(t.shape) != tuple(own[name].shape):
                raise LorahubError(f"{path}: {key} has shape {tuple(t.shape)}, the config expects "
                                   f"{tuple(own[name].shape)}")
            own[name].copy_(t.to(own[name].dtype))


def load_pipeline(ref: str, *, registry=None, device: str = "cpu", dtype=None, config=None,
                  inpaint: bool = False):
    """Load a text-to-image (or, with ``inpaint``, inpainting) pipeline from MODEL, offline.

    MODEL: tiny-sd1 / tiny-sdxl / tiny-flux / tiny-sd3, a diffusers folder (any pipeline diffusers
    loads: SD1/SD2/SDXL, Flux.1, SD3, …), a single-file SD ``.safetensors`` checkpoint (with
    ``config``: a local diffusers folder of the same architecture) or a registry checkpoint entry.
    ``registry``: a Registry, a LazyRegistry, a home folder or None (the default home, opened only when
    ``ref`` is a registry reference). ``dtype``: a torch dtype or fp32 | fp16 | bf16; None keeps the
    model's own.
    """
    import torch
    from diffusers import DiffusionPipeline

    from lorahub.formats.io import parse_dtype

    dtype = parse_dtype(dtype)
    if device not in ("cpu",) and not str(device).startswith("cuda") and device != "mps":
        raise LorahubError(f"device {device!r}: use cpu or cuda")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise LorahubError(f"device {device!r} requested but no CUDA device is available")
    path = resolve_model_ref(ref, registry)
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if path.is_dir():
        try:
            pipe = DiffusionPipeline.from_pretrained(str(path), **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise LorahubError(f"{ref}: cannot load the diffusers folder: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        if inpaint:
            pipe = to_inpaint(pipe)
    else:
        pipe = _single_file_pipeline(path, config=config, dtype=dtype, inpaint=inpaint)
    return pipe.to(device)


def to_inpaint(pipe):
    """The inpainting pipeline sharing ``pipe``'s components (SD1/SD2 or SDXL)."""
    import diffusers

    if isinstance(pipe, (diffusers.StableDiffusionInpaintPipeline, diffusers.StableDiffusionXLInpaintPipeline)):
        return pipe
    if getattr(pipe, "transformer", None) is not None:
        raise LorahubError("inpainting works with SD1/SD2/SDXL models; this model is "
                           f"{family_of_pipeline(pipe)} (a transformer)")
    if family_of_pipeline(pipe) == "sdxl":
        return diffusers.StableDiffusionXLInpaintPipeline.from_pipe(pipe)
    return diffusers.StableDiffusionInpaintPipeline.from_pipe(pipe)
