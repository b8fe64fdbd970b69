"""Streaming, tensor-by-tensor access to full Stable Diffusion checkpoints.

Two storage layouts are read and written:

* a **diffusers folder**: ``unet/diffusion_pytorch_model.safetensors``, ``text_encoder/model.safetensors``,
  ``text_encoder_2/model.safetensors`` (each possibly sharded with a ``*.safetensors.index.json``, or
  stored as an ``fp16`` variant);
* a **single-file checkpoint** in the original layout: LDM for SD1/SD2
  (``model.diffusion_model.*``, ``cond_stage_model.transformer.*`` or OpenCLIP ``cond_stage_model.model.*``)
  and SGM for SDXL (``conditioner.embedders.0.transformer.*``, ``conditioner.embedders.1.model.*``);
* a **Flux.1 transformer in the BFL layout** (``double_blocks.N.img_attn.qkv.weight``,
  ``single_blocks.N.linear1.weight``; also under ComfyUI's ``model.diffusion_model.`` prefix): layout
  ``bfl``, whose tensors keep their BFL names (fused q/k/v stay fused); ``get`` / ``shape`` / ``in``
  also take the canonical transformer names (a read-only view: the rows of the fused weight, the
  adaLN halves swapped), so ``inspect --base`` and friends see the diffusers modules.

Every tensor that belongs to the UNet, a DiT transformer or a text encoder is exposed under its
*canonical* name (BFL files: their BFL name), the diffusers module path with a part prefix (the same keys LoRA layers use, plus ``.weight``/``.bias``)::

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight
    text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.weight

Tensors are read one at a time with positioned reads (no memory map, so reading a whole model never
makes the process hold it): peak memory stays near the largest tensor in use.

API::

    ck = open_checkpoint(path)        # folder or .safetensors file
    ck.family                         # sd1 | sd2 | sdxl | sd3 | flux | other:<name> | unknown
    ck.arch                           # module list from a folder's own configs (names.Arch)
    ck.layout                         # diffusers | ldm | sgm | bfl
    ck.keys(); ck.shape(name); ck.get(name, dtype=None)
    write_like(ck, dest, transform=fn, dtype=None)   # same layout, every tensor passed through fn
    save_single_file(ck, dest, transform=fn)         # UNet + text encoders in LDM/SGM layout
    ck.close()  (or use ``with open_checkpoint(p) as ck:``)

``transform(name, tensor) -> tensor`` sees canonical names and must keep the shape; tensors that have
no canonical name (VAE, EMA copies, ...) are copied through unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from lorahub.errors import FormatError, LorahubError
from lorahub.formats.header import FLOAT_DTYPES, TORCH_NAMES
from lorahub.formats.names import canonical, unet_from_ldm, unet_to_ldm
from lorahub.vocab import PARTS, PICKLE_SUFFIXES



def _torch_dtype(st: str):
    import torch

    try:
        return getattr(torch, TORCH_NAMES[st])
    except KeyError:
        raise FormatError(f"tensor dtype {st} is not supported") from None


def _st_dtype(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    for k, v in TORCH_NAMES.items():
        if v == name:
            return k
    raise FormatError(f"dtype {dtype} cannot be written to safetensors")


# --------------------------------------------------------------------------------------------------
# Raw safetensors files: positioned reads, streaming writes
# --------------------------------------------------------------------------------------------------
class _File:
    """One safetensors file read tensor by tensor (header parsed by the hostile-safe parser)."""

    def __init__(self, path: Path):
        from lorahub.formats.header import read_header

        self.path = Path(path)
        self.header = read_header(self.path)
        self._fh = open(self.path, "rb")

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def info(self, key: str):
        return self.header.tensors[key]

    def read(self, key: str):
        import torch

        info = self.header.tensors[key]
        buf = bytearray(info.nbytes)
        self._fh.seek(self.header.data_start + info.start)
        got = self._fh.readinto(memoryview(buf))
        if got != info.nbytes:
            raise FormatError(f"{self.path}: truncated tensor {key}")
        dt = _torch_dtype(info.dtype)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dt)
        return torch.frombuffer(buf, dtype=dt).reshape(info.shape)

    def close(self) -> None:
        try:
            self._fh.close()
        except OSError:
            pass


class StreamWriter:
    """Write a safetensors file whose tensor list (name, dtype, shape) is known up front, one tensor
    at a time, so that a whole model never has to be in memory. Use inside ``fsutil.atomic_path``."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        from lorahub.formats.header import DTYPE_SIZES

        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        off = 0
        self._expect: list[tuple[str, int]] = []
        for name, st, shape in entries:
            n = DTYPE_SIZES[st]
            for s in shape:
                n *= int(s)
            header[name] = {"dtype": st, "shape": [int(s) for s in shape], "data_offsets": [off, off + n]}
            self._expect.append((name, n))
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * ((8 - len(raw) % 8) % 8)
        self._fh = open(path, "wb")
        self._fh.write(len(raw).to_bytes(8, "little") + raw)
        self._i = 0

    def write(self, name: str, tensor) -> None:
        exp_name, exp_n = self._expect[self._i]
        if name != exp_name:
            raise AssertionError(f"stream writer expected {exp_name}, got {name}")
        t = tensor.detach().cpu().contiguous().reshape(-1)
        data = t.view(__import__("torch").uint8).numpy() if t.numel() else b""
        if len(memoryview(data).cast("B")) != exp_n:
            raise LorahubError(f"{name}: tensor size changed while writing (shape/dtype must be kept)")
        self._fh.write(memoryview(data).cast("B"))
        self._i += 1

    def close(self) -> None:
        if self._i != len(self._expect):
            self._fh.close()
            raise AssertionError("stream writer closed before every tensor was written")
        self._fh.flush()
        self._fh.close()


# --------------------------------------------------------------------------------------------------
# Key mapping: original LDM/SGM single-file layout <-> diffusers module paths
# (the UNet map lives in lorahub.formats.names: unet_to_ldm / unet_from_ldm)
# --------------------------------------------------------------------------------------------------
UNET_LDM_PREFIX = "model.diffusion_model."


_OPENCLIP_LAYER = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


@dataclass(frozen=True)
class Source:
    """Where a canonical tensor lives: file index, raw key, optional (index, count) slice along dim 0
    (OpenCLIP's fused q/k/v), optional transpose (OpenCLIP's text_projection)."""

    file: int
    key: str
    part: tuple[int, int] | None = None
    transpose: bool = False


def _openclip_map(rest: str, part: str, n_layers_keep: int | None):
    """Canonical name(s) of an OpenCLIP text-tower key (``rest`` after ``...model.``)."""
    tm = f"{part}.text_model."
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", rest)
    if m:
        n, r = int(m[1]), m[2]
        if n_layers_keep is not None and n >= n_layers_keep:
            return None
        base = f"{tm}encoder.layers.{n}."
        if r in ("attn.in_proj_weight", "attn.in_proj_bias"):
            suffix = "weight" if r.endswith("weight") else "bias"
            return [(f"{base}self_attn.{p}_proj.{suffix}", (i, 3), False) for i, p in enumerate("qkv")]
        for a, b in _OPENCLIP_LAYER.items():
            if r.startswith(a + "."):
                return [(base + b + r[len(a):], None, False)]
        return None
    if rest == "token_embedding.weight":
        return [(f"{tm}embeddings.token_embedding.weight", None, False)]
    if rest == "positional_embedding":
        return [(f"{tm}embeddings.position_embedding.weight", None, False)]
    if rest.startswith("ln_final."):
        return [(f"{tm}final_layer_norm.{rest[len('ln_final.'):]}", None, False)]
    if rest == "text_projection" and part == "text_encoder_2":
        return [(f"{part}.text_projection.weight", None, True)]
    return None


def _hf_text_name(part: str, key: str) -> str:
    """Canonical name of a transformers text-model key (CLIP towers with or without ``text_model.``;
    other text encoders, e.g. T5, as they are)."""
    if key.startswith("text_model.") or key.startswith("text_projection."):
        return f"{part}.{key}"
    return canonical(part, key)


# --------------------------------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------------------------------
class Checkpoint:
    """A full model opened for streaming reads; see the module docstring."""

    def __init__(self, path: Path, layout: str, files: list[_File], mapping: dict[str, Source],
                 family: str, layers_per_block: int | None = None):
        self.path = Path(path)
        self.layout = layout
        self.family = family
        self.layers_per_block = layers_per_block
        self._files = files
        self._map = mapping
        self._inverse: dict[tuple[int, str], list[str]] = {}
        for name, src in mapping.items():
            self._inverse.setdefault((src.file, src.key), []).append(name)
        self._arch = None
        self.arch_error: str | None = None

    @property
    def arch(self):
        """The model's architecture (:class:`lorahub.formats.names.Arch`), derived from a diffusers
        folder's own configs; None for a single file (its configs are not in it)."""
        if self._arch is None and self.layout == "diffusers" and self.arch_error is None:
            from lorahub.formats.names import arch_of_folder

            try:
                self._arch = arch_of_folder(self.path)
            except FormatError as exc:  # a folder whose configs build no model: names are still read
                self.arch_error = str(exc)
        return self._arch

    # reading ---------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._map)

    def __contains__(self, name: str) -> bool:
        return name in self._map or self._bfl_view(name) is not None

    def _bfl_view(self, name: str):
        """For a BFL-layout file: (BFL tensor name, first row, rows, swap halves) of the canonical
        weight ``name`` (``transformer.transformer_blocks.0.attn.to_q.weight`` is a third of
        ``double_blocks.0.img_attn.qkv.weight``), read-only; None when there is none."""
        if self.layout != "bfl" or not name.startswith("transformer.") or name in self._map:
            return None
        from lorahub.formats.dit.flux import FLUX

        module, dot, kind = name.rpartition(".")
        if kind not in ("weight", "bias"):
            return None
        hit = FLUX.original_of(module)
        if hit is None or f"{hit[0]}.{kind}" not in self._map:
            return None
        orig, j = hit
        spec = FLUX.spec(orig)
        full = f"{orig}.{kind}"
        rows = self._files[self._map[full].file].info(self._map[full].key).shape
        if len(spec.parts) == 1:
            return full, 0, int(rows[0]), spec.swap
        inn = int(self._files[self._map[f"{orig}.weight"].file].info(self._map[f"{orig}.weight"].key).shape[1])
        dims = spec.dims(int(rows[0]), inn)
        return full, sum(dims[:j]), dims[j], False

    def parts(self) -> list[str]:
        found = {k.split(".", 1)[0] for k in self._map}
        return [p for p in PARTS if p in found]

    def source(self, name: str) -> Source:
        try:
            return self._map[name]
        except KeyError:
            raise LorahubError(f"{self.path}: no tensor {name}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        view = self._bfl_view(name)
        if view is not None:
            return (view[2], *self.shape(view[0])[1:])
        src = self.source(name)
        shape = list(self._files[src.file].info(src.key).shape)
        if src.part is not None:
            shape[0] //= src.part[1]
        if src.transpose:
            shape = shape[::-1]
        return tuple(shape)

    def dtype(self, name: str) -> str:
        """safetensors dtype string (F16, BF16, F32, ...) as stored."""
        view = self._bfl_view(name)
        if view is not None:
            return self.dtype(view[0])
        src = self.source(name)
        return self._files[src.file].info(src.key).dtype

    def get(self, name: str, dtype=None):
        view = self._bfl_view(name)
        if view is not None:  # a canonical weight inside a fused BFL one (read-only view)
            full, start, n, swap = view
            t = self.get(full)
            if swap:
                from lorahub.formats.dit.fused import swap_halves

                t = swap_halves(t)
            t = t[start:start + n].clone()
            return t if dtype is None else t.to(dtype)
        src = self.source(name)
        t = self._files[src.file].read(src.key)
        if src.part is not None:
            i, n = src.part
            step = t.shape[0] // n
            t = t[i * step:(i + 1) * step].clone()
        if src.transpose:
            t = t.T.contiguous()
        if dtype is not None:
            t = t.to(dtype)
        return t

    def nbytes(self) -> int:
        return sum(f.info(k).nbytes for f in self._files for k in f.keys())

    def metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for f in self._files:
            out.update(f.header.metadata)
        return out

    def files(self) -> list[Path]:
        return [f.path for f in self._files]

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # raw access for writers -------------------------------------------------------------------
    def _raw_tensor(self, fi: int, key: str, transform, dtype):
        names = self._inverse.get((fi, key))
        if not names:
            t = self._files[fi].read(key)
        else:
            pieces = []
            for name in names:
                x = self.get(name)
                if transform is not None:
                    y = transform(name, x)
                    if tuple(y.shape) != tuple(x.shape):
                        raise LorahubError(f"{name}: transform changed the shape {tuple(x.shape)} -> "
                                           f"{tuple(y.shape)}")
                    x = y
                if self._map[name].transpose:
                    x = x.T
                pieces.append(x)
            import torch

            t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)
            t = t.to(_torch_dtype(self._files[fi].info(key).dtype))
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t


def _detect_family_single(keys: Iterable[str], shapes: dict[str, tuple]) -> str:
    keys = list(keys)
    if any(k.startswith("conditioner.") or k.startswith(UNET_LDM_PREFIX + "label_emb.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    for k, s in shapes.items():
        if k.endswith("attn2.to_k.weight"):
            return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(int(s[-1]), "unknown")
    return "unknown"


BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
BFL_PROBE = "double_blocks.0.img_attn.qkv.weight"


def _bfl_prefix(keys) -> str | None:
    """The key prefix of a Flux.1 transformer in the original BFL layout (none for a BFL release file,
    ``model.diffusion_model.`` in ComfyUI full checkpoints), None when the file holds no such model."""
    keys = set(keys)
    return next((p for p in BFL_PREFIXES if p + BFL_PROBE in keys), None)


def _open_single(path: Path) -> Checkpoint:
    f = _File(path)
    keys = f.keys()
    prefix = _bfl_prefix(keys)
    if prefix is not None:
        # Flux.1 in the BFL layout: tensors keep their BFL names (``double_blocks.3.img_attn.qkv.weight``);
        # fused q/k/v stay fused (a LoRA reaches them through lorahub.formats.dit.flux.to_bfl_layers)
        mapping = {k[len(prefix):]: Source(0, k) for k in keys if k.startswith(prefix)}
        return Checkpoint(path, "bfl", [f], mapping, "flux")
    unet_keys = [k[len(UNET_LDM_PREFIX):] for k in keys if k.startswith(UNET_LDM_PREFIX)]
    # layers per block: the first downsampler sits at input_blocks.(L+1)
    downs = sorted(int(m[1]) for k in unet_keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k)))
    ups = sorted(int(m[1]) for k in unet_keys if (m := re.match(r"output_blocks\.(\d+)\.[12]\.conv\.", k)))
    if downs:
        L = downs[0] - 1
    elif ups:
        L = ups[0]  # first upsampler: output_blocks.(0·(L+1) + L)
    else:
        idx = [int(m[1]) for k in unet_keys if (m := re.match(r"input_blocks\.(\d+)\.", k))]
        L = max(idx) if idx else 1
    mapping: dict[str, Source] = {}
    # SD2's diffusers text encoder drops the last of OpenCLIP's 24 blocks (penultimate-layer output)
    clip_blocks = {int(m[1]) for k in keys if (m := re.match(r"cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.", k))}
    sd2_keep = max(clip_blocks) if clip_blocks else None
    for k in keys:
        if k.startswith(UNET_LDM_PREFIX):
            d = unet_from_ldm(k[len(UNET_LDM_PREFIX):], L)
            if d is not None:
                mapping["unet." + d] = Source(0, k)
            continue
        for prefix, part, kind in (("cond_stage_model.transformer.", "text_encoder", "hf"),
                                   ("conditioner.embedders.0.transformer.", "text_encoder", "hf"),
                                   ("conditioner.embedders.1.model.", "text_encoder_2", "openclip"),
                                   ("cond_stage_model.model.", "text_encoder", "openclip")):
            if k.startswith(prefix):
                rest = k[len(prefix):]
                if kind == "hf":
                    if rest.endswith("position_ids"):
                        break
                    mapping[_hf_text_name(part, rest)] = Source(0, k)
                else:
                    keep = sd2_keep if prefix.startswith("cond_stage_model") else None
                    for name, sl, tr in _openclip_map(rest, part, keep) or []:
                        mapping[name] = Source(0, k, sl, tr)
                break
    shapes = {k: f.info(k).shape for k in keys}
    family = _detect_family_single(keys, shapes)
    if not any(n.startswith("unet.") for n in mapping):
        f.close()
        raise FormatError(f"{path}: not a Stable Diffusion checkpoint (no model.diffusion_model.* UNet "
                          "tensors); LoRA files and other models are not supported here")
    return Checkpoint(path, "sgm" if family == "sdxl" else "ldm", [f], mapping, family, L)


def _part_files(folder: Path, stem: str) -> list[Path]:
    """Weight files of one diffusers component folder (plain, sharded, or fp16 variant)."""
    plain = folder / f"{stem}.safetensors"
    if plain.exists():
        return [plain]
    for idx_name in (f"{stem}.safetensors.index.json", f"{stem}.fp16.safetensors.index.json"):
        idx = folder / idx_name
        if idx.exists():
            try:
                weight_map = json.loads(idx.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError, OSError):
                raise FormatError(f"{idx}: unreadable shard index") from None
            files = []
            for fn in dict.fromkeys(weight_map.values()):
                p = folder / str(fn)
                if "/" in str(fn) or "\\" in str(fn) or not p.exists():
                    raise FormatError(f"{idx}: shard {fn} is missing")
                files.append(p)
            return files
    variant = folder / f"{stem}.fp16.safetensors"
    if variant.exists():
        return [variant]
    if any(folder.glob("*.bin")):
        raise FormatError(f"{folder}: only pickle (.bin) weights; convert them to safetensors first")
    return []


def _open_folder(path: Path) -> Checkpoint:
    files: list[_File] = []
    mapping: dict[str, Source] = {}
    for part in PARTS:
        sub = path / part
        if not sub.is_dir():
            continue
        stem = "diffusion_pytorch_model" if part in ("unet", "transformer") else "model"
        for p in _part_files(sub, stem):
            f = _File(p)
            fi = len(files)
            files.append(f)
            for k in f.keys():
                if k.endswith("position_ids"):
                    continue
                name = f"unet.{k}" if part == "unet" else _hf_text_name(part, k)
                mapping[name] = Source(fi, k)
    if not any(n.startswith(("unet.", "transformer.")) for n in mapping):
        for f in files:
            f.close()
        raise FormatError(f"{path}: no unet/ or transformer/ safetensors weights in this diffusers folder")
    from lorahub.formats.names import family_of_folder

    family = family_of_folder(path)
    L = None
    idx = [int(m[1]) for n in mapping if (m := re.match(r"unet\.down_blocks\.0\.resnets\.(\d+)\.", n))]
    if idx:
        L = max(idx) + 1
    return Checkpoint(path, "diffusers", files, mapping, family, L)


def open_checkpoint(path: os.PathLike | str) -> Checkpoint:
    """Open a diffusers folder or a single-file ``.safetensors`` checkpoint for streaming reads."""
    p = Path(path).expanduser()
    if p.is_dir():
        return _open_folder(p)
    if not p.exists():
        raise LorahubError(f"{path}: no such file or folder")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise FormatError(f"{path}: pickle checkpoints are not supported (never unpickled); "
                          "use a .safetensors checkpoint")
    return _open_single(p)


# --------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------
def _write_file(ck: Checkpoint, fi: int, dest: Path, transform, dtype, metadata=None) -> None:
    from lorahub import fsutil

    f = ck._files[fi]
    entries = []
    for k in f.keys():
        info = f.info(k)
        st = info.dtype
        if dtype is not None and st in FLOAT_DTYPES:
            st = _st_dtype(dtype)
        entries.append((k, st, tuple(info.shape)))
    with fsutil.atomic_path(dest) as tmp:
        w = StreamWriter(tmp, entries, f.header.metadata if metadata is None else metadata)
        for k, _, _ in entries:
            w.write(k, ck._raw_tensor(fi, k, transform, dtype))
        w.close()


def write_like(ck: Checkpoint, dest: os.PathLike | str, *, transform=None, dtype=None,
               metadata: dict[str, str] | None = None) -> Path:
    """Write ``ck`` again in its own layout (single file or diffusers folder), streaming, with every
    canonical tensor passed through ``transform(name, tensor)``; other tensors copied unchanged.
    ``dtype`` (torch dtype) casts floating-point tensors. ``metadata`` replaces the header metadata
    of a single-file checkpoint (folders keep each weight file's own)."""
    dest = Path(dest)
    if ck.layout != "diffusers":
        _write_file(ck, 0, dest, transform, dtype, metadata)
        return dest
    tmp = dest.with_name(dest.name + f".lorahub-tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    weight_files = {f.path.resolve(): i for i, f in enumerate(ck._files)}
    try:
        for src in ck.path.rglob("*"):
            rel = src.relative_to(ck.path)
            out = tmp / rel
            if src.is_dir():
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            fi = weight_files.get(src.resolve())
            if fi is not None:
                _write_file(ck, fi, out, transform, dtype)
            elif rel.parts[0] in PARTS and src.suffix in (".safetensors", ".bin"):
                continue  # other variants of the weights: not carried over
            else:
                shutil.copy2(src, out)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _ldm_name(ck: Checkpoint, name: str, family: str, up_attn: set[int], L: int) -> list[tuple[str, tuple | None, bool]] | None:
    part, rest = name.split(".", 1)
    if part == "unet":
        k = unet_to_ldm(rest, L, lambda i: i in up_attn)
        return [(UNET_LDM_PREFIX + k, None, False)] if k else None
    if rest.startswith("text_model.") or rest.startswith("text_projection."):
        if part == "text_encoder" and family != "sd2":
            prefix = "conditioner.embedders.0.transformer." if family == "sdxl" else "cond_stage_model.transformer."
            return [(prefix + rest, None, False)]
    return None  # OpenCLIP towers: written only by write_like (fused q/k/v needs the source layout)


def save_single_file(ck: Checkpoint, dest: os.PathLike | str, *, transform=None, dtype=None,
                     family: str | None = None) -> Path:
    """Write the UNet (and the HF-layout CLIP-L text encoder of SD1/SDXL) of ``ck`` as one
    LDM/SGM-layout ``.safetensors`` file, streaming. The VAE and OpenCLIP towers are not converted."""
    from lorahub import fsutil

    family = family or ck.family
    L = ck.layers_per_block or 1
    up_attn = {int(m[1]) for n in ck.keys() if (m := re.match(r"unet\.up_blocks\.(\d+)\.attentions\.", n))}
    plan = []
    for name in ck.keys():
        tgt = _ldm_name(ck, name, family, up_attn, L)
        if tgt:
            plan.append((tgt[0][0], name))
    entries = []
    for raw, name in plan:
        st = ck.dtype(name)
        if dtype is not None and st in FLOAT_DTYPES:
            st = _st_dtype(dtype)
        entries.append((raw, st, ck.shape(name)))
    with fsutil.atomic_path(Path(dest)) as tmp:
        w = StreamWriter(tmp, entries, {"format": "pt"})
        for (raw, name), (_, st, _) in zip(plan, entries):
            x = ck.get(name)
            if transform is not None:
                y = transform(name, x)
                if tuple(y.shape) != tuple(x.shape):
                    raise LorahubError(f"{name}: transform changed the shape")
                x = y
            w.write(raw, x.to(_torch_dtype(st)))
        w.close()
    return Path(dest)
