"""DiT families (Flux.1, SD3/3.5): their original layouts, fused q/k/v, and the kohya dialect in them.

Importing this package registers the families' kohya readers and writers with
:func:`lorahub.formats.names.register_family_dialect` (``flux``: BFL layout, :mod:`.flux`; ``sd3``: SAI
MMDiT layout, :mod:`.sd3`). :mod:`lorahub.formats.names` imports it the first time a family's dialect
is looked up, so every kohya read/write of these families goes through it.
"""

from __future__ import annotations

from typing import Callable

from lorahub.errors import FormatError
from lorahub.formats.canonical import LoraModel
from lorahub.formats.dit import flux, sd3
from lorahub.formats.dit.layout import PART
from lorahub.formats.names import FamilyDialect, register_family_dialect

BUILTIN = {"flux": FamilyDialect(read_kohya=flux.read_kohya, write_kohya=flux.write_kohya),
           "sd3": FamilyDialect(read_kohya=sd3.read_kohya, write_kohya=sd3.write_kohya)}
for _family, _dialect in BUILTIN.items():
    register_family_dialect(_family, _dialect)


def original_layers(model) -> dict:
    """The transformer layers of a Flux.1 or SD3 LoRA keyed by its family's original module paths (BFL:
    :func:`flux.to_bfl_layers`; SAI: :func:`sd3.to_sai_layers`), fused exactly; {} for other families."""
    if model.base == "flux":
        return flux.to_bfl_layers(model)
    if model.base == "sd3":
        return sd3.to_sai_layers(model)
    return {}


def family_layout(model):
    """The original :class:`~lorahub.formats.dit.layout.Layout` of a Flux.1 (BFL) or SD3 (SAI) LoRA;
    None for other families."""
    if model.base == "flux":
        return flux.FLUX
    if model.base == "sd3":
        return sd3.layout_of(model)
    return None


def _fusable(layer) -> bool:
    return (layer.kind == "lora" and layer.mid is None and layer.down.dim() == 2 and layer.up.dim() == 2
            and layer.dora_scale is None)


def to_original(model) -> tuple[dict, Callable]:
    """``(layers, back)``: every layer of ``model`` with the parts of each fused module of its family's
    original layout (Flux.1: ``img_attn.qkv`` / ``txt_attn.qkv`` from q/k/v, ``single_blocks.N.linear1``
    from q/k/v + ``proj_mlp``; SD3: the ``qkv`` of each attention) made one layer, as kohya's file holds
    it (:func:`~lorahub.formats.dit.fused.fuse_layers`: exact; one shared ``lora_A`` gives the same rank,
    separate ones a block-diagonal up of rank Σr). A fused layer is keyed ``transformer.<original path>``
    (``transformer.double_blocks.0.img_attn.qkv``) and takes the place of its first part. Everything else
    (text encoders, one-part modules, layers kept under a dialect's name, LyCORIS/DoRA parts, other
    families) is given as it is.

    ``back(layers)`` turns such layers (e.g. after each was resized or merged) into a canonical
    :class:`LoraModel` like ``model`` (its base, metadata, embeddings): a fused layer is split into its
    parts (:func:`~lorahub.formats.dit.fused.split_layer`: parts share its ``lora_A`` and alpha, so
    kohya's writer fuses them at its rank again; a part whose rows are all zero is left out), every other
    layer is kept under its key."""
    from lorahub.formats.names import is_unmapped

    lay = family_layout(model)
    groups: dict[str, list[str]] = {}
    if lay is not None:
        for key, layer in model.layers.items():
            if not key.startswith(PART + ".") or is_unmapped(key):
                continue
            hit = lay.original_of(key)
            if hit is not None and len(lay.spec(hit[0]).parts) > 1:
                groups.setdefault(hit[0], []).append(key)
        groups = {o: keys for o, keys in groups.items() if all(_fusable(model.layers[k]) for k in keys)}
    first = {keys[0]: orig for orig, keys in groups.items()}
    fused_keys = {k for keys in groups.values() for k in keys}
    layers = {}
    for key, layer in model.layers.items():
        if key in first:
            orig = first[key]
            layers[f"{PART}.{orig}"] = lay.to_original({k: model.layers[k] for k in groups[orig]})[orig]
        elif key not in fused_keys:
            layers[key] = layer

    def back(new_layers: dict) -> LoraModel:
        out: dict = {}
        for key, layer in new_layers.items():
            orig = key[len(PART) + 1:] if lay is not None and key.startswith(PART + ".") else None
            spec = lay.spec(orig) if orig is not None else None
            parts = lay.from_original({orig: layer}) if spec is not None and len(spec.parts) > 1 else {key: layer}
            for k, part in parts.items():
                if k in out or (k != key and k in new_layers):
                    raise FormatError(f"{k}: given both on its own and as part of {key}")
                out[k] = part
        return LoraModel(layers=out, embeddings=dict(model.embeddings), metadata=dict(model.metadata),
                         base=model.base, source_format=model.source_format, arch=model.arch,
                         extra=dict(model.extra))

    return layers, back


def fusion_notes(model) -> list[str]:
    """What writing ``model`` in its family's kohya layout does to separately trained q/k/v: a line
    saying the fused layers are block-diagonal (exact, rank 3r); empty when there is nothing to say."""
    if model.base not in ("flux", "sd3") or not any(k.startswith("transformer.") for k in model.layers):
        return []
    return flux.block_diagonal_notes(original_layers(model))


# the parts each family's diffusers pipeline loads LoRA layers into (its loader mixin's
# ``_lora_loadable_modules``): FluxPipeline has no T5 (text_encoder_2) LoRA, SD3 none for text_encoder_3
DIFFUSERS_LOADABLE = {"flux": ("transformer", "text_encoder"), "sd3": ("transformer", "text_encoder", "text_encoder_2")}


def diffusers_notes(model) -> list[str]:
    """What the family's diffusers pipeline will not load from ``model`` written as diffusers (its T5
    layers): one line, or none."""
    parts = DIFFUSERS_LOADABLE.get(model.base)
    if parts is None:
        return []
    left = sorted({k.split(".", 1)[0] for k in model.layers} - set(parts))
    if not left:
        return []
    n = sum(1 for k in model.layers if k.split(".", 1)[0] in left)
    return [f"{n} layer(s) of {', '.join(left)} (T5): diffusers' {model.base} pipeline loads no LoRA into it "
            "(load_lora_weights ignores them); they are kept in the file"]
