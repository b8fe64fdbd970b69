#!/usr/bin/env python
"""Header parse + format detection: CPU cost per small kohya LoRA file.

    python benchmarks/detect_speed.py              # 1,000 files, best of 5 passes
    python benchmarks/detect_speed.py --files 200 --repeat 3

The files are the ones of the scan benchmark (benchmarks/registry.py): kohya LoRAs of 4-23 SD1 attention
modules (12-69 tensors, 20-200 KB), rank 2/4/8/16 with alpha rank/2, kohya metadata, written with
:func:`lorahub.tiny_loras.kohya_tensors` / :func:`~lorahub.tiny_loras.save_tensors` by the same recipe.
Printed, in milliseconds per file and files per second (best of --repeat passes over all files, one thread,
page cache warm):

(a) ``detect(path)``: read the header from disk, parse it, classify (alphas read from the file);
(b) ``detect_bytes(data, path)`` from the whole file already in memory, the caches emptied before each
    pass (the first file of each structure is analysed in full, the others reuse it: a first scan);
(c) the same with the cache warm (every file's structure seen before);
(d) the file read alone (``Path.read_bytes``), the cost (b)/(c) leave to the caller.

The issue #18 target: header parse + detection <= 0.12 ms per file for these files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import platform
import tempfile
import time
from pathlib import Path

from lorahub.tiny_loras import scan_library


def per_file_ms(fn, items, repeat: int, before=None) -> float:
    best = float("inf")
    for _ in range(repeat):
        if before is not None:
            before()
        t0 = time.process_time()
        for it in items:
            fn(it)
        best = min(best, time.process_time() - t0)
    return 1000 * best / len(items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, help="also write the results as Markdown here")
    args = ap.parse_args()

    from lorahub.formats import detect as det
    from lorahub.formats.header import header_from_bytes

    with tempfile.TemporaryDirectory() as d:
        paths = scan_library(Path(d), args.files)
        blobs = [(p.read_bytes(), p) for p in paths]
        size = sum(len(b) for b, _ in blobs)
        assert all(det.detect_bytes(b, p) == det.detect(p) for b, p in blobs[:50])
        rows = [
            ("(a) detect(path): read header + parse + classify + alphas from the file",
             per_file_ms(det.detect, paths, args.repeat)),
            ("(b) detect_bytes(data, path), structure cache cleared before each pass",
             per_file_ms(lambda bp: det.detect_bytes(*bp), blobs, args.repeat, before=det.clear_cache)),
            ("(c) detect_bytes(data, path), structure cache warm",
             per_file_ms(lambda bp: det.detect_bytes(*bp), blobs, args.repeat)),
            ("(d) Path.read_bytes alone (for scale)", per_file_ms(Path.read_bytes, paths, args.repeat)),
        ]
    head = (f"{args.files} kohya files, {size / args.files / 1024:.0f} KB average, "
            f"{len({header_from_bytes(b).section for b, _ in blobs})} distinct tensor sections; "
            f"Python {platform.python_version()}, {platform.processor() or platform.machine()}; "
            f"CPU time, best of {args.repeat}")
    print(head)
    for label, ms in rows:
        print(f"  {label:<76} {ms:7.3f} ms/file  {1000 / ms:9.0f} files/s")
    if args.out:
        cmd = "python benchmarks/detect_speed.py " + " ".join(sys.argv[1:])
        table = "\n".join(f"| {label} | {ms:.3f} | {1000 / ms:.0f} |" for label, ms in rows)
        args.out.write_text(f"""## Header parse + format detection (per small file)

Command: `{cmd.strip()}` — {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC. {head}.
Target (issue #18): header parse + detection <= 0.12 ms per file for the scan benchmark's files.

| path | ms per file | files/s |
|---|---|---|
{table}
""")


if __name__ == "__main__":
    main()
