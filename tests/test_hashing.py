"""One-pass hashes: FORMATS.md test vectors and independent recomputation of every definition."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zlib

import blake3
import pytest

from lorahub.hashing import display, hash_bytes, hash_file, hash_stream


def _safetensors_bytes(meta: dict, payload: bytes) -> bytes:
    header = {"__metadata__": meta, "w": {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}}
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def test_formats_md_vectors():
    h = hash_bytes(b"hello world")
    assert display("autov2", h.autov2) == "B94D27B993"
    assert display("crc32", h.crc32) == "85114A0D"
    assert h.sha256 == hashlib.sha256(b"hello world").hexdigest()
    assert h.blake3 == blake3.blake3(b"hello world").hexdigest()
    # CRC32 is zlib's value with its bytes in little-endian order
    assert h.crc32 == zlib.crc32(b"hello world").to_bytes(4, "little").hex()
    assert h.autov1 is None  # < 2 MiB


def test_autov3_skips_header_so_metadata_edits_keep_it():
    payload = os.urandom(5000)
    a = _safetensors_bytes({"ss_output_name": "a"}, payload)
    b = _safetensors_bytes({"ss_output_name": "something else", "x": "y"}, payload)
    ha, hb = hash_bytes(a), hash_bytes(b)
    assert ha.sha256 != hb.sha256
    assert ha.autov3 == hb.autov3 == hashlib.sha256(payload).hexdigest()
    n = struct.unpack("<Q", a[:8])[0]
    assert ha.autov3 == hashlib.sha256(a[8 + n:]).hexdigest()


def test_autov3_header_rules():
    # N >= 16 MiB: the header is not skipped (whole file hashed)
    data = struct.pack("<Q", 16 * 1024 * 1024) + b"x" * 100
    assert hash_bytes(data).autov3 == hashlib.sha256(data).hexdigest()
    # N < 16 MiB but beyond the file: not safetensors, no AutoV3
    data = struct.pack("<Q", 1000) + b"x" * 100
    assert hash_bytes(data).autov3 is None


def test_tiny_chunks_split_the_header_length(tmp_path):
    data = _safetensors_bytes({"k": "v"}, os.urandom(3000))
    p = tmp_path / "s.safetensors"
    p.write_bytes(data)
    assert hash_file(p, chunk=3) == hash_file(p, chunk=1 << 20) == hash_bytes(data)


@pytest.mark.parametrize("chunk", [4099, 65536, 1 << 20])
def test_one_pass_matches_definitions_at_any_chunk_size(tmp_path, chunk):
    rnd = os.urandom(2 * 1024 * 1024 + 12345)
    data = _safetensors_bytes({"k": "v" * 300}, rnd)
    p = tmp_path / "f.safetensors"
    p.write_bytes(data)
    out = io.BytesIO()
    h = hash_file(p, copy_to=out, chunk=chunk)
    assert out.getvalue() == data
    assert h.size == len(data)
    assert h.sha256 == hashlib.sha256(data).hexdigest()
    assert h.autov2 == h.sha256[:10]
    assert h.autov1 == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    n = struct.unpack("<Q", data[:8])[0]
    assert h.autov3 == hashlib.sha256(data[8 + n:]).hexdigest()
    assert h.blake3 == blake3.blake3(data).hexdigest()
    assert h.crc32 == zlib.crc32(data).to_bytes(4, "little").hex()


def test_large_file_threaded_path_agrees(tmp_path):
    data = _safetensors_bytes({}, os.urandom(9 * 1024 * 1024))
    p = tmp_path / "big.safetensors"
    p.write_bytes(data)
    h = hash_file(p)
    n = struct.unpack("<Q", data[:8])[0]
    assert h.autov3 == hashlib.sha256(data[8 + n:]).hexdigest()
    assert h.sha256 == hashlib.sha256(data).hexdigest()


def test_truncated_stream_is_reported():
    from lorahub.errors import FormatError

    with pytest.raises(FormatError):
        hash_stream(io.BytesIO(b"abc"), 10)
