#!/usr/bin/env python
"""Crash stress: kill `lorahub` with SIGKILL at random moments and check nothing is lost or half-written.

    python tests/stress/crash.py --trials 50 [--ops add,scan,convert,merge,extract] [--seed N] [--workdir DIR]

Each trial starts one command in a child process against a shared registry home and kills it after a
random delay. After every kill: PRAGMA integrity_check is ok; every entry's blob exists and hashes to
its sha256 (`verify`); no blob in the store has content that differs from its name (no partial file
under a final name); the output file of convert/merge/extract, if present under its final name, is a
complete safetensors file. Then the killed command is run again (outputs with --force) and must
succeed; after it: the store checks again, every file the command was given is registered, no temp
file is left beside the outputs (the re-run removes what the killed writer left), and every temp file
in the store belongs to a killed process (`gc` removes those). At the end `gc` removes every leftover
temp file and unreferenced blob. Prints a JSON report; exits 1 when it lists problems.
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


def _temps(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob(".lorahub-tmp-*") if p.is_file())


def _registered(home: Path, paths: list[str]) -> list[str]:
    """The paths among ``paths`` whose bytes are not registered in ``home``."""
    conn = sqlite3.connect(home / "lorahub.db")
    shas = {r[0] for r in conn.execute("SELECT sha256 FROM entries")}
    conn.close()
    return [p for p in paths if hashlib.sha256(Path(p).read_bytes()).hexdigest() not in shas]


def run(trials: int, ops: list[str], workdir: Path, seed: int = 0, max_delay: float = 2.5) -> dict:
    from lorahub.fsutil import temp_writer

    rng = random.Random(seed)
    home = workdir / "home"
    src = workdir / "src"
    src.mkdir(parents=True, exist_ok=True)
    files = [kohya_file(src / f"f{k:03d}.safetensors", seed=1000 + k) for k in range(60)]
    env = dict(os.environ, LORAHUB_HOME=str(home), HF_HUB_OFFLINE="1")
    problems, kills, outputs, reruns, dead_temps = [], 0, 0, 0, 0
    # one registered entry so convert/merge have something to work on
    subprocess.run([sys.executable, "-m", "lorahub", "add", str(files[0])], env=env, capture_output=True)
    tuned = _tuned_tiny(workdir / "tuned-sd1") if "extract" in ops else None
    durations: dict[str, float] = {}
    killed_pids: set[int] = set()
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
            killed_pids.add(proc.pid)
        proc.wait()
        for p in _check_store(home):
            problems.append(f"trial {t} ({op}): {p}")
        if out.exists():
            outputs += 1
            if not _complete_safetensors(out):
                problems.append(f"trial {t} ({op}): partial output under its final name")
        # the same command again: it must finish, and leave nothing behind
        again = cmd + (["--force"] if op in ("convert", "merge", "extract") else [])
        r = subprocess.run([sys.executable, "-m", "lorahub", *again], env=env, capture_output=True, text=True)
        reruns += 1
        if r.returncode != 0:
            problems.append(f"trial {t} ({op}): re-run failed: exit {r.returncode}: {r.stderr.strip()[-300:]}")
        for p in _check_store(home):
            problems.append(f"trial {t} ({op}) after the re-run: {p}")
        given = pick if op == "add" else [str(f) for f in files] if op == "scan" else []
        missing = _registered(home, given)
        if missing:
            problems.append(f"trial {t} ({op}): {len(missing)} file(s) not registered after the re-run")
        if op in ("convert", "merge", "extract") and not (out.exists() and _complete_safetensors(out)):
            problems.append(f"trial {t} ({op}): no complete output after the re-run")
        beside = _temps(workdir)
        if beside:
            problems.append(f"trial {t} ({op}): {len(beside)} temp file(s) left beside the outputs: "
                            f"{[p.name for p in beside][:3]}")
        for p in _temps(home / "objects") + _temps(home):
            w = temp_writer(p.name)
            if w is None or w.pid not in killed_pids:
                problems.append(f"trial {t} ({op}): temp file {p.name} of a process that was not killed")
            else:
                dead_temps += 1
    from lorahub.registry import Registry

    reg = Registry.open(home)
    reg.gc(tmp_age_s=0)
    reg.close()
    left = _temps(home / "objects") + _temps(home)
    if left:
        problems.append(f"gc left {len(left)} temp files")
    problems += _check_store(home)
    return {"trials": trials, "ops": ops, "durations_s": {k: round(v, 2) for k, v in durations.items()},
            "killed": kills, "outputs_seen": outputs, "reruns": reruns, "temp_files_of_killed_writers": dead_temps,
            "problems": problems}


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
