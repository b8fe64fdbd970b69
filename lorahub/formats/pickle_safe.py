"""Pickled ``.pt`` / ``.ckpt`` / ``.bin`` / ``.pth`` files, read without executing anything.

Two readers:

* :func:`read_pickle_shapes` (no torch): a restricted unpickler over the ``data.pkl`` of a torch zip
  archive that only accepts the handful of globals a plain tensor dictionary needs (tensor rebuild
  functions, storage types, ``OrderedDict``). Tensors come back as :class:`TensorStub` (dtype + shape);
  no tensor bytes are read. Anything else (a class, a function, ``__reduce__`` tricks) raises
  :class:`~lorahub.errors.UnsafeFile`.
* :func:`load_tensors` (torch): ``torch.load(weights_only=True)``, flattened to ``{dotted key: tensor}``.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lorahub.errors import FormatError, UnsafeFile
from lorahub.formats.header import TORCH_NAMES

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
    return TensorStub(getattr(storage, "dtype", "F32"), tuple(int(s) for s in size))


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


def _flatten(obj, prefix: str, out: dict) -> None:
    if isinstance(obj, TensorStub):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}{i}.", out)
    # strings, numbers: ignored (names, step counts)


def read_pickle_shapes(path: str | Path) -> tuple[dict[str, TensorStub], dict[str, str]]:
    """Tensor stubs ``{dotted key: TensorStub}`` and string fields of a torch zip pickle, safely."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{path}: no such file")
    if not zipfile.is_zipfile(p):
        raise UnsafeFile(f"{p.name}: legacy (non-zip) pickle file: refusing to read it; "
                         "re-save it as safetensors with a tool you trust")
    try:
        with zipfile.ZipFile(p) as zf:
            names = [n for n in zf.namelist() if n.endswith("data.pkl")]
            if not names:
                raise FormatError(f"{p.name}: zip file without data.pkl: not a torch file")
            info = zf.getinfo(names[0])
            if info.file_size > 64 * 1024 * 1024:
                raise FormatError(f"{p.name}: pickle index is too large")
            raw = zf.read(names[0])
    except zipfile.BadZipFile:
        raise FormatError(f"{p.name}: damaged zip archive") from None
    try:
        obj = _Restricted(io.BytesIO(raw)).load()
    except (UnsafeFile, FormatError):
        raise
    except Exception as exc:  # malformed pickle stream
        raise FormatError(f"{p.name}: unreadable pickle ({type(exc).__name__})") from None
    out: dict[str, TensorStub] = {}
    strings: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, str):
                strings[str(k)] = v
    _flatten(obj, "", out)
    return out, strings


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
    out: dict = {}
    strings: dict[str, str] = {}

    def walk(o, prefix):
        if isinstance(o, torch.Tensor):
            out[prefix.rstrip(".")] = o
        elif isinstance(o, dict):
            for k, v in o.items():
                if isinstance(v, str) and not prefix:
                    strings[str(k)] = v
                walk(v, f"{prefix}{k}.")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{prefix}{i}.")

    walk(obj, "")
    return out, strings
