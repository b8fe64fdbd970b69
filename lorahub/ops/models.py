"""Resolve a ``--base MODEL`` argument and load diffusers pipelines offline.

MODEL is one of: ``tiny-sd1`` / ``tiny-sdxl`` (the built-in tiny fixture pipelines), a diffusers
folder, a single-file checkpoint (``.safetensors``), or a registry reference (id, name, hash prefix)
of a checkpoint entry. Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

from lorahub.errors import LorahubError

TINY = {"tiny-sd1": "sd1", "tiny-sdxl": "sdxl"}


def resolve_model_ref(ref: str, registry=None) -> Path:
    """Path of the model folder or file that ``ref`` names."""
    if ref in TINY:
        from lorahub import tiny

        return tiny.ensure(TINY[ref])
    p = Path(ref).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "model_index.json").exists() and not (p / "config.json").exists():
            raise LorahubError(f"{ref}: folder is not a diffusers model (no model_index.json)")
        return p
    if registry is not None:
        entry = registry.resolve(ref)
        return registry.blob_path(entry)
    raise LorahubError(f"{ref}: no such model (give a diffusers folder, a .safetensors checkpoint, "
                       "a registry reference, or tiny-sd1 / tiny-sdxl)")


def family_of_pipeline(pipe) -> str:
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd1"


def load_pipeline(ref: str, *, registry=None, device: str = "cpu", dtype=None):
    """Load a text-to-image pipeline from MODEL, offline."""
    import torch
    from diffusers import DiffusionPipeline

    path = resolve_model_ref(ref, registry)
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if path.is_dir():
        pipe = DiffusionPipeline.from_pretrained(str(path), **kwargs)
    else:
        raise LorahubError(f"{ref}: single-file checkpoints are not supported here yet; "
                           "convert it to a diffusers folder first")
    if device != "cpu" and not torch.cuda.is_available():
        raise LorahubError(f"device {device!r} requested but no CUDA device is available")
    return pipe.to(device)
