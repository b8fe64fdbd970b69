"""Hostile safetensors headers: every malformed input gives a FormatError quickly, never a crash/hang."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorahub.errors import FormatError
from lorahub.formats.header import MAX_HEADER_BYTES, MAX_METADATA_BYTES, MAX_TENSORS, parse_header_bytes, read_header


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
    with pytest.raises(FormatError) as exc:
        read_header(p)
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


# ------------------------------------------------------------------------------------------------
# safetensors' own rules: what lorahub accepts, the safetensors library reads (and nothing else)
T = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


REFUSED = [
    (json.dumps({"a": T}), b"\0" * 12, "trailing", True),
    (json.dumps({"a": {**T, "data_offsets": [4, 12]}}), b"\0" * 12, "belong to no tensor", True),
    (json.dumps({"a": {**T, "shape": [1], "data_offsets": [0, 4]},
                 "b": {**T, "shape": [1], "data_offsets": [8, 12]}}), b"\0" * 12, "belong to no tensor", True),
    (json.dumps({"a": T, "b": T}), b"\0" * 8, "overlap", True),
    (json.dumps({"a": {**T, "shape": [0], "data_offsets": [4, 4]}, "b": T}), b"\0" * 8, "overlap", True),
    # a duplicate key hiding an out-of-bounds copy, in either order
    ('{"a": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}, "a": ' + json.dumps(T) + "}",
     b"\0" * 8, "duplicate", False),
    ('{"a": ' + json.dumps(T) + ', "a": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}',
     b"\0" * 8, "duplicate", True),
    ('{"__metadata__": {"k": "1", "k": "2"}, "a": ' + json.dumps(T) + "}", b"\0" * 8, "duplicate", False),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": NaN}}', b"\0" * 8, "non-finite", True),
    ('{"\\ud800": ' + json.dumps(T) + "}", b"\0" * 8, "unicode", True),
    ('{"__metadata__": {"k": "\\udfff"}, "a": ' + json.dumps(T) + "}", b"\0" * 8, "unicode", True),
    (json.dumps({"a": {**T, "dtype": ["F32"]}}), b"\0" * 8, "dtype", True),
    (json.dumps({"a": {**T, "dtype": {"x": 1}}}), b"\0" * 8, "dtype", True),
    (json.dumps({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}), b"\0" * 2, "whole number", True),
    (json.dumps({"a": {**T, "shape": [1] * 9 + [2]}}), b"\0" * 8, "shape", False),
    (json.dumps({"__metadata__": {"ss_tag_frequency": "[" * 65 + "]" * 65}, "a": T}), b"\0" * 8, "nested", False),
    (json.dumps({"__metadata__": {"lorahub": '{"a":' * 5000 + "1" + "}" * 5000}, "a": T}), b"\0" * 8,
     "nested", False),
    (json.dumps({"__metadata__": {"ss_tag_frequency": '{"d": {"t": Infinity}}'}, "a": T}), b"\0" * 8,
     "non-finite", False),
    (json.dumps({"__metadata__": {"ss_tag_frequency": '{"d": {"t": -1e400}}'}, "a": T}), b"\0" * 8, "range", False),
    (json.dumps({"__metadata__": {"ss_seed": '[' + "9" * 41 + "]"}, "a": T}), b"\0" * 8, "digits", False),
    (json.dumps({"__metadata__": {"x": "a" * (MAX_METADATA_BYTES + 1)}}), b"", "metadata", False),
    (json.dumps({f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
                 for i in range(MAX_TENSORS + 1)}), b"", "tensors", False),
]


@pytest.mark.parametrize("header, data, words, lib_refuses", REFUSED,
                         ids=[f"{i}-{case[2].replace(' ', '_')}" for i, case in enumerate(REFUSED)])
def test_what_safetensors_refuses_lorahub_refuses(header, data, words, lib_refuses):
    """Every layout error safetensors refuses, lorahub refuses too (``lib_refuses``); beyond that lorahub
    is stricter on purpose: its limits, duplicate keys, more than 8 dimensions, hostile JSON in metadata."""
    import safetensors

    blob = _blob(header, data)
    with pytest.raises(FormatError) as exc:
        parse_header_bytes(blob, len(blob))
    msg = str(exc.value)
    assert "\n" not in msg and words.lower() in msg.lower(), msg
    try:
        safetensors.deserialize(blob)
        lib_refused = False
    except Exception:
        lib_refused = True
    assert lib_refused == lib_refuses


@pytest.mark.parametrize(
    "header, data",
    [
        # zero-size tensors are valid anywhere their empty range touches the tiling
        ({"z": {"dtype": "F32", "shape": [8, 0], "data_offsets": [0, 0]}, "a": T}, b"\0" * 8),
        ({"a": T, "z": {"dtype": "F32", "shape": [8, 0], "data_offsets": [8, 8]}}, b"\0" * 8),
        ({"z": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]},
          "y": {"dtype": "BF16", "shape": [0, 3], "data_offsets": [0, 0]}}, b""),
        ({}, b""),
        ({"__metadata__": None, "a": T}, b"\0" * 8),
        ({"a": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, b"\0" * 2),
        ({"__metadata__": {"ss_tag_frequency": json.dumps({"1_x": {"[[[[": 3, "{{": 1}}),
                           "note": "[not json", "t": "\U0001f600"}, "a": T}, b"\0" * 8),
        ({"b": {**T, "data_offsets": [8, 16]}, "a": T}, b"\0" * 16),  # any key order
    ],
)
def test_valid_headers_are_accepted(header, data):
    import safetensors

    blob = _blob(header, data)
    h = parse_header_bytes(blob, len(blob))
    theirs = dict(safetensors.deserialize(blob))
    assert {k: (t.dtype, list(t.shape)) for k, t in h.tensors.items()} == \
        {k: (v["dtype"], v["shape"]) for k, v in theirs.items()}


@st.composite
def layouts(draw):
    """A header and data area laid out as safetensors writes them, then maybe perturbed."""
    from lorahub.formats.header import DTYPE_BITS

    n = draw(st.integers(min_value=0, max_value=5))
    tensors: dict = {}
    off = 0
    for i in range(n):
        dtype = draw(st.sampled_from(["F16", "F32", "BF16", "U8", "I64", "BOOL", "F4", "F8_E4M3"]))
        shape = draw(st.lists(st.integers(min_value=0, max_value=4), max_size=3))
        count = 1
        for s_ in shape:
            count *= s_
        nbytes = (count * DTYPE_BITS[dtype] + 7) // 8
        tensors[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + nbytes]}
        off += nbytes
    data_len = off
    kind = draw(st.sampled_from(["none", "none", "trail", "shift", "grow", "shrink", "dup", "zero_inside",
                                 "meta", "order"]))
    keys = list(tensors)
    if kind == "trail":
        data_len += draw(st.integers(min_value=1, max_value=8))
    elif kind in ("shift", "grow", "shrink") and keys:
        t = tensors[draw(st.sampled_from(keys))]
        d = draw(st.integers(min_value=1, max_value=3))
        b, e = t["data_offsets"]
        t["data_offsets"] = {"shift": [b + d, e + d], "grow": [b, e + d], "shrink": [b, max(b, e - d)]}[kind]
        data_len = max(data_len, t["data_offsets"][1])
    elif kind == "zero_inside" and data_len > 1:
        at = draw(st.integers(min_value=1, max_value=data_len - 1))
        tensors["z"] = {"dtype": "U8", "shape": [0], "data_offsets": [at, at]}
    raw = json.dumps(tensors)
    if kind == "dup" and keys:
        k = draw(st.sampled_from(keys))
        raw = "{" + json.dumps(k) + ": " + json.dumps(tensors[k]) + ", " + raw[1:]
    elif kind == "meta":
        meta = draw(st.dictionaries(st.text(max_size=6), st.text(max_size=12), max_size=3))
        raw = json.dumps({"__metadata__": meta, **tensors})
    elif kind == "order":
        raw = json.dumps(dict(reversed(list(tensors.items()))))
    return raw, b"\x01" * data_len, kind


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_lorahub_accepts_only_what_safetensors_reads(case):
    import safetensors

    raw, data, kind = case
    blob = _blob(raw, data)
    try:
        ours = parse_header_bytes(blob, len(blob))
    except FormatError:
        ours = None
    try:
        theirs = dict(safetensors.deserialize(blob))
    except Exception:
        theirs = None
    if ours is not None:
        assert theirs is not None, raw
        assert {k: (t.dtype, list(t.shape)) for k, t in ours.tensors.items()} == \
            {k: (v["dtype"], v["shape"]) for k, v in theirs.items()}
    if kind in ("none", "order", "meta"):  # untouched layouts are valid: both read them
        assert (ours is None) == (theirs is None), (raw, theirs)


# ------------------------------------------------------------------------------------------------
# The metadata and sidecar readers (lorahub.metadata) on hostile header fields and sidecar files
def _nested(depth: int, kind: str) -> str:
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth)


number_text = st.one_of(st.integers(min_value=-(10**50), max_value=10**50).map(str),
                        st.floats(allow_nan=True, allow_infinity=True).map(
                            lambda f: {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}.get(str(f), repr(f))),
                        st.sampled_from(["1e999", "-1e999", "1" + "0" * 4000, "NaN", "Infinity", "0.5", "3"]))
hostile_json_text = st.one_of(
    json_val.map(json.dumps),
    st.text(max_size=40),
    st.builds(_nested, st.integers(min_value=0, max_value=3000), st.sampled_from(["list", "obj"])),
    st.builds(lambda folder, tag, n: '{"%s": {"%s": %s}}' % (folder, tag, n),
              st.sampled_from(["10_aqua character", "1_x", "img/5_sks outfit", "\\ud800"]),
              st.sampled_from(["aqua", "[[", "\\udc80", "a\\u0000b"]), number_text),
    st.builds(lambda items: json.dumps(items), st.lists(st.one_of(st.text(max_size=20), st.binary(max_size=40).map(
        lambda b: __import__("base64").b64encode(b).decode())), max_size=3)),
)
META_KEYS = ["ss_tag_frequency", "ss_dataset_dirs", "ssmd_cover_images", "ssmd_keywords", "ssmd_tags",
             "ssmd_display_name", "ssmd_description", "ssmd_author", "ssmd_source", "ss_training_comment",
             "modelspec.title", "modelspec.trigger_phrase", "modelspec.architecture", "modelspec.date",
             "ss_base_model_version", "ss_training_started_at", "ss_v2", "lorahub"]
sidecar_text = st.one_of(
    hostile_json_text,
    st.builds(lambda d: json.dumps(d), st.fixed_dictionaries({}, optional={
        "activation text": st.one_of(st.text(max_size=20), st.lists(st.text(max_size=8), max_size=3), json_val),
        "preferred weight": json_val, "description": json_val, "notes": json_val, "sd version": json_val,
        "negative text": json_val, "trainedWords": json_val, "baseModel": json_val, "modelId": json_val,
        "id": json_val, "tags": json_val,
        "model": st.one_of(json_val, st.fixed_dictionaries({}, optional={
            "name": json_val, "type": json_val, "description": json_val,
            "tags": st.one_of(json_val, st.lists(st.sampled_from(["character", "Style", "poses", "x"]),
                                                 max_size=3))}))})),
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(META_KEYS), hostile_json_text, max_size=5),
       st.one_of(st.none(), sidecar_text), st.one_of(st.none(), sidecar_text),
       st.one_of(st.none(), st.binary(max_size=64)), st.one_of(st.none(), st.binary(max_size=64)),
       st.sampled_from(["chars", "loras", "styles"]))
def test_metadata_and_sidecar_readers_never_crash(meta, webui, civitai, txt, preview, folder):
    """Whatever the header metadata and the files beside it hold, reading them gives an Imported whose
    fields the registry can store (or one FormatError), never another exception."""
    import tempfile
    from pathlib import Path

    from lorahub.errors import LorahubError
    from lorahub.metadata import collect, read_image
    from lorahub.vocab import LORA_TYPES

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / folder / "f.safetensors"
        p.parent.mkdir()
        _write_raw(p, '{"__metadata__": {' + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in meta.items())
                   + '}, "a": ' + json.dumps(T) + "}", b"\0" * 8)
        for text, suffix in ((webui, ".json"), (civitai, ".civitai.info")):
            if text is not None:
                p.with_name("f" + suffix).write_bytes(text.encode("utf-8", "surrogatepass"))
        if txt is not None:
            p.with_name("f.txt").write_bytes(txt)
        if preview is not None:
            p.with_name("f.preview.png").write_bytes(b"\x89PNG\r\n\x1a\n" + preview)
        try:
            h = read_header(p)
            imp = collect(p, h.metadata)
        except FormatError as exc:
            assert "\n" not in str(exc)
            return
        for v in (imp.name, imp.description, imp.source, imp.base, imp.created_at, imp.type, imp.type_source):
            assert v is None or isinstance(v, str)
        assert all(isinstance(t, str) and t for t in imp.triggers + imp.tags)
        assert imp.type is None or imp.type in LORA_TYPES
        # what the registry stores: strict JSON (no NaN), valid UTF-8
        json.dumps([imp.name, imp.triggers, imp.tags, imp.description, imp.extra, imp.notes],
                   allow_nan=False, ensure_ascii=False).encode("utf-8")
        for _kind, src in imp.previews:
            try:
                read_image(src)
            except LorahubError:
                pass


def _write_raw(path, header: str, data: bytes) -> None:
    raw = header.encode("utf-8", "surrogatepass")
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
