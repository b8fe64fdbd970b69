"""A safetensors header parser that treats every byte as hostile.

Layout: 8-byte little-endian u64 N, then N bytes of UTF-8 JSON
``{"__metadata__": {str: str}, name: {"dtype": D, "shape": [..], "data_offsets": [b, e]}, ...}``,
then the tensor data. No torch import; reads only the header bytes.

A header is accepted only when the ``safetensors`` library itself would read the file, and within
lorahub's limits:

* N at most :data:`MAX_HEADER_BYTES` and inside the file; strict UTF-8; a JSON object with no
  duplicate keys and no ``NaN``/``Infinity``;
* at most :data:`MAX_TENSORS` tensors, each with a known dtype, at most :data:`MAX_DIMS` non-negative
  dimensions (zero-size tensors such as ``[8, 0]`` are valid) and a byte size that matches its shape;
* the tensors' byte ranges, in offset order, tile the data area exactly: no gap, no overlap, no bytes
  after the last tensor (what safetensors calls "file not fully covered");
* ``__metadata__`` maps strings to strings, at most :data:`MAX_METADATA_BYTES` in all; every string is
  valid Unicode (no lone surrogates); a value that holds JSON (kohya's ``ss_tag_frequency``,
  ``ssmd_cover_images``, lorahub's own field …) passes :func:`loads_json`, so every reader of these
  fields can parse them without a recursion, overflow or non-finite-number surprise.

Headers of one training run (or one tool) differ at most in their metadata: the tensor entries, once
checked, are kept (:class:`SectionCache`, keyed on their JSON text and the data area's size), and the next
header with the same entries has only its metadata parsed and checked. Anything unusual or wrong goes
through the whole parse, so the result and every error message are the same either way.

:func:`loads_json` is the reader for JSON found inside hostile files (metadata fields, sidecars): the
same depth limit, no non-finite numbers, no integers longer than :data:`MAX_JSON_INT_DIGITS` digits.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

from lorahub.errors import FormatError

# Limits (documented in the module docstring; the error messages name them).
MAX_HEADER_BYTES = 32 * 1024 * 1024     # the safetensors library allows 100 MB; 32 MiB holds any real LoRA/model
MAX_TENSORS = 100_000                   # SDXL full checkpoints hold ~2,500 tensors, LyCORIS files a few thousand
MAX_METADATA_BYTES = 16 * 1024 * 1024   # keys + values of __metadata__ (cover images included)
MAX_JSON_DEPTH = 64                     # nesting of JSON inside a metadata value or a sidecar
MAX_JSON_INT_DIGITS = 40                # an integer in such JSON (tag counts, seeds, sizes)
MAX_DIMS = 8

# Bits per element of every safetensors dtype lorahub accepts (a subset of what safetensors knows).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F4": 4,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64,
}
# Bytes per element (F4 packs two elements in a byte: counted as 1 here; see DTYPE_BITS)
DTYPE_SIZES = {k: max(1, v // 8) for k, v in DTYPE_BITS.items()}
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
    # (the tensor entries' JSON text, the data area's size): headers with equal sections hold equal tensors
    # (what lorahub.formats.detect keys its structure cache on); None when the header was read another way
    section: tuple[str, int] | None = field(default=None, repr=False, compare=False)

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


# ------------------------------------------------------------------------------------ hostile JSON
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.S)


def json_depth(text: str) -> int:
    """How deeply the arrays and objects of the JSON ``text`` nest (brackets inside strings do not
    count). Linear time, no recursion, no parsing; an upper bound when ``text`` is not JSON."""
    n = text.count("[") + text.count("{")
    if n <= MAX_JSON_DEPTH:
        return n  # an upper bound, and within every limit
    only = _JSON_STRING.sub("", text).encode("utf-8", "surrogatepass").translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_DEPTH_STEP.__getitem__, only)), default=0)


def _no_constant(name: str):
    raise FormatError(f"non-finite number {name}")


def _int(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_JSON_INT_DIGITS:
        raise FormatError(f"integer of {len(text)} digits (the limit is {MAX_JSON_INT_DIGITS})")
    return int(text)


def _float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise FormatError(f"number {text[:20]} is out of range")
    return v


def loads_json(text: str | bytes, what: str = "JSON"):
    """Parse JSON from a hostile source (a metadata field, a sidecar file).

    Raises :class:`~lorahub.errors.FormatError` ("``what``: ...") when the JSON is nested deeper than
    :data:`MAX_JSON_DEPTH`, holds ``NaN``/``Infinity`` or a number that does not fit a float, or an
    integer longer than :data:`MAX_JSON_INT_DIGITS` digits; plain syntax errors raise ``ValueError``
    (``json.JSONDecodeError``) as ``json.loads`` does, so callers can tell "not JSON" from "hostile".
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8")  # UnicodeDecodeError is a ValueError
    too_deep = FormatError(f"{what}: JSON nested more than {MAX_JSON_DEPTH} levels deep")
    deep = json_depth(text) > MAX_JSON_DEPTH
    try:  # json's C parser is recursion-checked: deep input raises RecursionError, never crashes
        obj = json.loads(text, parse_constant=_no_constant, parse_int=_int, parse_float=_float)
    except FormatError as exc:
        raise FormatError(f"{what}: {exc}") from None
    except RecursionError:
        raise too_deep from None
    if deep:  # valid JSON, but deeper than lorahub's readers go
        raise too_deep
    if _SURROGATE_ESCAPE.search(text):  # "\\udc80" alone is valid JSON but not text UTF-8 can hold
        obj = _replace_lone_surrogates(obj)
    return obj


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _replace_lone_surrogates(obj):
    """``obj`` with each lone surrogate in its strings (keys too) replaced by U+FFFD."""
    if isinstance(obj, str):
        return _LONE_SURROGATE.sub("\ufffd", obj)  # json joins valid pairs: what is left is alone
    if isinstance(obj, list):
        return [_replace_lone_surrogates(v) for v in obj]
    if isinstance(obj, dict):
        return {_replace_lone_surrogates(k): _replace_lone_surrogates(v) for k, v in obj.items()}
    return obj


def _unique_pairs(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise FormatError(f"duplicate key {dup[:80]!r}")
    return d


def _valid_text(s: str) -> bool:
    """True when ``s`` is valid Unicode (JSON ``\\ud800`` escapes can smuggle in lone surrogates)."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ------------------------------------------------------------------------------------ the header
_JSON_SPACE = " \t\n\r"
_META_FIRST = re.compile(r'\{[ \t\n\r]*"__metadata__"[ \t\n\r]*:[ \t\n\r]*')
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_pairs, parse_constant=_no_constant)


def _length(first: bytes, size: int, name: str) -> int:
    """The header length N from the first 8 bytes of a file of ``size`` bytes, checked against both."""
    if len(first) < 8:
        raise FormatError(f"{name}: not a safetensors file (shorter than 8 bytes)")
    n = int.from_bytes(first[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"{name}: safetensors header length {n} exceeds the {MAX_HEADER_BYTES} byte limit")
    if 8 + n > size:
        raise FormatError(f"{name}: truncated or not safetensors (header length {n} > file size {size})")
    return n


def header_from_bytes(data: bytes | memoryview, name: str = "file") -> Header:
    """The header of the safetensors file whose whole content is ``data`` (what :func:`read_header` gives
    for the same file, the same errors included)."""
    _length(data[:8], len(data), name)
    return parse_header_bytes(data, len(data), name)


def parse_header_bytes(prefix: bytes | memoryview, file_size: int, name: str = "file") -> Header:
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
        raw = str(prefix[8 : 8 + n], "utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{name}: safetensors header is not valid UTF-8") from None
    raw_s = raw.rstrip(_JSON_SPACE)  # the format allows trailing-space padding
    if not raw_s.startswith("{"):
        raise FormatError(f"{name}: safetensors header is not a JSON object")
    if raw_s.count('"data_offsets"') > MAX_TENSORS:  # refuse before parsing (every tensor names one)
        raise FormatError(f"{name}: more than the {MAX_TENSORS} tensors lorahub reads")
    data_size = file_size - 8 - n
    # The common case: the tensor entries were seen (and checked) before, in a header that differed at
    # most in its metadata (files of one training run, of one tool). Only the metadata is parsed and
    # checked then; anything else, or anything wrong, goes through the whole parse below, which says what.
    split = _split(raw_s)
    if split is not None:
        text, meta_raw = split
        try:
            tensors = _section_tensors(text, data_size)
        except (FormatError, ValueError, RecursionError):
            tensors = None
        if tensors is not None:
            metadata = _check_metadata({} if meta_raw is None else meta_raw, name)
            return Header(header_len=n, tensors=dict(tensors), metadata=metadata, file_size=file_size,
                          section=(text, data_size))
    try:
        obj = json.loads(raw_s, object_pairs_hook=_unique_pairs, parse_constant=_no_constant)
    except FormatError as exc:
        raise FormatError(f"{name}: safetensors header has a {exc}") from None
    except RecursionError:
        raise FormatError(f"{name}: safetensors header JSON is nested too deeply") from None
    except ValueError:
        raise FormatError(f"{name}: safetensors header is not valid JSON") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{name}: safetensors header is not a JSON object")
    meta_raw = obj.pop("__metadata__", None)
    metadata = _check_metadata({} if meta_raw is None else meta_raw, name)
    if len(obj) > MAX_TENSORS:
        raise FormatError(f"{name}: {len(obj)} tensors, more than the {MAX_TENSORS} lorahub reads")
    tensors: dict[str, TensorInfo] = {}
    for key, info in obj.items():
        tensors[key] = _check_tensor(key, info, data_size, name)
    _check_layout(tensors, data_size, name)
    return Header(header_len=n, tensors=tensors, metadata=metadata, file_size=file_size)


def _split(raw_s: str) -> tuple[str, object] | None:
    """(the tensor entries as a JSON object text, the parsed ``__metadata__`` value or None) of a header
    text that starts with ``{``: the metadata is cut out when it comes first (as safetensors writes it),
    else the text is the whole header. The whole header is valid JSON exactly when the metadata value is
    and the text is; None when the metadata value does not parse (the whole parse then says why)."""
    m = _META_FIRST.match(raw_s)
    if m is None:
        return raw_s, None  # a "__metadata__" key further on makes _section_tensors refuse the text
    try:
        meta_raw, end = _DECODER.raw_decode(raw_s, m.end())
    except (FormatError, ValueError, RecursionError):
        return None
    rest = raw_s[end:].lstrip(_JSON_SPACE)
    if rest == "}":
        return "{}", meta_raw
    if rest.startswith(","):
        rest = rest[1:].lstrip(_JSON_SPACE)
        if rest.startswith('"'):  # an entry follows (a trailing comma is not JSON)
            return "{" + rest, meta_raw
    return None


class SectionCache:
    """What was computed from header sections (:attr:`Header.section`), the most recently used first: at
    most ``entries`` of them and ``chars`` characters of section text in all (a section longer than a
    quarter of that is never kept). Safe to share between threads."""

    MISSING = object()

    def __init__(self, entries: int = 256, chars: int = 16 * 1024 * 1024):
        self.entries, self.chars = entries, chars
        self._reset()
        _CACHES.add(self)

    def _reset(self) -> None:
        self._items: OrderedDict[tuple[str, int], object] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, section: tuple[str, int]):
        """The value kept for ``section``, or :attr:`MISSING`."""
        with self._lock:
            value = self._items.get(section, self.MISSING)
            if value is not self.MISSING:
                self._items.move_to_end(section)
            return value

    def put(self, section: tuple[str, int], value) -> None:
        if len(section[0]) > self.chars // 4:
            return
        with self._lock:
            if section in self._items:
                return
            self._items[section] = value
            self._size += len(section[0])
            while len(self._items) > self.entries or self._size > self.chars:
                old, _ = self._items.popitem(last=False)
                self._size -= len(old[0])

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._size = 0


def _after_fork() -> None:
    # a forked child (a worker of a scan) starts with empty caches and fresh locks: another thread of the
    # parent may have held a lock, mid-change, when it forked
    for cache in list(_CACHES):
        cache._reset()


_CACHES: "weakref.WeakSet[SectionCache]" = weakref.WeakSet()
os.register_at_fork(after_in_child=_after_fork)
_SECTIONS = SectionCache()


def _section_tensors(text: str, data_size: int) -> dict[str, TensorInfo]:
    """The checked tensors of a header's tensor entries (``text``, a JSON object without ``__metadata__``)
    for a data area of ``data_size`` bytes; raises when anything is wrong (callers then parse the whole
    header, whose errors name the file). Kept for the next header with the same entries: callers copy the
    dict."""
    tensors = _SECTIONS.get((text, data_size))
    if tensors is not SectionCache.MISSING:
        return tensors
    obj = json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=_no_constant)
    if type(obj) is not dict or "__metadata__" in obj or len(obj) > MAX_TENSORS:
        raise FormatError("not a plain tensor section")
    tensors = {key: _check_tensor(key, info, data_size, "file") for key, info in obj.items()}
    _check_layout(tensors, data_size, "file")
    _SECTIONS.put((text, data_size), tensors)
    return tensors


def clear_cache() -> None:
    """Forget the tensor sections seen so far (benchmarks measure cold parses with it)."""
    _SECTIONS.clear()


def _check_metadata(meta_raw, name: str) -> dict[str, str]:
    if not isinstance(meta_raw, dict):
        raise FormatError(f"{name}: __metadata__ is not an object")
    total = 0
    for k, v in meta_raw.items():
        if not isinstance(v, str):
            raise FormatError(f"{name}: metadata value for {k[:80]!r} is not a string")
        total += len(k) + len(v)
        if total > MAX_METADATA_BYTES:
            raise FormatError(f"{name}: metadata larger than the {MAX_METADATA_BYTES} byte limit")
        if not (_valid_text(k) and _valid_text(v)):
            raise FormatError(f"{name}: metadata field {k[:80]!r} is not valid Unicode")
        if v[:1] in ("[", "{"):  # JSON inside (kohya's ss_* fields, cover images, lorahub's own)
            try:
                loads_json(v, f"{name}: metadata field {k[:80]!r}")
            except ValueError:
                pass  # not JSON after all: readers treat it as text
    return meta_raw


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_tensor(key: str, info, data_size: int, name: str) -> TensorInfo:
    # the common case in few steps (a scan reads thousands of headers of dozens of tensors each);
    # anything unusual goes through the checks below, which say what is wrong
    if type(info) is dict:
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        bits = DTYPE_BITS.get(dtype) if type(dtype) is str else None
        if bits is not None and type(shape) is list and len(shape) <= MAX_DIMS and type(offs) is list \
                and len(offs) == 2 and key.isascii():
            b, e = offs
            count = 1
            for s in shape:
                if type(s) is not int or s < 0:
                    break
                count *= s
            else:
                if type(b) is int and type(e) is int and 0 <= b <= e <= data_size \
                        and count * bits <= 8 * data_size and not count * bits % 8 and e - b == count * bits // 8:
                    return TensorInfo(dtype, tuple(shape), b, e)
    return _check_tensor_slow(key, info, data_size, name)


def _check_tensor_slow(key: str, info, data_size: int, name: str) -> TensorInfo:
    shown = repr(key[:80]) if _valid_text(key) else ascii(key[:80])
    if not _valid_text(key):
        raise FormatError(f"{name}: tensor name {shown} is not valid Unicode")
    if not isinstance(info, dict):
        raise FormatError(f"{name}: tensor {shown} has no description")
    dtype = info.get("dtype")
    shape = info.get("shape")
    offs = info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise FormatError(f"{name}: tensor {shown} has unknown dtype {repr(dtype)[:40]}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(s) and s >= 0 for s in shape):
        raise FormatError(f"{name}: tensor {shown} has an invalid shape")
    if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs):
        raise FormatError(f"{name}: tensor {shown} has invalid data_offsets")
    b, e = offs
    if not 0 <= b <= e <= data_size:
        raise FormatError(f"{name}: tensor {shown} lies outside the file (offsets {b}..{e}, data {data_size})")
    bits = DTYPE_BITS[dtype]
    count = 1
    for s in shape:  # at most MAX_DIMS factors: exact, whatever their size ([8, 0] holds 0 elements)
        count *= s
    if count * bits > 8 * data_size:
        raise FormatError(f"{name}: tensor {shown} shape {str(shape)[:80]} does not fit in the file")
    if count * bits % 8:
        raise FormatError(f"{name}: tensor {shown} shape {str(shape)[:80]} {dtype} is not a whole number of bytes")
    if e - b != count * bits // 8:
        raise FormatError(f"{name}: tensor {shown} byte size {e - b} does not match shape {str(shape)[:80]} {dtype}")
    return TensorInfo(dtype, tuple(shape), b, e)


def _check_layout(tensors: dict[str, TensorInfo], data_size: int, name: str) -> None:
    """The tensors, in (start, end) order, must tile the data area exactly (safetensors' own rule)."""
    spans = sorted((t.start, t.end) for t in tensors.values())
    if all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and (not spans or spans[0][0] == 0) \
            and (spans[-1][1] if spans else 0) == data_size:
        return  # the data area is tiled exactly (the common case, checked without naming anything)
    pos = 0
    prev = None
    for key, t in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if t.start < pos:
            raise FormatError(f"{name}: tensors {prev[:80]!r} and {key[:80]!r} overlap")
        if t.start > pos:
            raise FormatError(f"{name}: {t.start - pos} byte(s) of the data area before tensor {key[:80]!r} "
                              "belong to no tensor")
        pos, prev = t.end, key
    if pos != data_size:
        raise FormatError(f"{name}: {data_size - pos} byte(s) after the last tensor belong to no tensor "
                          "(trailing data)")


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate the header of a safetensors file, reading only the header bytes."""
    p = Path(path)
    name = p.name
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(8)
            n = _length(first, size, name)
            rest = f.read(n)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, not a file") from None
    except PermissionError:
        raise FormatError(f"{path}: permission denied") from None
    return parse_header_bytes(first + rest, size, name)


def canonical_bytes(data: bytes) -> bytes:
    """The same safetensors file with its header written in sorted key order (compact JSON, padded to 8
    bytes); the tensor data is kept as it is. The safetensors library writes ``__metadata__`` in
    hash-map order, random per process: this makes the same content give the same bytes (and SHA-256)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    raw = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]
