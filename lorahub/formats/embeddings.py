"""Textual-inversion embeddings.

Read: webui safetensors ``{"emb_params": (n, d)}``, webui ``.pt`` ``{"string_to_param": {"*": (n, d)},
"name": …}`` (through ``torch.load(weights_only=True)``), SDXL ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``
and diffusers ``learned_embeds`` ``{token: (d,) or (n, d)}``.
Write: ``kohya`` (webui) form — ``emb_params`` or ``clip_l``/``clip_g`` — or ``diffusers`` form
``{token: tensor}`` (one text encoder only: diffusers loads SDXL embeddings per encoder).
Canonical: ``LoraModel.embeddings = {token: {"clip_l": (n, d)[, "clip_g": (n, 1280)]}}``.
"""

from __future__ import annotations

import torch

from lorahub.errors import FormatError
from lorahub.formats.canonical import LoraModel


def read(tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, strings: dict[str, str] | None = None,
         stem: str = "embedding", name: str = "file") -> LoraModel:
    from lorahub.formats.diffusers_fmt import _bookkeeping

    strings = strings or {}
    keys = set(tensors)
    clean, _info = _bookkeeping(metadata)
    model = LoraModel(metadata=clean, source_format="embedding")
    shapes = {}
    if keys == {"emb_params"}:
        tok = metadata.get("name") or strings.get("name") or stem
        model.embeddings[tok] = {"clip_l": _2d(tensors["emb_params"])}
        fmt = "webui"
        shapes[tok] = list(tensors["emb_params"].shape)
    elif keys == {"clip_l", "clip_g"}:
        tok = metadata.get("name") or stem
        model.embeddings[tok] = {"clip_l": _2d(tensors["clip_l"]), "clip_g": _2d(tensors["clip_g"])}
        fmt = "sdxl"
    elif any(k.startswith("string_to_param.") for k in keys):
        params = [k for k in keys if k.startswith("string_to_param.")]
        if len(params) != 1:
            raise FormatError(f"{name}: webui embedding with {len(params)} string_to_param entries")
        tok = strings.get("name") or stem
        model.embeddings[tok] = {"clip_l": _2d(tensors[params[0]])}
        fmt = "webui"
    else:
        for k, t in tensors.items():
            if t.dim() not in (1, 2) or not t.is_floating_point():
                raise FormatError(f"{name}: {k!r} is not a token embedding")
            model.embeddings[k] = {"clip_l": _2d(t)}
            shapes[k] = list(t.shape)
        fmt = "diffusers"
    model.extra["embedding_format"] = fmt
    if shapes:
        model.extra["embedding_shapes"] = shapes
    dims = {t.shape[-1] for slots in model.embeddings.values() for t in slots.values()}
    if fmt == "sdxl":
        model.base = "sdxl"
    elif dims == {768}:
        model.base = "sd1"
    elif dims == {1024}:
        model.base = "sd2"
    return model


def _2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.dim() == 1 else t


def write(model: LoraModel, dialect: str, dtype: torch.dtype | None = None
          ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if model.layers:
        raise FormatError("embeddings.write called with LoRA layers")
    shapes = model.extra.get("embedding_shapes", {})

    def cast(t, tok=None):
        if tok is not None and tok in shapes:
            t = t.reshape(shapes[tok])
        return t if dtype is None else t.to(dtype)

    toks = list(model.embeddings)
    if not toks:
        raise FormatError("nothing to write: no layers and no embeddings")
    if dialect == "kohya":
        if len(toks) != 1:
            raise FormatError(f"a webui embedding file holds one token; this has {len(toks)}: write the diffusers dialect")
        slots = model.embeddings[toks[0]]
        if "clip_g" in slots:
            return {"clip_l": cast(slots["clip_l"]), "clip_g": cast(slots["clip_g"])}, dict(model.metadata)
        meta = dict(model.metadata)
        if meta.get("name") != toks[0]:
            # the webui names the token after the file; keep ours in the header (marked as added)
            import json

            from lorahub.formats.diffusers_fmt import LOREHUB_KEY

            if "name" not in meta:
                meta[LOREHUB_KEY] = json.dumps({"added_keys": ["name"]}, separators=(",", ":"))
            meta["name"] = toks[0]
        return {"emb_params": cast(slots["clip_l"], toks[0])}, meta
    if dialect in ("diffusers", "peft"):
        if any("clip_g" in s for s in model.embeddings.values()):
            raise FormatError("SDXL embeddings (clip_l + clip_g) have no single-file diffusers form "
                              "(diffusers loads one tensor per text encoder): write the kohya dialect")
        return {tok: cast(s["clip_l"], tok) for tok, s in model.embeddings.items()}, dict(model.metadata)
    raise FormatError(f"unknown dialect {dialect!r}")
