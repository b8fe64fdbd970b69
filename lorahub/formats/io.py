"""Read any LoRA dialect into the canonical :class:`LoraModel`, and write one back.

``load_lora(path, arch=None)`` detects the dialect from the header (:func:`lorahub.formats.detect.detect`)
and reads the tensors exactly as stored (dtype included). ``save_lora(model, path, dialect, dtype)`` writes
``kohya`` (also LyCORIS / DoRA / bundled embeddings, natively), ``diffusers`` or ``peft``, atomically.
A→B→A gives the same tensors bit for bit and the same metadata: what a writer adds for its dialect is
recorded in the ``lorahub`` metadata field and removed again when read.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from lorahub.errors import FormatError, LorahubError
from lorahub.formats.canonical import LoraModel
from lorahub.formats.header import TORCH_NAMES
from lorahub.vocab import DIALECTS, DTYPE_NAMES, DTYPES, PICKLE_SUFFIXES


def parse_dtype(dtype) -> torch.dtype | None:
    """The torch dtype of a storage type name (fp16, bf16, fp32 and their aliases); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, DTYPE_NAMES[str(dtype).lower()])
    except KeyError:
        raise LorahubError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The short name (fp16 | bf16 | fp32) of a floating-point torch dtype; fp32 for any other."""
    return next((n for n in DTYPES if getattr(torch, DTYPE_NAMES[n]) == dtype), "fp32")


def check_dialect(dialect: str) -> str:
    """``dialect`` when lorahub writes it (kohya | diffusers | peft), else a LorahubError."""
    if dialect not in DIALECTS:
        raise LorahubError(f"unknown dialect {dialect!r} (one of {', '.join(DIALECTS)})")
    return dialect


def _read_tensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    from lorahub.formats.pickle_safe import ZIP_MAGIC, load_tensors

    if p.suffix.lower() in PICKLE_SUFFIXES:
        with open(p, "rb") as f:
            if f.read(len(ZIP_MAGIC)) == ZIP_MAGIC:
                tensors, strings = load_tensors(p)
                return tensors, {}, strings
    from safetensors.torch import load_file

    from lorahub.formats.header import read_header

    header = read_header(p)  # hostile-safe validation first
    try:
        tensors = load_file(str(p))
    except Exception as exc:
        raise FormatError(f"{p.name}: unreadable safetensors data ({str(exc).splitlines()[0][:120]})") from None
    return tensors, dict(header.metadata), {}


def load_lora(path: str | os.PathLike, *, arch=None) -> LoraModel:
    """Read a LoRA / LyCORIS / embedding file of any supported dialect into canonical form.

    ``arch``: the architecture the names belong to — an :class:`lorahub.formats.names.Arch` (e.g. a base
    model's own, :func:`lorahub.formats.names.arch_of_folder`) or a built-in name; by default a built-in
    one is inferred from names and shapes. kohya names no module list holds are kept as unmapped keys
    (``model.notes`` says which and why): every factor operation still works on them."""
    from lorahub.formats import cloneofsimo, diffusers_fmt, embeddings, kohya
    from lorahub.formats.detect import detect

    p = Path(path)
    det = detect(p)
    name = p.name
    if det.format == "checkpoint":
        raise FormatError(f"{name}: is a full model checkpoint, not a LoRA")
    tensors, metadata, strings = _read_tensors(p)
    hint = det.base if det.base != "unknown" else None
    model = None
    if det.format in ("kohya", "lycoris", "peft") and arch is None and (hint or "").startswith("other:"):
        from lorahub.formats.dit import other

        # a newer DiT family: its diffusers loader converts the keys (None: it has none, or refuses them)
        model = other.read(hint, tensors, metadata, fmt=det.format, name=name)
    if model is not None:
        model.source_format = det.format
    elif det.format in ("kohya", "lycoris"):
        model = kohya.read(tensors, metadata, arch=arch, base_hint=hint, name=name)
        model.source_format = det.format
    elif det.format in ("diffusers", "peft"):
        model = diffusers_fmt.read(tensors, metadata, arch=arch, base_hint=hint, name=name)
    elif det.format == "cloneofsimo":
        if all(k.isdigit() for k in tensors):
            model = cloneofsimo.read_pt_list(tensors, name=name, arch=arch)
        else:
            model = cloneofsimo.read(tensors, metadata, arch=arch, base_hint=hint, name=name)
    elif det.format == "xlabs":
        from lorahub.formats.dit import flux

        model = flux.read_xlabs(tensors, metadata, name=name)
    elif det.format in ("bfl", "comfyui"):
        from lorahub.formats.dit import flux

        model = flux.read_bfl(tensors, metadata, name=name)
    elif det.format == "embedding":
        model = embeddings.read(tensors, metadata, strings=strings, stem=p.stem, name=name)
        if model.base == "unknown":
            model.base = det.base
    else:
        raise FormatError(f"{name}: format {det.format!r} cannot be loaded")
    if model.base == "unknown" and hint:  # the reader could not tell: the detected family holds
        model.base = hint
    return model


def check_finite(model: LoraModel) -> list[str]:
    """Names of layers / tokens holding NaN or Inf values."""
    bad = []
    for n, layer in model.layers.items():
        ts = list(layer.weights.values()) + ([layer.dora_scale] if layer.dora_scale is not None else [])
        if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in ts):
            bad.append(n)
        elif layer.alpha is not None and not math.isfinite(layer.alpha):
            bad.append(n)
    for tok, slots in model.embeddings.items():
        if any(not bool(torch.isfinite(t).all()) for t in slots.values()):
            bad.append(tok)
    return bad


def to_state_dict(model: LoraModel, dialect: str = "kohya", dtype=None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of ``model`` in ``dialect`` (what :func:`save_lora` writes)."""
    from lorahub.formats import diffusers_fmt, embeddings, kohya

    dt = parse_dtype(dtype)
    check_dialect(dialect)
    if not model.layers:
        return embeddings.write(model, dialect, dt)
    if dialect == "kohya":
        return kohya.write(model, dt)
    return diffusers_fmt.write(model, dt, dialect)


_ST_DTYPES = {getattr(torch, name): code for code, name in TORCH_NAMES.items()}


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file as bytes, deterministically: sorted metadata and names, tensors ordered by
    element size (largest first, so every tensor stays aligned) then name. The safetensors library
    writes metadata in hash-map order, so the same content would not give the same bytes (and sha256)."""
    import json

    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    chunks = []
    offset = 0
    for k in order:
        t = tensors[k].detach().to("cpu").contiguous()
        if t.dtype not in _ST_DTYPES:
            raise FormatError(f"tensor {k!r} has unsupported dtype {t.dtype}")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    hb = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    return len(hb).to_bytes(8, "little") + hb + b"".join(chunks)


def save_lora(model: LoraModel, path: str | os.PathLike, dialect: str = "kohya", dtype=None) -> Path:
    """Write ``model`` as ``dialect`` to ``path`` (safetensors, atomic, deterministic bytes)."""
    from lorahub.fsutil import atomic_write_bytes

    tensors, meta = to_state_dict(model, dialect, dtype)
    return atomic_write_bytes(path, safetensors_bytes(tensors, meta))
