#!/usr/bin/env python
"""Concurrency stress: P processes add, scan, tag, remove and gc overlapping files in one registry home at once.

    python tests/stress/concurrency.py --procs 4 --files 200 [--workdir DIR]

Phase 1: process 0 runs `scan --link` over the folder of all files (hard links into the store, files
with hour-old mtimes), every other process adds every file (in its own shuffled order) through the
CLI — maximal overlap. Phase 2 (after a barrier): every process tags every entry +p<i> and removes its
own disjoint share. Meanwhile one more process runs `gc` over and over, through both phases.
Checks: each surviving file registered exactly once, every entry's blob present and intact (`verify`
clean; gc never took a blob or a temp file still in use), every entry carries all P tags (no lost
update), removed entries are gone, no 'database is locked'/'busy' message or unexpected exit code
reached a user, PRAGMA integrity_check is ok, and after a last `gc` the store holds exactly the
surviving entries' blobs and no temp file.
Prints a JSON report; exits 1 when it lists problems.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import os
import random
import sqlite3
import sys
import time
from pathlib import Path

from lorahub.tiny_loras import kohya_file


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


def _worker(i: int, procs: int, home: str, folder: str, files: list[str], barrier, queue) -> None:
    problems = []
    if i == 0:
        code, out, err = cli(["scan", folder, "--link", "--json", "--home", home])
        if code != 0 or "locked" in err.lower() or "busy" in err.lower():
            problems.append(f"scan --link: exit {code}: {err.strip()}")
        elif json.loads(out)["skipped"]:
            problems.append(f"scan --link skipped files: {json.loads(out)['skipped'][:3]}")
    else:
        order = files[:]
        random.Random(i).shuffle(order)
        for f in order:
            code, out, err = cli(["add", f, "--home", home])
            if code != 0 or "locked" in err.lower() or "busy" in err.lower():
                problems.append(f"add {Path(f).name}: exit {code}: {err.strip()}")
    barrier.wait()
    shas = [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files]
    mine = [s for k, s in enumerate(shas) if k % (2 * procs) == i]  # removed by this worker
    removed = {s for k, s in enumerate(shas) if k % (2 * procs) < procs}  # removed by some worker
    for s in shas:
        code, out, err = cli(["tag", s[:16], f"+p{i}", "--home", home])
        # an entry another worker removed may be gone already: only that refusal is allowed
        gone = s in removed and code == 2 and "no registry entry matches" in err
        if (code != 0 and not gone) or "locked" in err.lower() or "busy" in err.lower():
            problems.append(f"tag {s[:12]}: exit {code}: {err.strip()}")
    for s in mine:
        code, out, err = cli(["rm", s[:16], "--home", home])
        if code != 0:
            problems.append(f"rm {s[:12]}: exit {code}: {err.strip()}")
    queue.put(problems)


def _collector(home: str, stop, queue) -> None:
    """Run `gc` until told to stop; report its failures (an empty catalogue at the start may refuse)."""
    problems, runs = [], 0
    while not stop.is_set():
        code, out, err = cli(["gc", "--json", "--home", home])
        runs += 1
        if code != 0 and not (code == 2 and ("no entries" in err or "no lorahub registry" in err)):
            problems.append(f"gc: exit {code}: {err.strip()}")
        time.sleep(0.01)
    queue.put((runs, problems))


def run(procs: int, nfiles: int, workdir: Path) -> dict:
    src = workdir / "files"
    src.mkdir(parents=True, exist_ok=True)
    home = workdir / "home"
    files = [str(kohya_file(src / f"lora_{k:04d}.safetensors", seed=k, rank=2, width=32)) for k in range(nfiles)]
    hour_ago = time.time() - 3600
    for f in files:  # linked temp files keep this mtime: gc must not judge them by it
        os.utime(f, (hour_ago, hour_ago))
    ctx = mp.get_context("spawn")
    barrier, queue, gcq, stop = ctx.Barrier(procs), ctx.Queue(), ctx.Queue(), ctx.Event()
    t0 = time.perf_counter()
    ps = [ctx.Process(target=_worker, args=(i, procs, str(home), str(src), files, barrier, queue))
          for i in range(procs)]
    collector = ctx.Process(target=_collector, args=(str(home), stop, gcq))
    collector.start()
    for p in ps:
        p.start()
    problems = []
    for _ in ps:
        problems += queue.get(timeout=1800)
    for p in ps:
        p.join()
    stop.set()
    gc_runs, gc_problems = gcq.get(timeout=600)
    collector.join()
    problems += gc_problems
    elapsed = time.perf_counter() - t0
    shas = [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files]
    removed = {s for k, s in enumerate(shas) if k % (2 * procs) < procs}
    conn = sqlite3.connect(home / "lorahub.db")
    conn.row_factory = sqlite3.Row
    rows = conn.execute("SELECT sha256, tags FROM entries").fetchall()
    by_sha: dict[str, int] = {}
    for r in rows:
        by_sha[r["sha256"]] = by_sha.get(r["sha256"], 0) + 1
        tags = set(json.loads(r["tags"]))
        missing = {f"p{i}" for i in range(procs)} - tags
        if missing:
            problems.append(f"entry {r['sha256'][:12]} lost tag update(s): {sorted(missing)}")
    for s in shas:
        want = 0 if s in removed else 1
        if by_sha.get(s, 0) != want:
            problems.append(f"{s[:12]} registered {by_sha.get(s, 0)} times, expected {want}")
    integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    conn.close()
    if integrity != "ok":
        problems.append(f"integrity_check: {integrity}")
    code, out, err = cli(["verify", "--home", str(home)])
    if code != 0:
        problems.append(f"verify: exit {code}: {out.strip()} {err.strip()}")
    code, out, err = cli(["gc", "--json", "--home", str(home)])
    if code != 0:
        problems.append(f"final gc: exit {code}: {err.strip()}")
    blobs = sorted(p.name for p in (home / "objects").rglob("*") if p.is_file() and not p.name.startswith("."))
    if blobs != sorted(set(shas) - removed):
        problems.append(f"{len(blobs)} blobs for {len(set(shas) - removed)} surviving entries")
    temps = [p.name for p in home.rglob(".lorahub-tmp-*")]
    if temps:
        problems.append(f"{len(temps)} temp file(s) left after the last gc")
    return {"procs": procs, "files": nfiles, "seconds": round(elapsed, 1),
            "operations": (procs - 1) * nfiles + 1 + procs * nfiles + len(removed) + gc_runs, "gc_runs": gc_runs,
            "problems": problems}


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--workdir", type=Path, help="where the files and the registry home go (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        report = run(args.procs, args.files, args.workdir or Path(d))
    print(json.dumps(report, indent=2))
    sys.exit(1 if report["problems"] else 0)


if __name__ == "__main__":
    main()
