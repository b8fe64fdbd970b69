"""SD3 / SD3.5 LoRAs in kohya sd-scripts' naming: the SAI MMDiT layout (``lora_unet_joint_blocks_N_x_block_attn_qkv``,
``…_context_block_mlp_fc1``, SD3.5-medium's ``…_x_block_attn2_qkv``) <-> canonical form (diffusers module
paths, ``transformer.transformer_blocks.N.attn.to_q``). diffusers' SD3 loader converts no kohya keys, so
the map is lorahub's, from the same facts as diffusers' single-file SD3 converter
(``convert_sd3_transformer_checkpoint_to_diffusers``): q/k/v fused as ``qkv``; the last block's context
adaLN (``context_pre_only``) and the final adaLN store (shift, scale) where diffusers stores (scale, shift).

* :func:`to_sai_layers` / :func:`from_sai_layers`: canonical layers <-> layers keyed by SAI module path,
  exact (fusion rules of :mod:`lorahub.formats.dit.fused`).
* :func:`read_kohya` / :func:`write_kohya`: the family's kohya dialect (text encoders ``lora_te1_`` CLIP-L,
  ``lora_te2_`` CLIP-G, ``lora_te3_`` T5). kohya -> diffusers -> kohya is bit-exact.
"""

from __future__ import annotations

import functools
import re

import torch

from lorahub.formats.canonical import LoraLayer, LoraModel
from lorahub.formats.dit.common import read_kohya_layout, write_kohya_layout
from lorahub.formats.dit.fused import Fused, one, thirds
from lorahub.formats.dit.layout import Block, Layout

# number of joint blocks by model width (the last block is context_pre_only)
BLOCKS_BY_WIDTH = {1536: 24, 2432: 38}


JOINT = {
    "x_block.attn.qkv": Fused(("attn.to_q", "attn.to_k", "attn.to_v"), thirds),
    "x_block.attn.proj": one("attn.to_out.0"),
    "x_block.attn2.qkv": Fused(("attn2.to_q", "attn2.to_k", "attn2.to_v"), thirds),
    "x_block.attn2.proj": one("attn2.to_out.0"),
    "x_block.mlp.fc1": one("ff.net.0.proj"),
    "x_block.mlp.fc2": one("ff.net.2"),
    "x_block.adaLN_modulation.1": one("norm1.linear"),
    "context_block.attn.qkv": Fused(("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), thirds),
    "context_block.attn.proj": one("attn.to_add_out"),
    "context_block.mlp.fc1": one("ff_context.net.0.proj"),
    "context_block.mlp.fc2": one("ff_context.net.2"),
    "context_block.adaLN_modulation.1": one("norm1_context.linear"),
}
TOP = {
    "x_embedder.proj": one("pos_embed.proj"),
    "context_embedder": one("context_embedder"),
    "t_embedder.mlp.0": one("time_text_embed.timestep_embedder.linear_1"),
    "t_embedder.mlp.2": one("time_text_embed.timestep_embedder.linear_2"),
    "y_embedder.mlp.0": one("time_text_embed.text_embedder.linear_1"),
    "y_embedder.mlp.2": one("time_text_embed.text_embedder.linear_2"),
    "final_layer.linear": one("proj_out"),
    "final_layer.adaLN_modulation.1": one("norm_out.linear", swap=True),
}


@functools.lru_cache(maxsize=None)
def layout(num_layers: int) -> Layout:
    """The SAI layout of an SD3 transformer with ``num_layers`` joint blocks."""
    last_context = one("norm1_context.linear", swap=True)

    def special(block, i, suffix, f):
        return last_context if suffix == "context_block.adaLN_modulation.1" and i == num_layers - 1 else f

    return Layout(name="sd3", blocks=[Block("joint_blocks", "transformer_blocks", JOINT)], top=TOP, special=special)


def _builtin_arch(width: int | None) -> str:
    return {1536: "sd3", 2432: "sd3.5-large"}.get(width or 0, "sd3")


def _num_layers(arch: str | None, width: int | None, indices: list[int]) -> int:
    """Joint blocks of the model a LoRA is for: its architecture's config, else the published model of
    that width (1536: 24, 2432: 38), else one more than the highest block index the LoRA adapts."""
    from lorahub.errors import FormatError
    from lorahub.formats.names import get_arch

    if arch not in (None, "", "unknown"):
        try:
            n = get_arch(arch).configs.get("transformer", {}).get("num_layers")
            if isinstance(n, int) and n > 0:
                return n
        except FormatError:
            pass
    if width in BLOCKS_BY_WIDTH:
        return BLOCKS_BY_WIDTH[width]
    return max(indices, default=-1) + 1


_KOHYA_X = re.compile(r"^lora_unet_joint_blocks_(\d+)_(x_block_(?!mlp_fc2)\w+|context_block_(?!mlp_fc2)\w+)$")
_CANON = re.compile(r"^transformer\.transformer_blocks\.(\d+)\.(.+)$")


def layout_of(model: LoraModel) -> Layout:
    """The SAI layout of the SD3 transformer canonical LoRA ``model`` is for (its joint blocks from its
    architecture, its width, or the blocks it adapts)."""
    width, idx = None, []
    for k, layer in model.layers.items():
        m = _CANON.match(k)
        if m:
            idx.append(int(m[1]))
            if width is None and m[2] in ("attn.to_q", "attn.to_out.0", "norm1.linear", "ff.net.0.proj"):
                width = int(layer.shape[1])
    return layout(_num_layers(model.arch, width, idx))


def to_sai_layers(model: LoraModel) -> dict[str, LoraLayer]:
    """The transformer layers of SD3 LoRA ``model`` (canonical form) keyed by SAI module path
    (``joint_blocks.3.x_block.attn.qkv``, …), exact (fusion as :func:`lorahub.formats.dit.flux.to_bfl_layers`)."""
    return layout_of(model).to_original({k: v for k, v in model.layers.items() if k.startswith("transformer.")})


def from_sai_layers(layers: dict[str, LoraLayer], num_layers: int) -> dict[str, LoraLayer]:
    """Layers keyed by SAI module path as canonical layers (``transformer.…``) of an SD3 transformer
    with ``num_layers`` joint blocks, exact. The inverse of :func:`to_sai_layers`."""
    return layout(num_layers).from_original(layers)


def read_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str], name: str = "file") -> LoraModel:
    """A kohya sd-scripts SD3/SD3.5 LoRA (``lora_unet_joint_blocks_N_…``) in canonical form."""
    width, idx = None, []
    for k, t in tensors.items():
        mod = k.rsplit(".lora_down.weight", 1)[0] if k.endswith(".lora_down.weight") else None
        m = _KOHYA_X.match(mod) if mod else None
        if m:
            idx.append(int(m[1]))
            if width is None and t.dim() == 2:
                width = int(t.shape[1])
    lay = layout(_num_layers(None, width, idx))
    return read_kohya_layout(tensors, metadata, name, layout=lay, arch=_builtin_arch(width))


def write_kohya(model: LoraModel, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of SD3 LoRA ``model`` in kohya sd-scripts' naming (SAI layout, fused q/k/v)."""
    arch = model.arch if model.arch not in ("", "unknown") else "sd3"
    return write_kohya_layout(model, to_sai_layers(model), dtype, arch=arch)
