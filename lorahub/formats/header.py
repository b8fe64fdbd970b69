"""A safetensors header parser that treats every byte as hostile.

Layout: 8-byte little-endian u64 N, then N bytes of UTF-8 JSON
``{"__metadata__": {str: str}, name: {"dtype": D, "shape": [..], "data_offsets": [b, e]}, ...}``,
then the tensor data. Checks: N within the file and under a cap, strict UTF-8, JSON without deep
nesting, known dtypes, non-negative shapes whose byte size matches the offsets, offsets inside the
data area and not overlapping. No torch import; reads only the header bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lorahub.errors import FormatError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit is 100 MB
MAX_TENSORS = 1_000_000
MAX_DEPTH = 8

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
# safetensors dtype codes lorahub reads into torch tensors -> torch dtype names
TORCH_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
               "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # offset inside the data area
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class Header:
    header_len: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_size: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def _depth_ok(raw: str) -> bool:
    depth = 0
    in_str = False
    esc = False
    for ch in raw:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def parse_header_bytes(prefix: bytes, file_size: int, name: str = "file") -> Header:
    """Parse a header from its first bytes (``prefix`` must hold 8 + N bytes)."""
    if file_size < 8 or len(prefix) < 8:
        raise FormatError(f"{name}: not a safetensors file (shorter than 8 bytes)")
    n = int.from_bytes(prefix[:8], "little")
    if n < 2:
        raise FormatError(f"{name}: not a safetensors file (header length {n})")
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"{name}: safetensors header length {n} exceeds the {MAX_HEADER_BYTES} byte limit")
    if 8 + n > file_size:
        raise FormatError(f"{name}: truncated or not safetensors (header length {n} > file size {file_size})")
    if len(prefix) < 8 + n:
        raise FormatError(f"{name}: truncated header")
    try:
        raw = prefix[8 : 8 + n].decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{name}: safetensors header is not valid UTF-8") from None
    raw_s = raw.rstrip(" ")  # the format allows trailing-space padding
    if not raw_s.startswith("{"):
        raise FormatError(f"{name}: safetensors header is not a JSON object")
    if not _depth_ok(raw_s):
        raise FormatError(f"{name}: safetensors header JSON is nested too deeply")
    try:
        obj = json.loads(raw_s)
    except (ValueError, RecursionError):
        raise FormatError(f"{name}: safetensors header is not valid JSON") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{name}: safetensors header is not a JSON object")
    meta_raw = obj.pop("__metadata__", None)
    if meta_raw is None:
        meta_raw = {}
    if not isinstance(meta_raw, dict):
        raise FormatError(f"{name}: __metadata__ is not an object")
    metadata: dict[str, str] = {}
    for k, v in meta_raw.items():
        if not isinstance(v, str):
            raise FormatError(f"{name}: metadata value for {k!r} is not a string")
        metadata[k] = v
    if len(obj) > MAX_TENSORS:
        raise FormatError(f"{name}: too many tensors ({len(obj)})")
    data_size = file_size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for key, info in obj.items():
        if not isinstance(info, dict):
            raise FormatError(f"{name}: tensor {key!r} has no description")
        dtype = info.get("dtype")
        shape = info.get("shape")
        offs = info.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise FormatError(f"{name}: tensor {key!r} has unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape)):
            raise FormatError(f"{name}: tensor {key!r} has an invalid shape")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise FormatError(f"{name}: tensor {key!r} has invalid data_offsets")
        b, e = offs
        if not 0 <= b <= e <= data_size:
            raise FormatError(f"{name}: tensor {key!r} lies outside the file (offsets {b}..{e}, data {data_size})")
        count = 1
        for s in shape:
            count *= s
            if count * DTYPE_SIZES[dtype] > data_size:
                raise FormatError(f"{name}: tensor {key!r} shape {shape} does not fit in the file")
        if dtype == "F4":
            expect = (count + 1) // 2
        else:
            expect = count * DTYPE_SIZES[dtype]
        if e - b != expect:
            raise FormatError(f"{name}: tensor {key!r} byte size {e - b} does not match shape {shape} {dtype}")
        tensors[key] = TensorInfo(dtype, tuple(shape), b, e)
        if e > b:
            spans.append((b, e, key))
    spans.sort()
    for (b1, e1, k1), (b2, _e2, k2) in zip(spans, spans[1:]):
        if b2 < e1:
            raise FormatError(f"{name}: tensors {k1!r} and {k2!r} overlap")
    return Header(header_len=n, tensors=tensors, metadata=metadata, file_size=file_size)


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate the header of a safetensors file, reading only the header bytes."""
    p = Path(path)
    name = p.name
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(8)
            if len(first) < 8:
                raise FormatError(f"{name}: not a safetensors file (shorter than 8 bytes)")
            n = int.from_bytes(first, "little")
            if n > MAX_HEADER_BYTES:
                raise FormatError(f"{name}: safetensors header length {n} exceeds the {MAX_HEADER_BYTES} byte limit")
            if 8 + n > size:
                raise FormatError(f"{name}: truncated or not safetensors (header length {n} > file size {size})")
            rest = f.read(n)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, not a file") from None
    except PermissionError:
        raise FormatError(f"{path}: permission denied") from None
    return parse_header_bytes(first + rest, size, name)
