"""Module lists of the real architectures, and name maps between LoRA dialects and canonical names.

The module lists are *derived*, never hand-written: the UNet and text encoders are built on the meta
device (no weights, no memory, no network) from the published configs in ``fixtures/configs/real``
(SD1.5, SD2.1, SDXL base) or from the tiny fixture configs (``tiny-sd1``, ``tiny-sdxl``), and every
``nn.Linear`` / ``nn.Conv2d`` is listed with its weight shape under its canonical name:

    unet.<diffusers module path>
    text_encoder.text_model.<path>        (the canonical spelling, with ``text_model.``)
    text_encoder_2.text_model.<path>

Dialect names are produced from those lists:

* kohya: ``lora_unet_`` / ``lora_te_`` (SD1/SD2) / ``lora_te1_`` + ``lora_te2_`` (SDXL) + the module path
  with dots replaced by underscores. SDXL UNet names use the original SGM layout
  (``input_blocks.4.1…``, ``middle_block…``, ``output_blocks…``), computed from the diffusers path and
  the UNet config. Reading maps through the generated table — never by guessing where dots were.
* cloneofsimo: the order of ``nn.Linear`` modules found by walking the model's modules, keeping
  ancestors whose class name is in the target set (see :func:`cloneofsimo_order`).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field

from lorahub.errors import FormatError
from lorahub.resources import model_config
from lorahub.vocab import ARCHS, FAMILIES, PARTS, TINY_MODELS

FAMILY = {**{f: f for f in FAMILIES}, **TINY_MODELS}  # architecture -> base family

_REAL = {
    "sd1": {"unet": "sd15_unet", "text_encoder": "clip_vit_l14_text"},
    "sd2": {"unet": "sd21_unet", "text_encoder": "openclip_vit_h14_text"},
    "sdxl": {"unet": "sdxl_unet", "text_encoder": "clip_vit_l14_text", "text_encoder_2": "openclip_vit_bigg14_text"},
}
_TINY = {
    "tiny-sd1": {"unet": "sd1_unet", "text_encoder": "clip_text"},
    "tiny-sdxl": {"unet": "sdxl_unet", "text_encoder": "clip_text", "text_encoder_2": "clip_text"},
}


def _load_config(arch: str, part: str) -> dict:
    if arch in _REAL:
        cfg = model_config("real", _REAL[arch][part])
    else:
        cfg = model_config("tiny", _TINY[arch][part])
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


@dataclass
class Arch:
    """One architecture: canonical module names with weight shapes, its UNet config, module trees."""

    name: str
    family: str
    modules: dict[str, tuple[int, ...]]
    unet_config: dict
    # part -> every module of the model in ``named_modules()`` order: (path, class name, is nn.Linear)
    trees: dict[str, list[tuple[str, str, bool]]] = field(default_factory=dict, repr=False)
    _kohya: dict[str, str] | None = field(default=None, repr=False)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in PARTS if p in self.trees)

    def kohya_to_canonical(self) -> dict[str, str]:
        if self._kohya is None:
            self._kohya = {to_kohya(name, self): name for name in self.modules}
        return self._kohya


def _arch_fingerprint(name: str) -> str:
    import hashlib
    from importlib.metadata import version

    h = hashlib.sha256(f"arch-cache-1/{name}".encode())
    for part in PARTS:
        try:
            h.update(json.dumps(_load_config(name, part), sort_keys=True).encode())
        except KeyError:
            pass
    for pkg in ("torch", "diffusers", "transformers"):
        h.update(f"{pkg}={version(pkg)}".encode())
    return h.hexdigest()[:16]


def _cache_file(name: str):
    import os
    from pathlib import Path

    root = os.environ.get("LORAHUB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lorahub")
    return Path(root) / "arch" / f"{name}-{_arch_fingerprint(name)}.json"


def _build_arch_data(name: str) -> dict:
    """Build the models on the meta device and list their modules (imports diffusers/transformers)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ucfg = _load_config(name, "unet")
    models = {}
    with torch.device("meta"):
        models["unet"] = UNet2DConditionModel(**ucfg)
        models["text_encoder"] = CLIPTextModel(CLIPTextConfig(**_load_config(name, "text_encoder")))
        if FAMILY[name] == "sdxl":
            models["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig(**_load_config(name, "text_encoder_2")))
    modules: dict[str, list[int]] = {}
    trees: dict[str, list] = {}
    for part, model in models.items():
        tree = []
        for path, mod in model.named_modules():
            tree.append([path, type(mod).__name__, isinstance(mod, torch.nn.Linear)])
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                modules[canonical(part, path)] = [int(s) for s in mod.weight.shape]
        trees[part] = tree
    return {"modules": modules, "unet_config": ucfg, "trees": trees}


@functools.lru_cache(maxsize=None)
def get_arch(name: str) -> Arch:
    """The module list of ``name``: built once on the meta device, then cached as JSON on disk
    (keyed by the configs and the torch/diffusers/transformers versions), so later processes need
    not import diffusers to map names."""
    if name not in ARCHS:
        raise FormatError(f"unknown architecture {name!r} (one of {', '.join(ARCHS)})")
    data = None
    try:
        cache = _cache_file(name)
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        cache = locals().get("cache")
    if not isinstance(data, dict) or set(data) != {"modules", "unet_config", "trees"}:
        data = _build_arch_data(name)
        if cache is not None:
            try:
                from lorahub.fsutil import atomic_write_text

                atomic_write_text(cache, json.dumps(data))
            except OSError:  # a read-only cache only costs speed
                pass
    return Arch(name=name, family=FAMILY[name],
                modules={k: tuple(v) for k, v in data["modules"].items()},
                unet_config=data["unet_config"],
                trees={p: [(a, b, bool(c)) for a, b, c in t] for p, t in data["trees"].items()})


# ----------------------------------------------------------------------------------------------
# canonical spelling

def canonical(part: str, path: str) -> str:
    """Canonical name of module ``path`` of ``part`` (adds ``text_model.`` for text encoders)."""
    if part in ("text_encoder", "text_encoder_2") and not path.startswith(("text_model.", "text_projection")):
        path = "text_model." + path
    return f"{part}.{path}"


def normalize(name: str) -> str:
    """Canonical spelling of a prefixed diffusers-style module name (accepts transformers-5 paths)."""
    part, _, rest = name.partition(".")
    if part in ("text_encoder", "text_encoder_2"):
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
# kohya names

def to_kohya(name: str, arch: Arch, *, sgm: bool = True) -> str:
    """kohya module name (without the ``.lora_down.weight`` suffix) of canonical ``name``.

    SDXL UNet names use the SGM layout unless ``sgm=False`` (some tools write diffusers paths)."""
    part, rest = split(name)
    if part == "unet":
        if arch.family == "sdxl" and sgm:
            rest = unet_to_sgm(rest, arch.unet_config)
        return "lora_unet_" + rest.replace(".", "_")
    if part == "text_encoder":
        prefix = "lora_te1_" if arch.family == "sdxl" else "lora_te_"
    elif part == "text_encoder_2":
        prefix = "lora_te2_"
    else:
        raise FormatError(f"{name}: no kohya name for part {part!r}")
    return prefix + rest.replace(".", "_")


def from_kohya(kname: str, arch: Arch) -> str | None:
    """Canonical name of kohya module ``kname`` in ``arch`` (None when it is not a module of ``arch``)."""
    table = arch.kohya_to_canonical()
    hit = table.get(kname)
    if hit is None and arch.family == "sdxl" and kname.startswith("lora_te_"):
        hit = table.get("lora_te1_" + kname[len("lora_te_"):])
    if hit is None and arch.family != "sdxl" and kname.startswith("lora_te1_"):
        hit = table.get("lora_te_" + kname[len("lora_te1_"):])
    if hit is None and kname.startswith("lora_unet_") and arch.family == "sdxl":
        # some tools write SDXL kohya names in the diffusers layout
        hit = _diffusers_kohya_table(arch.name).get(kname)
    return hit


@functools.lru_cache(maxsize=None)
def _diffusers_kohya_table(arch_name: str) -> dict[str, str]:
    arch = get_arch(arch_name)
    return {"lora_unet_" + split(n)[1].replace(".", "_"): n for n in arch.modules if n.startswith("unet.")}


# ----------------------------------------------------------------------------------------------
# architecture inference

def _order(base_hint: str | None) -> list[str]:
    fam = base_hint if base_hint in FAMILIES else None
    order = list(ARCHS)
    if fam:
        order.sort(key=lambda a: FAMILY[a] != fam)
    return order


def infer_arch(names_shapes: dict[str, tuple[int, ...]], *, kohya: bool = False,
               base_hint: str | None = None) -> Arch:
    """The architecture whose module list holds every name with a matching weight shape.

    ``names_shapes``: module name (canonical, or kohya when ``kohya``) -> weight shape (out, in[, kh, kw]).
    Shapes may be None to skip the check. Raises FormatError naming the closest candidate otherwise.
    """
    best = None
    for arch_name in _order(base_hint):
        arch = get_arch(arch_name)
        missing = 0
        bad_shape = 0
        for n, shape in names_shapes.items():
            c = from_kohya(n, arch) if kohya else normalize(n)
            if c is None or c not in arch.modules:
                missing += 1
                continue
            if shape is not None and not _shape_ok(arch.modules[c], shape):
                bad_shape += 1
        if missing == 0 and bad_shape == 0:
            return arch
        score = missing + bad_shape
        if best is None or score < best[0]:
            best = (score, arch_name, missing, bad_shape)
    if best is None:
        raise FormatError("no architectures available")
    _, arch_name, missing, bad_shape = best
    raise FormatError(f"the layers match no known model (closest: {arch_name}, {missing} unknown module(s), "
                      f"{bad_shape} shape mismatch(es)); is this a LoRA for another base model?")


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
