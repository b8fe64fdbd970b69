"""diffusers and PEFT dialects.

diffusers: ``unet.<path>.lora_A.weight`` (r, in[, kh, kw]) / ``.lora_B.weight`` (out, r[, 1, 1]),
``text_encoder.…``, ``text_encoder_2.…``; alphas in the header metadata ``lora_adapter_metadata`` (JSON
of each part's LoraConfig with keys prefixed by the part: ``unet.r``, ``unet.lora_alpha``,
``unet.alpha_pattern`` …), as diffusers' own ``save_lora_weights`` writes it. Older forms read too:
``….lora.down.weight`` / ``….lora.up.weight`` and attn-processor ``…processor.to_q_lora.down.weight``.

peft: one model per file, ``base_model.model.<path>.lora_A.weight`` (what ``PeftModel.save_pretrained``
writes) or unprefixed ``<path>.lora_A.weight``; its LoraConfig unprefixed in ``lora_adapter_metadata``.

Only plain LoRA layers (linear or conv, no Tucker mid, no DoRA) can be written: diffusers cannot load
LoHa/LoKr and drops DoRA's magnitude, so those are refused with the reason.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import torch

from lorahub.errors import FormatError
from lorahub.formats import names
from lorahub.formats.canonical import LoraLayer, LoraModel
from lorahub.vocab import PARTS

META_KEY = "lora_adapter_metadata"
LOREHUB_KEY = "lorahub"  # our own bookkeeping: keys we added, layers without alpha, alpha dtypes

_KEY = re.compile(r"^(?P<mod>.+?)\.(?:lora_(?P<ab>[AB])\.weight|lora\.(?P<ud>up|down)\.weight|alpha)$")
_PROC = re.compile(r"^(?P<mod>.+?)\.processor\.(?P<proj>to_q|to_k|to_v|to_out|add_k_proj|add_v_proj)_lora\."
                   r"(?P<ud>up|down)\.weight$")
_PROC_PLAIN = re.compile(r"^(?P<mod>.+?)\.(?P<proj>to_q|to_k|to_v|to_out|add_k_proj|add_v_proj)_lora\."
                         r"(?P<ud>up|down)\.weight$")


def _parse(key: str) -> tuple[str, str] | None:
    for rx in (_PROC, _PROC_PLAIN):
        m = rx.match(key)
        if m:
            proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
            return f"{m['mod']}.{proj}", m["ud"]
    m = _KEY.match(key)
    if not m:
        return None
    if m["ab"]:
        return m["mod"], "down" if m["ab"] == "A" else "up"
    if m["ud"]:
        return m["mod"], m["ud"]
    return m["mod"], "alpha"


def _bookkeeping(metadata: dict[str, str]) -> tuple[dict[str, str], dict]:
    meta = dict(metadata)
    raw = meta.pop(LOREHUB_KEY, None)
    info: dict = {}
    if raw:
        try:
            info = json.loads(raw)
        except ValueError:
            info = {}
        for k in info.get("added_keys", []):
            meta.pop(k, None)
        stash = info.get("stash")
        if isinstance(stash, dict):  # kohya's hash fields, held back while the tensors are not kohya's
            meta.update({k: v for k, v in stash.items() if isinstance(k, str) and isinstance(v, str)})
    return meta, info


def _part_configs(raw: str | None, prefixed: bool) -> dict[str, dict]:
    if not raw:
        return {}
    try:
        obj = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(obj, dict):
        return {}
    if not prefixed:
        return {"": obj}
    out: dict[str, dict] = {}
    for k, v in obj.items():
        part, _, field = k.partition(".")
        if field:
            out.setdefault(part, {})[field] = v
    return out


def _pattern_value(pattern: dict, path: str):
    """PEFT's rule: a pattern key matches a module whose name ends with it (after a dot)."""
    best = None
    for key, v in (pattern or {}).items():
        k = key.removeprefix("text_model.")
        p = path.removeprefix("text_model.")
        if p == k or p.endswith("." + k):
            if best is None or len(key) > len(best[0]):
                best = (key, v)
    return None if best is None else best[1]


_PREFIXES = tuple(p + "." for p in PARTS)


def _guess_parts(mods: list[str], name: str) -> list[str]:
    """Candidate parts of unprefixed (PEFT) module paths: text encoders, a UNet or a DiT transformer."""
    def te_like(m):
        return m.startswith(("text_model.", "encoder.layers.", "encoder.block.", "text_projection")) \
            or ".self_attn." in m or ".mlp.fc" in m or ".SelfAttention." in m

    all_te = all(te_like(m) for m in mods)
    if any(te_like(m) for m in mods) and not all_te:
        raise FormatError(f"{name}: unprefixed keys mix denoiser and text-encoder modules")
    if all_te:
        return ["text_encoder", "text_encoder_2", "text_encoder_3"]
    if any(m.startswith(("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "time_embedding.")) for m in mods):
        return ["unet"]
    return ["transformer", "unet"]


def read(tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, arch=None,
         base_hint: str | None = None, name: str = "file") -> LoraModel:
    """Read diffusers/PEFT tensors. ``arch`` (an Arch or its name) names the architecture; without it the
    built-in one holding every module is recorded when there is one. Module paths need no table:
    layers of any model are read."""
    meta, info = _bookkeeping(metadata)
    adapter_meta = metadata.get(META_KEY)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if "lora_magnitude_vector" in key:
            raise FormatError(f"{name}: PEFT DoRA (lora_magnitude_vector) is not supported")
        parsed = _parse(key)
        if parsed is None:
            raise FormatError(f"{name}: key {key!r} is not a diffusers/PEFT LoRA key")
        mod, fac = parsed
        groups.setdefault(mod.removeprefix("base_model.model."), {})[fac] = t
    prefixed = all(m.startswith(_PREFIXES) for m in groups)
    fmt = "diffusers" if prefixed else "peft"
    if not prefixed and any(m.startswith(_PREFIXES) for m in groups):
        raise FormatError(f"{name}: mixes prefixed (unet./transformer./text_encoder.) and unprefixed LoRA keys")

    for mod, f in groups.items():
        if "down" not in f or "up" not in f:
            raise FormatError(f"{name}: layer {mod} lacks its " + ("up (lora_B)" if "down" in f else "down (lora_A)")
                              + " factor")
        if f["down"].shape[0] == 0 or f["up"].dim() < 2 or f["up"].shape[1] == 0:
            raise FormatError(f"{name}: layer {mod} has rank 0")
        if f["down"].shape[0] != f["up"].shape[1]:
            raise FormatError(f"{name}: layer {mod}: up {tuple(f['up'].shape)} and down {tuple(f['down'].shape)} "
                              "have different ranks")

    def shape_of(f):
        d, u = f["down"], f["up"]
        return (int(u.shape[0]), int(d.shape[1]), *[int(s) for s in d.shape[2:]]) if d.dim() == 4 else \
            (int(u.shape[0]), int(d.shape[1]))

    # canonical names (unprefixed peft keys: guess the part, then let the architecture decide)
    if prefixed:
        cmap = {m: names.normalize(m) for m in groups}
        candidates = [cmap]
    else:
        candidates = [{m: names.canonical(p, m) for m in groups} for p in _guess_parts(list(groups), name)]
    arch_obj = names.resolve_arch(arch)
    cmap = candidates[0]
    if arch_obj is not None:
        cmap = next((c for c in candidates if all(v in arch_obj.modules for v in c.values())), cmap)
    else:
        for cand in candidates:
            arch_obj, _why = names.match_arch({cand[m]: shape_of(f) for m, f in groups.items()}, base_hint=base_hint)
            if arch_obj is not None:
                cmap = cand
                break

    configs = _part_configs(adapter_meta, prefixed)
    no_alpha = set(info.get("no_alpha", []))
    layer_extra = info.get("layer_extra", {})
    known = arch_obj is not None and arch_obj.family != "unknown"
    model = LoraModel(metadata=meta, source_format=fmt, base=arch_obj.family if known else (base_hint or "unknown"),
                      arch=arch_obj.name if arch_obj else "unknown")
    if arch_obj is None and not prefixed and len(candidates) > 1:  # no module list told the parts apart
        model.notes.append(f"unprefixed keys: read as {names.split(next(iter(cmap.values())))[0]} modules "
                           "(no known model holds them)")
    if info.get("kohya_unet_layout"):
        model.extra["kohya_unet_layout"] = info["kohya_unet_layout"]
    for mod, f in groups.items():
        cname = cmap[mod]
        part, path = names.split(cname)
        weights = {"down": f["down"], "up": f["up"]}
        layer = LoraLayer(kind="lora", weights=weights)
        cfg = configs.get(part if prefixed else "", {})
        if "alpha" in f:
            layer.alpha = float(f["alpha"].reshape(()).item())
            layer.extra["alpha_dtype"] = str(f["alpha"].dtype).replace("torch.", "")
            layer.extra["alpha_shape"] = list(f["alpha"].shape)
        elif cfg and cname not in no_alpha:
            a = _pattern_value(cfg.get("alpha_pattern", {}), path)
            if a is None:
                a = cfg.get("lora_alpha")
            layer.alpha = None if a is None else float(a)
        if cname in layer_extra:
            layer.extra.update(layer_extra[cname])
        model.layers[cname] = layer
    return model


# ----------------------------------------------------------------------------------------------
# writing

def _check_writable(model: LoraModel, dialect: str) -> None:
    left = names.unmapped(model.layers)
    if left:
        raise FormatError(f"{len(left)} layer(s) have no known module path (kohya names of a model lorahub has "
                          f"no table for, e.g. {left[0]}), which {dialect} files need: give the base model "
                          "(its own module list maps them), or keep the kohya dialect")
    for cname, layer in model.layers.items():
        if layer.kind != "lora":
            raise FormatError(f"cannot write {layer.kind} layer {cname} as {dialect}: diffusers and PEFT LoRA "
                              "files hold only plain LoRA factors (keep it in the kohya/LyCORIS dialect)")
        if layer.dora_scale is not None:
            raise FormatError(f"cannot write DoRA layer {cname} as {dialect}: diffusers drops dora_scale "
                              "(keep it in the kohya dialect)")
        if layer.mid is not None:
            raise FormatError(f"cannot write Tucker LoCon layer {cname} as {dialect}: PEFT has no lora_mid "
                              "(keep it in the kohya dialect)")
    if model.embeddings:
        raise FormatError(f"this LoRA bundles {len(model.embeddings)} token embedding(s) "
                          f"({', '.join(model.embeddings)}), which {dialect} LoRA files cannot hold "
                          "(diffusers rejects such files): write the kohya dialect, or drop the embeddings")


def _config_for(layers: dict[str, LoraLayer], strip_text_model: bool = True) -> dict:
    ranks = {n: layer.rank for n, layer in layers.items()}
    alphas = {n: (layer.alpha if layer.alpha is not None else float(layer.rank)) for n, layer in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    a = Counter(alphas.values()).most_common(1)[0][0]

    def path(n):
        p = names.split(n)[1]
        return p.removeprefix("text_model.") if strip_text_model else p

    cfg = {
        "r": r,
        "lora_alpha": a,
        "rank_pattern": {path(n): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {path(n): v for n, v in alphas.items() if v != a},
        "target_modules": sorted(path(n) for n in layers),
        "use_dora": False,
        "lora_bias": False,
    }
    for k in ("lora_alpha",):
        if float(cfg[k]).is_integer():
            cfg[k] = int(cfg[k]) if isinstance(cfg[k], float) and cfg[k] == int(cfg[k]) else cfg[k]
    return cfg


def _consistent(cfg: dict, layers: dict[str, LoraLayer]) -> bool:
    """True when an existing LoraConfig gives every layer its rank and alpha (so it can be kept verbatim)."""
    if not isinstance(cfg, dict) or "r" not in cfg:
        return False
    for n, layer in layers.items():
        p = names.split(n)[1]
        r = _pattern_value(cfg.get("rank_pattern", {}), p) or cfg.get("r")
        a = _pattern_value(cfg.get("alpha_pattern", {}), p)
        if a is None:
            a = cfg.get("lora_alpha", r)
        want_a = layer.alpha if layer.alpha is not None else layer.rank
        if r != layer.rank or float(a) != float(want_a):
            return False
        tm = cfg.get("target_modules")
        if isinstance(tm, list) and not any(p.removeprefix("text_model.") == t.removeprefix("text_model.")
                                            or p.endswith("." + t) for t in tm):
            return False
    return True


def _bookkeeping_meta(model: LoraModel, added: list[str], has_config: bool, stash: dict[str, str]) -> str:
    info: dict = {"added_keys": added}
    if stash:
        info["stash"] = stash
    na = [n for n, layer in model.layers.items() if layer.alpha is None] if has_config else []
    if na:
        info["no_alpha"] = na
    le = {}
    for n, layer in model.layers.items():
        e = {}
        if layer.extra.get("alpha_dtype", _dt(layer.down)) != _dt(layer.down):
            e["alpha_dtype"] = layer.extra["alpha_dtype"]
        if layer.extra.get("alpha_shape"):
            e["alpha_shape"] = layer.extra["alpha_shape"]
        if e:
            le[n] = e
    if le:
        info["layer_extra"] = le
    if model.extra.get("kohya_unet_layout"):
        info["kohya_unet_layout"] = model.extra["kohya_unet_layout"]
    return json.dumps(info, sort_keys=True, separators=(",", ":"))


def write(model: LoraModel, dtype: torch.dtype | None = None, dialect: str = "diffusers"
          ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from lorahub.formats.kohya import HASH_KEYS

    _check_writable(model, dialect)
    out: dict[str, torch.Tensor] = {}
    meta = dict(model.metadata)
    # kohya's hashes describe kohya's tensors: stale here. Held in lorahub's field, so a conversion back
    # to kohya recomputes them.
    stash = {k: meta.pop(k) for k in HASH_KEYS if k in meta}
    added: list[str] = []
    if dialect == "peft":
        parts = model.parts()
        if len(parts) > 1:
            raise FormatError(f"a PEFT adapter file holds one model but this LoRA adapts {' + '.join(parts)}: "
                              "write the diffusers dialect (prefixed keys), which diffusers loads in one call")
        for cname, layer in model.layers.items():
            p = names.split(cname)[1]
            out[f"base_model.model.{p}.lora_A.weight"] = _cast(layer.down, dtype)
            out[f"base_model.model.{p}.lora_B.weight"] = _cast(layer.up, dtype)
        existing = _part_configs(meta.get(META_KEY), prefixed=False).get("")
        # a PEFT adapter always carries its LoraConfig (peft needs it to build the layers)
        if not (existing and _consistent(existing, model.layers)):
            if META_KEY not in meta:
                added.append(META_KEY)
            meta[META_KEY] = json.dumps(_config_for(model.layers), indent=2, sort_keys=True)
    else:
        by_part: dict[str, dict[str, LoraLayer]] = {}
        for cname, layer in model.layers.items():
            out[f"{cname}.lora_A.weight"] = _cast(layer.down, dtype)
            out[f"{cname}.lora_B.weight"] = _cast(layer.up, dtype)
            by_part.setdefault(names.split(cname)[0], {})[cname] = layer
        existing = _part_configs(meta.get(META_KEY), prefixed=True)
        all_default = not existing and all(layer.alpha is None for layer in model.layers.values())
        if not all_default and not (existing and set(existing) == set(by_part)
                and all(_consistent(existing[p], ls) for p, ls in by_part.items())):
            cfg = {}
            for part, ls in by_part.items():
                for k, v in _config_for(ls).items():
                    cfg[f"{part}.{k}"] = v
            if META_KEY not in meta:
                added.append(META_KEY)
            meta[META_KEY] = json.dumps(cfg, indent=2, sort_keys=True)
    if "format" not in meta:
        meta["format"] = "pt"
        added.append("format")
    book = _bookkeeping_meta(model, added, META_KEY in meta, stash)
    if book != '{"added_keys":[]}':
        meta[LOREHUB_KEY] = book
    return out, meta


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None else t.to(dtype)
