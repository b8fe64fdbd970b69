"""Hostile safetensors headers: every malformed input gives a FormatError quickly, never a crash/hang."""

from __future__ import annotations

import json
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorahub.errors import FormatError
from lorahub.formats.header import MAX_HEADER_BYTES, parse_header_bytes, read_header


def _file(tmp_path, data: bytes, name="x.safetensors"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _blob(header: dict | str | bytes, data: bytes = b"", pad_to: int | None = None) -> bytes:
    if isinstance(header, dict):
        raw = json.dumps(header).encode()
    elif isinstance(header, str):
        raw = header.encode()
    else:
        raw = header
    return struct.pack("<Q", len(raw)) + raw + data


def test_valid_file_parses(tmp_path):
    h = {"__metadata__": {"k": "v"}, "a": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]}}
    hdr = read_header(_file(tmp_path, _blob(h, b"\0" * 12)))
    assert hdr.metadata == {"k": "v"}
    assert hdr.tensors["a"].shape == (2, 3) and hdr.tensors["a"].nbytes == 12


@pytest.mark.parametrize(
    "blob, words",
    [
        (b"", "shorter than 8"),
        (b"\x01\x02", "shorter than 8"),
        (struct.pack("<Q", 2**63) + b"{}", "exceeds"),
        (struct.pack("<Q", 2**64 - 1), "exceeds"),
        (struct.pack("<Q", 1000) + b"{}", "truncated"),
        (_blob("not json at all"), "JSON"),
        (_blob("[1, 2]"), "JSON object"),
        (_blob(b"{\"a\": \"\xff\xfe\"}"), "UTF-8"),
        (_blob("{" + "\"a\":{" * 5000 + "}" * 5001), "nested"),
        (_blob("[" * 100000 + "]" * 100000), "JSON object"),
        (_blob({"a": {"dtype": "F17", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "dtype"),
        (_blob({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 4), "outside"),
        (_blob({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "shape"),
        (_blob({"a": {"dtype": "F32", "shape": [2**31, 2**31, 2**31], "data_offsets": [0, 4]}}, b"\0" * 4),
         "shape"),
        (_blob({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}, b"\0" * 12), "byte size"),
        (_blob({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4), "outside"),
        (_blob({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlap"),
        (_blob({"__metadata__": {"k": 1}}), "metadata"),
        (_blob({"__metadata__": []}), "metadata"),
        (_blob({"a": 5}), "description"),
        (_blob({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, True]}}, b"\0" * 4), "offsets"),
        (_blob({"a": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}, b"\0" * 4), "shape"),
    ],
)
def test_adversarial_headers_are_refused(tmp_path, blob, words):
    p = _file(tmp_path, blob)
    t = time.perf_counter()
    with pytest.raises(FormatError) as exc:
        read_header(p)
    assert time.perf_counter() - t < 2.0
    msg = str(exc.value)
    assert "\n" not in msg and words.lower() in msg.lower(), msg


def test_huge_declared_header_is_not_allocated(tmp_path):
    # 200 MB header announced in a tiny file: refused before reading/allocating it.
    p = _file(tmp_path, struct.pack("<Q", 200 * 1024 * 1024) + b"{}")
    with pytest.raises(FormatError, match="exceeds"):
        read_header(p)
    # Under the cap but larger than the file: refused as truncated, nothing read.
    p = _file(tmp_path, struct.pack("<Q", MAX_HEADER_BYTES - 1) + b"{}", "y.safetensors")
    with pytest.raises(FormatError, match="truncated"):
        read_header(p)


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        read_header(tmp_path / "nope.safetensors")
    with pytest.raises(FormatError, match="directory"):
        read_header(tmp_path)


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_never_crash(data):
    try:
        parse_header_bytes(data, len(data))
    except FormatError:
        pass


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.floats(allow_nan=False), st.text(max_size=8))
json_val = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), c, max_size=4)),
                        max_leaves=20)
tensor_desc = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F16", "F32", "BF16", "I64", "U8", "F64", "X", 3]),
    "shape": st.one_of(st.lists(st.integers(min_value=-3, max_value=2**40), max_size=5), json_val),
    "data_offsets": st.one_of(st.lists(st.integers(min_value=-5, max_value=2**40), min_size=2, max_size=2),
                              json_val),
})


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(max_size=10), st.one_of(tensor_desc, json_val), max_size=6),
       st.integers(min_value=0, max_value=256))
def test_random_structured_headers_never_crash(header, data_len):
    blob = _blob(header, b"\0" * data_len)
    try:
        h = parse_header_bytes(blob, len(blob))
    except FormatError:
        return
    # Whatever parses is internally consistent: every tensor lies inside the data, no overlaps.
    size = len(blob) - h.data_start
    spans = sorted((t.start, t.end) for t in h.tensors.values() if t.end > t.start)
    for (b, e) in spans:
        assert 0 <= b <= e <= size
    for (b1, e1), (b2, e2) in zip(spans, spans[1:]):
        assert b2 >= e1
