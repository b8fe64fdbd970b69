"""Base-model families: which family a LoRA or model belongs to, and why (standard library only).

The catalogue, ``lorahub inspect`` and the architecture layer all name families the same way:
``sd1``, ``sd2``, ``sdxl``, ``sd3``, ``flux`` (:data:`lorahub.vocab.FAMILIES`), ``other:<name>`` for every
other family (``other:qwen-image``, ``other:wan``, …) and ``unknown`` only when nothing says anything.
A *base model* is the named model inside a family a file was made for (``pony``, ``illustrious``,
``noobai``, ``playground`` for SDXL derivatives; ``flux-1-dev``, ``sd3.5-large`` for variants), kept
apart from the family so a catalogue can filter on either.

Evidence, strongest first:

1. **Shapes and module names** (:func:`from_layers`): the blocks a LoRA adapts and their widths — Flux.1:
   ``double_blocks``/``transformer_blocks`` (19) + ``single_blocks``/``single_transformer_blocks`` (38) at
   width 3072; SD3-medium: 24 joint blocks at 1536; SD3.5-large: 38 at 2432; SD1/SD2/SDXL UNets by their
   cross-attention width (768 / 1024 / 2048) or the SGM layout; and the module names of other families.
2. **Metadata** (:func:`from_metadata`, :func:`from_text`): ``modelspec.architecture``,
   ``ss_base_model_version``, ``ss_sd_model_name``, a Civitai ``baseModel``, a webui ``sd version``.

:func:`settle` combines them: shapes win over metadata (a disagreement becomes a note), metadata decides
among families the shapes fit equally well (Flux.1 and Chroma share their attention layers), and the
base model comes from whichever source names one. Nothing here imports torch: the catalogue commands
use it and must start fast.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from lorahub.errors import LorahubError
from lorahub.vocab import BASES, OTHER_BASE

_SLUG = re.compile(r"^[a-z0-9][a-z0-9.+\-]{0,62}$")


def other(name: str) -> str:
    """``other:<name>``: a family lorahub has no table for."""
    return OTHER_BASE + name


def is_base(value: str) -> bool:
    """True for a base family lorahub accepts: sd1 | sd2 | sdxl | sd3 | flux | unknown | other:<name>."""
    if value in BASES:
        return True
    return value.startswith(OTHER_BASE) and bool(_SLUG.match(value[len(OTHER_BASE):]))


def is_family(value: str | None) -> bool:
    """True for a base family that says something (any base but ``unknown``)."""
    return bool(value) and value != "unknown" and is_base(value)


def check_base(value: str | None) -> str | None:
    """``value`` when it is a base family (None passes), else a LorahubError saying what is accepted."""
    if value is None or is_base(value):
        return value
    raise LorahubError(f"unknown base {value!r}: one of {', '.join(BASES)}, or other:<name> "
                       "(lower-case letters, digits, '.', '-', e.g. other:qwen-image)")


def check_base_model(value: str | None) -> str | None:
    """A base-model name as stored (lower case, e.g. ``pony``), or a LorahubError."""
    if value is None:
        return None
    v = str(value).strip().lower()
    if not _SLUG.match(v):
        raise LorahubError(f"base model {value!r}: use lower-case letters, digits, '.', '-' (e.g. pony)")
    return v


# --------------------------------------------------------------------------------------------------
# Evidence

@dataclass(frozen=True)
class Evidence:
    """One source's reading: the family (and base model) it points at, and what it saw."""

    source: str                      # "shapes" | a metadata key | "civitai baseModel" | "sidecar"
    base: str                        # a family (never "unknown")
    base_model: str | None = None
    detail: str = ""                 # what was seen, e.g. "19 double + 38 single blocks at width 3072"
    also: tuple[str, ...] = ()       # shapes only: other families these shapes fit equally well

    def text(self) -> str:
        said = self.base + (f" ({self.base_model})" if self.base_model else "")
        return f"{self.source}: {self.detail} -> {said}" if self.detail else f"{self.source} -> {said}"


@dataclass
class Settled:
    """The family a file is catalogued under, its base model, and why."""

    base: str = "unknown"
    base_model: str | None = None
    evidence: list[str] = field(default_factory=list)   # one line per source that said something
    notes: list[str] = field(default_factory=list)      # disagreements (shapes win)


def settle(evidence: Iterable[Evidence]) -> Settled:
    """Combine readings: the first shape reading wins over every metadata reading; among metadata, the
    first (strongest) one wins. A metadata family the shapes also fit (``also``) is taken without a
    note; one they do not fit is noted as a disagreement. The base model comes from the first reading
    of the chosen family that names one."""
    evs = [e for e in evidence if e is not None and is_family(e.base)]
    out = Settled(evidence=[e.text() for e in evs])
    if not evs:
        return out
    shapes = next((e for e in evs if e.source == "shapes"), None)
    meta = [e for e in evs if e.source != "shapes"]
    if shapes is not None:
        base = shapes.base
        fits = {shapes.base, *shapes.also}
        for m in meta:
            if m.base in fits and m.base != shapes.base and base == shapes.base:
                base = m.base  # the shapes fit both; the metadata decides
            elif m.base not in fits:
                out.notes.append(f"shapes say {shapes.base} but {m.source} says {m.base}; using the shapes")
    else:
        base = meta[0].base
        for m in meta[1:]:
            if m.base != base:
                out.notes.append(f"{meta[0].source} says {base} but {m.source} says {m.base}; "
                                 f"using {meta[0].source}")
    out.base = base
    out.base_model = next((e.base_model for e in evs if e.base == base and e.base_model), None)
    return out


# --------------------------------------------------------------------------------------------------
# Free text (metadata values, Civitai base model names, checkpoint file names)

_DERIVATIVES = (  # SDXL derivatives: (pattern, base model)
    (r"pony", "pony"), (r"illustrious", "illustrious"), (r"noob", "noobai"), (r"playground", "playground"),
    (r"animagine", "animagine"),
)
_TEXT_RULES: tuple[tuple[str, str], ...] = (  # (pattern, family), first match wins; lower-case text
    (r"kolors", other("kolors")),
    (r"flux[ ._-]?2|flux\.2", other("flux2")),
    (r"chroma", other("chroma")),
    (r"flux", "flux"),
    (r"hunyuan[ ._-]?video", other("hunyuan-video")),
    (r"hunyuan", other("hunyuan-dit")),
    (r"pixart", other("pixart")),
    (r"(?<![a-z])sana(?![a-z])", other("sana")),
    (r"aura[ ._-]?flow", other("auraflow")),
    (r"lumina", other("lumina")),
    (r"z[ ._-]?image", other("z-image")),
    (r"hidream", other("hidream")),
    (r"qwen", other("qwen-image")),
    (r"(?<![a-z])wan(?![a-z])|wan[ ._-]?(?:video|2)", other("wan")),
    (r"cogvideo", other("cogvideox")),
    (r"cogview", other("cogview")),
    (r"(?<![a-z])ltx", other("ltx-video")),
    (r"mochi", other("mochi")),
    (r"cascade", other("stable-cascade")),
    (r"sd[ ._-]?3|stable[ ._-]?diffusion[ ._-]?v?3", "sd3"),
    (r"sdxl|sd[ ._-]?xl|stable[ ._-]?diffusion[ ._-]?xl|xl(?![a-z])", "sdxl"),
    (r"sd[ ._-]?v?2|stable[ ._-]?diffusion[ ._-]?v?2|(?<![a-z0-9])v2[-._]", "sd2"),
    (r"sd[ ._-]?v?1|stable[ ._-]?diffusion[ ._-]?v?1|(?<![a-z0-9])v1[-._]", "sd1"),
)


def _variant(family: str, t: str) -> str | None:
    """The base model a family's free text names (``flux-1-dev``, ``sd3.5-large``, ``pony``, …)."""
    if family == "sdxl":
        return next((bm for rx, bm in _DERIVATIVES if re.search(rx, t)), None)
    if family == "flux":
        for word, bm in (("kontext", "flux-1-kontext"), ("schnell", "flux-1-schnell"), ("krea", "flux-1-krea"),
                         ("fill", "flux-1-fill"), ("dev", "flux-1-dev"), (r"flux[ ._-]?1[ ._-]?d\b", "flux-1-dev"),
                         (r"flux[ ._-]?1[ ._-]?s\b", "flux-1-schnell")):
            if re.search(word, t):
                return bm
        return None
    if family == "sd3":
        v35 = re.search(r"3[._-]5", t)
        size = next((s for s in ("large-turbo", "large", "medium") if re.search(s.replace("-", r"[ ._-]?"), t)), None)
        if v35:
            return f"sd3.5-{size}" if size else "sd3.5"
        return f"sd3-{size}" if size else None
    return None


def from_text(text: str | None, source: str) -> Evidence | None:
    """The family (and base model) a free-text value names, e.g. ``flux-1-dev/lora``, ``sdxl_base_v1-0``,
    ``Pony``, ``ponyDiffusionV6XL.safetensors``, ``SD 3.5 Large``; None when it names none."""
    if not isinstance(text, str):
        return None
    t = text.strip().lower()
    if not t or t in ("none", "unknown", "other"):
        return None
    for rx, bm in _DERIVATIVES:
        if re.search(rx, t):
            return Evidence(source, "sdxl", bm, text.strip()[:80])
    for rx, fam in _TEXT_RULES:
        if re.search(rx, t):
            return Evidence(source, fam, _variant(fam, t), text.strip()[:80])
    return None


# metadata keys, strongest first
METADATA_KEYS = ("modelspec.architecture", "ss_base_model_version", "ss_sd_model_name")


def from_metadata(meta: dict[str, str]) -> list[Evidence]:
    """Readings of the header metadata fields that name a family, strongest first."""
    out = []
    for key in METADATA_KEYS:
        ev = from_text(meta.get(key), key)
        if ev is not None:
            out.append(ev)
    if not out and str(meta.get("ss_v2", "")).lower() in ("true", "false"):
        out.append(Evidence("ss_v2", "sd2" if str(meta["ss_v2"]).lower() == "true" else "sd1",
                            detail=f"ss_v2={meta['ss_v2']}"))
    return out


# --------------------------------------------------------------------------------------------------
# Shapes and module names

@dataclass(frozen=True)
class LayerShape:
    """One adapted module as a LoRA file names it: ``part`` (unet | transformer | text_encoder…, '' when
    the file does not say), its name as written (any dialect) and the adapted weight's (out, in)."""

    part: str
    name: str
    out: int | None
    inp: int | None
    flat: str = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "flat", _flat(self.name))


_SEPARATORS = str.maketrans({".": "_", ":": "_"})


def _flat(name: str) -> str:
    """Name with every separator as '_' (kohya's flattening), for patterns that fit every dialect."""
    return name.lower().translate(_SEPARATORS)


def _max_index(names: list[str], rx: str) -> int:
    pat = re.compile(rx)
    idx = [int(m[1]) for n in names for m in [pat.search(n)] if m]
    return max(idx) + 1 if idx else 0


def _width(layers: list[LayerShape], rx: str) -> int | None:
    """The most common in-features of the layers whose flattened name matches ``rx``."""
    pat = re.compile(rx)
    c = Counter(x.inp for x in layers if x.inp and pat.search(x.flat))
    return c.most_common(1)[0][0] if c else None


_UNET_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def _denoiser(x: LayerShape) -> bool:
    n = x.name.lower()
    if x.part.startswith("text_encoder") or n.startswith(("lora_te", "text_encoder", "te_", "te1_", "te2_")):
        return False
    return True


def from_layers(layers: Iterable[LayerShape]) -> Evidence | None:
    """The family the adapted modules and their shapes point at (None when they point nowhere)."""
    layers = list(layers)
    den = [x for x in layers if _denoiser(x)]
    names = [x.flat for x in den]
    joined = "\n".join(names)

    def ev(base, detail, bm=None, also=()):
        return Evidence("shapes", base, bm, detail, tuple(also))

    unet_like = re.search(r"(?:^|_)(?:down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)_",
                          joined)
    if not unet_like:
        dit = _dit(den, names, joined, ev)
        if dit is not None:
            return dit
    return _unet(layers, den, joined, ev)


def _dit(den: list[LayerShape], names: list[str], joined: str, ev) -> Evidence | None:
    """DiT families: module names first, widths and block counts second."""
    if re.search(r"(?:^|_)double_blocks_\d+_|(?:^|_)single_blocks_\d+_", joined):  # BFL layout
        nd = _max_index(names, r"(?:^|_)double_blocks_(\d+)_")
        ns = _max_index(names, r"(?:^|_)single_blocks_(\d+)_")
        w = _width(den, r"double_blocks_\d+_(?:img|txt)_attn_qkv|single_blocks_\d+_linear1|double_blocks_\d+_img")
        detail = f"BFL-layout {nd} double + {ns} single blocks at width {w}"
        if "distilled_guidance_layer" in joined:
            return ev(other("chroma"), detail + " with distilled_guidance_layer")
        if w == 6144:
            return ev(other("flux2"), detail)
        if w == 3072 and (nd > 19 or ns > 38):
            return ev(other("hunyuan-video"), detail)
        # FLUX.1's width 3072; any other width: a smaller model of the same layout (a test fixture)
        return ev("flux", detail, also=(other("chroma"), other("hunyuan-video")))
    if re.search(r"(?:^|_)joint_blocks_\d+_(?:x|context)_block", joined):  # SAI MMDiT layout
        n = _max_index(names, r"(?:^|_)joint_blocks_(\d+)_")
        w = _width(den, r"joint_blocks_\d+_x_block_attn_qkv")
        return ev("sd3", f"MMDiT joint_blocks: {n} blocks at width {w}", _sd3_variant(n, w, False))
    if "double_stream_blocks" in joined or "single_stream_blocks" in joined:
        return ev(other("hidream"), "double_stream_blocks / single_stream_blocks")
    if "joint_transformer_blocks" in joined:
        return ev(other("auraflow"), "joint_transformer_blocks + single_transformer_blocks")
    if "to_qkv_mlp_proj" in joined or "double_stream_modulation" in joined:
        return ev(other("flux2"), "single blocks with fused to_qkv_mlp_proj")
    single = _max_index(names, r"(?:^|_)single_transformer_blocks_(\d+)_")
    double = _max_index(names, r"(?:^|_)(?<!single_)(?<!joint_)transformer_blocks_(\d+)_")
    if single or double:
        w = _width(den, r"transformer_blocks_\d+_(?:attn1?_to_q|attn1?_to_k|attn_to_v)")
        if re.search(r"transformer_blocks_\d+_(?:img|txt)_(?:mlp|mod)", joined):
            return ev(other("qwen-image"), f"img_mlp/txt_mlp blocks ({double}) at width {w}")
        if "conv_inverted" in joined or "conv_point" in joined:
            return ev(other("sana"), f"linear-attention blocks with conv_inverted ({double}) at width {w}")
        if single:
            detail = f"{double} double + {single} single transformer blocks at width {w}"
            if "distilled_guidance_layer" in joined:
                return ev(other("chroma"), detail + " with distilled_guidance_layer")
            if w == 6144:
                return ev(other("flux2"), detail)
            return ev("flux", detail, also=(other("chroma"),))
        joint = re.search(r"transformer_blocks_\d+_(?:attn_add_[qkv]_proj|attn_to_add_out|ff_context|norm1_context)",
                          joined)
        if joint or re.search(r"transformer_blocks_\d+_attn_to_[qkv](?:_|$)", joined):
            detail = f"{double} joint transformer blocks at width {w}"
            if w == 3072:
                if double > 19 or "img_mod" in joined:
                    return ev(other("qwen-image"), detail)
                return ev("flux", detail + " (double-stream blocks only)", also=(other("qwen-image"), other("chroma")))
            if w in (1536, 2432) or w is None:
                attn2 = bool(re.search(r"transformer_blocks_\d+_attn2_", joined))
                return ev("sd3", detail, _sd3_variant(double, w, attn2))
            return ev(other("mmdit"), detail)
        if re.search(r"transformer_blocks_\d+_attn2_", joined):  # PixArt-style self + cross attention
            if w == 1152:
                return ev(other("pixart"), f"{double} self/cross-attention blocks at width {w}",
                          also=(other("sana"),))
            if w == 2240:
                return ev(other("sana"), f"{double} self/cross-attention blocks at width {w}")
    if re.search(r"(?:^|_)blocks_\d+_(?:self_attn|cross_attn|ffn)_", joined):
        n = _max_index(names, r"(?:^|_)blocks_(\d+)_")
        return ev(other("wan"), f"{n} blocks with self_attn/cross_attn/ffn")
    if re.search(r"(?:^|_)blocks_\d+_attn[12]_", joined) and not re.search(r"(?:^|_)(?:down|up)_blocks_", joined):
        n = _max_index(names, r"(?:^|_)blocks_(\d+)_")
        w = _width(den, r"blocks_\d+_attn1_to_q")
        if "ffn" in joined:
            return ev(other("wan"), f"{n} blocks with attn1/attn2/ffn at width {w}")
        if w == 1408 or n == 40:
            return ev(other("hunyuan-dit"), f"{n} blocks with attn1/attn2 at width {w}")
    if re.search(r"(?:^|_)(?:noise_refiner|context_refiner)_\d+_|(?:^|_)layers_\d+_(?:attn|attention)_", joined):
        w = _width(den, r"layers_\d+_(?:attn|attention)_(?:to_q|qkv)")
        n = _max_index(names, r"(?:^|_)layers_(\d+)_")
        if w == 3840 or "feed_forward_w1" in joined and w != 2304:
            return ev(other("z-image"), f"{n} layers at width {w}")
        return ev(other("lumina"), f"{n} layers at width {w}")
    return None


def _unet(layers: list[LayerShape], den: list[LayerShape], joined: str, ev) -> Evidence | None:
    """SD1 / SD2 / SDXL UNets: the SGM layout, the cross-attention width, the text encoders."""
    te2 = any(x.part == "text_encoder_2" or x.name.lower().startswith("lora_te2_") for x in layers)
    sgm = re.search(r"(?:^|_)(?:input_blocks|output_blocks|middle_block)_", joined)
    width = _cross_width(den)
    if sgm:
        if width in (None, 2048):
            return ev("sdxl", "SGM-layout UNet names" + (f", cross-attention width {width}" if width else ""))
        return None
    if width in _UNET_WIDTHS:
        return ev(_UNET_WIDTHS[width], f"cross-attention width {width}")
    if te2:
        return ev("sdxl", "two text encoders (text_encoder_2 layers)")
    tw = _te_width(layers)
    if tw in (768, 1024):
        return ev(_UNET_WIDTHS[tw], f"text-encoder width {tw}")
    return None


def _sd3_variant(n: int, w: int | None, attn2: bool) -> str | None:
    if w == 2432 or n > 24:
        return "sd3.5-large"
    if w == 1536:
        return "sd3.5-medium" if attn2 else "sd3-medium"
    return None


_CROSS = re.compile(r"attn2_(?:processor_)?to_[kv](?:_|$)")


def _cross_width(layers: list[LayerShape]) -> int | None:
    """In-features of the cross-attention to_k/to_v layers (768 sd1, 1024 sd2, 2048 sdxl)."""
    c = Counter(x.inp for x in layers if x.inp and _CROSS.search(x.flat))
    return c.most_common(1)[0][0] if c else None


def _te_width(layers: list[LayerShape]) -> int | None:
    """Hidden width of the first text encoder: the in/out feature count its projections share."""
    c = Counter()
    for x in layers:
        n = x.name.lower()
        if x.part == "text_encoder" or n.startswith(("lora_te_", "lora_te1_")):
            for v in (x.inp, x.out):
                if v:
                    c[v] += 1
    known = [(n, w) for w, n in c.items() if w in (768, 1024, 1280)]
    return max(known)[1] if known else None


# --------------------------------------------------------------------------------------------------
# Model configs (the architecture layer: a model's family from its own config)

_CLASS_FAMILIES = {
    "FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3",
    "Flux2Transformer2DModel": other("flux2"), "ChromaTransformer2DModel": other("chroma"),
    "QwenImageTransformer2DModel": other("qwen-image"), "WanTransformer3DModel": other("wan"),
    "HunyuanDiT2DModel": other("hunyuan-dit"), "HunyuanVideoTransformer3DModel": other("hunyuan-video"),
    "PixArtTransformer2DModel": other("pixart"), "SanaTransformer2DModel": other("sana"),
    "AuraFlowTransformer2DModel": other("auraflow"), "Lumina2Transformer2DModel": other("lumina"),
    "ZImageTransformer2DModel": other("z-image"), "HiDreamImageTransformer2DModel": other("hidream"),
    "CogView4Transformer2DModel": other("cogview"), "LTXVideoTransformer3DModel": other("ltx-video"),
    "MochiTransformer3DModel": other("mochi"), "CogVideoXTransformer3DModel": other("cogvideox"),
}


def family_of_class(class_name: str | None) -> str | None:
    """The family of a diffusers denoiser class (``FluxTransformer2DModel`` -> flux), None if unknown."""
    return _CLASS_FAMILIES.get(class_name or "")


def family_of_unet_config(cfg: dict) -> str:
    """sd1 | sd2 | sdxl from a UNet2DConditionModel config (its cross-attention width and added
    conditioning), ``unknown`` for a UNet of no published family."""
    if cfg.get("addition_embed_type") == "text_time" and cfg.get("cross_attention_dim") == 2048:
        return "sdxl"
    if cfg.get("addition_embed_type") in (None, "") and cfg.get("cross_attention_dim") in (768, 1024):
        return _UNET_WIDTHS[cfg["cross_attention_dim"]]
    return "unknown"
