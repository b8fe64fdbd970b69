"""Helpers for the stress scripts: small distinct LoRA files and in-process CLI calls."""

from __future__ import annotations

import contextlib
import io
import struct
import json
from pathlib import Path


def write_lora(path: Path, seed: int, rank: int = 2, width: int = 32) -> Path:
    """A tiny, valid kohya LoRA whose bytes depend on ``seed`` (written without torch)."""
    import random

    rng = random.Random(seed)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    down = struct.pack(f"<{rank * width}f", *(rng.uniform(-1, 1) for _ in range(rank * width)))
    up = struct.pack(f"<{width * rank}f", *(rng.uniform(-1, 1) for _ in range(width * rank)))
    alpha = struct.pack("<f", float(rank))
    tensors = [(f"{name}.alpha", [], alpha), (f"{name}.lora_down.weight", [rank, width], down),
               (f"{name}.lora_up.weight", [width, rank], up)]
    header, data, off = {"__metadata__": {"ss_network_dim": str(rank), "seed": str(seed)}}, b"", 0
    for key, shape, raw in tensors:
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def cli(args: list[str]) -> tuple[int, str, str]:
    """Run the lorahub CLI in this process; return (exit code, stdout, stderr)."""
    from lorahub.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(map(str, args)))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()
