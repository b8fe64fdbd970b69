"""What the DiT families' kohya readers and writers share: factor grouping, the kohya file split into
layout layers (mapped through a :class:`~lorahub.formats.dit.layout.Layout`) and the rest (text
encoders, LyCORIS/DoRA layers: read by the generic kohya reader), and writing back."""

from __future__ import annotations

import json
from typing import Callable

import torch

from lorahub.errors import FormatError
from lorahub.formats import kohya
from lorahub.formats.canonical import LoraLayer, LoraModel
from lorahub.formats.dit.layout import Layout

KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
PEFT_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".alpha": "alpha"}


def kohya_name(orig: str) -> str:
    """kohya's name of an original-layout module: ``lora_unet_`` + the path with dots as underscores."""
    return "lora_unet_" + orig.replace(".", "_")


def groups_of(tensors: dict[str, torch.Tensor], suffixes: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {down|up|alpha: tensor}}`` by key suffix; a key with none of them is a FormatError."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        for s, fac in suffixes.items():
            if k.endswith(s):
                out.setdefault(k[: -len(s)], {})[fac] = t
                break
        else:
            raise FormatError(f"key {k!r} is not a LoRA factor")
    return out


def plain_layer(mod: str, f: dict[str, torch.Tensor], name: str) -> LoraLayer:
    """A plain LoRA layer from its factors (alpha's value, dtype and shape kept for writing back)."""
    if "down" not in f or "up" not in f:
        raise FormatError(f"{name}: layer {mod} lacks its " + ("up" if "down" in f else "down") + " factor")
    if f["down"].dim() != 2 or f["up"].dim() != 2 or f["down"].shape[0] != f["up"].shape[1] or f["down"].shape[0] == 0:
        raise FormatError(f"{name}: layer {mod}: up {tuple(f['up'].shape)} and down {tuple(f['down'].shape)} "
                          "do not make a LoRA pair")
    layer = LoraLayer("lora", {"down": f["down"], "up": f["up"]})
    if "alpha" in f:
        kohya.set_alpha(layer, f["alpha"], f"{name}: alpha of {mod}")
    return layer


def clean_meta(metadata: dict[str, str]) -> dict[str, str]:
    """Header metadata without lorahub's bookkeeping field (its stashed fields restored)."""
    from lorahub.formats.diffusers_fmt import LOREHUB_KEY

    meta = dict(metadata)
    raw = meta.pop(LOREHUB_KEY, None)
    if raw:
        try:
            stash = json.loads(raw).get("stash", {})
        except (ValueError, AttributeError):
            stash = {}
        if isinstance(stash, dict):  # header metadata is hostile input: only string fields come back
            meta.update({k: v for k, v in stash.items() if isinstance(k, str) and isinstance(v, str)})
    return meta


def arch_name(model: LoraModel, arch: str) -> str:
    """``arch`` (a built-in architecture) when every mapped layer is one of its modules with its shape,
    else ``unknown`` (a smaller model of the family: its own config names it)."""
    from lorahub.formats.names import get_arch, is_unmapped

    a = get_arch(arch)
    for k, layer in model.layers.items():
        if is_unmapped(k):
            continue
        shape = a.modules.get(k)
        try:
            if shape is None or tuple(shape) != tuple(layer.shape):
                return "unknown"
        except (ValueError, KeyError):
            return "unknown"
    return arch


def read_kohya_layout(tensors: dict[str, torch.Tensor], metadata: dict[str, str], name: str, *, layout: Layout,
                      arch: str, convert: Callable[[dict[str, LoraLayer]], dict[str, LoraLayer]] | None = None
                      ) -> LoraModel:
    """A kohya file of a DiT family in canonical form. Whole plain linear LoRA layers named after the
    family's original layout (``lora_unet_<original path>``) are mapped by ``convert`` (kohya name ->
    layer in, canonical layers out; default: the layout's own split); the rest (text encoders, LyCORIS,
    DoRA, names the layout lacks) goes through the generic kohya reader with the built-in ``arch``
    (text encoders mapped; the others kept under their kohya names)."""
    from lorahub.formats import kohya

    plain: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        sk = kohya.split_key(k)
        if sk is not None and sk[0].startswith("lora_unet_") and sk[1] in ("lora_down.weight", "lora_up.weight",
                                                                          "alpha"):
            plain.setdefault(sk[0], {})[sk[1]] = t
        else:
            rest[k] = t
    other = {sk[0] for sk in map(kohya.split_key, rest) if sk is not None}  # DoRA / LyCORIS factors
    kl: dict[str, LoraLayer] = {}
    for mod, fs in plain.items():
        if (layout.from_kohya(mod) is None or mod in other
                or set(fs) - {"alpha"} != {"lora_down.weight", "lora_up.weight"}
                or fs["lora_down.weight"].dim() != 2 or fs["lora_up.weight"].dim() != 2):
            rest.update({f"{mod}.{s}": t for s, t in fs.items()})
            continue
        kl[mod] = plain_layer(mod, {KOHYA_SUFFIXES["." + s]: t for s, t in fs.items()}, name)
    if rest:
        model = kohya.read(rest, metadata, arch=arch, base_hint=None, name=name)
    else:
        model = LoraModel(metadata=clean_meta(metadata))
    if kl:
        canon = convert(kl) if convert else layout.from_original({layout.from_kohya(k): v for k, v in kl.items()})
    else:
        canon = {}
    model.layers = {**canon, **model.layers}
    model.base, model.source_format = layout.name, "kohya"
    model.arch = arch_name(model, arch)
    return model


def write_kohya_layout(model: LoraModel, original: dict[str, LoraLayer], dtype: torch.dtype | None, *, arch: str
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya tensors and metadata of ``model`` whose transformer layers are ``original`` (keyed by
    original-layout path): those under ``lora_unet_<path>``; text encoders by kohya's rule for the
    built-in ``arch`` (``lora_te1_``/``lora_te2_``, T5 ``lora_te3_``)."""
    from lorahub.formats import kohya
    from lorahub.formats.names import unmapped_key

    layers = {unmapped_key("transformer", kohya_name(o)): layer for o, layer in original.items()}
    for k, layer in model.layers.items():
        if not k.startswith("transformer."):
            layers[k] = layer
    tmp = LoraModel(layers=layers, embeddings=model.embeddings, metadata=model.metadata, base="unknown",
                    source_format=model.source_format, arch=arch, extra=model.extra)
    return kohya.write(tmp, dtype)
