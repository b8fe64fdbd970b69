"""The one LoRA factory: small deterministic LoRA files and models for tests, benchmarks and ``lorahub demo``.

Three kinds of things, all deterministic per seed:

* **Canonical models** (torch): :func:`random_lora` — a plain LoRA with random factors on given
  module shapes; :func:`lora_file` writes one through lorahub's own writer in any dialect;
  :func:`pipeline_lora` — a random LoRA on a loaded diffusers pipeline's modules, plus the same LoRA as
  raw diffusers keys built here (so a test of the reader does not go through lorahub's writer).
* **Raw files** (numpy only, no torch import, key dicts built here rather than by lorahub's writers):
  :func:`kohya_tensors`, :func:`embedding_tensors`, :func:`save_tensors`, and :func:`kohya_file`, a small
  kohya LoRA with SD-shaped cross-attention factors (the registry's and the stress scripts' workhorse).
* **Tiny fixture files of every dialect** for the tiny fixture models: :func:`write_all` / :func:`ensure`.

``write_all(dest_dir) -> {name: path}`` writes, for ``tiny-sd1`` and ``tiny-sdxl``, files whose keys are
built here from raw key dicts (not through lorahub's writers, so they test the readers) using the tiny
models' real module paths:

=====================  ==========================================================================
name                   content
=====================  ==========================================================================
sd1-kohya              kohya LoRA, UNet attention + text encoder, rank 4, alpha 2, kohya metadata
sd1-diffusers          diffusers LoRA (``unet.…lora_A``/``text_encoder.…``), alpha in metadata
sd1-peft               PEFT adapter of the UNet (``base_model.model.…``), no part prefix
sd1-cloneofsimo        cloneofsimo ``unet:<i>:up`` … in the module-walk order, with a ``<s1>`` token
sd1-locon              kohya LoCon: attention + 3x3 ResNet convs (rank 4, alpha 4)
sd1-loha / sd1-lokr    LyCORIS LoHa / LoKr on attention layers
sd1-dora               kohya LoRA + ``dora_scale``
sd1-ti-webui           ``{"emb_params": (2, 32)}``;  sd1-ti-diffusers: ``{"<tinytok>": (32,)}``
sdxl-kohya             kohya LoRA with SGM-layout UNet names, ``lora_te1_`` + ``lora_te2_``
sdxl-diffusers         diffusers LoRA with ``text_encoder_2``
sdxl-ti                ``{"clip_l": (2, 32), "clip_g": (2, 32)}``
=====================  ==========================================================================

Every LoRA carries ``ss_network_dim``, ``ss_network_alpha``, ``ss_base_model_version`` and
``ss_tag_frequency`` with a clear trigger word (``tinychar`` for SD1, ``tinystyle`` for SDXL).
Fixed seeds: the same bytes on every run.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

VERSION = "2"  # 2: deterministic bytes (sorted headers)
RANK = 4
ALPHA = 2.0
TRIGGERS = {"sd1": "tinychar", "sdxl": "tinystyle"}


# ==================================================================================================
# Canonical models (torch)
# ==================================================================================================
def random_lora(layers: Mapping[str, Sequence[int]], seed: int = 0, rank: int = 4, alpha: float | None = None, *,
                scale: float = 0.1, fan_in: bool = False, base: str = "sd1", dtype=None,
                metadata: dict[str, str] | None = None):
    """A plain LoRA (canonical :class:`~lorahub.formats.canonical.LoraModel`) with a layer on every
    ``canonical name: weight shape`` of ``layers`` — ``(out, in)`` or ``(out, in, kh, kw)`` (convs: ``down``
    is ``(r, in, kh, kw)``, ``up`` ``(out, r, 1, 1)``). Factors are N(0, scale²), drawn layer by layer, ``down``
    first; ``fan_in`` draws ``down`` as N(0, 1/fan-in) instead (SD-sized layers keep a sane ΔW).
    ``dtype`` casts the factors (default float32)."""
    import math

    import torch

    from lorahub.formats.canonical import LoraLayer, LoraModel

    gen = torch.Generator().manual_seed(seed)
    m = LoraModel(base=base, metadata=dict(metadata or {}))
    for key, shape in layers.items():
        out, *rest = shape
        down = torch.randn(rank, *rest, generator=gen)
        down = down / math.sqrt(math.prod(rest)) if fan_in else down * scale
        up = torch.randn(out, rank, *([1, 1] if len(shape) == 4 else []), generator=gen) * scale
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        m.layers[key] = LoraLayer("lora", {"down": down, "up": up}, alpha=alpha)
    return m


def lora_file(path: str | os.PathLike, layers: Mapping[str, Sequence[int]], seed: int = 0, rank: int = 4,
              alpha: float | None = None, *, dialect: str = "kohya", **kwargs) -> Path:
    """:func:`random_lora` (``kwargs`` go to it) written to ``path`` as ``dialect`` by lorahub's own writer."""
    from lorahub.formats.io import save_lora

    return save_lora(random_lora(layers, seed, rank, alpha, **kwargs), path, dialect=dialect)


def module_shapes(root, part: str, keep: Callable[[str], bool] = lambda path: True) -> dict[str, tuple]:
    """``{canonical name: weight shape}`` of the Linear and 1×1-conv modules of ``root`` (the ``part`` of a
    pipeline: ``unet``, ``text_encoder``, …) whose module path passes ``keep``."""
    return {k: shape for k, (_, shape) in _module_targets(root, part, keep).items()}


def _module_targets(root, part: str, keep: Callable[[str], bool]) -> dict[str, tuple[str, tuple]]:
    """canonical name -> (module path, weight shape) of root's Linear / 1×1-conv modules passing keep."""
    import torch

    from lorahub.formats.names import canonical

    out = {}
    for path, m in root.named_modules():
        if not keep(path):
            continue
        if isinstance(m, torch.nn.Linear):
            out[canonical(part, path)] = (path, (m.out_features, m.in_features))
        elif isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1):
            out[canonical(part, path)] = (path, (m.out_channels, m.in_channels, 1, 1))
    return out


def _default_keep() -> dict[str, Callable[[str], bool]]:
    return {"unet": lambda p: "attentions" in p,
            "text_encoder": lambda p: "self_attn" in p or "mlp" in p,
            "text_encoder_2": lambda p: "self_attn" in p}


def pipeline_lora(pipe, seed: int = 0, *, rank: int = 4, scale: float = 0.3, fan_in: bool = False,
                  keep: Mapping[str, Callable[[str], bool]] | None = None):
    """A random plain LoRA on a loaded diffusers pipeline: ``(LoraModel, raw diffusers tensors)``.

    Layers go on the Linear and 1×1-conv modules of every ``part: predicate(module path)`` of ``keep``
    (default: the UNet's attention blocks, the first text encoder's ``self_attn``/``mlp`` and the second's
    ``self_attn``; parts the pipeline lacks are skipped). The raw dict holds the same factors under
    diffusers keys (``unet.<path>.lora_A.weight`` / ``lora_B``), built here and not by lorahub's writers.
    Factors as in :func:`random_lora` (alpha = rank)."""
    targets: dict[str, tuple[str, tuple]] = {}
    for part, pred in (keep or _default_keep()).items():
        root = getattr(pipe, part, None)  # a diffusers pipeline: SD1 has no text_encoder_2
        if root is not None:
            targets |= {k: (f"{part}.{path}", shape) for k, (path, shape) in _module_targets(root, part, pred).items()}
    model = random_lora({k: shape for k, (_, shape) in targets.items()}, seed, rank, scale=scale, fan_in=fan_in,
                        base="unknown")
    raw = {}
    for key, layer in model.layers.items():
        raw[f"{targets[key][0]}.lora_A.weight"] = layer.down.clone()
        raw[f"{targets[key][0]}.lora_B.weight"] = layer.up.clone()
    return model, raw


# ==================================================================================================
# Raw files (numpy; no torch)
# ==================================================================================================
SD1_CROSS_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
SD1_SELF_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"

# A few kohya module names of the tiny SD1 pipeline (32-wide attention and text encoder) and their shapes.
TINY_SD1_KOHYA = {
    SD1_SELF_Q: (32, 32),
    SD1_CROSS_K: (32, 32),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (32, 32),
}


def kohya_tensors(modules: Mapping[str, Sequence[int]], *, rank: int = 4, alpha: float | None = None, seed=0,
                  dtype: str = "float16", scale: float = 1.0, up_scale: float | None = None,
                  algo: str = "lora") -> dict:
    """Raw kohya tensors (numpy arrays) for ``{kohya module name: weight shape}``.

    ``algo="lora"``: ``lora_down.weight`` (r, in[, kh, kw]) and ``lora_up.weight`` (out, r[, 1, 1]);
    ``algo="loha"``: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in), ``hada_w2_a``, ``hada_w2_b`` (Linear shapes).
    Every module gets an ``alpha`` scalar (default: the rank). Factors are N(0, scale²) (``up_scale`` for
    ``lora_up`` when given), drawn module by module; ``seed`` may be a ``numpy.random.Generator`` to share
    one stream across calls."""
    import numpy as np

    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    t = {}
    for name, shape in modules.items():
        out, inn, *k = shape
        if algo == "lora":
            t[f"{name}.lora_down.weight"] = (rng.standard_normal((rank, inn, *k)) * scale).astype(dt)
            up = rng.standard_normal((out, rank, *([1, 1] if k else [])))
            t[f"{name}.lora_up.weight"] = (up * (scale if up_scale is None else up_scale)).astype(dt)
        elif algo == "loha":
            for key, shp in (("hada_w1_a", (out, rank)), ("hada_w1_b", (rank, inn)),
                             ("hada_w2_a", (out, rank)), ("hada_w2_b", (rank, inn))):
                t[f"{name}.{key}"] = (rng.standard_normal(shp) * scale).astype(dt)
        else:
            raise ValueError(f"unknown algo {algo!r}")
        t[f"{name}.alpha"] = np.array(float(rank) if alpha is None else alpha, dtype=dt)
    return t


def embedding_tensors(keys: Sequence[str] = ("emb_params",), vectors: int = 2, width: int = 32, seed=0) -> dict:
    """A raw textual-inversion file's tensors: ``(vectors, width)`` float32 rows under every key
    (webui: ``emb_params``; SDXL: ``clip_l`` + ``clip_g``)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal((vectors, width)).astype(np.float32) for k in keys}


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Write numpy ``tensors`` to ``path`` as safetensors (parent folders created); returns the path."""
    from safetensors.numpy import save

    from lorahub.formats.header import canonical_bytes

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(canonical_bytes(save(tensors, metadata=metadata)))  # the same bytes every time
    return p


def kohya_file(path: str | os.PathLike, *, rank: int = 4, seed: int = 0, meta: dict[str, str] | None = None,
               width: int = 768, extra_rank: int | None = None) -> Path:
    """A small fp16 kohya LoRA with SD-shaped attention factors: cross-attention ``to_k`` (320, ``width``)
    at ``rank`` and self-attention ``to_q`` (320, 320) at ``extra_rank`` (default ``rank``), alpha rank/2
    each. ``width`` is the text-encoder width the shapes name: 768 → sd1, 1024 → sd2, anything else → no
    base from the shapes. The same ``seed`` gives the same tensors (the metadata may differ)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    r2 = extra_rank or rank
    t = kohya_tensors({SD1_CROSS_K: (320, width)}, rank=rank, alpha=rank / 2, seed=rng)
    t |= kohya_tensors({SD1_SELF_Q: (320, 320)}, rank=r2, alpha=r2 / 2, seed=rng)
    return save_tensors(path, t, meta)


# ==================================================================================================
# LoRAs at the real shapes of DiT families (Flux.1, SD3): module lists, raw tensors
# ==================================================================================================
# kohya sd-scripts' Flux.1 names follow the BFL layout (facts in FORMATS.md): fused q/k/v, and in single
# blocks q/k/v + MLP fused in linear1. (out, in) at width 3072.
FLUX_DOUBLE = {"img_attn_qkv": (9216, 3072), "img_attn_proj": (3072, 3072), "img_mlp_0": (12288, 3072),
               "img_mlp_2": (3072, 12288), "img_mod_lin": (18432, 3072),
               "txt_attn_qkv": (9216, 3072), "txt_attn_proj": (3072, 3072), "txt_mlp_0": (12288, 3072),
               "txt_mlp_2": (3072, 12288), "txt_mod_lin": (18432, 3072)}
FLUX_SINGLE = {"linear1": (21504, 3072), "linear2": (3072, 15360), "modulation_lin": (9216, 3072)}
ATTENTION = ("img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "txt_attn_proj", "linear1", "linear2")


def scan_library(folder: str | os.PathLike, n: int, seed: int = 0) -> list[Path]:
    """``n`` small kohya LoRA files as a scan meets them (the registry and detection benchmarks'
    library): 4-23 SD1 attention modules each (12-69 tensors, 20-200 KB), rank 2/4/8/16 with alpha
    rank/2, kohya metadata, ten sub-folders. Returns the paths, sorted."""
    import numpy as np

    mods_all = [f"lora_unet_down_blocks_{b}_attentions_{a}_transformer_blocks_0_{m}"
                for b in range(3) for a in range(2) for m in ("attn1_to_q", "attn1_to_k", "attn2_to_k", "attn2_to_v")]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        rank = int(rng.choice([2, 4, 8, 16]))
        mods = {m: (320, 768 if "attn2" in m else 320) for m in mods_all[: 4 + i % 20]}
        out.append(save_tensors(Path(folder) / f"d{i % 10}" / f"lora_{i:04d}.safetensors",
                                kohya_tensors(mods, rank=rank, alpha=rank / 2, seed=rng),
                                {"ss_network_dim": str(rank), "ss_output_name": f"lora_{i:04d}",
                                 "ss_tag_frequency": '{"5_x": {"zkz%d": 5, "tag": 2}}' % i}))
    return sorted(out)


def flux_kohya_modules(double: int = 19, single: int = 38, kinds: Sequence[str] = ATTENTION) -> dict[str, tuple]:
    """``{kohya module name: (out, in)}`` of a Flux.1 LoRA in kohya's BFL naming
    (``lora_unet_double_blocks_N_img_attn_qkv``, ``lora_unet_single_blocks_N_linear1``) on ``double`` +
    ``single`` blocks, for the module kinds of :data:`FLUX_DOUBLE` / :data:`FLUX_SINGLE` in ``kinds``."""
    out = {}
    for i in range(double):
        out |= {f"lora_unet_double_blocks_{i}_{k}": v for k, v in FLUX_DOUBLE.items() if k in kinds}
    for i in range(single):
        out |= {f"lora_unet_single_blocks_{i}_{k}": v for k, v in FLUX_SINGLE.items() if k in kinds}
    return out


def _dit_attention(path: str) -> bool:
    return bool(re.search(r"\.attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)$|\.proj_out$|\.proj_mlp$", path)) \
        and "transformer_blocks." in path


def dit_modules(arch: str = "flux", keep: Callable[[str], bool] = _dit_attention) -> dict[str, tuple]:
    """``{canonical name: (out, in)}`` of the ``transformer`` modules of a built-in DiT architecture
    (``flux``: FLUX.1-dev, ``sd3``: SD3-medium, ``sd3.5-large``), derived from its published config on
    the meta device (:mod:`lorahub.formats.names`), whose module path passes ``keep`` (default: the
    attention projections of every block, and the single blocks' ``proj_mlp``/``proj_out``)."""
    from lorahub.formats.names import get_arch

    return {k: v for k, v in get_arch(arch).modules.items()
            if k.startswith("transformer.") and keep(k.split(".", 1)[1])}


def diffusers_tensors(modules: Mapping[str, Sequence[int]], *, rank: int = 4, seed=0, dtype: str = "float16",
                      scale: float = 1.0) -> dict:
    """Raw diffusers/PEFT tensors (numpy) for ``{prefixed module path: (out, in)}``:
    ``<path>.lora_A.weight`` (r, in) and ``<path>.lora_B.weight`` (out, r), N(0, scale²), alpha = rank."""
    import numpy as np

    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    t = {}
    for name, (out, inn) in modules.items():
        t[f"{name}.lora_A.weight"] = (rng.standard_normal((rank, inn)) * scale).astype(dt)
        t[f"{name}.lora_B.weight"] = (rng.standard_normal((out, rank)) * scale).astype(dt)
    return t


# ==================================================================================================
# Tiny fixture files of every dialect (write_all / ensure)
# ==================================================================================================
# SGM (original) layout of the tiny SDXL UNet's attention blocks (layers_per_block = 1), written out by
# hand here so the files test lorahub.formats.names' generated map rather than reuse it.
_TINY_SDXL_SGM = {
    "down_blocks.1.attentions.0.": "input_blocks.3.1.",
    "mid_block.attentions.0.": "middle_block.1.",
    "up_blocks.0.attentions.0.": "output_blocks.0.1.",
    "up_blocks.0.attentions.1.": "output_blocks.1.1.",
}


def sd15_targets() -> list[tuple[str, tuple]]:
    """(canonical name, weight shape) of the modules a default kohya SD1.5 LoRA adapts: the UNet's
    attention blocks (192 linears) and the text encoder's attention and MLP linears (72)."""
    from lorahub.formats.names import get_arch

    arch = get_arch("sd1")
    unet = [(k, s) for k, s in arch.modules.items() if k.startswith("unet.") and ".attentions." in k]
    te = [(k, s) for k, s in arch.modules.items()
          if k.startswith("text_encoder.") and (".self_attn." in k or ".mlp." in k)]
    assert len(unet) == 192 and len(te) == 72, (len(unet), len(te))
    return unet + te


def flux_injected_deltas(transformer, path: str | os.PathLike, prefix: str = "transformer.") -> dict:
    """Load the diffusers Flux LoRA file ``path`` into ``transformer`` (a FluxTransformer2DModel) as
    ``FluxPipeline.load_lora_weights`` does; the ΔW = lora_B·lora_A·scaling (float64) peft injected into
    each module, keyed by ``prefix`` + its module path (the canonical key with the default prefix)."""
    import warnings

    import torch
    from diffusers import FluxPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd, meta = FluxPipeline.lora_state_dict(str(path), return_lora_metadata=True)
        FluxPipeline.load_lora_into_transformer(sd, transformer=transformer, adapter_name="x", metadata=meta,
                                                network_alphas=None)
    out = {}
    with torch.no_grad():
        for name, mod in transformer.named_modules():
            if hasattr(mod, "lora_A") and "x" in mod.lora_A:
                out[prefix + name] = (mod.lora_B["x"].weight.double() @ mod.lora_A["x"].weight.double()
                                      * mod.scaling["x"])
    return out


def _gen(seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1):
        return (torch.randn(*shape, generator=g) * scale).float()

    return rand


def _models(kind: str):
    """The tiny UNet and text encoder(s) of ``kind`` built on the meta device (module tree only)."""
    import torch

    with torch.device("meta"):
        unet = _meta_unet(kind)
        tes = {"text_encoder": _meta_te(False)}
        if kind == "sdxl":
            tes["text_encoder_2"] = _meta_te(True)
    return unet, tes


def _meta_unet(kind):
    from diffusers import UNet2DConditionModel

    from lorahub import tiny

    return UNet2DConditionModel(**tiny._config(f"{kind}_unet"))


def _meta_te(with_projection):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lorahub import tiny

    cfg = CLIPTextConfig(**tiny._config("clip_text"))
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _attn_linears(unet):
    """(path, out, in) of the Linear/1x1 modules kohya targets in transformer blocks (and proj_in/out)."""
    import torch

    out = []
    for path, m in unet.named_modules():
        if ".attentions." not in f".{path}" and not path.startswith("mid_block.attentions"):
            continue
        if isinstance(m, torch.nn.Linear):
            out.append((path, m.out_features, m.in_features, None))
        elif isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1):
            out.append((path, m.out_channels, m.in_channels, (1, 1)))
    return out


def _te_linears(te):
    import torch

    out = []
    for path, m in te.named_modules():
        if isinstance(m, torch.nn.Linear) and (".self_attn." in path or ".mlp." in path):
            p = path if path.startswith("text_model.") else "text_model." + path
            out.append((p, m.out_features, m.in_features, None))
    return out


def _resnet_convs(unet):
    import torch

    return [(p, m.out_channels, m.in_channels, m.kernel_size) for p, m in unet.named_modules()
            if isinstance(m, torch.nn.Conv2d) and ".resnets." in p and m.kernel_size == (3, 3)]


def _kohya_unet_name(path: str, kind: str) -> str:
    if kind == "sdxl":
        for k, v in _TINY_SDXL_SGM.items():
            if path.startswith(k):
                path = v + path[len(k):]
                break
        else:
            raise ValueError(f"no SGM name written for {path}")
    return "lora_unet_" + path.replace(".", "_")


def _meta(kind: str, network_module: str = "networks.lora", dim=RANK, alpha=ALPHA, extra: dict | None = None):
    trig = TRIGGERS[kind]
    m = {
        "ss_network_module": network_module,
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sd_v1" if kind == "sd1" else "sdxl_base_v1-0",
        "ss_output_name": f"tiny-{kind}",
        "ss_tag_frequency": json.dumps({f"10_{trig}": {trig: 12, "1girl": 5, "smile": 3}}),
        "ss_resolution": "(64, 64)",
        "ss_num_epochs": "2",
        "ss_learning_rate": "0.0001",
        "modelspec.architecture": ("stable-diffusion-v1/lora" if kind == "sd1"
                                   else "stable-diffusion-xl-v1-base/lora"),
        "modelspec.title": f"tiny {kind} test LoRA",
    }
    m.update(extra or {})
    return m


def _lora_pair(rand, out_f, in_f, k, r=RANK):
    if k is None:
        return rand(r, in_f), rand(out_f, r)
    return rand(r, in_f, *k), rand(out_f, r, 1, 1)


def kohya_dict(kind: str, seed: int = 0, conv: bool = False) -> dict:
    import torch

    rand = _gen(seed)
    unet, tes = _models(kind)
    sd = {}
    mods = [(_kohya_unet_name(p, kind), o, i, k) for p, o, i, k in _attn_linears(unet)]
    if conv:
        assert kind == "sd1"
        mods += [(_kohya_unet_name(p, kind), o, i, k) for p, o, i, k in _resnet_convs(unet)]
    prefixes = {"text_encoder": "lora_te_" if kind == "sd1" else "lora_te1_", "text_encoder_2": "lora_te2_"}
    for part, te in tes.items():
        mods += [(prefixes[part] + p.replace(".", "_"), o, i, k) for p, o, i, k in _te_linears(te)]
    for name, o, i, k in mods:
        down, up = _lora_pair(rand, o, i, k)
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.lora_up.weight"] = up
        sd[f"{name}.alpha"] = torch.tensor(ALPHA if not conv else float(RANK))
    return sd


def write_all(dest_dir: str | os.PathLike) -> dict[str, Path]:
    """Write every tiny LoRA file into ``dest_dir``; returns ``{name: path}``."""
    import torch

    from lorahub.formats.io import safetensors_bytes
    from lorahub.fsutil import atomic_write_bytes

    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def save(name, sd, meta=None):  # deterministic bytes: two calls write identical files
        p = dest / f"tiny-{name}.safetensors"
        atomic_write_bytes(p, safetensors_bytes(sd, meta))
        out[name] = p

    # --- SD1 -------------------------------------------------------------------------------
    save("sd1-kohya", kohya_dict("sd1", 1), _meta("sd1"))
    save("sd1-locon", kohya_dict("sd1", 2, conv=True),
         _meta("sd1", "lycoris.kohya", alpha=float(RANK), extra={"ss_network_args": json.dumps(
             {"conv_dim": str(RANK), "conv_alpha": str(RANK), "algo": "locon"})}))

    unet, tes = _models("sd1")
    rand = _gen(3)
    diff = {}
    alpha_cfg = {}
    for part, mods in (("unet", _attn_linears(unet)), ("text_encoder", _te_linears(tes["text_encoder"]))):
        for p, o, i, k in mods:
            down, up = _lora_pair(rand, o, i, k)
            diff[f"{part}.{p}.lora_A.weight"] = down
            diff[f"{part}.{p}.lora_B.weight"] = up
        tm = sorted(p.removeprefix("text_model.") for p, *_ in mods)
        alpha_cfg.update({f"{part}.r": RANK, f"{part}.lora_alpha": ALPHA, f"{part}.target_modules": tm,
                          f"{part}.rank_pattern": {}, f"{part}.alpha_pattern": {}, f"{part}.use_dora": False,
                          f"{part}.lora_bias": False})
    save("sd1-diffusers", diff, {"format": "pt", "lora_adapter_metadata": json.dumps(alpha_cfg, indent=2,
                                                                                       sort_keys=True),
                                 "modelspec.trigger_phrase": TRIGGERS["sd1"],
                                 "modelspec.architecture": "stable-diffusion-v1/lora"})

    rand = _gen(4)
    peft = {}
    for p, o, i, k in _attn_linears(unet):
        down, up = _lora_pair(rand, o, i, k)
        peft[f"base_model.model.{p}.lora_A.weight"] = down
        peft[f"base_model.model.{p}.lora_B.weight"] = up
    save("sd1-peft", peft)

    # cloneofsimo: walk modules, keep Attention/GEGLU ancestors, their nn.Linear children in order
    rand = _gen(5)
    clone = {}
    cmeta = {"unet": json.dumps(["CrossAttention", "Attention", "GEGLU"]),
             "text_encoder": json.dumps(["CLIPAttention"])}
    for part, model, targets in (("unet", unet, {"Attention", "GEGLU"}),
                                 ("text_encoder", tes["text_encoder"], {"CLIPAttention"})):
        i = 0
        for anc in model.modules():
            if type(anc).__name__ not in targets:
                continue
            for _, m in anc.named_modules():
                if isinstance(m, torch.nn.Linear):
                    clone[f"{part}:{i}:down"] = rand(RANK, m.in_features).half()
                    clone[f"{part}:{i}:up"] = rand(m.out_features, RANK).half()
                    cmeta[f"{part}:{i}:rank"] = str(RANK)
                    i += 1
    clone["<s1>"] = rand(32, scale=1.0)
    cmeta["<s1>"] = "<embed>"
    save("sd1-cloneofsimo", clone, cmeta)

    # LyCORIS on the attention projections (Linear only)
    rand = _gen(6)
    loha, lokr, dora = {}, {}, {}
    for p, o, i, k in _attn_linears(unet):
        if k is not None:
            continue
        n = _kohya_unet_name(p, "sd1")
        loha[f"{n}.hada_w1_a"], loha[f"{n}.hada_w1_b"] = rand(o, RANK), rand(RANK, i)
        loha[f"{n}.hada_w2_a"], loha[f"{n}.hada_w2_b"] = rand(o, RANK), rand(RANK, i)
        loha[f"{n}.alpha"] = torch.tensor(ALPHA)
        # LoKr: w1 (f, f) full, w2 factored (o/f, r) @ (r, i/f), f = 4
        f = 4
        lokr[f"{n}.lokr_w1"] = rand(f, f, scale=1.0)
        lokr[f"{n}.lokr_w2_a"], lokr[f"{n}.lokr_w2_b"] = rand(o // f, 2), rand(2, i // f)
        lokr[f"{n}.alpha"] = torch.tensor(ALPHA)
        down, up = _lora_pair(rand, o, i, None)
        dora[f"{n}.lora_down.weight"], dora[f"{n}.lora_up.weight"] = down, up
        dora[f"{n}.alpha"] = torch.tensor(ALPHA)
        dora[f"{n}.dora_scale"] = 1.0 + rand(1, i)
    save("sd1-loha", loha, _meta("sd1", "lycoris.kohya", extra={"ss_network_args": '{"algo": "loha"}'}))
    save("sd1-lokr", lokr, _meta("sd1", "lycoris.kohya", extra={"ss_network_args": '{"algo": "lokr"}'}))
    save("sd1-dora", dora, _meta("sd1", extra={"ss_network_args": '{"dora_wd": "True"}'}))

    rand = _gen(7)
    save("sd1-ti-webui", {"emb_params": rand(2, 32, scale=1.0)}, {"name": "tinytok"})
    save("sd1-ti-diffusers", {"<tinytok>": rand(32, scale=1.0)})

    # --- SDXL ------------------------------------------------------------------------------
    save("sdxl-kohya", kohya_dict("sdxl", 11), _meta("sdxl"))
    xunet, xtes = _models("sdxl")
    rand = _gen(12)
    diff = {}
    for part, mods in (("unet", _attn_linears(xunet)), ("text_encoder", _te_linears(xtes["text_encoder"])),
                       ("text_encoder_2", _te_linears(xtes["text_encoder_2"]))):
        for p, o, i, k in mods:
            down, up = _lora_pair(rand, o, i, k)
            diff[f"{part}.{p}.lora_A.weight"] = down
            diff[f"{part}.{p}.lora_B.weight"] = up
    save("sdxl-diffusers", diff, {"format": "pt", "modelspec.trigger_phrase": TRIGGERS["sdxl"],
                                  "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    save("sdxl-ti", {"clip_l": rand(2, 32, scale=1.0), "clip_g": rand(2, 32, scale=1.0)})
    return out


def ensure() -> dict[str, Path]:
    """The tiny LoRA files in a shared cache folder (written once, then reused): ``{name: path}``."""
    import hashlib

    from lorahub import tiny

    key = hashlib.sha256(f"{VERSION}/{tiny._fingerprint()}".encode()).hexdigest()[:12]
    folder = tiny.cache_root() / f"loras-{key}"
    done = folder / "index.json"
    if done.exists():
        index = json.loads(done.read_text())
        paths = {k: folder / v for k, v in index.items()}
        if all(p.exists() for p in paths.values()):
            return paths
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    paths = write_all(tmp)
    (tmp / "index.json").write_text(json.dumps({k: p.name for k, p in paths.items()}, indent=1))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process won the race: use its folder
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    index = json.loads(done.read_text())
    return {k: folder / v for k, v in index.items()}
