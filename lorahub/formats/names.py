"""The architecture layer: module lists derived from a model's own config, and name maps between LoRA
dialects and canonical names.

**Module lists are derived, never hand-written.** Every model part (``unet``, ``transformer``,
``text_encoder``, ``text_encoder_2``, ``text_encoder_3``) is built on the meta device (no weights, no
memory, no network) from its config — a diffusers model class named by the config's ``_class_name``
(``UNet2DConditionModel`` of any config, ``FluxTransformer2DModel``, ``SD3Transformer2DModel``, …) or a
transformers text encoder (``CLIPTextModel``, ``CLIPTextModelWithProjection``, ``T5EncoderModel``, …) —
and every ``nn.Linear`` / ``nn.Conv2d`` is listed with its weight shape under its canonical name::

    unet.<diffusers module path>             transformer.<diffusers module path>
    text_encoder.text_model.<path>           (CLIP towers: the canonical spelling, with ``text_model.``)
    text_encoder_3.encoder.block.0.…         (other text encoders: their own module paths)

:func:`derive_arch` does this for any set of part configs; :func:`arch_of_folder` for a diffusers folder
(``model_index.json`` + ``<part>/config.json``), :func:`arch_of_pipeline` for a loaded pipeline. The
result is cached on disk, keyed by the configs and the torch/diffusers/transformers versions, and
named ``cfg-<fingerprint>`` so a later process finds it again (:func:`get_arch`). The built-in
architectures (:data:`lorahub.vocab.ARCHS`: SD1.5, SD2.1, SDXL, the tiny fixtures, FLUX.1-dev,
SD3-medium, SD3.5-large) are the same derivation from configs shipped in ``lorahub/data/configs``: a
cache used when no model is at hand, not a whitelist.

**Factor math needs no architecture.** A layer whose exact module path cannot be known (a kohya name of
a model none of the tables holds) keeps its dialect's own name under a part prefix,
``unet.lora_unet_double_blocks_0_img_attn_qkv`` — an *unmapped* key (:func:`is_unmapped`); every factor
operation works on it, writing kohya gives the name back verbatim, and a model's module list maps it
when one is given (:func:`map_unmapped`). The architecture is consulted only where a mapping needs it:

* kohya: ``lora_unet_`` / ``lora_te_`` (one text encoder) / ``lora_te1_`` + ``lora_te2_`` (+ ``lora_te3_``)
  and the module path with dots replaced by underscores; UNets with SDXL's added conditioning
  (``addition_embed_type: text_time``) use the original SGM layout (``input_blocks.4.1…``), computed from
  the diffusers path and the UNet config. Reading maps through the generated table — never by
  guessing where dots were.
* cloneofsimo: the order of ``nn.Linear`` modules found by walking the model's modules, keeping
  ancestors whose class name is in the target set (see :func:`cloneofsimo_order`).
* per-family readers and writers (:func:`register_family_dialect`): a family whose kohya names are not
  module paths (Flux.1's BFL layout, fused q/k/v) plugs its own conversion in here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lorahub.errors import FormatError
from lorahub.resources import model_config
from lorahub.vocab import ARCHS, PARTS, TINY_MODELS

# built-in architectures: part -> (config group, config file, class name override)
_BUILTIN: dict[str, dict[str, tuple[str, str, str | None]]] = {
    "sd1": {"unet": ("real", "sd15_unet", None), "text_encoder": ("real", "clip_vit_l14_text", None)},
    "sd2": {"unet": ("real", "sd21_unet", None), "text_encoder": ("real", "openclip_vit_h14_text", None)},
    "sdxl": {"unet": ("real", "sdxl_unet", None), "text_encoder": ("real", "clip_vit_l14_text", None),
             "text_encoder_2": ("real", "openclip_vit_bigg14_text", None)},
    "tiny-sd1": {"unet": ("tiny", "sd1_unet", None), "text_encoder": ("tiny", "clip_text", "CLIPTextModel")},
    "tiny-sdxl": {"unet": ("tiny", "sdxl_unet", None), "text_encoder": ("tiny", "clip_text", "CLIPTextModel"),
                  "text_encoder_2": ("tiny", "clip_text", "CLIPTextModelWithProjection")},
    "tiny-flux": {"transformer": ("tiny", "flux_transformer", None),
                  "text_encoder": ("tiny", "clip_text", "CLIPTextModel"),
                  "text_encoder_2": ("tiny", "t5_encoder", None)},
    "tiny-sd3": {"transformer": ("tiny", "sd3_transformer", None),
                 "text_encoder": ("tiny", "clip_text", "CLIPTextModelWithProjection"),
                 "text_encoder_2": ("tiny", "clip_text", "CLIPTextModelWithProjection"),
                 "text_encoder_3": ("tiny", "t5_encoder", None)},
    "flux": {"transformer": ("real", "flux1_dev_transformer", None),
             "text_encoder": ("real", "clip_vit_l14_text", None),
             "text_encoder_2": ("real", "t5_v1_1_xxl_encoder", None)},
    "sd3": {"transformer": ("real", "sd3_medium_transformer", None),
            "text_encoder": ("real", "clip_vit_l14_text", "CLIPTextModelWithProjection"),
            "text_encoder_2": ("real", "openclip_vit_bigg14_text", None),
            "text_encoder_3": ("real", "t5_v1_1_xxl_encoder", None)},
    "sd3.5-large": {"transformer": ("real", "sd35_large_transformer", None),
                    "text_encoder": ("real", "clip_vit_l14_text", "CLIPTextModelWithProjection"),
                    "text_encoder_2": ("real", "openclip_vit_bigg14_text", None),
                    "text_encoder_3": ("real", "t5_v1_1_xxl_encoder", None)},
}
_BUILTIN_FAMILY = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl", **TINY_MODELS, "flux": "flux", "sd3": "sd3",
                   "sd3.5-large": "sd3"}
FAMILY = dict(_BUILTIN_FAMILY)  # built-in architecture -> base family
CACHE_VERSION = "arch-cache-2"


@dataclass(frozen=True)
class PartSpec:
    """What one model part is built from: its library (diffusers | transformers), class and config."""

    library: str
    cls: str
    config: dict

    def key(self) -> list:
        return [self.library, self.cls, {k: v for k, v in sorted(self.config.items()) if not k.startswith("_")}]


@dataclass
class Arch:
    """One architecture: canonical module names with weight shapes, each part's config and class, the
    module trees (for cloneofsimo's walk), and its base family."""

    name: str
    family: str
    modules: dict[str, tuple[int, ...]]
    configs: dict[str, dict] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)
    # part -> every module of the model in ``named_modules()`` order: (path, class name, is nn.Linear)
    trees: dict[str, list[tuple[str, str, bool]]] = field(default_factory=dict, repr=False)
    _kohya: dict[str, str] | None = field(default=None, repr=False)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in PARTS if p in self.trees)

    @property
    def unet_config(self) -> dict:
        return self.configs.get("unet", {})

    @property
    def kohya_unet_layout(self) -> str:
        """``sgm`` for UNets with SDXL's added conditioning (kohya writes their original layout), else
        ``diffusers`` (kohya writes the diffusers module paths)."""
        return "sgm" if self.unet_config.get("addition_embed_type") == "text_time" else "diffusers"

    def kohya_to_canonical(self) -> dict[str, str]:
        if self._kohya is None:
            table = {}
            for name in self.modules:
                k = kohya_name(name, self)
                if k is not None:
                    table[k] = name
            self._kohya = table
        return self._kohya


# ----------------------------------------------------------------------------------------------
# derivation: build on the meta device, list the modules, cache on disk

def _check_config(cfg: dict, where: str) -> None:
    """Configs are input: refuse sizes that would make even a meta-device build explode."""
    for k, v in cfg.items():
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, (list, tuple)) and len(v) > 64:
                raise FormatError(f"{where}: config {k} has {len(v)} entries")
            continue
        if any(w in k for w in ("layers", "blocks", "heads")) and not 0 <= v <= 1024:
            raise FormatError(f"{where}: config {k} = {v} is out of range")


def _model_class(library: str, cls: str):
    """The model class ``cls`` of ``library``, only when it really is a model class (names come from
    config files)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,80}", cls or ""):
        raise FormatError(f"bad model class name {cls!r}")
    if library == "diffusers":
        import diffusers

        obj = getattr(diffusers, cls, None)
        ok = isinstance(obj, type) and issubclass(obj, diffusers.ModelMixin)
    elif library == "transformers":
        import transformers

        obj = getattr(transformers, cls, None)
        ok = isinstance(obj, type) and issubclass(obj, transformers.PreTrainedModel)
    else:
        raise FormatError(f"model class {cls!r}: unknown library {library!r}")
    if not ok:
        raise FormatError(f"{cls} is not a {library} model class")
    return obj


def _instantiate(spec: PartSpec):
    import inspect

    cls = _model_class(spec.library, spec.cls)
    cfg = {k: v for k, v in spec.config.items() if not k.startswith("_")}
    _check_config(cfg, spec.cls)
    if spec.library == "diffusers":
        params = inspect.signature(cls.__init__).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            cfg = {k: v for k, v in cfg.items() if k in params}
        return cls(**cfg)
    return cls(cls.config_class(**cfg))


def _build(specs: dict[str, PartSpec]) -> dict:
    """Build every part on the meta device and list its modules (imports diffusers / transformers)."""
    import logging
    import warnings

    import torch

    modules: dict[str, list[int]] = {}
    trees: dict[str, list] = {}
    quiet = [logging.getLogger(n) for n in ("diffusers", "transformers")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        for part, spec in specs.items():
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # deprecation notices of the library's own classes
                    model = _instantiate(spec)
            except FormatError:
                raise
            except Exception as exc:  # noqa: BLE001 - a config the class refuses: one line
                raise FormatError(f"cannot build {part} ({spec.cls}) from its config: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:160] if str(exc) else ''}") from None
            tree = []
            for path, mod in model.named_modules():
                tree.append([path, type(mod).__name__, isinstance(mod, torch.nn.Linear)])
                if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                    modules[canonical(part, path)] = [int(s) for s in mod.weight.shape]
            trees[part] = tree
            del model
    finally:
        for q, lv in zip(quiet, levels):
            q.setLevel(lv)
    return {"modules": modules, "trees": trees}


def fingerprint(specs: dict[str, PartSpec]) -> str:
    """Fingerprint of a set of part configs and the library versions that turn them into modules."""
    from importlib.metadata import version

    h = hashlib.sha256(CACHE_VERSION.encode())
    h.update(json.dumps({p: s.key() for p, s in sorted(specs.items())}, sort_keys=True, default=str).encode())
    for pkg in ("torch", "diffusers", "transformers"):
        h.update(f"{pkg}={version(pkg)}".encode())
    return h.hexdigest()[:16]


def _cache_dir() -> Path:
    import os

    root = os.environ.get("LORAHUB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lorahub")
    return Path(root) / "arch"


def _family_of_specs(specs: dict[str, PartSpec]) -> str:
    from lorahub.formats import families

    for part in ("unet", "transformer"):
        spec = specs.get(part)
        if spec is None:
            continue
        if spec.cls == "UNet2DConditionModel":
            fam = families.family_of_unet_config(spec.config)
            if fam == "unknown":  # the tiny fixtures' UNets are catalogued under their family
                fam = next((_BUILTIN_FAMILY[a] for a in TINY_MODELS if "unet" in _BUILTIN[a]
                            and _same_config(_builtin_specs(a)["unet"].config, spec.config)), "unknown")
            return fam
        return families.family_of_class(spec.cls) or "unknown"
    return "unknown"


def _same_config(short: dict, full: dict) -> bool:
    """True when ``full`` (a saved config, every default written out) says what ``short`` says."""
    return all(json.dumps(full.get(k), sort_keys=True) == json.dumps(v, sort_keys=True) for k, v in short.items())


def family_of_folder(path: str | Path) -> str:
    """The base family of a diffusers folder from its denoiser's config (no model is built)."""
    try:
        return _family_of_specs(specs_of_folder(path))
    except FormatError:
        return "unknown"


_ARCHS: dict[str, Arch] = {}  # every architecture this process knows, by name


def _from_data(name: str, data: dict) -> Arch:
    return Arch(name=name, family=data["family"], modules={k: tuple(v) for k, v in data["modules"].items()},
                configs=data["configs"], classes=data["classes"],
                trees={p: [(a, b, bool(c)) for a, b, c in t] for p, t in data["trees"].items()})


_FIELDS = {"modules", "trees", "configs", "classes", "family"}


def derive_arch(specs: dict[str, PartSpec], *, name: str | None = None, family: str | None = None) -> Arch:
    """The architecture of the model whose parts are built from ``specs``: built on the meta device
    once, then read from the disk cache (keyed by the configs and library versions). ``name`` defaults
    to ``cfg-<fingerprint>`` (which :func:`get_arch` resolves later, in any process); ``family`` to the
    one the denoiser's config says (:mod:`lorahub.formats.families`)."""
    specs = {p: specs[p] for p in PARTS if p in specs}
    if not specs:
        raise FormatError("no model part (unet, transformer, text encoders) to derive modules from")
    fp = fingerprint(specs)
    name = name or f"cfg-{fp}"
    hit = _ARCHS.get(name)
    if hit is not None and (name.startswith("cfg-") or hit.configs == {p: s.config for p, s in specs.items()}):
        return hit
    cache = _cache_dir() / f"{name}-{fp}.json" if not name.startswith("cfg-") else _cache_dir() / f"{name}.json"
    data = None
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    if not isinstance(data, dict) or set(data) != _FIELDS:
        data = _build(specs)
        data["configs"] = {p: s.config for p, s in specs.items()}
        data["classes"] = {p: s.cls for p, s in specs.items()}
        data["family"] = family or _family_of_specs(specs)
        try:
            from lorahub.fsutil import atomic_write_text

            atomic_write_text(cache, json.dumps(data, default=str))
        except (OSError, TypeError, ValueError):  # an unwritable cache only costs speed
            pass
    arch = _from_data(name, data)
    if family:
        arch.family = family
    _ARCHS[name] = arch
    return arch


def _builtin_specs(name: str) -> dict[str, PartSpec]:
    out = {}
    for part, (group, file, cls) in _BUILTIN[name].items():
        cfg = model_config(group, file)
        cls = cls or cfg.get("_class_name")
        library = "diffusers" if part in ("unet", "transformer") else "transformers"
        out[part] = PartSpec(library, cls, {k: v for k, v in cfg.items() if not k.startswith("_")})
    return out


@functools.lru_cache(maxsize=None)
def _builtin(name: str) -> Arch:
    return derive_arch(_builtin_specs(name), name=name, family=_BUILTIN_FAMILY[name])


def get_arch(name: str) -> Arch:
    """The architecture ``name``: a built-in one (:data:`lorahub.vocab.ARCHS`), or one derived earlier
    (``cfg-<fingerprint>``, from this process or the disk cache)."""
    if isinstance(name, Arch):
        return name
    if name in ARCHS:
        return _builtin(name)
    hit = _ARCHS.get(name)
    if hit is not None:
        return hit
    if isinstance(name, str) and re.fullmatch(r"cfg-[0-9a-f]{16}", name):
        try:
            data = json.loads((_cache_dir() / f"{name}.json").read_text())
            if isinstance(data, dict) and set(data) == _FIELDS:
                _ARCHS[name] = _from_data(name, data)
                return _ARCHS[name]
        except (OSError, ValueError):
            pass
        raise FormatError(f"architecture {name} is no longer cached: give its model again")
    raise FormatError(f"unknown architecture {name!r} (one of {', '.join(ARCHS)}, or a model to derive it from)")


def resolve_arch(arch) -> Arch | None:
    """``arch`` as an :class:`Arch`: an Arch, a name for :func:`get_arch`, or None (stays None)."""
    if arch is None or isinstance(arch, Arch):
        return arch
    return get_arch(arch)


# ----------------------------------------------------------------------------------------------
# the model in hand: a diffusers folder, a loaded pipeline

def _read_json(path: Path) -> dict:
    try:
        if path.stat().st_size > 4 * 1024 * 1024:
            raise FormatError(f"{path}: config file too large")
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: unreadable config ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: a config must be a JSON object")
    return obj


def specs_of_folder(path: str | Path) -> dict[str, PartSpec]:
    """The part configs of a diffusers folder: ``model_index.json`` names each component's library and
    class; ``<part>/config.json`` holds its config (``_class_name`` / ``architectures`` when there is no
    model index)."""
    root = Path(path)
    index = _read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
    out: dict[str, PartSpec] = {}
    for part in PARTS:
        cfg_file = root / part / "config.json"
        if not cfg_file.is_file():
            continue
        cfg = _read_json(cfg_file)
        entry = index.get(part)
        if isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry):
            library, cls = entry
        elif isinstance(cfg.get("_class_name"), str):
            library, cls = "diffusers", cfg["_class_name"]
        elif isinstance(cfg.get("architectures"), list) and cfg["architectures"]:
            library, cls = "transformers", str(cfg["architectures"][0])
        else:
            continue
        if library not in ("diffusers", "transformers"):
            continue
        out[part] = PartSpec(library, cls, {k: v for k, v in cfg.items() if not k.startswith("_")})
    if not out:
        raise FormatError(f"{root}: no model part with a config (unet/, transformer/, text_encoder*/config.json)")
    return out


def arch_of_folder(path: str | Path) -> Arch:
    """The architecture of a diffusers folder, derived from its own configs (cached)."""
    return derive_arch(specs_of_folder(path))


def arch_of_pipeline(pipe) -> Arch:
    """The architecture of a loaded diffusers pipeline, derived from its components' configs (cached):
    the module list of the model as built, whatever adapters were injected since."""
    out: dict[str, PartSpec] = {}
    for part in PARTS:
        comp = getattr(pipe, part, None)
        if comp is None:
            continue
        cfg = getattr(comp, "config", None)
        if cfg is None:
            continue
        cls = type(comp).__name__
        if hasattr(cfg, "to_dict") and not isinstance(cfg, dict):  # transformers config
            out[part] = PartSpec("transformers", cls, {k: v for k, v in cfg.to_dict().items()
                                                       if not k.startswith("_") and k != "transformers_version"})
        else:
            out[part] = PartSpec("diffusers", cls, {k: v for k, v in dict(cfg).items() if not k.startswith("_")})
    return derive_arch(out)


# ----------------------------------------------------------------------------------------------
# canonical spelling

TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3")
_CLIP_TOWER = ("encoder.layers.", "embeddings.", "final_layer_norm")


def canonical(part: str, path: str) -> str:
    """Canonical name of module ``path`` of ``part``: a CLIP text tower's paths are spelled with
    ``text_model.`` (transformers 5's ``CLIPTextModel`` has no ``.text_model``); every other path as is."""
    if part in TEXT_PARTS and path.startswith(_CLIP_TOWER):
        path = "text_model." + path
    return f"{part}.{path}"


def normalize(name: str) -> str:
    """Canonical spelling of a prefixed diffusers-style module name (accepts transformers-5 paths)."""
    part, _, rest = name.partition(".")
    if part in TEXT_PARTS:
        return canonical(part, rest)
    return name


def split(name: str) -> tuple[str, str]:
    part, _, rest = name.partition(".")
    return part, rest


def live_path(name: str, root) -> str:
    """Module path of canonical ``name`` inside the live model ``root`` (its part), e.g. a pipeline's
    ``text_encoder``: transformers 5 ``CLIPTextModel`` has no ``.text_model``."""
    _part, rest = split(name)
    if rest.startswith("text_model.") and not hasattr(root, "text_model"):
        return rest[len("text_model."):]
    return rest


def get_live_module(pipe, name: str):
    """The live ``nn.Module`` a canonical layer name adapts, in a diffusers pipeline."""
    part, _ = split(name)
    root = getattr(pipe, part, None)
    if root is None:
        raise FormatError(f"the pipeline has no {part}")
    return root.get_submodule(live_path(name, root))


# ----------------------------------------------------------------------------------------------
# The original LDM (SD1/SD2) / SGM (SDXL) layout of the UNet <-> diffusers module paths.
# One map serves module paths (kohya LoRA names) and parameter names (single-file checkpoints).

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_RESNET_FROM_LDM = {v: k for k, v in _RESNET_TO_LDM.items()}
_TOP_TO_LDM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
               "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_TOP_FROM_LDM = {v: k for k, v in _TOP_TO_LDM.items()}


def _swap_head(path: str, table: dict[str, str]) -> str | None:
    """``path`` with its leading module path replaced through ``table`` (None when none matches)."""
    for a, b in table.items():
        if path == a or path.startswith(a + "."):
            return b + path[len(a):]
    return None


def unet_to_ldm(path: str, layers_per_block: int, up_has_attn) -> str | None:
    """LDM/SGM path of a diffusers UNet module or parameter path (without ``unet.``), e.g.
    ``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in``; None when it has none.
    ``up_has_attn(i)``: whether up block ``i`` has attentions (its upsampler then sits at index 2)."""
    top = _swap_head(path, _TOP_TO_LDM)
    if top is not None:
        return top
    n = layers_per_block + 1
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$", path)
    if m:
        side, i, what, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if what in ("downsamplers", "upsamplers"):
            conv = _swap_head(rest, {"conv": "op" if what == "downsamplers" else "conv"})
            if conv is None:
                return None
            if what == "downsamplers":
                return f"input_blocks.{(i + 1) * n}.0.{conv}"
            return f"output_blocks.{i * n + layers_per_block}.{2 if up_has_attn(i) else 1}.{conv}"
        idx = i * n + j + 1 if side == "down_blocks" else i * n + j
        block = "input_blocks" if side == "down_blocks" else "output_blocks"
        if what == "attentions":
            return f"{block}.{idx}.1.{rest}"
        r = _swap_head(rest, _RESNET_TO_LDM)
        return f"{block}.{idx}.0.{r}" if r else None
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if m:
        what, j, rest = m[1], int(m[2]), m[3]
        if what == "attentions":
            return f"middle_block.1.{rest}"
        r = _swap_head(rest, _RESNET_TO_LDM)
        return f"middle_block.{2 * j}.{r}" if r else None
    return None


def unet_from_ldm(key: str, layers_per_block: int) -> str | None:
    """Diffusers UNet path of an LDM/SGM UNet path (without ``model.diffusion_model.``); the inverse
    of :func:`unet_to_ldm`. None when it has none."""
    top = _swap_head(key, _TOP_FROM_LDM)
    if top is not None:
        return top
    n = layers_per_block + 1
    m = re.match(r"^input_blocks\.(\d+)\.(\d+)\.(.+)$", key)
    if m:
        k, sub, rest = int(m[1]), int(m[2]), m[3]
        if k == 0:
            return None
        i, j = divmod(k - 1, n)
        if j == layers_per_block:
            conv = _swap_head(rest, {"op": "conv"}) if sub == 0 else None
            return f"down_blocks.{i}.downsamplers.0.{conv}" if conv else None
        if sub == 0:
            r = _swap_head(rest, _RESNET_FROM_LDM)
            return f"down_blocks.{i}.resnets.{j}.{r}" if r else None
        return f"down_blocks.{i}.attentions.{j}.{rest}" if sub == 1 else None
    m = re.match(r"^middle_block\.(\d+)\.(.+)$", key)
    if m:
        sub, rest = int(m[1]), m[2]
        if sub in (0, 2):
            r = _swap_head(rest, _RESNET_FROM_LDM)
            return f"mid_block.resnets.{sub // 2}.{r}" if r else None
        return f"mid_block.attentions.0.{rest}" if sub == 1 else None
    m = re.match(r"^output_blocks\.(\d+)\.(\d+)\.(.+)$", key)
    if m:
        k, sub, rest = int(m[1]), int(m[2]), m[3]
        i, j = divmod(k, n)
        if sub == 0:
            r = _swap_head(rest, _RESNET_FROM_LDM)
            return f"up_blocks.{i}.resnets.{j}.{r}" if r else None
        conv = _swap_head(rest, {"conv": "conv"})
        if conv is not None:
            return f"up_blocks.{i}.upsamplers.0.{conv}"
        return f"up_blocks.{i}.attentions.{j}.{rest}" if sub == 1 else None
    return None


def unet_to_sgm(path: str, ucfg: dict) -> str:
    """SGM module path of a diffusers UNet module path for the UNet config ``ucfg`` (the path itself
    when the layout has no such module)."""
    lpb = ucfg.get("layers_per_block", 2)
    if isinstance(lpb, (list, tuple)):
        raise FormatError("per-block layers_per_block has no SGM layout")
    return unet_to_ldm(path, lpb, lambda i: "CrossAttn" in ucfg["up_block_types"][i]) or path


# ----------------------------------------------------------------------------------------------
# unmapped keys: a layer under its dialect's own name

# kohya module-name prefixes and the part each names (longest first)
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                  "lora_te3_": "text_encoder_3", "lora_te_": "text_encoder"}


def kohya_part(kname: str) -> str | None:
    """The part a kohya module name belongs to (``lora_unet_…`` -> unet), None without a kohya prefix."""
    return next((part for prefix, part in KOHYA_PREFIXES.items() if kname.startswith(prefix)), None)


def unmapped_key(part: str, dialect_name: str) -> str:
    """The canonical key of a layer whose module path is not known: its dialect's own (flattened) name
    under its part, e.g. ``unet.lora_unet_double_blocks_0_img_attn_qkv``."""
    return f"{part}.{dialect_name}"


def is_unmapped(key: str) -> bool:
    """True for a key that holds a dialect's name rather than a module path (see :func:`unmapped_key`):
    no module path starts with ``lora_``."""
    return split(key)[1].startswith("lora_")


def dialect_name(key: str) -> str:
    """The dialect's own name an unmapped key keeps."""
    return split(key)[1]


def unmapped(keys) -> list[str]:
    """The unmapped keys among ``keys``."""
    return [k for k in keys if is_unmapped(k)]


# ----------------------------------------------------------------------------------------------
# per-family dialects (a family whose kohya names are not module paths plugs its conversion in)

@dataclass
class FamilyDialect:
    """A family's own kohya reader and writer, for families whose kohya names are not module paths
    (Flux.1's BFL layout with fused q/k/v). ``read_kohya(tensors, metadata, name) -> LoraModel``;
    ``write_kohya(model, dtype) -> (tensors, metadata)``. Either may be None (the generic rule applies)."""

    read_kohya: Callable | None = None
    write_kohya: Callable | None = None


_FAMILY_DIALECTS: dict[str, FamilyDialect] = {}
_BUILTIN_DIALECTS: list[bool] = []  # set once lorahub.formats.dit registered Flux.1's and SD3's


def _load_builtin_dialects() -> None:
    if not _BUILTIN_DIALECTS:
        _BUILTIN_DIALECTS.append(True)
        import lorahub.formats.dit  # noqa: F401 - registers the built-in family dialects


def register_family_dialect(family: str, dialect: FamilyDialect | None) -> None:
    """Install ``dialect`` for LoRAs of ``family`` (sd3, flux, other:…); None removes it. kohya files
    detected as ``family`` are then read, and LoRAs of ``family`` written, through it. The built-in
    ones (:mod:`lorahub.formats.dit`: flux, sd3) are registered first, so a later call replaces them."""
    _load_builtin_dialects()
    if dialect is None:
        _FAMILY_DIALECTS.pop(family, None)
    else:
        _FAMILY_DIALECTS[family] = dialect


def family_dialect(family: str | None) -> FamilyDialect | None:
    """The dialect registered for ``family``, if any (the built-in ones: flux, sd3)."""
    _load_builtin_dialects()
    return _FAMILY_DIALECTS.get(family or "")


# ----------------------------------------------------------------------------------------------
# kohya names

def kohya_name(name: str, arch: Arch | None, *, sgm: bool = True, parts=()) -> str | None:
    """kohya module name (without the ``.lora_down.weight`` suffix) of canonical ``name``; None for a
    part kohya has no generic naming for (a DiT ``transformer``: its family names it).

    An unmapped key gives its kohya name back verbatim. UNet names follow the SGM layout when ``arch``
    is an SDXL-style UNet (unless ``sgm=False``: some tools write diffusers paths), else the module path
    with dots -> underscores (kohya's rule, which needs no table). The first text encoder is
    ``lora_te1_`` when there is a second one (in ``arch`` or in ``parts``), else ``lora_te_``; the second
    ``lora_te2_``; a T5 encoder ``lora_te3_`` whichever part holds it (SD3 and Flux.1 alike)."""
    part, rest = split(name)
    if is_unmapped(name):
        return rest
    if part == "unet":
        if arch is not None and sgm and arch.kohya_unet_layout == "sgm":
            try:
                rest = unet_to_sgm(rest, arch.unet_config)
            except FormatError:  # per-block layers_per_block: no SGM layout, kohya writes module paths
                pass
        return "lora_unet_" + rest.replace(".", "_")
    if part in TEXT_PARTS and arch is not None and arch.classes.get(part, "").startswith("T5"):
        return "lora_te3_" + rest.replace(".", "_")  # kohya numbers T5 third (SD3 and Flux.1 alike)
    if part == "text_encoder":
        two = "text_encoder_2" in parts or (arch is not None and "text_encoder_2" in arch.parts)
        return ("lora_te1_" if two else "lora_te_") + rest.replace(".", "_")
    if part == "text_encoder_2":
        return "lora_te2_" + rest.replace(".", "_")
    if part == "text_encoder_3":
        return "lora_te3_" + rest.replace(".", "_")
    return None


def to_kohya(name: str, arch: Arch | None, *, sgm: bool = True, parts=()) -> str:
    """:func:`kohya_name`, or a FormatError for a part kohya has no generic naming for."""
    k = kohya_name(name, arch, sgm=sgm, parts=parts)
    if k is None:
        part = split(name)[0]
        fam = arch.family if arch is not None else "this model"
        raise FormatError(f"{name}: the kohya dialect has no generic naming for the {part} of {fam} (its "
                          "kohya files use the family's original layout, which lorahub cannot write yet); "
                          "write the diffusers or peft dialect")
    return k


def from_kohya(kname: str, arch: Arch) -> str | None:
    """Canonical name of kohya module ``kname`` in ``arch`` (None when it is not a module of ``arch``)."""
    table = arch.kohya_to_canonical()
    hit = table.get(kname)
    if hit is None and kname.startswith("lora_te_"):
        hit = table.get("lora_te1_" + kname[len("lora_te_"):])
    if hit is None and kname.startswith("lora_te1_"):
        hit = table.get("lora_te_" + kname[len("lora_te1_"):])
    if hit is None and kname.startswith("lora_unet_") and arch.kohya_unet_layout == "sgm":
        # some tools write SDXL kohya names in the diffusers layout
        hit = _diffusers_kohya_table(arch.name).get(kname)
    return hit


def kohya_layout_of(kname: str, arch: Arch) -> str:
    """``diffusers`` when kohya UNet name ``kname`` is written in the diffusers layout of an SGM-layout
    architecture (some tools do), else ``sgm``/``diffusers`` as the architecture writes it."""
    if kname.startswith("lora_unet_") and arch.kohya_unet_layout == "sgm" and kname not in arch.kohya_to_canonical():
        return "diffusers"
    return arch.kohya_unet_layout


@functools.lru_cache(maxsize=None)
def _diffusers_kohya_table(arch_name: str) -> dict[str, str]:
    arch = get_arch(arch_name)
    return {"lora_unet_" + split(n)[1].replace(".", "_"): n for n in arch.modules if n.startswith("unet.")}


# ----------------------------------------------------------------------------------------------
# architecture inference (the built-in cache) and mapping through a given architecture

def _part_of(name: str, kohya: bool) -> str | None:
    return kohya_part(name) if kohya else split(name)[0]


def _order(base_hint: str | None, parts: set[str]) -> list[str]:
    order = [a for a in ARCHS if parts <= set(_BUILTIN[a])]
    if base_hint:
        order.sort(key=lambda a: FAMILY[a] != base_hint)
    return order


def _fit(arch: Arch, names_shapes: dict, kohya: bool) -> tuple[dict[str, str], list[str], list[str]]:
    """(name -> canonical for the names ``arch`` holds with a fitting shape, names it lacks, misfits)."""
    found, missing, misfit = {}, [], []
    for n, shape in names_shapes.items():
        c = from_kohya(n, arch) if kohya else normalize(n)
        if c is None or c not in arch.modules:
            missing.append(n)
        elif shape is not None and not _shape_ok(arch.modules[c], shape):
            misfit.append(n)
        else:
            found[n] = c
    return found, missing, misfit


def _best(names_shapes: dict[str, tuple[int, ...] | None], kohya: bool, base_hint: str | None):
    """(matching Arch or None, closest (score, name, missing, misfit, found) or None)."""
    parts = {_part_of(n, kohya) for n in names_shapes}
    if None in parts:
        return None, None
    best = None
    for arch_name in _order(base_hint, parts):
        arch = get_arch(arch_name)
        found, missing, misfit = _fit(arch, names_shapes, kohya)
        if not missing and not misfit:
            return arch, None
        score = len(missing) + len(misfit)
        if best is None or score < best[0]:
            best = (score, arch_name, missing, misfit, found)
    return None, best


def _no_match(best) -> str:
    if best is None:
        return "the layers match no known model"
    _, arch_name, missing, misfit, _found = best
    return (f"the layers match no known model (closest: {arch_name}, {len(missing)} unknown module(s), "
            f"{len(misfit)} shape mismatch(es))")


def infer_arch(names_shapes: dict[str, tuple[int, ...]], *, kohya: bool = False,
               base_hint: str | None = None) -> Arch:
    """The built-in architecture whose module list holds every name with a matching weight shape.

    ``names_shapes``: module name (canonical, or kohya when ``kohya``) -> weight shape (out, in[, kh, kw]).
    Shapes may be None to skip the check. Raises FormatError naming the closest candidate otherwise.
    """
    arch, best = _best(names_shapes, kohya, base_hint)
    if arch is None:
        raise FormatError(_no_match(best) + "; is this a LoRA for another base model?")
    return arch


def match_arch(names_shapes: dict[str, tuple[int, ...]], *, kohya: bool = False,
               base_hint: str | None = None) -> tuple[Arch | None, str]:
    """Like :func:`infer_arch` but never raises: (the architecture or None, why none matched)."""
    arch, best = _best(names_shapes, kohya, base_hint)
    return arch, ("" if arch is not None else _no_match(best))


@dataclass
class KohyaMap:
    """How a file's kohya module names map to canonical keys (unmapped ones keep their kohya name)."""

    arch: Arch | None
    names: dict[str, str]                       # kohya name -> canonical key
    notes: list[str] = field(default_factory=list)

    @property
    def unmapped(self) -> list[str]:
        return [k for k, c in self.names.items() if is_unmapped(c)]


def _kept_notes(arch_name: str, missing: list[str], misfit: list[str], what: str) -> list[str]:
    notes = []
    if missing:
        notes.append(f"{len(missing)} layer(s) are not modules of {what} ({arch_name}): kept under their kohya "
                     f"names, e.g. {missing[0]}")
    if misfit:
        notes.append(f"{len(misfit)} layer(s) do not fit the shape of their module in {what} ({arch_name}): "
                     f"kept under their kohya names, e.g. {misfit[0]}")
    return notes


def map_kohya(shapes: dict[str, tuple[int, ...] | None], *, arch=None, base_hint: str | None = None) -> KohyaMap:
    """Map kohya module names (-> the adapted weight's shape, or None) to canonical keys.

    With ``arch`` (an Arch or a name; the base model's own architecture) every name that is one of its
    modules with a fitting shape is mapped. Without, the built-in architecture holding every name is
    used; when none does but one holds most of them (SD1 inpainting's 9-channel ``conv_in``, a few
    modules of a derivative), those are mapped. Names left over keep their kohya names (unmapped:
    factor operations need no mapping), with a note saying which and why."""
    def keep(k):
        return unmapped_key(kohya_part(k) or "unet", k)

    if arch is not None:
        a = resolve_arch(arch)
        found, missing, misfit = _fit(a, shapes, True)
        out = {k: found.get(k) or keep(k) for k in shapes}
        return KohyaMap(a, out, _kept_notes(a.name, missing, misfit, "the base model"))
    a, best = _best(shapes, True, base_hint)
    if a is not None:
        return KohyaMap(a, {k: from_kohya(k, a) for k in shapes})
    if best is not None and len(best[4]) * 2 >= len(shapes) and (a := get_arch(best[1])).kohya_unet_layout != "sgm":
        # most names are modules of one known model (diffusers-layout names mean the same module
        # path in any model that has it): map those, keep the rest
        _, name, missing, misfit, found = best
        out = {k: found.get(k) or keep(k) for k in shapes}
        return KohyaMap(a, out, _kept_notes(name, missing, misfit, "the closest known model"))
    if base_hint not in (None, "unknown", "sd1", "sd2", "sdxl"):
        note = (f"{len(shapes)} layer(s) kept under their kohya names: kohya files of {base_hint} name modules "
                "in the family's original layout, which has no map to module paths here (factor operations "
                "need none)")
    else:
        note = (f"{len(shapes)} layer(s) kept under their kohya names: {_no_match(best)}; a base model maps "
                "them to module paths")
    return KohyaMap(None, {k: keep(k) for k in shapes}, [note])


def map_unmapped(model, arch) -> list[str]:
    """Map ``model``'s unmapped kohya keys through ``arch`` (an Arch or name; the base model's own
    architecture) in place, where the module exists with a fitting shape. Returns the keys still
    unmapped. Sets ``model.arch`` (and an unknown ``model.base``) from ``arch``."""
    a = resolve_arch(arch)
    left = []
    renamed = {}
    for key, layer in model.layers.items():
        if not is_unmapped(key):
            continue
        kname = dialect_name(key)
        c = from_kohya(kname, a) if kohya_part(kname) else None
        try:
            shape = tuple(layer.shape)
        except (ValueError, KeyError):
            shape = None
        if c is None or c in model.layers or c in renamed.values() or (
                shape is not None and not _shape_ok(a.modules[c], shape)):
            left.append(key)
            continue
        renamed[key] = c
        if a.kohya_unet_layout == "sgm" and kohya_layout_of(kname, a) == "diffusers":
            model.extra["kohya_unet_layout"] = "diffusers"
    if renamed:
        model.layers = {renamed.get(k, k): v for k, v in model.layers.items()}
    model.arch = a.name
    if model.base == "unknown" and a.family != "unknown":
        model.base = a.family
    return left


def arch_for_writing(model) -> Arch | None:
    """The architecture ``model``'s names belong to, for writers that need one (SGM layout, text encoder
    prefixes): its own (``model.arch``), else the built-in one holding every mapped name, else None."""
    if model.arch not in (None, "", "unknown"):
        try:
            return get_arch(model.arch)
        except FormatError:
            pass
    shapes = {}
    for n, layer in model.layers.items():
        if is_unmapped(n):
            continue
        try:
            shapes[n] = tuple(layer.shape)
        except (ValueError, KeyError):
            shapes[n] = None
    if not shapes:
        return None
    return match_arch(shapes, base_hint=model.base)[0]


def default_dialect(model) -> str:
    """The dialect a derived LoRA is written in when none is asked for: kohya, unless a layer has no
    kohya name (a DiT transformer's, which its family names) — then diffusers."""
    family = family_dialect(model.base)
    if family is not None and family.write_kohya is not None:
        return "kohya"
    parts = model.parts()
    return "kohya" if all(kohya_name(k, None, parts=parts) is not None for k in model.layers) else "diffusers"


def _shape_ok(module_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    if len(module_shape) == 4 and len(shape) == 2:
        # a linear-shaped factor pair on a 1x1 conv (some tools flatten)
        return module_shape[0] == shape[0] and module_shape[1] * module_shape[2] * module_shape[3] == shape[1]
    if len(module_shape) == 2 and len(shape) == 4:
        return tuple(shape[2:]) == (1, 1) and module_shape == tuple(shape[:2])
    return tuple(module_shape) == tuple(shape)


# ----------------------------------------------------------------------------------------------
# cloneofsimo module walk

CLONE_DEFAULT_TARGETS = {"unet": ["CrossAttention", "Attention", "GEGLU"], "text_encoder": ["CLIPAttention"]}
_CLASS_ALIASES = {"CrossAttention": "Attention", "Attention": "Attention"}


def cloneofsimo_order(arch: Arch, part: str, targets: list[str] | None = None,
                      legacy_block_order: bool = False) -> list[str]:
    """Canonical names of the ``nn.Linear`` modules in cloneofsimo's walk order.

    The walk: every module of ``model.modules()`` whose class name is in ``targets`` (an ancestor), then
    every ``nn.Linear`` of that ancestor's ``named_modules()``. Class names of the diffusers release
    cloneofsimo used (``CrossAttention``) are matched to today's (``Attention``). With
    ``legacy_block_order`` each transformer block is walked as diffusers <= 0.11 registered it
    (attn1, ff, attn2) instead of today's (attn1, attn2, ff).
    """
    tree = arch.trees.get(part)
    if tree is None:
        raise FormatError(f"{arch.name} has no {part}")
    wanted = {_CLASS_ALIASES.get(t, t) for t in (targets or CLONE_DEFAULT_TARGETS.get(part, []))}
    ancestors = [path for path, cls, _ in tree if cls in wanted]
    if legacy_block_order:
        ancestors = _legacy_reorder(ancestors)
    index = {path: i for i, (path, _, _) in enumerate(tree)}
    out: list[str] = []
    for a in ancestors:
        # named_modules() is a pre-order walk: a module's descendants follow it contiguously
        prefix = a + "." if a else ""
        for path, _, is_linear in tree[index[a]:]:
            if path != a and not path.startswith(prefix):
                break
            if is_linear:
                out.append(canonical(part, path))
    return out


def _legacy_reorder(ancestors: list[str]) -> list[str]:
    """Within each transformer block, order attn1, ff, attn2 (diffusers <= 0.11 registration order)."""
    def key(item):
        i, name = item
        m = re.match(r"^(.*transformer_blocks\.\d+)\.(attn1|attn2|ff)(\..*)?$", name)
        if not m:
            return (i, 0)
        block_first = min(j for j, n in enumerate(ancestors) if n.startswith(m[1] + "."))
        return (block_first, {"attn1": 0, "ff": 1, "attn2": 2}[m[2]])
    return [n for _, n in sorted(enumerate(ancestors), key=key)]
