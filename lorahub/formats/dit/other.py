"""Newer DiT families (Flux.2, Qwen-Image, Z-Image, HiDream, Wan, …): their non-diffusers LoRA files
(kohya ``lora_unet_…``, ComfyUI ``diffusion_model.…``, musubi, LyCORIS LoKr where diffusers reads it) read
into canonical form through the family's own diffusers loader, ``<Pipeline>.lora_state_dict`` — a
classmethod that converts the keys without building a model. Those converters fold alpha into the
factors, so the canonical layers hold scale-1 factors with the same ΔW; writing these families back to
their kohya names is not supported (the diffusers and peft dialects are)."""

from __future__ import annotations

import logging

import torch

from lorahub.errors import FormatError
from lorahub.formats.canonical import LoraLayer, LoraModel

# family -> the diffusers pipeline class whose loader mixin converts its LoRA files
PIPELINES = {
    "other:flux2": "Flux2Pipeline", "other:qwen-image": "QwenImagePipeline", "other:z-image": "ZImagePipeline",
    "other:hidream": "HiDreamImagePipeline", "other:wan": "WanPipeline", "other:lumina": "Lumina2Pipeline",
    "other:hunyuan-video": "HunyuanVideoPipeline", "other:ltx-video": "LTXPipeline", "other:chroma": "ChromaPipeline",
    "other:sana": "SanaPipeline", "other:auraflow": "AuraFlowPipeline", "other:cogview": "CogView4Pipeline",
    "other:cogvideox": "CogVideoXPipeline", "other:mochi": "MochiPipeline",
}


def read(family: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, fmt: str,
         name: str = "file") -> LoraModel | None:
    """``tensors`` of a ``family`` LoRA in canonical form through the family's diffusers loader; None when
    diffusers has no loader for the family or its converter refuses the keys (the caller then keeps the
    dialect's own names)."""
    import diffusers

    from lorahub.formats import diffusers_fmt
    from lorahub.formats.dit.common import clean_meta
    from lorahub.vocab import PARTS

    cls = getattr(diffusers, PIPELINES.get(family, ""), None) if family in PIPELINES else None
    if cls is None:
        return None
    quiet = logging.getLogger("diffusers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        sd = cls.lora_state_dict({k: v.clone() for k, v in tensors.items()})
    except Exception:  # noqa: BLE001 - a converter refusing keys it does not know: keep the dialect's names
        return None
    finally:
        quiet.setLevel(level)
    if isinstance(sd, tuple):
        sd = sd[0]
    prefixes = tuple(p + "." for p in PARTS)
    if not sd or not all(isinstance(t, torch.Tensor) and k.startswith(prefixes) for k, t in sd.items()):
        return None
    lokr = {k: t for k, t in sd.items() if ".lokr_" in k}
    rest = {k: t for k, t in sd.items() if k not in lokr}
    if not all("lora_A" in k or "lora_B" in k or k.endswith(".alpha") for k in rest):
        return None
    meta = {k: v for k, v in clean_meta(metadata).items() if k != diffusers_fmt.META_KEY}
    model = diffusers_fmt.read(rest, meta, base_hint=family, name=name) if rest else LoraModel(metadata=meta)
    model.layers.update(_lokr_layers(lokr, name))
    model.base, model.source_format = family, fmt
    model.notes.append(f"read through diffusers' {cls.__name__}.lora_state_dict (alpha folded into the factors)")
    return model


_LOKR = {"lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2", "lokr_w2_a": "w2a",
         "lokr_w2_b": "w2b", "lokr_t2": "t2"}


def _lokr_layers(tensors: dict[str, torch.Tensor], name: str) -> dict[str, LoraLayer]:
    """LoKr layers from diffusers' converted keys (``transformer.<path>.lokr_w1`` …; alpha already baked
    into the left factor, so scale 1)."""
    from lorahub.formats.kohya import _adapted_shape

    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        mod, _, fac = k.rpartition(".")
        if fac not in _LOKR:
            raise FormatError(f"{name}: key {k!r} is not a LoKr factor")
        groups.setdefault(mod, {})[_LOKR[fac]] = t
    out = {}
    for mod, w in groups.items():
        shape = _adapted_shape("lokr", w)
        if shape is None:
            raise FormatError(f"{name}: LoKr layer {mod} lacks a Kronecker factor")
        out[mod] = LoraLayer("lokr", w, alpha=None, extra={"shape": list(shape)})  # alpha baked in: scale 1
    return out
