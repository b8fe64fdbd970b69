"""Classify a LoRA / LyCORIS / embedding / checkpoint file from its header alone.

``detect(path) -> Detection`` reads the safetensors header (key names, dtypes, shapes, metadata) and at
most the few bytes of the scalar ``alpha`` tensors. It imports neither torch nor numpy and never
unpickles: pickled ``.pt``/``.ckpt``/``.bin`` files are read through a restricted unpickler that only
accepts plain tensor dictionaries (see :mod:`lorahub.formats.pickle_safe`).

Dialects recognised (facts in ``FORMATS.md``):

* kohya / webui: ``lora_unet_…`` / ``lora_te_…`` / ``lora_te1_…`` / ``lora_te2_…`` / ``lora_te3_…`` with
  ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (``.lora_mid.weight`` for Tucker LoCon);
* LyCORIS in the same naming: ``hada_*`` (LoHa), ``lokr_*`` (LoKr), ``diff`` (full), ``dora_scale``;
* diffusers: ``unet.…`` / ``transformer.…`` / ``text_encoder.…`` / ``text_encoder_2.…`` / ``text_encoder_3.…``
  with ``lora_A``/``lora_B``, the older ``.lora.down``/``.lora.up`` and attn-processor ``to_q_lora.down``
  forms;
* peft: the same without a part prefix (or with ``base_model.model.``);
* cloneofsimo: ``<model>:<i>:up`` / ``<model>:<i>:down`` (+ ``<embed>`` tokens);
* textual inversion: ``emb_params``, ``clip_l``/``clip_g``, diffusers ``{token: (n, d)}``, webui
  ``.pt`` ``string_to_param``;
* single-file Stable Diffusion checkpoints (``model.diffusion_model.…``) and bare DiT state dicts (Flux.1
  in the BFL layout, …).

``detect_bytes(data, path)`` gives the same from a file's whole content already in memory (nothing read from
disk). What a LoRA's tensor names, dtypes and shapes say is worked out once per kind of header and kept
(a bounded cache): files of one training run differ only in what is read per file, the alpha values and
the metadata.

The base family comes from the adapted modules' names and shapes first, then the header metadata
(:mod:`lorahub.formats.families`): ``Detection.base``, ``.base_model`` (``pony``, ``flux-1-dev``, …) and
``.evidence`` (what said so); a disagreement is a note, and the shapes win.
"""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lorahub.errors import FormatError
from lorahub.formats import families
from lorahub.formats.header import (FLOAT_DTYPES, Header, SectionCache, TensorInfo, header_from_bytes, read_header)
from lorahub.formats.header import clear_cache as clear_header_cache
from lorahub.formats.names import KOHYA_PREFIXES
from lorahub.formats.pickle_safe import ZIP_MAGIC
from lorahub.vocab import PARTS, PICKLE_SUFFIXES

# per-module suffixes of the kohya/LyCORIS naming, longest first
KOHYA_SUFFIXES = (
    ".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".alpha", ".dora_scale",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_w1", ".lokr_w2", ".lokr_t2",
    ".diff_b", ".diff", ".on_input", ".weight", ".bias",
)
DIFFUSERS_PARTS = tuple(p + "." for p in PARTS)
_DIFF_SUFFIX = re.compile(
    r"^(?P<mod>.+?)\.(?:(?P<ab>lora_[AB])(?:\.[^.]+)?\.weight|lora_[AB]\.weight|lora\.(?P<ud>up|down)\.weight"
    r"|lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?|alpha)$")
_PROC_SUFFIX = re.compile(r"^(?P<mod>.+)\.(?P<proj>to_q|to_k|to_v|to_out(?:\.0)?|add_k_proj|add_v_proj)_lora\."
                          r"(?P<ud>up|down)\.weight$")
_CLONE = re.compile(r"^(?P<model>[A-Za-z0-9_]+):(?P<i>\d+):(?P<ud>up|down)$")
# Flux.1 LoRAs keyed by BFL module paths: XLabs (attention-processor LoRAs), and ComfyUI / ai-toolkit
# (``diffusion_model.`` prefix) or PEFT (``base_model.model.`` or no prefix) files with kohya or PEFT factors
_XLABS = re.compile(r"^(?:diffusion_model\.)?(?P<mod>(?:double|single)_blocks\.\d+\.processor\.(?:qkv|proj)_lora\d?)"
                    r"\.(?P<ud>down|up)\.weight$")
_BFL = re.compile(r"^(?P<prefix>diffusion_model\.|base_model\.model\.|transformer\.|model\.)?"
                  r"(?P<mod>(?:double_blocks|single_blocks)\.\d+\.[a-z_0-9]+(?:\.(?:qkv|proj|lin|\d))?"
                  r"|final_layer\.(?:linear|adaLN_modulation\.1)|img_in|txt_in"
                  r"|(?:time_in|vector_in|guidance_in)\.(?:in_layer|out_layer))"
                  r"\.(?P<fac>lora_[AB]\.weight|lora_down\.weight|lora_up\.weight|alpha)$")
# LyCORIS factors on module paths under a ``diffusion_model.`` prefix (ai-toolkit LoKr of newer DiTs)
_PREFIXED_LYCORIS = re.compile(r"^diffusion_model\.(?P<mod>.+)\.(?P<fac>lokr_w1|lokr_w1_a|lokr_w1_b|lokr_w2|lokr_w2_a"
                               r"|lokr_w2_b|lokr_t2|alpha)$")
_BFL_FACTOR = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up", "lora_up.weight": "up",
               "alpha": "alpha"}
CHECKPOINT_MARKERS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")


@dataclass
class Detection:
    format: str
    kind: str
    base: str = "unknown"
    parts: list[str] = field(default_factory=list)
    rank: int | None = None
    rank_min: int | None = None
    rank_max: int | None = None
    alpha: float | None = None
    tokens: list[str] = field(default_factory=list)
    n_layers: int = 0
    notes: list[str] = field(default_factory=list)
    dtype: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    base_model: str | None = None  # the named model inside the family (pony, flux-1-dev, sd3.5-large, …)
    # what said which family: the shape reading first, then metadata (lorahub.formats.families)
    evidence: list[families.Evidence] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("format", "kind", "base", "parts", "rank", "rank_min", "rank_max",
                                            "alpha", "tokens", "n_layers", "notes", "dtype", "base_model")}
        d["base_evidence"] = [e.text() for e in self.evidence]
        return d

    def settle(self, extra: list[families.Evidence] = ()) -> families.Settled:
        """The family from this file's evidence plus ``extra`` (sidecars), as the catalogue records it."""
        return families.settle(list(self.evidence) + list(extra))


# ----------------------------------------------------------------------------------------------
# base family: shapes first, then metadata (lorahub.formats.families)

def base_from_metadata(meta: dict[str, str]) -> tuple[str | None, str | None]:
    """(base, which field said so) from kohya / modelspec / webui metadata."""
    evs = families.from_metadata(meta)
    return (evs[0].base, evs[0].source) if evs else (None, None)


def _width_base(width: int) -> str | None:
    return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(int(width))


def _settle(d: "Detection", shapes: families.Evidence | None, meta: dict[str, str], notes: list[str]) -> None:
    """Set ``d.base``, ``d.base_model`` and ``d.evidence``; disagreements go to ``notes``."""
    d.evidence = ([shapes] if shapes is not None else []) + families.from_metadata(meta)
    st = families.settle(d.evidence)
    notes.extend(st.notes)
    if shapes is None and st.base != "unknown":
        notes.append(f"base from {d.evidence[0].source} only (shapes match no full-size model)")
    d.base, d.base_model = st.base, st.base_model


def _shape_evidence(base: str | None, detail: str) -> families.Evidence | None:
    return families.Evidence("shapes", base, detail=detail) if base else None


# ----------------------------------------------------------------------------------------------
# classification

@dataclass
class _Layer:
    part: str
    name: str
    factors: dict[str, TensorInfo] = field(default_factory=dict)


def _group_kohya(tensors: dict[str, TensorInfo]) -> tuple[dict[str, _Layer], list[str], list[str]]:
    layers: dict[str, _Layer] = {}
    tokens: list[str] = []
    other: list[str] = []
    for key, info in tensors.items():
        if key.startswith("bundle_emb."):
            tok = key.split(".")[1]
            if tok not in tokens:
                tokens.append(tok)
            continue
        prefix = next((p for p in KOHYA_PREFIXES if key.startswith(p)), None)
        suffix = next((s for s in KOHYA_SUFFIXES if key.endswith(s)), None)
        if prefix is None or suffix is None:
            other.append(key)
            continue
        mod = key[: -len(suffix)]
        layer = layers.setdefault(mod, _Layer(KOHYA_PREFIXES[prefix], mod))
        layer.factors[suffix.lstrip(".").replace(".weight", "") if suffix != ".weight" else "weight"] = info
    return layers, tokens, other


def _group_diffusers(tensors: dict[str, TensorInfo]) -> tuple[dict[str, _Layer], list[str]]:
    layers: dict[str, _Layer] = {}
    other: list[str] = []
    for key, info in tensors.items():
        m = _PROC_SUFFIX.match(key)
        if m:
            mod = f"{m['mod']}.{m['proj']}"
            fac = m["ud"]
        else:
            m = _DIFF_SUFFIX.match(key)
            if not m:
                other.append(key)
                continue
            mod = m["mod"]
            tail = key[len(mod) + 1:]
            if tail.startswith("lora_A"):
                fac = "down"
            elif tail.startswith("lora_B"):
                fac = "up"
            elif tail.startswith("lora.down"):
                fac = "down"
            elif tail.startswith("lora.up"):
                fac = "up"
            elif tail.startswith("lora_magnitude_vector"):
                fac = "dora_scale"
            else:
                fac = "alpha"
        part = next((p[:-1] for p in DIFFUSERS_PARTS if mod.startswith(p)), "")
        layers.setdefault(mod, _Layer(part, mod)).factors[fac] = info
    return layers, other


def _clone_layers(tensors: dict[str, TensorInfo]) -> dict[str, _Layer]:
    layers: dict[str, _Layer] = {}
    for key, info in tensors.items():
        m = _CLONE.match(key)
        if m:
            mod = f"{m['model']}:{m['i']}"
            layers.setdefault(mod, _Layer(m["model"], mod)).factors[m["ud"]] = info
    return layers


def _prefixed_lycoris(tensors: dict[str, TensorInfo]) -> tuple[str, dict[str, _Layer]] | None:
    """(lycoris, layers) when every key is a LoKr factor (or alpha) on a ``diffusion_model.`` module path."""
    layers: dict[str, _Layer] = {}
    for k, info in tensors.items():
        m = _PREFIXED_LYCORIS.match(k)
        if m is None:
            return None
        layers.setdefault(m["mod"], _Layer("transformer", m["mod"])).factors[m["fac"]] = info
    if not any(any(f.startswith("lokr_") for f in layer.factors) for layer in layers.values()):
        return None
    return "lycoris", layers


def _bfl_layers(tensors: dict[str, TensorInfo]) -> tuple[str, dict[str, _Layer]] | None:
    """(xlabs | comfyui | bfl, layers) when every key is a LoRA factor on a Flux.1 BFL module path."""
    layers: dict[str, _Layer] = {}
    keys = list(tensors)
    if all(_XLABS.match(k) for k in keys):
        for k in keys:
            m = _XLABS.match(k)
            layers.setdefault(m["mod"], _Layer("transformer", m["mod"])).factors[m["ud"]] = tensors[k]
        return "xlabs", layers
    prefixes = set()
    for k in keys:
        m = _BFL.match(k)
        if m is None:
            return None
        prefixes.add(m["prefix"] or "")
        layers.setdefault(m["mod"], _Layer("transformer", m["mod"])).factors[_BFL_FACTOR[m["fac"]]] = tensors[k]
    if len(prefixes) != 1 or not any("_blocks." in n for n in layers):
        return None
    return ("comfyui" if prefixes == {"diffusion_model."} else "bfl"), layers


_STRUCT = {"F16": "<e", "F32": "<f", "F64": "<d", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B"}
_STRUCTS = {k: struct.Struct(v) for k, v in _STRUCT.items()}
_BF16 = struct.Struct("<f")


def _readable_scalar(info: TensorInfo) -> bool:
    """Whether ``info`` is a scalar tensor whose value :func:`_scalar` reads (1 to 8 bytes, a known type)."""
    if info.nbytes == 0 or info.nbytes > 8:
        return False
    return info.dtype == "BF16" or (info.dtype in _STRUCTS and _STRUCTS[info.dtype].size == info.nbytes)


def _scalar(raw: bytes | memoryview, dtype: str) -> float:
    if dtype == "BF16":
        return _BF16.unpack(b"\x00\x00" + bytes(raw[:2]))[0]
    return float(_STRUCTS[dtype].unpack(raw)[0])


def _scalars(path: Path | None, header: Header | None, infos: tuple[TensorInfo, ...]) -> list[float]:
    """Values of scalar tensors (alphas), read with ``struct`` through one open file (no numpy, no torch);
    ``infos`` are readable (:func:`_readable_scalar`), in data order."""
    if path is None or header is None or not infos:
        return []
    out: list[float] = []
    with open(path, "rb") as f:
        for info in infos:
            f.seek(header.data_start + info.start)
            raw = f.read(info.nbytes)
            if len(raw) == info.nbytes:
                out.append(_scalar(raw, info.dtype))
    return out


def _scalars_in(data: bytes | memoryview, header: Header, infos: tuple[TensorInfo, ...]) -> list[float]:
    """The same values from the file's whole content ``data``."""
    at = header.data_start
    return [_scalar(data[at + i.start: at + i.end], i.dtype) for i in infos]


def _layer_rank(f: dict[str, TensorInfo]) -> int | None:
    for k in ("lora_down", "down"):
        if k in f and f[k].shape:
            return int(f[k].shape[0])
    if "hada_w1_b" in f and f["hada_w1_b"].shape:
        return int(f["hada_w1_b"].shape[0])
    if "lokr_t2" in f and f["lokr_t2"].shape:
        return int(f["lokr_t2"].shape[0])
    for k in ("lokr_w2_a", "lokr_w1_a"):
        if k in f and len(f[k].shape) >= 2:
            return int(f[k].shape[1])
    return None


def _layer_kind(f: dict[str, TensorInfo]) -> str:
    if any(k.startswith("hada_") for k in f):
        return "loha"
    if any(k.startswith("lokr_") for k in f):
        return "lokr"
    if "diff" in f:
        return "full"
    if "on_input" in f or ("weight" in f and "lora_down" not in f):
        return "ia3"
    d = f.get("lora_down") or f.get("down")
    if "lora_mid" in f or (d is not None and len(d.shape) == 4 and d.shape[2] * d.shape[3] > 1):
        return "locon"
    return "lora"


def _io(f: dict[str, TensorInfo]) -> tuple[int | None, int | None]:
    """(out, in) features of the weight a layer's factors adapt (None where they do not say)."""
    d = f.get("lora_down") or f.get("down") or f.get("hada_w1_b") or f.get("diff")
    u = f.get("lora_up") or f.get("up") or f.get("hada_w1_a")
    inp = int(d.shape[1]) if d is not None and len(d.shape) >= 2 else None
    out = int(u.shape[0]) if u is not None and len(u.shape) >= 1 else None
    if "diff" in f and len(f["diff"].shape) >= 2:
        out = int(f["diff"].shape[0])
    if inp is None and "lokr_w1" in f and ("lokr_w2" in f or "lokr_w2_b" in f):
        w2 = f.get("lokr_w2") or f.get("lokr_w2_b")
        if f["lokr_w1"].shape and w2.shape:
            inp = int(f["lokr_w1"].shape[-1]) * int(w2.shape[-1])
    return out, inp


def _layer_shapes(layers: dict[str, _Layer]) -> list[families.LayerShape]:
    return [families.LayerShape(layer.part, layer.name, *_io(layer.factors)) for layer in layers.values()]


def _embedding_detection(tensors: dict[str, TensorInfo], meta: dict[str, str], notes: list[str],
                         strings: dict[str, str] | None = None) -> Detection | None:
    keys = list(tensors)
    if not keys:
        return None
    dims: list[int] = []
    tokens: list[str] = []
    base = None
    if set(keys) == {"emb_params"} and tensors["emb_params"].shape:  # (a 0-d tensor is no embedding)
        dims = [tensors["emb_params"].shape[-1]]
        name = meta.get("name") or (strings or {}).get("name")
        tokens = [name] if name else []
        if not tokens:
            notes.append("webui embedding without a stored name: the file name is the token")
    elif {"clip_l", "clip_g"} == set(keys) and tensors["clip_l"].shape and tensors["clip_g"].shape:
        base = "sdxl"
        dims = [tensors["clip_l"].shape[-1], tensors["clip_g"].shape[-1]]
        notes.append("SDXL embedding (clip_l + clip_g): load each tensor into its own text encoder")
    elif any(k.startswith("string_to_param.") for k in keys) and all(
            tensors[k].shape for k in keys if k.startswith("string_to_param.")):
        keys = [k for k in keys if k.startswith("string_to_param.")]
        dims = [tensors[k].shape[-1] for k in keys]
        name = (strings or {}).get("name")
        tokens = [name] if name else []
    elif (len(keys) <= 64 and all(1 <= len(tensors[k].shape) <= 2 for k in keys)
          and all(tensors[k].dtype in FLOAT_DTYPES for k in keys)
          and not any(k.endswith((".weight", ".bias", ".alpha")) or ":" in k for k in keys)):
        dims = [tensors[k].shape[-1] for k in keys]
        tokens = keys
    else:
        return None
    if base is None:
        bases = {_width_base(d) if d != 2048 else None for d in dims}
        bases.discard(None)
        base = bases.pop() if len(bases) == 1 else None
    d = Detection(format="embedding", kind="textual-inversion", tokens=tokens, notes=notes, metadata=meta)
    _settle(d, _shape_evidence(base, f"token embedding width {'+'.join(str(x) for x in dims)}"), meta, notes)
    vectors = [tensors[k].shape[0] if len(tensors[k].shape) == 2 else 1 for k in keys]
    d.n_layers = 0
    d.dtype = Counter(tensors[k].dtype for k in keys).most_common(1)[0][0]
    d.parts = ["text_encoder", "text_encoder_2"] if base == "sdxl" and "clip_g" in keys else ["text_encoder"]
    notes.append(f"{max(vectors)} vector(s) per token")
    return d


_DENOISER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")


def _weight_shapes(tensors: dict[str, TensorInfo]) -> list[families.LayerShape]:
    """The 2-D weights of a full model as layers (name without ``.weight`` and the denoiser prefix)."""
    out = []
    for k, info in tensors.items():
        if k.endswith(".weight") and len(info.shape) == 2:
            name = k[: -len(".weight")]
            prefix = next((p for p in _DENOISER_PREFIXES if name.startswith(p)), "")
            if prefix or not name.startswith(("cond_stage_model.", "conditioner.", "first_stage_model.",
                                              "text_encoder", "vae.")):
                out.append(families.LayerShape("", name[len(prefix):], int(info.shape[0]), int(info.shape[1])))
    return out


def _checkpoint_detection(tensors: dict[str, TensorInfo], meta: dict[str, str], notes: list[str],
                          shapes: families.Evidence | None = None) -> Detection:
    if shapes is None:
        if any(k.startswith("conditioner.embedders.1.") for k in tensors):
            shapes = _shape_evidence("sdxl", "SGM checkpoint with two text encoders (conditioner.embedders.1)")
        else:
            for k, info in tensors.items():
                if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight") and len(info.shape) == 2:
                    shapes = _shape_evidence(_width_base(info.shape[1]), f"cross-attention width {info.shape[1]}")
                    break
            else:
                shapes = families.from_layers(_weight_shapes(tensors))
    parts = []
    if any(k.startswith("model.diffusion_model.") for k in tensors):
        parts.append("unet" if shapes is None or shapes.base in ("sd1", "sd2", "sdxl") else "transformer")
    if any(k.startswith(("cond_stage_model.", "conditioner.embedders.0.")) for k in tensors):
        parts.append("text_encoder")
    if any(k.startswith("conditioner.embedders.1.") for k in tensors):
        parts.append("text_encoder_2")
    if not parts and shapes is not None:  # a bare denoiser state dict (a DiT in its original layout, …)
        parts.append("unet" if shapes.base in ("sd1", "sd2", "sdxl") else "transformer")
    d = Detection(format="checkpoint", kind="checkpoint", parts=parts, notes=notes, metadata=meta)
    _settle(d, shapes, meta, notes)
    d.n_layers = len(tensors)
    d.dtype = Counter(i.dtype for i in tensors.values()).most_common(1)[0][0] if tensors else None
    return d


@dataclass(frozen=True)
class _Plan:
    """What a LoRA file's tensor names, dtypes and shapes say (everything of a :class:`Detection` that does
    not depend on the alpha values or the metadata). Immutable: one plan serves many files."""

    fmt: str
    kind: str
    parts: tuple[str, ...]
    rank: int | None
    rank_min: int | None
    rank_max: int | None
    tokens: tuple[str, ...]
    n_layers: int
    dtype: str | None
    notes: tuple[str, ...]
    alphas: tuple[TensorInfo, ...]  # the layers' scalar alphas that can be read, in data order
    shapes: families.Evidence | None
    uses_metadata: bool  # the plan read the metadata (cloneofsimo's token list): it serves only its file


def classify(tensors: dict[str, TensorInfo], meta: dict[str, str], *, path: Path | None = None,
             header: Header | None = None, strings: dict[str, str] | None = None,
             name: str = "file") -> Detection:
    """Classify from names/shapes/metadata (the core of :func:`detect`); the alpha values are read from
    ``path`` when it is given with its ``header``."""
    plan = _analyse(tensors, meta, strings, name)
    if isinstance(plan, Detection):
        return plan
    return _finish(plan, meta, _scalars(path, header, plan.alphas))


def _analyse(tensors: dict[str, TensorInfo], meta: dict[str, str], strings: dict[str, str] | None,
             name: str) -> _Plan | Detection:
    """The plan of a LoRA / LyCORIS file, or the whole Detection of an embedding or a checkpoint."""
    notes: list[str] = []
    keys = list(tensors)
    if not keys:
        raise FormatError(f"{name}: holds no tensors: not a LoRA, embedding or checkpoint")

    if any(k.startswith(CHECKPOINT_MARKERS) for k in keys):
        return _checkpoint_detection(tensors, meta, notes)

    clone = _clone_layers(tensors)
    dit = _bfl_layers(tensors) or _prefixed_lycoris(tensors)
    if dit is not None:
        fmt, layers = dit
        other, tokens, parts = [], [], ["transformer"]
        if fmt == "lycoris":
            notes.append("LyCORIS factors on diffusion_model. module paths (ai-toolkit)")
        elif fmt == "xlabs":
            notes.append("XLabs Flux LoRA (attention-processor keys, no alpha: scale 1)")
        elif fmt == "comfyui":
            notes.append("ComfyUI / ai-toolkit keys (diffusion_model. prefix, BFL module paths)")
        else:
            notes.append("PEFT factors on BFL module paths (the original Flux.1 layout)")
    elif clone:
        layers = clone
        fmt = "cloneofsimo"
        tokens = [k for k, v in meta.items() if v == "<embed>" and k in tensors]
        other = [k for k in keys if not _CLONE.match(k) and k not in tokens]
        parts = sorted({layer.part for layer in layers.values()}, key=_part_order)
        if tokens:
            notes.append(f"bundles {len(tokens)} token embedding(s): {', '.join(tokens)}")
    else:
        klayers, ktokens, kother = _group_kohya(tensors)
        dlayers, dother = _group_diffusers(tensors) if len(kother) + len(ktokens) > 0 or not klayers else ({}, [])
        if klayers and len(klayers) >= len(dlayers):
            layers, other, tokens = klayers, kother, ktokens
            kinds = {_layer_kind(layer.factors) for layer in layers.values()}
            fmt = "lycoris" if kinds & {"loha", "lokr", "full", "ia3"} else "kohya"
            if tokens:
                notes.append(f"bundles {len(tokens)} token embedding(s): diffusers' load_lora_weights "
                             "rejects such files")
        elif dlayers:
            layers, other, tokens = dlayers, dother, []
            prefixed = [layer for layer in layers.values() if layer.part]
            if len(prefixed) == len(layers):
                fmt = "diffusers"
            else:
                fmt = "peft"
                notes.append("keys lack the unet./text_encoder. prefix: diffusers >= 0.33 loads this as a silent "
                             "no-op; converting it to the diffusers dialect fixes it")
                for layer in layers.values():
                    if not layer.part:
                        n = layer.name
                        layer.part = ("text_encoder" if ("text_model" in n or "self_attn" in n or "mlp.fc" in n)
                                      else "unet" if n.startswith(("down_blocks.", "up_blocks.", "mid_block."))
                                      else "transformer")
            if any(".lora.down" in k or "_lora.down" in k for k in keys):
                notes.append("older diffusers naming (lora.down/lora.up or attn-processor keys)")
        else:
            emb = _embedding_detection(tensors, meta, notes, strings)
            if emb is not None:
                return emb
            # a full diffusers UNet / text encoder state dict?
            if any(k.endswith("attn2.to_k.weight") for k in keys) or any(k.endswith("self_attn.q_proj.weight")
                                                                          for k in keys):
                return _checkpoint_detection(tensors, meta, notes)
            # a full DiT (Flux.1 in the BFL layout, a diffusers transformer, …)?
            if sum(k.endswith(".weight") for k in keys) >= len(keys) // 2:
                shapes = families.from_layers(_weight_shapes(tensors))
                if shapes is not None:
                    return _checkpoint_detection(tensors, meta, notes, shapes)
            raise FormatError(f"{name}: unknown format (no LoRA, LyCORIS, embedding or checkpoint keys found; "
                              f"first key {keys[0]!r})")
        parts = sorted({layer.part for layer in layers.values() if layer.part}, key=_part_order)
    if other:
        notes.append(f"{len(other)} key(s) not understood, e.g. {other[0]!r}")

    # incomplete layers
    for layer in layers.values():
        f = layer.factors
        if ("lora_down" in f) != ("lora_up" in f) or ("down" in f) != ("up" in f):
            notes.append(f"layer {layer.name} lacks its up or down factor")
            break

    # kind
    kinds = Counter(_layer_kind(layer.factors) for layer in layers.values())
    has_dora = any("dora_scale" in layer.factors for layer in layers.values())
    if has_dora:
        kind = "dora"
    elif kinds.get("loha"):
        kind = "loha"
    elif kinds.get("lokr"):
        kind = "lokr"
    elif kinds.get("locon"):
        kind = "locon"
    elif kinds.get("ia3"):
        kind = "lora"
        notes.append("(IA)3 layers present")
    else:
        kind = "lora"

    # ranks
    ranks = [r for r in (_layer_rank(layer.factors) for layer in layers.values()) if r is not None]
    rank = rank_min = rank_max = None
    if ranks:
        c = Counter(ranks)
        top = max(c.values())
        rank = max(r for r, n in c.items() if n == top)
        rank_min, rank_max = min(ranks), max(ranks)
    if any(r == 0 for r in ranks):
        notes.append("a layer has rank 0")

    # the alpha tensors whose values each file gives
    alphas = tuple(i for i in sorted((layer.factors["alpha"] for layer in layers.values() if "alpha" in layer.factors),
                                     key=lambda i: i.start) if _readable_scalar(i))

    # base: module names and shapes first, then metadata (per file: _finish)
    shapes = families.from_layers(_layer_shapes(layers))
    if fmt == "cloneofsimo" and shapes is None:
        tw = Counter(int(tensors[t].shape[-1]) for t in tokens if tensors[t].shape)
        if tw and tw.most_common(1)[0][0] in (768, 1024):
            w = tw.most_common(1)[0][0]
            shapes = _shape_evidence(_width_base(w), f"token embedding width {w}")

    dtypes = Counter(i.dtype for k, i in tensors.items() if not k.endswith(".alpha"))
    return _Plan(fmt=fmt, kind=kind, parts=tuple(parts), rank=rank, rank_min=rank_min, rank_max=rank_max,
                 tokens=tuple(tokens), n_layers=len(layers), dtype=dtypes.most_common(1)[0][0] if dtypes else None,
                 notes=tuple(notes), alphas=alphas, shapes=shapes, uses_metadata=fmt == "cloneofsimo")


def _finish(plan: _Plan, meta: dict[str, str], alphas: list[float]) -> Detection:
    """The Detection of one file: its ``plan``, its alpha ``values`` and its metadata."""
    notes = list(plan.notes)
    if alphas:
        first = alphas[0]
        if alphas.count(first) == len(alphas):  # one alpha for every layer (the common case)
            alpha = first
        else:
            c = Counter(alphas)
            alpha = c.most_common(1)[0][0]
            if len(c) > 1:
                notes.append(f"alpha varies by layer ({min(alphas):g}..{max(alphas):g})")
    else:
        alpha = _alpha_from_meta(meta, plan.fmt)
    if plan.fmt == "cloneofsimo":
        alpha = None  # scale folded into `up`: alpha = rank
    d = Detection(format=plan.fmt, kind=plan.kind, parts=list(plan.parts), rank=plan.rank, rank_min=plan.rank_min,
                  rank_max=plan.rank_max, alpha=alpha, tokens=list(plan.tokens), n_layers=plan.n_layers,
                  notes=notes, dtype=plan.dtype, metadata=meta)
    _settle(d, plan.shapes, meta, notes)
    return d


_PLANS = SectionCache()


def _plan_of(header: Header, name: str) -> _Plan | Detection:
    """The plan of a safetensors file (or the whole Detection of an embedding / a checkpoint), made once
    for every header with the same tensor section (LoRAs only: other files are analysed each time, as
    their Detection depends on the metadata)."""
    plan = _PLANS.get(header.section) if header.section is not None else None
    if isinstance(plan, _Plan):
        return plan
    plan = _analyse(header.tensors, header.metadata, None, name)
    if header.section is not None and isinstance(plan, _Plan) and not plan.uses_metadata:
        _PLANS.put(header.section, plan)
    return plan


def clear_cache() -> None:
    """Forget the headers and plans seen so far (benchmarks measure cold detection with it)."""
    _PLANS.clear()
    clear_header_cache()


def _alpha_from_meta(meta: dict[str, str], fmt: str) -> float | None:
    v = meta.get("ss_network_alpha")
    if v:
        try:
            return float(v)
        except ValueError:
            pass
    raw = meta.get("lora_adapter_metadata")
    if raw:
        try:
            obj = json.loads(raw)
        except ValueError:
            return None
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k.endswith("lora_alpha") and isinstance(v, (int, float)):
                    return float(v)
    return None


def _part_order(p: str) -> int:
    return PARTS.index(p) if p in PARTS else len(PARTS)


def detect(path: str | Path) -> Detection:
    """Detect the format of ``path`` from its header (safetensors) or its pickle index (.pt/.ckpt/.bin)."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{path}: no such file")
    if p.is_dir():
        raise FormatError(f"{path}: is a directory, not a file")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        with open(p, "rb") as f:
            magic = f.read(len(ZIP_MAGIC))
        if magic != ZIP_MAGIC:
            # maybe a safetensors file with a pickle suffix
            try:
                header = read_header(p)
            except FormatError:
                raise _legacy_pickle(p) from None
            return _detect_header(header, p.name, lambda infos: _scalars(p, header, infos))
        from lorahub.formats.pickle_safe import read_pickle_shapes

        stubs, strings = read_pickle_shapes(p)
        if not stubs:
            raise FormatError(f"{p.name}: pickle holds no tensors")
        # webui embedding .pt: {"string_to_param": {"*": tensor}, "name": ...}
        tensors = {k: TensorInfo(s.dtype, s.shape, 0, 0) for k, s in stubs.items()}
        # pickled cloneofsimo .pt: a flat list [up0, down0, up1, down1, ...]
        if all(k.isdigit() for k in tensors):
            d = Detection(format="cloneofsimo", kind="lora", parts=[], n_layers=len(tensors) // 2,
                          notes=["pickled cloneofsimo list (up, down pairs); no module names stored"])
            ranks = [int(tensors[str(i)].shape[0]) for i in range(1, len(tensors), 2)
                     if len(tensors[str(i)].shape) >= 1]
            if ranks:
                d.rank, d.rank_min, d.rank_max = Counter(ranks).most_common(1)[0][0], min(ranks), max(ranks)
            d.dtype = Counter(i.dtype for i in tensors.values()).most_common(1)[0][0]
            return d
        return classify(tensors, {}, strings=strings, name=p.name)
    header = read_header(p)
    return _detect_header(header, p.name, lambda infos: _scalars(p, header, infos))


def detect_bytes(data: bytes | memoryview, path: str | Path) -> Detection:
    """:func:`detect` of the file at ``path`` whose whole content is ``data``, read from ``data`` alone (the
    header and the alpha values; ``path`` names the file in messages and gives its suffix): equal to
    ``detect(path)``, the same errors included. Torch zip archives (.pt/.ckpt/.bin starting with a zip
    header) are the exception: their pickle index is read from ``path``.

    Files of one training run (or one tool) share their tensor names, dtypes and shapes: the analysis of
    those is done once and kept for the next such file (the last 256 kinds are kept)."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        if bytes(data[:len(ZIP_MAGIC)]) == ZIP_MAGIC:
            return detect(p)
        try:
            header = header_from_bytes(data, p.name)
        except FormatError:
            raise _legacy_pickle(p) from None
    else:
        header = header_from_bytes(data, p.name)
    return _detect_header(header, p.name, lambda infos: _scalars_in(data, header, infos))


def _legacy_pickle(p: Path) -> Exception:
    from lorahub.errors import UnsafeFile

    return UnsafeFile(f"{p.name}: legacy pickle file: refusing to unpickle it "
                      "(re-save it as safetensors with a tool you trust)")


def _detect_header(header: Header, name: str, read_alphas) -> Detection:
    """The Detection of a safetensors file from its ``header``; ``read_alphas(infos)`` gives the values."""
    plan = _plan_of(header, name)
    if isinstance(plan, Detection):
        return plan
    return _finish(plan, header.metadata, read_alphas(plan.alphas))
