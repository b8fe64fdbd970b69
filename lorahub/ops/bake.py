"""Bake LoRAs into a full checkpoint: W = W0 + Σ αᵢ·ΔWᵢ, streamed one tensor at a time.

The merged update comes as a :class:`LoraModel` whose layers are exact factors of Σ αᵢ·ΔWᵢ (the
``concat`` merge): per layer only ΔW (out×in) is formed, added to W0 in fp32 and cast back to the
base tensor's own dtype. Tensors the LoRAs do not touch are copied byte for byte.

Output forms:
* a diffusers folder (from a diffusers folder): every file is copied, and the weight files of
  ``unet``, ``text_encoder``, ``text_encoder_2`` (each shard) are rewritten by a streaming
  safetensors writer (header first, then one tensor at a time: memory ≈ the largest tensor);
* a single ``.safetensors`` (from a single-file LDM/SGM checkpoint): same streaming rewrite with the
  canonical → original key map of :mod:`lorahub.ops.checkpoints`.

The recipe text is recorded in each rewritten file's header metadata (``lorahub.recipe``) and, for a
folder, in ``lorahub_recipe.toml`` next to ``model_index.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lorahub.errors import LorahubError
from lorahub.formats.canonical import LoraModel
from lorahub.formats.header import read_header

PART_DIRS = ("unet", "text_encoder", "text_encoder_2")
RECIPE_FILE = "lorahub_recipe.toml"

_ST_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}


@dataclass
class BakeReport:
    out: Path
    layers: int = 0  # weights changed
    files: list[str] = field(default_factory=list)
    dtypes: dict[str, str] = field(default_factory=dict)  # file -> dtype of the changed tensors

    def to_dict(self) -> dict:
        return {"out": str(self.out), "layers": self.layers, "files": self.files, "dtypes": self.dtypes}


# --------------------------------------------------------------------------------------------------
# Streaming safetensors rewrite


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def rewrite_safetensors(src: Path, dst: Path, updates: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                        metadata: dict[str, str] | None = None) -> list[str]:
    """Copy ``src`` to ``dst`` tensor by tensor; ``updates[key](W0) -> W`` replaces some tensors.

    Shapes and dtypes are kept (the update's result is cast back). The header is written first, so
    only one tensor is in memory at a time. ``dst`` is written directly: callers write into a
    temporary location and rename. Returns the keys that were updated.
    """
    from safetensors import safe_open

    hdr = read_header(src)
    missing = [k for k in updates if k not in hdr.tensors]
    if missing:
        raise LorahubError(f"{src}: no tensor {missing[0]!r}")
    meta = dict(hdr.metadata)
    if metadata:
        meta.update(metadata)
    # same order as the source data area
    keys = sorted(hdr.tensors, key=lambda k: hdr.tensors[k].start)
    header: dict = {"__metadata__": meta} if meta else {}
    off = 0
    for k in keys:
        info = hdr.tensors[k]
        header[k] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [off, off + info.nbytes]}
        off += info.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    done = []
    with open(src, "rb") as fin, open(dst, "wb") as fout, safe_open(str(src), framework="pt") as st:
        fout.write(len(raw).to_bytes(8, "little"))
        fout.write(raw)
        for k in keys:
            info = hdr.tensors[k]
            if k in updates:
                if info.dtype not in _ST_TO_TORCH:
                    raise LorahubError(f"{src}: {k} has dtype {info.dtype}; only float weights can be baked")
                w0 = st.get_tensor(k)
                w = updates[k](w0).to(w0.dtype)
                if tuple(w.shape) != tuple(info.shape):
                    raise LorahubError(f"{src}: {k}: update of shape {tuple(w.shape)} for a weight {info.shape}")
                data = _tensor_bytes(w)
                assert len(data) == info.nbytes
                fout.write(data)
                done.append(k)
            else:
                fin.seek(hdr.data_start + info.start)
                left = info.nbytes
                while left:
                    chunk = fin.read(min(left, 16 << 20))
                    if not chunk:
                        raise LorahubError(f"{src}: truncated tensor data")
                    fout.write(chunk)
                    left -= len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return done


# --------------------------------------------------------------------------------------------------
# ΔW of the merged model


def _delta_fn(layer, scale: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    def apply(w0: torch.Tensor) -> torch.Tensor:
        d = layer.delta(dtype=torch.float32) * scale
        if d.numel() != w0.numel():
            raise LorahubError(f"LoRA update of shape {tuple(d.shape)} does not fit a base weight "
                               f"{tuple(w0.shape)}: is the base the right model?")
        return w0.to(torch.float32) + d.reshape(w0.shape)
    return apply


def _module_key(name: str) -> str:
    """Normalise a module path for matching: drop transformers' optional ``text_model.``."""
    return name[len("text_model."):] if name.startswith("text_model.") else name


# --------------------------------------------------------------------------------------------------
# Diffusers folder


def bake_diffusers(base: Path, merged: LoraModel, out: Path, *, recipe_text: str = "",
                   on_file: Callable[[str], None] | None = None) -> BakeReport:
    """Write ``out`` = the diffusers folder ``base`` with ``merged``'s ΔW added (atomic folder rename)."""
    base, out = Path(base), Path(out)
    if not (base / "model_index.json").is_file():
        raise LorahubError(f"{base}: not a diffusers folder (no model_index.json)")
    if out.exists():
        raise LorahubError(f"{out}: already exists; choose a new output folder")
    by_part: dict[str, dict[str, object]] = {}
    for key, layer in merged.layers.items():
        part, _, mod = key.partition(".")
        if part not in PART_DIRS:
            raise LorahubError(f"{key}: unknown model part {part!r}")
        by_part.setdefault(part, {})[_module_key(mod)] = layer

    tmp = out.with_name(f".lorahub-tmp-{out.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    report = BakeReport(out=out)
    meta = {"lorahub.recipe": recipe_text} if recipe_text else {}
    try:
        weight_files: dict[Path, str] = {}
        for part in by_part:
            comp = base / part
            files = sorted(comp.glob("*.safetensors")) if comp.is_dir() else []
            if not files:
                raise LorahubError(f"{base}: the model has no {part}/*.safetensors weights to bake into")
            for f in files:
                weight_files[f] = part

        def ignore(folder, names):
            return [n for n in names if Path(folder, n) in weight_files]

        shutil.copytree(base, tmp, ignore=ignore)
        found: dict[str, set[str]] = {p: set() for p in by_part}
        for f, part in weight_files.items():
            hdr = read_header(f)
            layers = by_part[part]
            updates = {}
            for k in hdr.tensors:
                if not k.endswith(".weight"):
                    continue
                mk = _module_key(k[: -len(".weight")])
                if mk in layers:
                    updates[k] = _delta_fn(layers[mk])
                    found[part].add(mk)
            dst = tmp / f.relative_to(base)
            done = rewrite_safetensors(f, dst, updates, metadata=meta)
            report.layers += len(done)
            report.files.append(str(f.relative_to(base)))
            if done:
                report.dtypes[str(f.relative_to(base))] = hdr.tensors[done[0]].dtype
            if on_file:
                on_file(str(f.relative_to(base)))
        for part, layers in by_part.items():
            lost = sorted(set(layers) - found[part])
            if lost:
                raise LorahubError(f"{part}.{lost[0]}: no such weight in {base / part} "
                                   f"({len(lost)} layer(s) unmatched): is the base the right model?")
        if recipe_text:
            (tmp / RECIPE_FILE).write_text(recipe_text, encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


# --------------------------------------------------------------------------------------------------
# Single-file checkpoint


def bake_single_file(base: Path, merged: LoraModel, out: Path, *, recipe_text: str = "") -> BakeReport:
    """``out`` = the single-file checkpoint ``base`` with ΔW added, keys in the checkpoint's own naming."""
    from lorahub import fsutil

    try:
        from lorahub.ops import checkpoints
    except ImportError:
        raise LorahubError("baking into a single-file checkpoint needs lorahub.ops.checkpoints "
                           "(not available in this build); use a diffusers folder as the base") from None
    keymap = _single_file_keymap(checkpoints, base, merged)
    report = BakeReport(out=out)
    updates = {}
    for key, layer in merged.layers.items():
        if key not in keymap:
            raise LorahubError(f"{key}: no such weight in {base}: is the base the right model?")
        updates[keymap[key]] = _delta_fn(layer)
    meta = {"lorahub.recipe": recipe_text} if recipe_text else {}
    with fsutil.atomic_path(out) as tmp:
        done = rewrite_safetensors(base, tmp, updates, metadata=meta)
    report.layers = len(done)
    report.files.append(out.name)
    if done:
        report.dtypes[out.name] = read_header(base).tensors[done[0]].dtype
    return report


def _single_file_keymap(checkpoints, base: Path, merged: LoraModel) -> dict[str, str]:
    """canonical layer key -> weight key inside the single file, via lorahub.ops.checkpoints."""
    fn = getattr(checkpoints, "single_file_weight_keys", None)
    if fn is None:
        raise LorahubError("this build of lorahub.ops.checkpoints cannot map single-file keys; "
                           "use a diffusers folder as the base")
    return fn(base, list(merged.layers))


def bake(base: Path, merged: LoraModel, out: Path, *, recipe_text: str = "", on_file=None) -> BakeReport:
    """Dispatch on the base: a diffusers folder gives a folder, a .safetensors file gives a file."""
    base = Path(base)
    if base.is_dir():
        if Path(out).suffix == ".safetensors":
            raise LorahubError(f"{out}: the base is a diffusers folder, so the baked model is a folder; "
                               "give --out a folder name (without .safetensors)")
        return bake_diffusers(base, merged, Path(out), recipe_text=recipe_text, on_file=on_file)
    if base.suffix != ".safetensors":
        raise LorahubError(f"{base}: bake needs a diffusers folder or a .safetensors checkpoint")
    return bake_single_file(base, merged, Path(out), recipe_text=recipe_text)
