"""Every hash people look LoRA files up by, computed in ONE read pass over the file.

Definitions (docs: ../shared/FORMATS.md, Civitai's model scanner, the webui):

=========  ==========================================================  =======================
name       bytes hashed                                                 shown as
=========  ==========================================================  =======================
sha256     the whole file                                               64 hex
autov1     SHA-256 of the 64 KiB at offset 1 MiB (webui "old hash")     8 hex; None if < 2 MiB
autov2     SHA-256 of the whole file                                    first 10 hex
autov3     webui "addnet" hash: SHA-256 of everything after the         64 hex (webui shows 12)
           safetensors header (8 + N bytes); if N >= 16 MiB the
           header is not skipped; None for non-safetensors files
crc32      CRC-32 of the whole file, bytes in little-endian order       8 hex
blake3     BLAKE3 of the whole file                                     64 hex
=========  ==========================================================  =======================

All values are lower-case hex here; :func:`display` gives Civitai's upper-case spelling.
``hash_file(path, copy_to=f)`` also writes the bytes it reads to an open file, so the registry
stores a blob while hashing it, without reading the source twice.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from dataclasses import asdict, dataclass
from typing import BinaryIO

AUTOV1_OFFSET = 0x100000
AUTOV1_LENGTH = 0x10000
AUTOV1_MIN_SIZE = 2 * 1024 * 1024
AUTOV3_MAX_HEADER = 16 * 1024 * 1024
CHUNK = 1024 * 1024
HASH_NAMES = ("sha256", "autov1", "autov2", "autov3", "crc32", "blake3")
SHORT_LEN = {"autov1": 8, "autov2": 10, "crc32": 8}


@dataclass(frozen=True)
class Hashes:
    sha256: str
    autov1: str | None
    autov2: str
    autov3: str | None
    crc32: str
    blake3: str
    size: int

    def as_dict(self) -> dict:
        return asdict(self)


def display(name: str, value: str | None) -> str:
    """Civitai's spelling of a stored hash: upper case for SHA256/AutoV1/AutoV2/CRC32."""
    if value is None:
        return "-"
    if name in ("sha256", "autov1", "autov2", "crc32"):
        return value.upper()
    return value


def crc32_hex(crc: int) -> str:
    """CRC-32 value printed with its bytes in little-endian order (``b"hello world"`` -> 85114a0d)."""
    return (crc & 0xFFFFFFFF).to_bytes(4, "little").hex()


def _autov3_start(first8: bytes, size: int) -> int | None:
    """Offset where the addnet hash starts, or None when the file is not safetensors-shaped."""
    if len(first8) < 8:
        return None
    n = int.from_bytes(first8, "little")
    if n >= AUTOV3_MAX_HEADER:
        return 0 if size >= 8 else None
    if n < 2 or 8 + n > size:
        return None
    return 8 + n


def _new_blake3():
    from blake3 import blake3

    return blake3()


def hash_file(path: str | os.PathLike, *, copy_to: BinaryIO | None = None, chunk: int = CHUNK) -> Hashes:
    """Hash ``path`` in one pass (optionally copying its bytes to ``copy_to``)."""
    with open(path, "rb") as f:
        return hash_stream(f, os.fstat(f.fileno()).st_size, copy_to=copy_to, chunk=chunk)


def hash_bytes(data: bytes) -> Hashes:
    """The hashes of a file whose whole content is ``data`` (what :func:`hash_stream` gives)."""
    mv = memoryview(data)
    size = len(data)
    digest = hashlib.sha256(mv).hexdigest()
    v3_start = _autov3_start(data[:8], size)
    v1 = None
    if size >= AUTOV1_MIN_SIZE:
        v1 = hashlib.sha256(mv[AUTOV1_OFFSET:AUTOV1_OFFSET + AUTOV1_LENGTH]).hexdigest()[:8]
    b3 = _new_blake3()
    b3.update(mv)
    return Hashes(
        sha256=digest,
        autov1=v1,
        autov2=digest[:10],
        autov3=hashlib.sha256(mv[v3_start:]).hexdigest() if v3_start is not None else None,
        crc32=crc32_hex(zlib.crc32(mv)),
        blake3=b3.hexdigest(),
        size=size,
    )


def hash_stream(f: BinaryIO, size: int, *, copy_to: BinaryIO | None = None, chunk: int = CHUNK) -> Hashes:
    sha = hashlib.sha256()
    b3 = _new_blake3()
    crc = 0
    v1 = hashlib.sha256() if size >= AUTOV1_MIN_SIZE else None
    v3 = None
    v3_start: int | None = None
    pos = 0
    first = True
    # Large files: let the two SHA-256 streams run on two threads (hashlib releases the GIL).
    pool = None
    if size >= 8 * chunk:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1)
    try:
        while True:
            buf = f.read(max(chunk, 8) if first else chunk)
            if not buf:
                break
            if first:
                first = False
                v3_start = _autov3_start(buf[:8], size)
                if v3_start is not None:
                    v3 = hashlib.sha256()
            end = pos + len(buf)
            mv = memoryview(buf)
            v3_part = None
            if v3 is not None and end > v3_start:
                v3_part = mv[max(0, v3_start - pos):]
            fut = None
            if pool is not None and v3_part is not None:
                fut = pool.submit(v3.update, v3_part)
            elif v3_part is not None:
                v3.update(v3_part)
            sha.update(mv)
            b3.update(mv)
            crc = zlib.crc32(mv, crc)
            if v1 is not None and pos < AUTOV1_OFFSET + AUTOV1_LENGTH and end > AUTOV1_OFFSET:
                lo = max(AUTOV1_OFFSET, pos) - pos
                hi = min(AUTOV1_OFFSET + AUTOV1_LENGTH, end) - pos
                v1.update(mv[lo:hi])
            if copy_to is not None:
                copy_to.write(mv)
            if fut is not None:
                fut.result()
            pos = end
    finally:
        if pool is not None:
            pool.shutdown()
    if pos != size:
        from lorahub.errors import FormatError

        raise FormatError(f"file changed while it was read ({pos} bytes read, {size} expected)")
    digest = sha.hexdigest()
    return Hashes(
        sha256=digest,
        autov1=v1.hexdigest()[:8] if v1 is not None else None,
        autov2=digest[:10],
        autov3=v3.hexdigest() if v3 is not None else None,
        crc32=crc32_hex(crc),
        blake3=b3.hexdigest(),
        size=size,
    )


def sha256_file(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            buf = f.read(chunk)
            if not buf:
                break
            h.update(buf)
    return h.hexdigest()
