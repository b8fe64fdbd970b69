"""Flux.1 LoRAs: the BFL layout (kohya sd-scripts, XLabs, ComfyUI/ai-toolkit, BFL-named PEFT files) <->
canonical form (diffusers module paths, ``transformer.transformer_blocks.3.attn.to_q``).

* :func:`to_bfl_layers` / :func:`from_bfl_layers`: canonical layers <-> layers keyed by BFL module path
  (``double_blocks.3.img_attn.qkv``, ``single_blocks.7.linear1``, ``final_layer.linear``), exact: q/k/v
  (and the single blocks' MLP input) sharing one ``lora_A`` fuse into one layer of the same rank; with
  different ``lora_A`` into one layer of rank Σr with a block-diagonal up (:mod:`lorahub.formats.dit.fused`).
* Reading: kohya files through :func:`from_bfl_layers`, which gives the modules, factors and ΔW of
  diffusers' own converter (``lora_conversion_utils._convert_kohya_flux_lora_to_diffusers``; the tests
  compare them module by module) where that converter cannot serve: it folds alpha into the factors
  (the bits change, so no bit-exact way back), knows only FLUX.1's width 3072 and 19 + 38 blocks,
  ignores ``final_layer`` alphas, and importing diffusers costs seconds an ``inspect`` cannot spend.
  XLabs files go through ``_convert_xlabs_flux_lora_to_diffusers``. ComfyUI/ai-toolkit files (``diffusion_model.`` prefix)
  and BFL-named PEFT files (``double_blocks.N.img_attn.qkv.lora_A.weight``) through the BFL map.
* Writing kohya: :func:`write_kohya` (BFL names, fused q/k/v; text encoders as ``lora_te1_`` CLIP-L and
  ``lora_te3_`` T5, kohya's rule). kohya -> diffusers -> kohya is bit-exact.
"""

from __future__ import annotations

import torch

from lorahub.errors import FormatError
from lorahub.formats.canonical import LoraLayer, LoraModel
from lorahub.formats.dit.fused import Fused, one, qkv_mlp, thirds
from lorahub.formats.dit.common import (KOHYA_SUFFIXES, PEFT_SUFFIXES, arch_name, clean_meta, groups_of,
                                        plain_layer, read_kohya_layout, write_kohya_layout)
from lorahub.formats.dit.layout import Block, Layout

FLUX = Layout(
    name="flux",
    blocks=[
        Block("double_blocks", "transformer_blocks", {
            "img_attn.qkv": Fused(("attn.to_q", "attn.to_k", "attn.to_v"), thirds),
            "img_attn.proj": one("attn.to_out.0"),
            "img_mlp.0": one("ff.net.0.proj"),
            "img_mlp.2": one("ff.net.2"),
            "img_mod.lin": one("norm1.linear"),
            "txt_attn.qkv": Fused(("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), thirds),
            "txt_attn.proj": one("attn.to_add_out"),
            "txt_mlp.0": one("ff_context.net.0.proj"),
            "txt_mlp.2": one("ff_context.net.2"),
            "txt_mod.lin": one("norm1_context.linear"),
        }),
        Block("single_blocks", "single_transformer_blocks", {
            "linear1": Fused(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), qkv_mlp),
            "linear2": one("proj_out"),
            "modulation.lin": one("norm.linear"),
        }),
    ],
    top={
        "img_in": one("x_embedder"),
        "txt_in": one("context_embedder"),
        "time_in.in_layer": one("time_text_embed.timestep_embedder.linear_1"),
        "time_in.out_layer": one("time_text_embed.timestep_embedder.linear_2"),
        "vector_in.in_layer": one("time_text_embed.text_embedder.linear_1"),
        "vector_in.out_layer": one("time_text_embed.text_embedder.linear_2"),
        "guidance_in.in_layer": one("time_text_embed.guidance_embedder.linear_1"),
        "guidance_in.out_layer": one("time_text_embed.guidance_embedder.linear_2"),
        "final_layer.linear": one("proj_out"),
        "final_layer.adaLN_modulation.1": one("norm_out.linear", swap=True),
    },
)


def to_bfl_layers(model: LoraModel) -> dict[str, LoraLayer]:
    """The transformer layers of Flux LoRA ``model`` (canonical form) keyed by BFL module path
    (``double_blocks.3.img_attn.qkv``, ``single_blocks.7.linear1``, …), exact (same ΔW per module).

    q/k/v (and, in single blocks, q/k/v + ``proj_mlp``) sharing one ``lora_A`` and alpha/rank become one
    layer of the same rank with the ups stacked; with different ``lora_A`` one layer of rank Σr with a
    block-diagonal up (``layer.extra["fusion"] == "block-diagonal"``, ``extra["fused_ranks"]``); a
    missing part is zero rows. Text-encoder layers are not included. Unmapped kohya keys
    (``transformer.lora_unet_double_blocks_0_img_attn_qkv``) are taken under their BFL path. A
    transformer module with no BFL counterpart is a FormatError."""
    from lorahub.formats.names import dialect_name, is_unmapped

    mapped, kept = {}, {}
    for key, layer in model.layers.items():
        if not key.startswith("transformer."):
            continue
        if is_unmapped(key):
            orig = FLUX.from_kohya(dialect_name(key))
            if orig is None:
                raise FormatError(f"{key}: not a module of the Flux.1 BFL layout")
            kept[orig] = layer
        else:
            mapped[key] = layer
    out = FLUX.to_original(mapped)
    for orig, layer in kept.items():
        if orig in out:
            raise FormatError(f"{orig}: given both as a kohya name and as module paths")
        out[orig] = layer
    return out


def from_bfl_layers(layers: dict[str, LoraLayer]) -> dict[str, LoraLayer]:
    """Layers keyed by BFL module path as canonical layers (``transformer.…``), exact: a fused up is
    split row-wise into its parts, which all keep the same ``down`` tensor (or, when the up is
    block-diagonal, their own columns and rows). The inverse of :func:`to_bfl_layers`."""
    return FLUX.from_original(layers)


def fusion_notes(model: LoraModel) -> list[str]:
    """What writing ``model`` in BFL layout does to its q/k/v: one line per kind of block-diagonal
    fusion (``exact, rank 3r``), empty when every fused group shared its ``lora_A``."""
    return block_diagonal_notes(to_bfl_layers(model))


def block_diagonal_notes(layers: dict[str, LoraLayer]) -> list[str]:
    """One line about the fused layers (original path -> layer) that :func:`~lorahub.formats.dit.fused.fuse_layers`
    made block-diagonal, e.g. ``… exact, rank 3r (double_blocks.0.img_attn.qkv: rank 12)``; [] when none."""
    diag = {k: v for k, v in layers.items() if v.extra.get("fusion") == "block-diagonal"}
    if not diag:
        return []
    kinds: dict[str, tuple[str, LoraLayer]] = {}
    for key, layer in diag.items():
        ranks = [r for r in layer.extra["fused_ranks"] if r]
        label = f"rank {len(ranks)}r" if len(set(ranks)) == 1 else "rank " + "+".join(str(r) for r in ranks)
        kinds.setdefault(label, (key, layer))
    said = "; ".join(f"{label} ({key}: rank {layer.rank})" for label, (key, layer) in sorted(kinds.items()))
    return [f"{len(diag)} fused layer(s) had parts with different lora_A (trained separately): each written as one "
            f"layer with a block-diagonal up (zero blocks), exact, {said}"]


# ----------------------------------------------------------------------------------------------
# reading

def read_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str], name: str = "file") -> LoraModel:
    """A kohya sd-scripts Flux.1 LoRA (BFL names, ``lora_unet_double_blocks_N_img_attn_qkv``, …; text
    encoders ``lora_te1_`` CLIP-L, ``lora_te3_`` T5) in canonical form. Plain LoRA transformer layers
    become diffusers modules through :func:`from_bfl_layers` (the same modules, factors and ΔW as
    diffusers' ``_convert_kohya_flux_lora_to_diffusers``, but with the tensors' bits and alpha kept, at
    any width and block count, and without importing diffusers); text encoders are mapped as kohya maps
    them; LyCORIS/DoRA transformer layers keep their kohya names."""
    return read_kohya_layout(tensors, metadata, name, layout=FLUX, arch="flux")


def read_xlabs(tensors: dict[str, torch.Tensor], metadata: dict[str, str], name: str = "file") -> LoraModel:
    """An XLabs Flux LoRA (``double_blocks.N.processor.qkv_lora1.down.weight``) through diffusers'
    ``_convert_xlabs_flux_lora_to_diffusers`` (XLabs files have no alpha: scale 1)."""
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    try:
        conv = _convert_xlabs_flux_lora_to_diffusers(dict(tensors))
    except (ValueError, AttributeError, KeyError) as exc:
        raise FormatError(f"{name}: not an XLabs Flux LoRA ({str(exc).splitlines()[0][:100]})") from None
    return _from_peft_keys(conv, metadata, name, "xlabs")


def _from_peft_keys(conv: dict[str, torch.Tensor], metadata, name: str, fmt: str) -> LoraModel:
    model = LoraModel(metadata=clean_meta(metadata), base="flux", source_format=fmt)
    for mod, f in groups_of(conv, PEFT_SUFFIXES).items():
        if not mod.startswith("transformer."):
            raise FormatError(f"{name}: key {mod!r} is not a Flux transformer module")
        model.layers[mod] = plain_layer(mod, f, name)
    model.arch = arch_name(model, "flux")
    return model


_BFL_PREFIXES = ("diffusion_model.", "base_model.model.", "transformer.", "model.")


def read_bfl(tensors: dict[str, torch.Tensor], metadata: dict[str, str], name: str = "file") -> LoraModel:
    """A Flux LoRA whose keys are BFL module paths with PEFT or kohya factors, optionally prefixed
    (ComfyUI/ai-toolkit ``diffusion_model.``, PEFT ``base_model.model.``):
    ``double_blocks.0.img_attn.qkv.lora_A.weight``, ``diffusion_model.single_blocks.3.linear1.lora_down.weight``.
    kohya-style factors go through diffusers' kohya converter (as ComfyUI files do in diffusers), PEFT
    ones through :func:`from_bfl_layers`."""
    kohya_like = any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in tensors)
    fmt = "comfyui" if any(k.startswith("diffusion_model.") for k in tensors) else "bfl"
    stripped = {}
    for k, t in tensors.items():
        p = next((p for p in _BFL_PREFIXES if k.startswith(p)), "")
        stripped[k[len(p):]] = t
    groups = groups_of(stripped, KOHYA_SUFFIXES if kohya_like else PEFT_SUFFIXES)
    layers = {}
    for orig, f in groups.items():
        if FLUX.spec(orig) is None:
            raise FormatError(f"{name}: {orig} is not a module of the Flux.1 BFL layout")
        layers[orig] = plain_layer(orig, f, name)
    if kohya_like:
        model = read_kohya({f"lora_unet_{o.replace('.', '_')}.{s}": t for o, f in groups.items()
                            for s, t in (("lora_down.weight", f["down"]), ("lora_up.weight", f["up"]),
                                         *((("alpha", f["alpha"]),) if "alpha" in f else ()))},
                           metadata, name)
    else:
        model = LoraModel(metadata=clean_meta(metadata), layers=from_bfl_layers(layers), base="flux")
        model.arch = arch_name(model, "flux")
    model.source_format = fmt
    return model


# ----------------------------------------------------------------------------------------------
# writing

def write_kohya(model: LoraModel, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of Flux LoRA ``model`` in kohya sd-scripts' naming (BFL layout, fused q/k/v)."""
    return write_kohya_layout(model, to_bfl_layers(model), dtype, arch=model.arch if model.arch not in ("", "unknown")
                              else "flux")
