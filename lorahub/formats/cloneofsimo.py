"""cloneofsimo (lora_diffusion) dialect: read only.

safetensors keys ``<model>:<i>:up`` / ``<model>:<i>:down``; metadata ``<model>`` = JSON list of the target
class names, ``<model>:<i>:rank``; learned tokens as tensors ``<s1>`` with metadata value ``<embed>``.
The ``.pt`` form is a flat list ``[up0, down0, up1, down1, …]`` of the UNet (read with
``torch.load(weights_only=True)``). There are no module names: index ``i`` is the position in the module
walk replayed by :func:`lorahub.formats.names.cloneofsimo_order` on the matching architecture (a
built-in one, or the base model's own when it is given). The walk
order depends on the diffusers release the file was made with (transformer blocks registered
attn1, ff, attn2 up to 0.11; attn1, attn2, ff since): both are tried and the one whose shapes match every
factor wins. ``up`` already carries the scale, so alpha = rank.
"""

from __future__ import annotations

import json
import re

import torch

from lorahub.errors import FormatError
from lorahub.formats import names
from lorahub.formats.canonical import LoraLayer, LoraModel
from lorahub.vocab import PARTS

_KEY = re.compile(r"^(?P<model>[A-Za-z0-9_]+):(?P<i>\d+):(?P<ud>up|down)$")
_CANDIDATES = ("sd1", "sd2", "tiny-sd1", "sdxl", "tiny-sdxl")


def read(tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, arch=None,
         base_hint: str | None = None, name: str = "file") -> LoraModel:
    per_model: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    tokens: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m:
            per_model.setdefault(m["model"], {}).setdefault(int(m["i"]), {})[m["ud"]] = t
        elif metadata.get(key) == "<embed>":
            tokens[key] = t
        else:
            raise FormatError(f"{name}: key {key!r} is not a cloneofsimo LoRA key")
    for model_name, idx in per_model.items():
        if model_name not in PARTS:
            raise FormatError(f"{name}: unknown cloneofsimo model name {model_name!r}")
        if sorted(idx) != list(range(len(idx))):
            raise FormatError(f"{name}: {model_name} module indices are not 0..{len(idx) - 1}")
        for i, f in idx.items():
            if "up" not in f or "down" not in f:
                raise FormatError(f"{name}: {model_name}:{i} lacks its up or down factor")
            if f["down"].shape[0] == 0:
                raise FormatError(f"{name}: {model_name}:{i} has rank 0")
            if f["up"].shape[1] != f["down"].shape[0]:
                raise FormatError(f"{name}: {model_name}:{i}: up {tuple(f['up'].shape)} and down "
                                  f"{tuple(f['down'].shape)} have different ranks")

    targets = {}
    for model_name in per_model:
        raw = metadata.get(model_name)
        try:
            targets[model_name] = json.loads(raw) if raw else None
        except ValueError:
            targets[model_name] = None

    order = [arch] if arch else sorted(_CANDIDATES, key=lambda a: names.FAMILY[a] != base_hint)
    tried = []
    for arch_name in order:
        a = names.get_arch(arch_name)
        mapping = _match(a, per_model, targets)
        if mapping is not None:
            break
        tried.append(a.name)
    else:
        raise FormatError(f"{name}: the cloneofsimo module order matches none of {', '.join(tried)} "
                          "(tried both diffusers block orders)")

    clone_meta = {k: v for k, v in metadata.items() if k in per_model or _is_rank_key(k) or v == "<embed>"}
    meta = {k: v for k, v in metadata.items() if k not in clone_meta}
    model = LoraModel(metadata=meta, source_format="cloneofsimo", base=a.family if a.family != "unknown" else
                      (base_hint or "unknown"), arch=a.name)
    model.extra["cloneofsimo_metadata"] = clone_meta
    for (model_name, i), cname in mapping.items():
        f = per_model[model_name][i]
        model.layers[cname] = LoraLayer(kind="lora", weights={"down": f["down"], "up": f["up"]})
    for tok, t in tokens.items():
        model.embeddings[tok] = {"clip_l": t.reshape(1, -1) if t.dim() == 1 else t}
    if tokens:
        model.extra["embedding_shapes"] = {tok: list(t.shape) for tok, t in tokens.items()}
    return model


def _is_rank_key(k: str) -> bool:
    return bool(re.match(r"^[A-Za-z0-9_]+:\d+:rank$", k))


def _match(a: names.Arch, per_model, targets) -> dict[tuple[str, int], str] | None:
    mapping: dict[tuple[str, int], str] = {}
    for model_name, idx in per_model.items():
        if model_name not in a.parts:
            return None
        found = None
        for legacy in (False, True):
            order = names.cloneofsimo_order(a, model_name, targets.get(model_name), legacy_block_order=legacy)
            if len(order) != len(idx):
                continue
            ok = all(_fits(a.modules[order[i]], idx[i]) for i in range(len(order)))
            if ok:
                found = order
                break
        if found is None:
            return None
        for i, cname in enumerate(found):
            mapping[(model_name, i)] = cname
    return mapping


def _fits(shape, f) -> bool:
    return tuple(shape) == (int(f["up"].shape[0]), int(f["down"].shape[1]))


def read_pt_list(tensors: dict[str, torch.Tensor], name: str = "file", arch=None) -> LoraModel:
    """The pickled ``.pt`` form: ``{"0": up0, "1": down0, …}`` after flattening the list (UNet only)."""
    n = len(tensors)
    if n % 2:
        raise FormatError(f"{name}: odd number of tensors in a cloneofsimo list")
    flat = {f"unet:{i}:up": tensors[str(2 * i)] for i in range(n // 2)}
    flat |= {f"unet:{i}:down": tensors[str(2 * i + 1)] for i in range(n // 2)}
    return read(flat, {}, arch=arch, name=name)
