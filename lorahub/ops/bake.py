"""Bake LoRAs into a full checkpoint: W = W0 + Σ αᵢ·ΔWᵢ, streamed one tensor at a time.

The merged update comes as a :class:`LoraModel` whose layers are exact factors of Σ αᵢ·ΔWᵢ (the
``concat`` merge). Reading and writing go through :mod:`lorahub.ops.checkpoints` (canonical names,
positioned reads, a streaming safetensors writer): per adapted weight only its ΔW is formed, added to
W0 in fp32 and cast back to the base tensor's own dtype; every other tensor is copied as stored.

* base = a diffusers folder  -> a diffusers folder (other files copied);
* base = a single-file LDM/SGM ``.safetensors`` -> a single ``.safetensors`` in the same layout;
* base = a Flux.1 transformer in the BFL layout (``double_blocks.N.img_attn.qkv.weight``) -> the same
  layout, the LoRA's q/k/v (and single blocks' q/k/v + MLP) fused exactly as BFL fuses them
  (:func:`lorahub.formats.dit.flux.to_bfl_layers`).

Flux.1 / SD3 diffusers folders take the LoRA's ``transformer.…`` layers on the transformer's weights.

The recipe is recorded in ``lorahub_recipe.toml`` inside a baked folder, and in the header metadata
(``lorahub.recipe``) of a baked single file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lorahub.errors import LorahubError
from lorahub.formats.canonical import LoraModel
from lorahub.formats.header import FLOAT_DTYPES
from lorahub.formats.names import canonical, dialect_name, from_kohya, is_unmapped, kohya_part
from lorahub.vocab import PARTS

RECIPE_FILE = "lorahub_recipe.toml"


@dataclass
class BakeReport:
    out: Path
    layers: int = 0  # weights changed
    family: str = "unknown"
    layout: str = ""
    dtypes: dict[str, int] = field(default_factory=dict)  # stored dtype of changed weights -> count

    def to_dict(self) -> dict:
        return {"out": str(self.out), "layers": self.layers, "family": self.family, "layout": self.layout,
                "dtypes": self.dtypes}


def weight_name(key: str) -> str:
    """Canonical checkpoint tensor name of a LoRA layer key (CLIP towers spelled with ``text_model.``)."""
    part, _, rest = key.partition(".")
    if part not in PARTS:
        raise LorahubError(f"{key}: unknown model part {part!r}")
    return canonical(part, rest) + ".weight"


def _module_of(ck, key: str) -> str:
    """The canonical module a layer key adapts in ``ck``: the key itself, or for an unmapped kohya key
    the module the base model's own module list names (a diffusers folder's configs)."""
    if not is_unmapped(key):
        return key
    if ck.arch is None:
        why = ck.arch_error or "a single-file checkpoint carries no config"
        raise LorahubError(f"{key}: this kohya name needs the base model's module list to find its weight "
                           f"({why}); bake onto a diffusers folder of the model")
    hit = from_kohya(dialect_name(key), ck.arch) if kohya_part(dialect_name(key)) else None
    if hit is None:
        raise LorahubError(f"{key}: not a module of {ck.path}: is the base the right model?")
    return hit


def _bfl_layers(ck, merged: LoraModel) -> dict[str, object]:
    """A Flux.1 LoRA's transformer layers keyed by BFL module path (fused q/k/v exact:
    :func:`lorahub.formats.dit.flux.to_bfl_layers`), for a BFL-layout file (the transformer only)."""
    from lorahub.formats.dit.flux import to_bfl_layers

    if ck.family != merged.base and merged.base not in ("flux", "unknown"):
        raise LorahubError(f"{ck.path} is a Flux.1 transformer (BFL layout) but the LoRA is for {merged.base}")
    layers = {}
    for key, layer in merged.layers.items():
        if is_unmapped(key) and dialect_name(key).startswith("lora_unet_"):
            key = "transformer." + dialect_name(key)  # a kohya Flux name read without its family
        elif not key.startswith("transformer."):
            others = [k for k in merged.layers if not k.startswith("transformer.") and not
                      (is_unmapped(k) and dialect_name(k).startswith("lora_unet_"))]
            raise LorahubError(f"{key}: a Flux.1 file in the BFL layout holds only the transformer; "
                               f"{len(others)} text-encoder layer(s) of the LoRA cannot be baked into it")
        layers[key] = layer
    return to_bfl_layers(LoraModel(base="flux", layers=layers))


def _plan(ck, merged: LoraModel) -> dict[str, list]:
    """Weight name -> the layers that add to it (several when differently named layers of the inputs
    map to one module). A Flux.1 file in the BFL layout takes the LoRA's layers fused as BFL modules."""
    plan: dict[str, list] = {}
    lost = []
    if ck.layout == "bfl":
        items = [(orig, orig + ".weight", layer) for orig, layer in _bfl_layers(ck, merged).items()]
    else:
        items = [(key, weight_name(_module_of(ck, key)), layer) for key, layer in merged.layers.items()]
    for key, name, layer in items:
        if name not in ck:
            lost.append(key)
            continue
        shape = tuple(ck.shape(name))
        want = tuple(int(s) for s in layer.shape)
        if shape[0] != want[0] or math.prod(shape[1:]) != math.prod(want[1:]):
            raise LorahubError(f"{key}: the LoRA adapts a weight of shape {want}, the base has {shape}: "
                               "is the base the right model?")
        if ck.dtype(name) not in FLOAT_DTYPES:
            raise LorahubError(f"{name}: stored as {ck.dtype(name)}; only float weights can be baked")
        plan.setdefault(name, []).append(layer)
    if lost:
        raise LorahubError(f"{lost[0]}: no such weight in {ck.path} ({len(lost)} layer(s) unmatched): "
                           "is the base the right model?")
    return plan


def check(base: Path, merged: LoraModel, out: Path, *, force: bool = False) -> None:
    """Every refusal :func:`bake` can make, without writing anything (headers only)."""
    from lorahub.ops import checkpoints

    _check_paths(Path(base), Path(out), force)
    with checkpoints.open_checkpoint(base) as ck:
        _plan(ck, merged)


def _check_paths(base: Path, out: Path, force: bool) -> None:
    from lorahub.outputs import check_output

    check_output(out, force=force, inputs=[base], folder=base.is_dir())
    if base.is_dir() and out.suffix.lower() == ".safetensors":
        raise LorahubError(f"{out}: the base is a diffusers folder, so the baked model is a folder; "
                           "the output must be a folder name (without .safetensors)")
    if base.is_file() and out.suffix.lower() != ".safetensors":
        raise LorahubError(f"{out}: the base is a single-file checkpoint; the output must be a .safetensors file")


def bake(base: Path, merged: LoraModel, out: Path, *, recipe_text: str = "", force: bool = False,
         on_tensor: Callable[[str], None] | None = None) -> BakeReport:
    """Write ``out`` = ``base`` with ``merged``'s ΔW added (folder -> folder, single file -> single file).

    ``merged``: the update, as a LoRA whose layers are exact factors (a ``concat`` merge; see
    :func:`lorahub.ops.recipe.merge_recipe` for baking from a recipe). An existing ``out`` is replaced
    only with ``force``."""
    from lorahub import fsutil
    from lorahub.ops import checkpoints

    base, out = Path(base), Path(out)
    _check_paths(base, out, force)
    with checkpoints.open_checkpoint(base) as ck:
        plan = _plan(ck, merged)
        report = BakeReport(out=out, family=ck.family, layout=ck.layout)

        def transform(name: str, w0: torch.Tensor) -> torch.Tensor:
            layers = plan.get(name)
            if layers is None:
                return w0
            d = sum(layer.delta(dtype=torch.float32).reshape(w0.shape) for layer in layers)
            report.layers += 1
            st = ck.dtype(name)
            report.dtypes[st] = report.dtypes.get(st, 0) + 1
            if on_tensor:
                on_tensor(name)
            return (w0.to(torch.float32) + d).to(w0.dtype)

        kwargs = {}
        single = ck.layout != "diffusers"
        if single and recipe_text:
            meta = dict(ck.metadata())
            meta["lorahub.recipe"] = recipe_text
            kwargs["metadata"] = meta
        checkpoints.write_like(ck, out, transform=transform, **kwargs)
    if report.layers != len(plan):
        raise LorahubError(f"internal: baked {report.layers} of {len(plan)} weights")
    if recipe_text and not single:
        fsutil.atomic_write_text(out / RECIPE_FILE, recipe_text)
    return report
