"""Pickled ``.pt`` / ``.ckpt`` / ``.bin`` / ``.pth`` files, read without executing anything.

Two readers:

* :func:`read_pickle_shapes` (no torch): a restricted unpickler over the one pickle of a torch zip
  archive that ``torch.load`` would load (:func:`torch_pickle_name`), accepting only the handful of
  globals a plain tensor dictionary needs (tensor rebuild functions, storage types, ``OrderedDict``).
  Tensors come back as :class:`TensorStub` (dtype + shape); no tensor bytes are read. Anything else
  (a class, a function, ``__reduce__`` tricks) raises :class:`~lorahub.errors.UnsafeFile`.
* :func:`load_tensors` (torch): ``torch.load(weights_only=True)``, flattened to ``{dotted key: tensor}``.

Both walk what they loaded with :func:`flatten`, which bounds the work: a pickle's memo lets a few
hundred bytes reference one container 2^40 times, so a container reached twice is refused, and so are
structures deeper than :data:`MAX_PICKLE_DEPTH`, with more than :data:`MAX_PICKLE_NODES` objects, more
than :data:`~lorahub.formats.header.MAX_TENSORS` tensors or :data:`MAX_KEY_CHARS` characters of keys.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lorahub.errors import FormatError, UnsafeFile
from lorahub.formats.header import MAX_DIMS, MAX_TENSORS, TORCH_NAMES

# Limits of what a pickled tensor dictionary may be (a real state dict: one container per module level,
# a few thousand tensors, a few levels deep).
MAX_PICKLE_BYTES = 32 * 1024 * 1024  # the pickle itself (tensor data lives in other archive members)
MAX_PICKLE_DEPTH = 32
MAX_PICKLE_NODES = 1_000_000          # containers and values visited
MAX_KEY_CHARS = 16 * 1024 * 1024      # all flattened keys together
ZIP_MAGIC = b"PK\x03\x04"            # torch.load treats a file as a zip archive only when it starts so

_STORAGE_DTYPES = {
    "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16", "DoubleStorage": "F64",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL",
}
_TORCH_DTYPES = {torch_name: code for code, torch_name in TORCH_NAMES.items()}


@dataclass(frozen=True)
class TensorStub:
    dtype: str
    shape: tuple[int, ...]


class _StorageType:
    def __init__(self, dtype: str):
        self.dtype = dtype


class _DType:
    def __init__(self, name: str):
        self.name = name


def _rebuild_tensor(storage, offset, size, stride, *rest):
    if (not isinstance(size, (tuple, list)) or len(size) > MAX_DIMS
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in size)):
        raise FormatError("a tensor has an invalid shape")
    return TensorStub(storage.dtype if isinstance(storage, _StorageType) else "F32", tuple(size))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


def _ordered_dict(*args):
    from collections import OrderedDict

    return OrderedDict(*args)


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return _ordered_dict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _DType(_TORCH_DTYPES[name])
        raise UnsafeFile(f"pickle references {module}.{name}: refusing to load it (only plain tensors "
                         "are accepted; convert the file to safetensors with a tool you trust)")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel)
        if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] == "storage":
            st = pid[1]
            if isinstance(st, _StorageType):
                return st
            if isinstance(st, _DType):
                return _StorageType(st.name)
            return _StorageType("F32")
        raise UnsafeFile("pickle uses an unknown persistent reference: refusing to load it")


def flatten(obj, is_leaf: Callable[[object], bool], name: str) -> dict[str, object]:
    """``{dotted key: leaf}`` of nested dicts/lists/tuples, within the limits of this module.

    Strings, numbers and other values are skipped. Memo-aware: a pickle's memo lets one container be
    referenced from many places at almost no cost in bytes, so every container is walked once; reaching
    one again is harmless when it held no tensors (skipped: e.g. an optimizer's shared ``betas``) and
    refused when it did (the same tensors under ever more keys), as is a container that holds itself.
    A leaf (tensor) may appear under several keys (tied weights).
    """
    out: dict[str, object] = {}
    leaves_in: dict[int, int] = {}  # id of a container walked -> tensors found in it
    on_path: set[int] = set()
    budget = {"nodes": MAX_PICKLE_NODES, "chars": MAX_KEY_CHARS, "leaves": 0}

    def refuse(why: str):
        raise UnsafeFile(f"{name}: pickle {why}: refusing it (not a plain tensor dictionary)")

    def walk(o, prefix: str, depth: int) -> None:
        budget["nodes"] -= 1
        if budget["nodes"] < 0:
            refuse(f"holds more than {MAX_PICKLE_NODES} objects")
        if is_leaf(o):
            budget["leaves"] += 1
            out[prefix[:-1]] = o
            if len(out) > MAX_TENSORS:
                refuse(f"holds more than {MAX_TENSORS} tensors")
            return
        if not isinstance(o, (dict, list, tuple)):
            return
        oid = id(o)
        if oid in on_path:
            refuse("holds a container inside itself")
        if oid in leaves_in:
            if leaves_in[oid]:
                refuse("refers to one container of tensors from several places (memo references)")
            return
        if depth >= MAX_PICKLE_DEPTH:
            refuse(f"nests more than {MAX_PICKLE_DEPTH} levels deep")
        on_path.add(oid)
        before = budget["leaves"]
        for k, v in (o.items() if isinstance(o, dict) else enumerate(o)):
            if not (isinstance(v, (dict, list, tuple)) or is_leaf(v)):  # a name, a step count: skipped
                budget["nodes"] -= 1
                continue
            child = f"{prefix}{_key(k)}."
            budget["chars"] -= len(child)
            if budget["chars"] < 0:
                refuse(f"keys exceed {MAX_KEY_CHARS} characters")
            walk(v, child, depth + 1)
        on_path.discard(oid)
        leaves_in[oid] = budget["leaves"] - before

    walk(obj, "", 0)
    if budget["nodes"] < 0:
        refuse(f"holds more than {MAX_PICKLE_NODES} objects")
    return out


def _key(k) -> str:
    if isinstance(k, str):
        return k[:4096]
    if isinstance(k, (int, bool)) or k is None:
        return str(k)
    return type(k).__name__


def torch_pickle_name(zf: zipfile.ZipFile, name: str) -> str:
    """The member of a torch zip archive that ``torch.load`` unpickles, by torch's own rule.

    torch's reader (``PyTorchFileReader``) takes the folder of the archive's first member as the archive
    name, requires every member to lie in it and loads ``<folder>/data.pkl``. Refused: members outside
    that folder, TorchScript archives (``constants.pkl``; torch.load(weights_only=True) refuses them too),
    and archives with any other or a duplicated ``*.pkl`` member (more than one candidate: a checker and
    torch could read different pickles).
    """
    names = zf.namelist()
    if not names or "/" not in names[0]:
        raise FormatError(f"{name}: zip file that is not a torch archive (no archive folder)")
    folder = names[0].split("/", 1)[0] + "/"
    if any(not n.startswith(folder) for n in names):
        raise FormatError(f"{name}: zip file that is not a torch archive (members outside {folder})")
    target = folder + "data.pkl"
    pickles = [n for n in names if n.lower().endswith(".pkl")]
    if any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in pickles):
        raise UnsafeFile(f"{name}: TorchScript archive: refusing it (it holds code, not just tensors)")
    if target not in names:
        raise FormatError(f"{name}: zip file without {target}: not a torch file")
    if pickles != [target]:
        shown = ", ".join(sorted(set(pickles)))[:200]
        raise UnsafeFile(f"{name}: torch archive with {len(pickles)} pickle members ({shown}): refusing it "
                         "(torch.load reads only one)")
    return target


def read_pickle_shapes(path: str | Path) -> tuple[dict[str, TensorStub], dict[str, str]]:
    """Tensor stubs ``{dotted key: TensorStub}`` and string fields of a torch zip pickle, safely."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{path}: no such file")
    with open(p, "rb") as f:
        magic = f.read(len(ZIP_MAGIC))
    if magic != ZIP_MAGIC:
        raise UnsafeFile(f"{p.name}: legacy (non-zip) pickle file: refusing to read it; "
                         "re-save it as safetensors with a tool you trust")
    try:
        with zipfile.ZipFile(p) as zf:
            member = torch_pickle_name(zf, p.name)
            if zf.getinfo(member).file_size > MAX_PICKLE_BYTES:
                raise FormatError(f"{p.name}: pickle index is larger than {MAX_PICKLE_BYTES} bytes")
            with zf.open(member) as fh:
                raw = fh.read(MAX_PICKLE_BYTES + 1)
            if len(raw) > MAX_PICKLE_BYTES:
                raise FormatError(f"{p.name}: pickle index is larger than {MAX_PICKLE_BYTES} bytes")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, ValueError):
        raise FormatError(f"{p.name}: damaged zip archive") from None
    try:
        obj = _Restricted(io.BytesIO(raw)).load()
    except (UnsafeFile, FormatError):
        raise
    except Exception as exc:  # malformed pickle stream
        raise FormatError(f"{p.name}: unreadable pickle ({type(exc).__name__})") from None
    strings: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in list(obj.items())[:MAX_TENSORS]:
            if isinstance(v, str):
                strings[str(k)[:4096]] = v
    out = flatten(obj, lambda o: isinstance(o, TensorStub), p.name)
    return out, strings  # type: ignore[return-value]


def load_tensors(path: str | Path) -> tuple[dict, dict[str, str]]:
    """``torch.load(weights_only=True)`` flattened to ``{dotted key: tensor}`` plus top-level strings."""
    import torch

    p = Path(path)
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except Exception as exc:
        raise UnsafeFile(f"{p.name}: refused by torch.load(weights_only=True): {str(exc).splitlines()[0][:160]}") \
            from None
    strings: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in list(obj.items())[:MAX_TENSORS]:
            if isinstance(v, str):
                strings[str(k)[:4096]] = v
    return flatten(obj, lambda o: isinstance(o, torch.Tensor), p.name), strings
