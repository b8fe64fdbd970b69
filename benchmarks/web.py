#!/usr/bin/env python
"""Gallery benchmark: server time of `lorahub serve` pages on a registry of 10,000 entries.

    python benchmarks/web.py                      # 10,000 entries (builds the registry: ~1-2 minutes)
    python benchmarks/web.py --entries 2000 --repeat 10 --out benchmarks/results/web.md

The registry is built through the registry API: N small generated kohya LoRA files (ranks 2-32, realistic
kohya metadata with ~60 training tags, trigger words from the tag frequencies), every fifth one with a
`.preview.png` sidecar, added with `Registry.add_many` (what `lorahub scan` runs); then tags are spread
over the entries (one write transaction). The gallery is served in this process by a real uvicorn server
on a free port, and pages are requested over HTTP; the server time of each page is read from its
`Server-Timing` header (the time from the request reaching the application to the response start),
median of --repeat requests after one warm-up request. Target: the gallery page < 300 ms.
Start-up: the whole `python -m lorahub serve --port 0` process, from its start to the first gallery page
answered (median of 3; target < 1 s), next to a `lorahub search` cold start on the same registry.

Reference in the same process: `Registry.search()` of every entry (what `lorahub list` reads), which
the gallery must not pay: a page reads only its own rows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from lorahub.tiny_loras import kohya_tensors, save_tensors

MODULES = [f"lora_unet_down_blocks_{b}_attentions_{a}_transformer_blocks_0_{m}"
           for b in range(3) for a in range(2) for m in ("attn1_to_q", "attn1_to_k", "attn2_to_k", "attn2_to_v")]
WORDS = ("portrait", "anime", "watercolor", "cyberpunk", "forest", "castle", "knight", "robot", "sunset", "neon",
         "armor", "dress", "smile", "city", "ocean", "dragon", "flower", "snow", "desert", "pixel")
TAGS = ("style", "character", "wip", "favourite", "sdxl-ready", "photo", "painting", "concept", "pose", "test")


def make_files(folder: Path, n: int, seed: int = 0) -> None:
    """n small kohya LoRA files with kohya training metadata; every fifth with a preview sidecar."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    png = folder / "_preview.png"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rank = int(rng.choice([2, 4, 8, 16, 32]))
        mods = {m: (64, 96 if "attn2" in m else 64) for m in MODULES[: 2 + i % 6]}
        words = [WORDS[(i * 7 + k) % len(WORDS)] for k in range(3)]
        trigger = f"zk{i:05d}"
        freq = {f"10_{trigger}": {trigger: 40, **{f"{w} {j}": int(rng.integers(1, 40))
                                                  for j, w in enumerate(WORDS * 3)}}}
        meta = {"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2), "ss_output_name": f"lora_{i:05d}",
                "ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1",
                "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors", "ss_learning_rate": "0.0001",
                "ss_num_epochs": "10", "ss_resolution": "(512, 512)", "ss_tag_frequency": json.dumps(freq),
                "modelspec.title": f"{' '.join(words)} {i}", "modelspec.architecture": "stable-diffusion-v1/lora"}
        p = save_tensors(folder / f"d{i % 20}" / f"{words[0]}_{words[1]}_{i:05d}.safetensors",
                         kohya_tensors(mods, rank=rank, alpha=rank / 2, seed=rng), meta)
        if i % 5 == 0:
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            Image.new("RGB", (64, 64), colour).save(png)
            shutil.copyfile(png, p.with_suffix(".preview.png"))
    png.unlink(missing_ok=True)


def build_registry(home: Path, n: int, work: Path) -> dict:
    from lorahub.registry import Registry, edits
    from lorahub.registry.workflows import iter_files

    src = work / "loras"
    t0 = time.perf_counter()
    make_files(src, n)
    t1 = time.perf_counter()
    with Registry.open(home) as reg:
        counts = reg.add_many(iter_files(src, (".safetensors",)))
        t2 = time.perf_counter()
        with reg._write():  # one transaction for the tags (a benchmark fast path)
            for k, (eid,) in enumerate(reg.conn.execute("SELECT id FROM entries ORDER BY id").fetchall()):
                edits.change_tags(reg.conn, eid, add=[TAGS[k % len(TAGS)], TAGS[(k * 3 + 1) % len(TAGS)]])
        t3 = time.perf_counter()
        previews = reg.conn.execute("SELECT count(*) FROM previews").fetchone()[0]
        entries = reg.count()
    shutil.rmtree(src, ignore_errors=True)
    return {"entries": entries, "previews": previews, "generate_s": t1 - t0, "add_s": t2 - t1, "tags_s": t3 - t2,
            **counts}


def server_ms(url: str) -> tuple[float, float, int]:
    """(server ms from Server-Timing, client wall ms, bytes) of one GET."""
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as r:
        body = r.read()
        timing = r.headers.get("server-timing", "")
    wall = (time.perf_counter() - t0) * 1000
    m = re.search(r"dur=([0-9.]+)", timing)
    return (float(m.group(1)) if m else float("nan")), wall, len(body)


def startup_s(home: Path, env: dict) -> float:
    """Seconds from starting `lorahub serve` to its first gallery page answered."""
    import subprocess

    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "lorahub", "serve", "--port", "0", "--home", str(home)],
                         stdout=subprocess.PIPE, text=True, env=env)
    try:
        url = re.search(r"at (http://\S+)", p.stdout.readline()).group(1)
        urllib.request.urlopen(url, timeout=60).read()
        return time.perf_counter() - t0
    finally:
        p.terminate()
        p.wait(30)


def cold_search_s(home: Path, env: dict) -> float:
    import subprocess

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lorahub", "search", "zk00012", "--home", str(home)], env=env,
                   capture_output=True, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--home", type=Path, help="reuse (or build once into) this registry home")
    ap.add_argument("--out", type=Path, help="write the results as Markdown here")
    args = ap.parse_args()

    from lorahub.registry import Registry
    from lorahub.web.server import GalleryServer

    work = Path(tempfile.mkdtemp(prefix="lorahub-bench-web-"))
    try:
        home = args.home or work / "home"
        built = None
        if not (home / "lorahub.db").is_file():
            built = build_registry(home, args.entries, work)
            print(f"built: {built}", file=sys.stderr)
        with Registry.open(home) as reg:
            n = reg.count()
            some = reg.conn.execute("SELECT id FROM entries e WHERE EXISTS (SELECT 1 FROM previews p "
                                    "WHERE p.entry_id = e.id) ORDER BY id LIMIT 1").fetchone()[0]
            word = WORDS[3]
            # the reference: every entry, as `lorahub list` reads them
            ref = []
            for _ in range(max(3, args.repeat // 3)):
                t0 = time.perf_counter()
                all_entries = reg.search(None)
                ref.append((time.perf_counter() - t0) * 1000)
            assert len(all_entries) == n
        pages = [
            ("gallery, first page (newest first)", "/"),
            (f"search as you type `{word[:3]}` (results part)", f"/?q={word[:3]}&fragment=1"),
            (f"search `{word}` + tag filter", f"/?q={word}&tag=style"),
            ("filter base=sd1, sort by name, page 100", "/?base=sd1&sort=name&page=100"),
            ("last page, sorted by rank", "/?sort=rank&page=1000000"),
            ("entry page", f"/entry/{some}"),
        ]
        rows = []
        with GalleryServer.bind(home, port=0).start() as srv:
            base = srv.url.rstrip("/")
            for label, path in pages:
                server_ms(base + path)  # warm-up (templates compiled, thumbnails made)
                runs = [server_ms(base + path) for _ in range(args.repeat)]
                rows.append((label, path, statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs),
                             runs[0][2]))
                print(f"{label}: {rows[-1][2]:.1f} ms server, {rows[-1][3]:.1f} ms wall", file=sys.stderr)
            static = statistics.median(server_ms(base + "/static/style.css")[0] for _ in range(args.repeat))
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # as after `pip install`: byte-code cached
        startup_s(home, env)  # warm the OS caches
        start = statistics.median(startup_s(home, env) for _ in range(3))
        search_start = statistics.median(cold_search_s(home, env) for _ in range(3))
        load = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ref_ms = statistics.median(ref)
    gallery_ms = rows[0][2]
    cmd = "python benchmarks/web.py " + " ".join(sys.argv[1:])
    table = "\n".join(f"| {label} (`{path}`) | {srv_ms:.1f} ms | {wall:.1f} ms | {size / 1024:.0f} KB | "
                      f"{ref_ms / srv_ms:.1f}x |" for label, path, srv_ms, wall, size in rows)
    build = (f"Registry built for this run with `Registry.add_many`: {built['entries']} entries, {built['previews']} "
             f"previews (files generated in {built['generate_s']:.0f} s, added in {built['add_s']:.0f} s, tags "
             f"{built['tags_s']:.1f} s).") if built else f"Registry reused from {home} ({n} entries)."
    md = f"""## Web gallery benchmark (`lorahub serve`)

Command: `{cmd.strip()}` — {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()},
{platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}. {build}
Server time = the page's `Server-Timing` (request reaching the application → response start), median of
{args.repeat} requests after a warm-up; wall = the client's time for the whole request over loopback HTTP.

| page ({n} entries) | server time | wall | size | vs. reading every entry |
|---|---|---|---|---|
{table}
| a static file (`/static/style.css`), the floor | {static:.1f} ms | | | |

Start-up of `lorahub serve` (process start → first gallery page answered): {start:.2f} s (target < 1 s:
{'met' if start < 1 else 'NOT met'}); a `lorahub search` cold start on the same registry: {search_start:.2f} s.

Reference, same process: `Registry.search()` of all {n} entries (what `lorahub list` reads) {ref_ms:.1f} ms.
Target: the gallery page in < 300 ms server time: {'met' if gallery_ms < 300 else 'NOT met'} ({gallery_ms:.1f} ms).

Load average at the end of the run: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) on {os.cpu_count()} CPUs
(the machine is shared with other jobs: timings are noisy).

A page runs the count of matching entries and one page of 48 rows (the same full-text search and filters
as `lorahub search`; the sort runs over entry ids only, then the page's 48 rows are read); the filter menus
(types, bases, kinds, top tags with counts: one grouped pass over the catalogue) are computed again only
after the catalogue changed; card covers are thumbnails re-encoded once and cached in the home.
"""
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md)


if __name__ == "__main__":
    main()
