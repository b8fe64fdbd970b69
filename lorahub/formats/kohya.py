"""kohya / webui dialect (also LyCORIS LoHa/LoKr/full/DoRA, which use the same module naming).

Metadata: :func:`derived_metadata` is what kohya's own tools (train_network, resize_lora, svd_merge_lora,
extract_lora_from_models) write, for a LoRA lorahub made; :func:`write` recomputes the hash fields
(:data:`HASH_KEYS`) the way kohya does, so they are never stale.

Keys: ``<kohya module>.<factor>`` with the kohya module name from :mod:`lorahub.formats.names`
(``lora_unet_…``, ``lora_te_…``/``lora_te1_…``/``lora_te2_…``; SDXL UNet in the SGM layout) and
factors ``lora_down.weight``, ``lora_up.weight``, ``lora_mid.weight``, ``alpha``, ``dora_scale``,
``hada_w1_a`` …, ``lokr_w1`` …, ``diff``. Bundled embeddings: ``bundle_emb.<token>.string_to_param.*``
(SD1/SD2) or ``bundle_emb.<token>.clip_l`` / ``.clip_g`` (SDXL).
"""

from __future__ import annotations

import hashlib
import json

import torch

from lorahub.errors import FormatError
from lorahub.formats import names
from lorahub.formats.canonical import LoraLayer, LoraModel
from lorahub.vocab import KOHYA_BASE_VERSIONS, MODELSPEC_ARCHITECTURES

# file factor suffix -> (layer kind, canonical factor name)
FACTORS = {
    "lora_down.weight": ("lora", "down"), "lora_up.weight": ("lora", "up"), "lora_mid.weight": ("lora", "mid"),
    "hada_w1_a": ("loha", "w1a"), "hada_w1_b": ("loha", "w1b"), "hada_w2_a": ("loha", "w2a"),
    "hada_w2_b": ("loha", "w2b"), "hada_t1": ("loha", "t1"), "hada_t2": ("loha", "t2"),
    "lokr_w1": ("lokr", "w1"), "lokr_w1_a": ("lokr", "w1a"), "lokr_w1_b": ("lokr", "w1b"),
    "lokr_w2": ("lokr", "w2"), "lokr_w2_a": ("lokr", "w2a"), "lokr_w2_b": ("lokr", "w2b"),
    "lokr_t2": ("lokr", "t2"), "diff": ("full", "diff"), "diff_b": ("full", "diff_b"),
}
SUFFIX_OF = {(kind, fac): suffix for suffix, (kind, fac) in FACTORS.items()}
_SPECIAL = ("alpha", "dora_scale")
_ALL_SUFFIXES = sorted(list(FACTORS) + list(_SPECIAL), key=len, reverse=True)


def split_key(key: str) -> tuple[str, str] | None:
    for s in _ALL_SUFFIXES:
        if key.endswith("." + s):
            return key[: -len(s) - 1], s
    return None


def _adapted_shape(kind: str, f: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
    """Shape of the adapted weight implied by the factors (None when it needs the architecture)."""
    if kind == "lora" and "down" in f and "up" in f:
        down, up = f["down"], f["up"]
        if down.dim() == 4:
            kh, kw = (f["mid"].shape[2:] if "mid" in f else down.shape[2:])
            return (int(up.shape[0]), int(down.shape[1]), int(kh), int(kw))
        return (int(up.shape[0]), int(down.shape[1]))
    if kind == "full":
        return tuple(int(s) for s in f["diff"].shape)
    if kind == "loha":
        if "t1" in f:  # Tucker: w1a (r, out), w1b (r, in), t1 (r, r, kh, kw)
            return (int(f["w1a"].shape[1]), int(f["w1b"].shape[1]), *[int(x) for x in f["t1"].shape[2:]])
        return (int(f["w1a"].shape[0]), int(f["w1b"].shape[1]))  # conv: (out, in*kh*kw)
    if kind == "lokr":
        try:
            a, b = f["w1"].shape if "w1" in f else (f["w1a"].shape[0], f["w1b"].shape[1])
            if "t2" in f:
                w2 = (f["w2a"].shape[1], f["w2b"].shape[1], *f["t2"].shape[2:])
            elif "w2" in f:
                w2 = tuple(f["w2"].shape)
            else:
                w2 = (f["w2a"].shape[0], f["w2b"].shape[1])
        except KeyError:
            return None
        return (int(a * w2[0]), int(b * w2[1]), *[int(x) for x in w2[2:]])
    return None


def set_alpha(layer: LoraLayer, tensor, what: str) -> None:
    """``layer.alpha`` from a kohya ``.alpha`` tensor (a scalar, as any shape of one element), keeping
    its dtype and shape so the file is written back bit for bit; ``what`` names it in the error."""
    if tensor.numel() != 1:
        raise FormatError(f"{what} is not a scalar")
    layer.alpha = float(tensor.reshape(()).item())
    layer.extra["alpha_dtype"] = str(tensor.dtype).replace("torch.", "")
    layer.extra["alpha_shape"] = list(tensor.shape)


def read(tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, arch=None,
         base_hint: str | None = None, name: str = "file") -> LoraModel:
    """Read kohya/LyCORIS tensors. ``arch`` (an Arch or its name: the base model's own architecture)
    maps the names; without it the built-in table holding every name does, and when none does the
    layers keep their kohya names (unmapped; see :mod:`lorahub.formats.names`)."""
    family = names.family_dialect(base_hint)
    if family is not None and family.read_kohya is not None:
        model = family.read_kohya(tensors, metadata, name)
        if arch is not None:  # the base model's own module list maps what the family's reader left unmapped
            left = names.map_unmapped(model, arch)
            model.notes = [n for n in model.notes if "kept under their kohya names" not in n]
            if left:
                model.notes.append(f"{len(left)} layer(s) are not modules of the base model: kept under their "
                                   f"kohya names, e.g. {left[0]}")
        return model
    groups: dict[str, dict[str, torch.Tensor]] = {}
    emb: dict[str, dict[str, torch.Tensor]] = {}
    emb_keys: dict[str, dict[str, str]] = {}
    for key, t in tensors.items():
        if key.startswith("bundle_emb."):
            _, tok, inner = key.split(".", 2)
            slot = "clip_g" if inner == "clip_g" else "clip_l"
            emb.setdefault(tok, {})[slot] = t
            emb_keys.setdefault(tok, {})[slot] = inner
            continue
        sk = split_key(key)
        if sk is None or not sk[0].startswith(tuple(names_prefixes())):
            raise FormatError(f"{name}: key {key!r} is not a kohya/LyCORIS LoRA key ((IA)3 and other "
                              "network types are not supported)")
        groups.setdefault(sk[0], {})[sk[1]] = t

    # factors and kinds per module
    built: dict[str, tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
    for mod, fs in groups.items():
        kinds = {FACTORS[s][0] for s in fs if s in FACTORS}
        if len(kinds) != 1:
            raise FormatError(f"{name}: module {mod} has " + ("no factors" if not kinds else
                              f"factors of several kinds ({', '.join(sorted(kinds))})"))
        kind = kinds.pop()
        weights = {FACTORS[s][1]: t for s, t in fs.items() if s in FACTORS}
        special = {s: t for s, t in fs.items() if s in _SPECIAL}
        _check_factors(mod, kind, weights, name)
        built[mod] = (kind, weights, special)

    # architecture: the module each name adapts (kept under its kohya name when no table holds it)
    shapes = {mod: _adapted_shape(kind, w) for mod, (kind, w, _s) in built.items()}
    km = names.map_kohya(shapes, arch=arch, base_hint=base_hint)
    a = km.arch

    from lorahub.formats.diffusers_fmt import LOREHUB_KEY

    metadata = dict(metadata)
    raw = metadata.pop(LOREHUB_KEY, None)
    if raw:
        try:
            stash = json.loads(raw).get("stash", {})
        except (ValueError, AttributeError, RecursionError):
            stash = {}
        if isinstance(stash, dict):  # only an object of strings is ours; anything else is ignored
            metadata.update({k: v for k, v in stash.items() if isinstance(v, str)})
    known = a is not None and a.family != "unknown"
    model = LoraModel(metadata=metadata, source_format="kohya", base=a.family if known else (base_hint or "unknown"),
                      arch=a.name if a else "unknown", notes=list(km.notes))
    for mod, (kind, weights, special) in built.items():
        cname = km.names[mod]
        mapped = not names.is_unmapped(cname)
        if mapped and a.kohya_unet_layout == "sgm" and names.kohya_layout_of(mod, a) == "diffusers":
            model.extra["kohya_unet_layout"] = "diffusers"  # written back the same way
        layer = LoraLayer(kind=kind, weights=weights)
        if "alpha" in special:
            set_alpha(layer, special["alpha"], f"{name}: alpha of {mod}")
        if "dora_scale" in special:
            layer.dora_scale = special["dora_scale"]
        if kind in ("loha", "lokr") or (kind == "lora" and "mid" in weights):
            shape = a.modules[cname] if mapped else shapes[mod]
            if shape is not None:
                layer.extra["shape"] = list(shape)
        model.layers[cname] = layer
    if emb:
        model.embeddings = emb
        model.extra["embedding_keys"] = emb_keys
    return model


def names_prefixes() -> tuple[str, ...]:
    return tuple(names.KOHYA_PREFIXES)


def _check_factors(mod: str, kind: str, w: dict[str, torch.Tensor], name: str) -> None:
    if kind == "lora":
        if "down" not in w or "up" not in w:
            raise FormatError(f"{name}: layer {mod} lacks its " + ("lora_up" if "down" in w else "lora_down")
                              + " factor")
        down, up = w["down"], w["up"]
        if down.shape[0] == 0 or up.dim() < 2 or up.shape[1] == 0:
            raise FormatError(f"{name}: layer {mod} has rank 0")
        r_up = up.shape[1]
        r_down = w["mid"].shape[0] if "mid" in w else down.shape[0]
        if "mid" in w:
            if w["mid"].shape[1] != down.shape[0]:
                raise FormatError(f"{name}: layer {mod}: lora_mid {tuple(w['mid'].shape)} does not fit "
                                  f"lora_down {tuple(down.shape)}")
        if r_up != r_down:
            raise FormatError(f"{name}: layer {mod}: lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)} "
                              "have different ranks")
    elif kind == "loha":
        for k in ("w1a", "w1b", "w2a", "w2b"):
            if k not in w:
                raise FormatError(f"{name}: LoHa layer {mod} lacks hada_{k[:2]}_{k[2]}")
        tucker = "t1" in w or "t2" in w  # Tucker: w?a is (r, out), w?b is (r, in)
        ra = (lambda t: t.shape[0]) if tucker else (lambda t: t.shape[1])
        if ra(w["w1a"]) != w["w1b"].shape[0] or ra(w["w2a"]) != w["w2b"].shape[0]:
            raise FormatError(f"{name}: LoHa layer {mod} has mismatched factor shapes")
        if w["w1b"].shape[0] == 0:
            raise FormatError(f"{name}: layer {mod} has rank 0")
    elif kind == "lokr":
        if not (("w1" in w) or ("w1a" in w and "w1b" in w)) or not (("w2" in w) or ("w2a" in w and "w2b" in w)):
            raise FormatError(f"{name}: LoKr layer {mod} lacks a Kronecker factor")


def write(model: LoraModel, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of ``model`` in the kohya dialect."""
    family = names.family_dialect(model.base)
    if family is not None and family.write_kohya is not None:
        return family.write_kohya(model, dtype)
    arch = names.arch_for_writing(model)
    parts = model.parts()
    out: dict[str, torch.Tensor] = {}
    for cname, layer in model.layers.items():
        if arch is not None and cname not in arch.modules and not names.is_unmapped(cname):
            raise FormatError(f"layer {cname} is not a module of {arch.name}")
        k = names.to_kohya(cname, arch, sgm=model.extra.get("kohya_unet_layout") != "diffusers", parts=parts)
        for fac, t in layer.weights.items():
            suffix = SUFFIX_OF.get((layer.kind, fac))
            if suffix is None:
                raise FormatError(f"layer {cname}: factor {fac!r} of kind {layer.kind} has no kohya key")
            out[f"{k}.{suffix}"] = _cast(t, dtype)
        if layer.alpha is not None:
            adt = getattr(torch, layer.extra["alpha_dtype"]) if "alpha_dtype" in layer.extra and dtype is None \
                else (dtype or next(iter(layer.weights.values())).dtype)
            a = torch.tensor(layer.alpha, dtype=adt)
            if layer.extra.get("alpha_shape"):
                a = a.reshape(layer.extra["alpha_shape"])
            out[f"{k}.alpha"] = a
        if layer.dora_scale is not None:
            out[f"{k}.dora_scale"] = _cast(layer.dora_scale, dtype)
    keys = model.extra.get("embedding_keys", {})
    for tok, slots in model.embeddings.items():
        for slot, t in slots.items():
            inner = keys.get(tok, {}).get(slot)
            if inner is None:
                inner = slot if (model.base == "sdxl" or "clip_g" in slots) else "string_to_param.*"
            out[f"bundle_emb.{tok}.{inner}"] = _cast(t, dtype)
    meta = dict(model.metadata)
    if model.extra.get("kohya_hashes") or any(k in meta for k in HASH_KEYS):
        meta.update(kohya_hashes(out, meta))
    # diffusers' LoraConfig JSON must not reach a kohya file (diffusers refuses "network_alphas and
    # metadata" together): stash it in lorahub's own field so a later conversion to diffusers restores it.
    from lorahub.formats.diffusers_fmt import LOREHUB_KEY, META_KEY

    if META_KEY in meta:
        meta[LOREHUB_KEY] = json.dumps({"stash": {META_KEY: meta.pop(META_KEY)}}, sort_keys=True,
                                       separators=(",", ":"))
    return out, meta


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or not t.is_floating_point() else t.to(dtype)


# ----- metadata ------------------------------------------------------------------------------------
NETWORK_MODULE = "networks.lora"  # kohya's module for plain LoRA / LoCon (what lorahub's outputs are)
# Hash fields: kohya's sd-webui-additional-networks hashes and ModelSpec's hash. Recomputed by
# :func:`write` whenever present (or when ``model.extra["kohya_hashes"]`` asks for them).
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
# fields :func:`derived_metadata` recomputes (an input's values would be stale)
RECOMPUTED = HASH_KEYS + ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                          "modelspec.architecture", "modelspec.title", "modelspec.merged_from")
# ss_network_args entries that describe ranks or the network structure (stale after a rank change)
STRUCTURE_ARGS = ("conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims",
                  "conv_block_alphas", "algo", "preset", "factor", "use_tucker", "use_scalar",
                  "decompose_both", "full_matrix")
DYNAMIC = "Dynamic"  # kohya's ss_network_dim / ss_network_alpha when layers differ


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """The hash fields of a kohya file holding ``tensors`` (as saved), computed as kohya does
    (sd-scripts ``train_util.precalculate_safetensors_hashes``): the tensors are serialised by the
    safetensors library with only the ``ss_*`` metadata; ``sshs_model_hash`` is the SHA-256 of the bytes
    after the header (the tensor data), ``sshs_legacy_hash`` the first 8 hex digits of the SHA-256 of the
    64 KiB at offset 1 MiB. ``modelspec.hash_sha256`` is ``0x`` + the SHA-256 over the tensors' bytes in
    saved order (ModelSpec / kohya's ``sai_model_spec``), which is the same digest."""
    from safetensors.torch import save

    blob = save({k: t.contiguous() for k, t in tensors.items()},
                {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(blob[:8], "little")
    data = hashlib.sha256(memoryview(blob)[8 + n:]).hexdigest()
    legacy = hashlib.sha256(memoryview(blob)[0x100000:0x110000]).hexdigest()[:8]
    return {"sshs_model_hash": data, "sshs_legacy_hash": legacy, "modelspec.hash_sha256": "0x" + data}


def _number(x: float) -> str:
    return str(float(x))


def _one(values: set, fmt) -> str:
    return fmt(next(iter(values))) if len(values) == 1 else DYNAMIC


def _json_dict(text) -> dict:
    try:
        d = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return {}
    return dict(d) if isinstance(d, dict) else {}


def derived_metadata(model: LoraModel, *, title: str, inherited: dict[str, str] | None = None,
                     merged_from: str | None = None) -> dict[str, str]:
    """Header metadata for a LoRA lorahub made (resize, merge, extract), as kohya's own tools write it.

    ``model``: the result, plain LoRA / LoCon layers with their alphas. ``inherited``: the input's
    metadata that still describes the result (training metadata; the caller chooses); the fields
    computed here (:data:`RECOMPUTED`) are replaced. Written: ``ss_network_module`` (``networks.lora``,
    or the input's for DoRA layers), ``ss_network_dim`` / ``ss_network_alpha`` of the linear layers
    (``Dynamic`` when they differ, as kohya writes them), ``ss_network_args`` with ``conv_dim`` /
    ``conv_alpha`` of the 3×3 conv layers, ``ss_base_model_version`` / ``ss_v2`` when missing, and the
    ModelSpec fields (``modelspec.sai_model_spec``, ``architecture``, ``implementation``, ``title``,
    ``resolution``, ``merged_from``). The hash fields are filled in by :func:`write` from the tensors as
    saved (``model.extra["kohya_hashes"]`` is set here).
    """
    inherited = dict(inherited or {})
    meta = {k: v for k, v in inherited.items() if k not in RECOMPUTED}
    layers = list(model.layers.values())
    dora = any(layer.dora_scale is not None for layer in layers)
    old_module = inherited.get("ss_network_module")
    module = old_module if dora and old_module else NETWORK_MODULE
    args = _json_dict(inherited.get("ss_network_args")) if old_module == module else {}
    for k in STRUCTURE_ARGS:
        args.pop(k, None)

    def is_conv(layer) -> bool:
        shape = tuple(layer.shape)
        return len(shape) == 4 and shape[2:] != (1, 1)

    lin = [layer for layer in layers if not is_conv(layer)] or layers
    conv = [layer for layer in layers if is_conv(layer) and lin is not layers]

    def alpha(layer) -> float:
        return float(layer.rank) if layer.alpha is None else float(layer.alpha)

    meta["ss_network_module"] = module
    meta["ss_network_dim"] = _one({int(layer.rank) for layer in lin}, str)
    meta["ss_network_alpha"] = _one({alpha(layer) for layer in lin}, _number)
    if conv:
        args["conv_dim"] = _one({int(layer.rank) for layer in conv}, str)
        args["conv_alpha"] = _one({alpha(layer) for layer in conv}, _number)
    if args:
        meta["ss_network_args"] = json.dumps(args)
    family = model.base
    if family in KOHYA_BASE_VERSIONS:
        meta.setdefault("ss_base_model_version", KOHYA_BASE_VERSIONS[family])
        meta.setdefault("ss_v2", str(family == "sd2"))
        from lorahub.metadata import base_hint

        arch = inherited.get("modelspec.architecture", "").split("/")[0]
        if base_hint(arch) != family:  # the input's own (e.g. stable-diffusion-v2-768-v) when it fits
            arch = MODELSPEC_ARCHITECTURES[family]
        meta["modelspec.architecture"] = f"{arch}/lora"
        meta.setdefault("modelspec.sai_model_spec", "1.0.1")
        # kohya's sai_model_spec.determine_implementation for a LoRA
        meta.setdefault("modelspec.implementation", {"sdxl": "https://github.com/Stability-AI/generative-models",
                                                     "flux": "https://github.com/black-forest-labs/flux"}
                        .get(family, "diffusers"))
        meta.setdefault("modelspec.resolution", "1024x1024" if family in ("sdxl", "sd3", "flux") else "512x512")
    meta["modelspec.title"] = title
    if merged_from:
        meta["modelspec.merged_from"] = merged_from
    model.extra["kohya_hashes"] = True
    return meta


def training_comment(inherited: dict[str, str], note: str) -> str:
    """kohya's ``ss_training_comment`` after an operation: ``note; <the input's comment>``."""
    old = inherited.get("ss_training_comment", "")
    return f"{note}; {old}" if old else note
