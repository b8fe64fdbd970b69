"""lorahub's vocabulary: the one home of every word the catalogue, the formats and the CLI share.

Standard library only (the catalogue commands import it and must start fast). Anything that names a
part, a LoRA type, a base family, a network kind, a file dialect, a lineage relation or a LoRA file
suffix takes it from here; anything that turns free text into a file name uses :func:`safe_filename`.
"""

from __future__ import annotations

import re

# Parts of a pipeline a LoRA can adapt, in canonical-key prefix form (``unet.…``, ``transformer.…``,
# ``text_encoder.…``): the diffusers pipeline's own component names.
PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")

# What an entry depicts (the registry's ``type`` column; the six categories LoRA sites use).
LORA_TYPES = ("character", "style", "pose", "clothing", "object", "concept")

# Base-model families a LoRA or checkpoint belongs to. ``unknown`` only when nothing says otherwise;
# every other family is ``other:<name>`` (``OTHER_BASE`` + a name of ``OTHER_FAMILIES`` or any lower-case
# slug the evidence gives). lorahub.formats.families holds the evidence rules.
BASES = ("sd1", "sd2", "sdxl", "sd3", "flux", "unknown")
FAMILIES = BASES[:-1]  # the known ones
OTHER_BASE = "other:"
OTHER_FAMILIES = ("flux2", "chroma", "qwen-image", "wan", "hunyuan-dit", "hunyuan-video", "pixart", "sana",
                  "auraflow", "lumina", "z-image", "hidream", "kolors", "cogview", "stable-cascade", "ltx-video",
                  "mochi", "cogvideox")

# The built-in tiny fixture pipelines (``lorahub.tiny``) and the family each belongs to.
TINY_MODELS = {"tiny-sd1": "sd1", "tiny-sdxl": "sdxl", "tiny-flux": "flux", "tiny-sd3": "sd3"}

# Architectures whose module lists ship with lorahub, as a cache of their derivation from published
# configs (lorahub.formats.names): layer names are matched against them when no model is at hand.
# Any other model's module list is derived from its own config when it is given.
ARCHS = ("sd1", "sd2", "sdxl") + tuple(TINY_MODELS) + ("flux", "sd3", "sd3.5-large")

# How kohya's ``ss_base_model_version`` and Stability's ModelSpec ``modelspec.architecture`` (LoRA
# adapters add ``/lora``) name each family, as lorahub writes them. For the DiT families these are
# the family-level words, which claim no variant: kohya sd-scripts writes "flux1" for FLUX.1
# (library/flux_utils.MODEL_VERSION_FLUX_V1) and, for SD3, the MMDiT's model type ("medium",
# "5-medium", "5-large"), where lorahub, not knowing which, writes "sd3"; the architectures are
# sai_model_spec's ARCH_SD3_M ("stable-diffusion-3", kohya appends "-<model type>") and
# ARCH_FLUX_1_UNKNOWN ("flux-1"; "flux-1-dev" / "flux-1-schnell" when known).
KOHYA_BASE_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1"}
MODELSPEC_ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                           "sdxl": "stable-diffusion-xl-v1-base", "sd3": "stable-diffusion-3", "flux": "flux-1"}

# Network kinds, as the registry stores them.
KINDS = ("lora", "locon", "loha", "lokr", "dora", "textual-inversion", "checkpoint")
NETWORK_KINDS = KINDS[:5]  # the LoRA / LyCORIS adapters (not embeddings, not full models)

# File dialects lorahub reads (``FORMATS``) and writes (``DIALECTS``).
FORMATS = ("kohya", "diffusers", "peft", "cloneofsimo", "lycoris", "embedding", "checkpoint",
           "xlabs", "bfl", "comfyui")  # the last three: Flux.1 LoRAs keyed by BFL module paths (read only)
DIALECTS = ("kohya", "diffusers", "peft")

# How an entry came from another (the ``lineage.relation`` column).
RELATIONS = ("converted-from", "extracted-from", "merged-from", "trained-from", "resized-from", "pulled-from")

# Floating-point storage types a user picks (short names, as lorahub writes and prints them) ...
DTYPES = ("fp32", "fp16", "bf16")
# ... every spelling lorahub accepts for them, and their torch names.
DTYPE_NAMES = {"fp16": "float16", "float16": "float16", "half": "float16",
               "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp32": "float32", "float32": "float32", "float": "float32"}

# File suffixes: what may hold a LoRA / embedding, and which of them are pickles (never unpickled).
# the largest integer lorahub takes anywhere (SQLite's INTEGER): every count, rank, size or seed fits
INT_LIMIT = 2**63 - 1

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
LORA_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES


def has_separator(ref: str) -> bool:
    """True when a reference holds a path separator: it can only be a path (names never hold one)."""
    return "/" in ref or "\\" in ref


def looks_like_path(ref: str) -> bool:
    """True when a reference is meant as a file path (a separator, or a LoRA file suffix), so a
    missing file is reported as such rather than as an unknown registry entry."""
    return has_separator(ref) or ref.lower().endswith(LORA_SUFFIXES)


def safe_filename(name: str, default: str = "lora", *, max_len: int = 150) -> str:
    """A file-name stem made from untrusted text (an entry name, a token): no path separators, no
    control characters, no leading dots, no ``..``; never empty."""
    s = re.sub(r"[^\w.\-()+\[\] ]", "_", str(name), flags=re.UNICODE)
    s = re.sub(r"\.{2,}", ".", s).strip(" ._")
    return s[:max_len] or default
