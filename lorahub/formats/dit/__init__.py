"""DiT families (Flux.1, SD3/3.5): their original layouts, fused q/k/v, and the kohya dialect in them.

Importing this package registers the families' kohya readers and writers with
:func:`lorahub.formats.names.register_family_dialect` (``flux``: BFL layout, :mod:`.flux`; ``sd3``: SAI
MMDiT layout, :mod:`.sd3`). :mod:`lorahub.formats.names` imports it the first time a family's dialect
is looked up, so every kohya read/write of these families goes through it.
"""

from __future__ import annotations

from lorahub.formats.dit import flux, sd3
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
