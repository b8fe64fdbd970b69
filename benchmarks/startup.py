#!/usr/bin/env python
"""Start-up benchmark: `lorahub list`, `search`, `show` as a new user gets them (issue #18 item 1).

    python benchmarks/startup.py --out benchmarks/results/startup.md      # builds a fresh venv (needs PyPI)
    python benchmarks/startup.py --venv /tmp/lh-venv                       # reuse / keep that venv
    python benchmarks/startup.py --python /path/to/python                  # measure an existing install

1. A fresh virtual environment (no system site packages) gets ``pip install <this checkout>``: the
   pinned core dependencies of pyproject.toml, nothing else (no torch), installed the way a user's
   pip installs them (byte-code compiled at install time, the ``lorahub`` console script).
2. A registry of --entries generated kohya LoRAs is filled with ``lorahub scan``.
3. Each command runs --repeat times as a new process (the ``lorahub`` console script, page cache warm,
   one unmeasured run first); the median wall time is reported next to the same interpreter's bare
   ``python -c pass`` measured in the same run. Target: median < 0.3 s for list, search and show.
4. One more run of each command reports which heavy packages its process imported
   (pydantic, torch, numpy, ...): there must be none.

The machine's load average is recorded: on a shared machine the figures are inflated.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("pydantic", "pydantic_core", "torch", "numpy", "diffusers", "transformers", "peft", "safetensors", "rich")
TARGET = 0.3

PROBE = r"""
import json, os, runpy, sys
sys.argv = ["lorahub", *sys.argv[2:]]
out = os.environ["LH_PROBE_OUT"]
try:
    runpy.run_module("lorahub", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
json.dump(sorted({m.split(".")[0] for m in sys.modules}), open(out, "w"))
"""

GEN = r"""
import sys
from pathlib import Path
import numpy as np
from lorahub.tiny_loras import kohya_tensors, save_tensors
folder, n = Path(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
words = ["anime", "style", "portrait", "landscape", "character", "detail", "lineart", "watercolor"]
for i in range(n):
    rank = int(rng.choice([2, 4, 8]))
    mods = {f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn{1 + i % 2}_to_{m}": (320, 320)
            for m in ("q", "k")}
    save_tensors(folder / f"lora_{i:04d}.safetensors", kohya_tensors(mods, rank=rank, seed=rng),
                 {"ss_network_dim": str(rank), "ss_output_name": f"{words[i % 8]}_{i:04d}",
                  "ss_tag_frequency": '{"5_x": {"%s": 5, "zkz%d": 2}}' % (words[(i + 3) % 8], i)})
"""


def run(cmd: list[str], env: dict, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r


CPU: dict[str, list[float]] = {}


def timed(cmd: list[str], env: dict, label: str | None = None) -> float:
    """Wall seconds of a child process; its CPU seconds (user + sys) go to CPU[label]."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    run(cmd, env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if label:
        CPU.setdefault(label, []).append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return wall


def timed_tty(cmd: list[str], env: dict, label: str | None = None) -> float:
    """:func:`timed` with the child's stdout on a pseudo-terminal (what a user at a terminal gets:
    ``list``/``search`` print aligned columns there, tab-separated lines into a pipe)."""
    import pty
    import resource

    master, slave = pty.openpty()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    while True:  # drain the terminal, or the child blocks on a full one
        try:
            if not os.read(master, 65536):
                break
        except OSError:  # EIO: the child closed its end
            break
    err = p.communicate()[1]
    wall = time.perf_counter() - t0
    os.close(master)
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-2000:]!r}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if label:
        CPU.setdefault(label, []).append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return wall


def make_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    # a regular (non-editable) install of this checkout: what `pip install lorahub` would give
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", str(ROOT)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT)], check=True)
    return py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", type=Path, help="measure this interpreter's lorahub install instead of a fresh venv")
    ap.add_argument("--venv", type=Path, help="build (or reuse) the fresh venv here and keep it")
    ap.add_argument("--entries", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", type=Path, help="write the results as Markdown here")
    args = ap.parse_args()

    out_path = args.out.resolve() if args.out else None
    work = Path(tempfile.mkdtemp(prefix="lorahub-startup-"))
    os.chdir(work)  # so that no child imports lorahub from this checkout (python -c puts '' on sys.path)
    try:
        if args.python:
            py = args.python
            how = f"existing interpreter `{py}`"
        else:
            venv = args.venv or work / "venv"
            t0 = time.perf_counter()
            py = make_venv(venv)
            how = f"fresh venv (`pip install .`, {time.perf_counter() - t0:.0f} s to build)"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LORAHUB_HOME", "PYTHONDONTWRITEBYTECODE")}
        env["COLUMNS"] = "120"
        lh = [str(py), "-m", "lorahub"]
        script = Path(py).parent / "lorahub"
        if script.exists():
            lh = [str(script)]
        pkgs = json.loads(run([str(py), "-m", "pip", "list", "--format", "json"], env).stdout)
        versions = {p["name"].lower(): p["version"] for p in pkgs}
        where = run([str(py), "-c", "import lorahub, sys; print(lorahub.__file__)"], env).stdout.strip()
        if str(ROOT) in where and not args.python:
            raise SystemExit(f"the venv imports lorahub from the checkout ({where}), not its own install")

        src, home = work / "loras", work / "home"
        run([str(py), "-c", GEN, str(src), str(args.entries)], env)
        run(lh + ["scan", str(src), "--home", str(home)], env)
        name = "lora_0007"
        cmds = {"list": ["list"], "list (terminal)": ["list"], "list --json": ["list", "--json"],
                "search": ["search", "watercolor"], "show": ["show", name]}
        tty = {"list (terminal)"}  # stdout on a pseudo-terminal; the others print into a pipe
        for c in cmds.values():
            c += ["--home", str(home)]
        bare = [str(py), "-c", "pass"]
        for k, c in [("", bare)] + [(k, lh + c) for k, c in cmds.items()]:
            (timed_tty if k in tty else timed)(c, env)  # one unmeasured run each (byte-code, page cache)
        times: dict[str, list[float]] = {"python -c pass": []}
        for k in cmds:
            times[k] = []
        for _ in range(args.repeat):  # interleaved, so a load spike hits every command alike
            times["python -c pass"].append(timed(bare, env, "python -c pass"))
            for k, c in cmds.items():
                times[k].append((timed_tty if k in tty else timed)(lh + c, env, k))
        imported = {}
        for k, c in cmds.items():
            out = work / f"mods-{k}.json"
            run([str(py), "-c", PROBE, "x", *c], {**env, "LH_PROBE_OUT": str(out)})
            mods = set(json.loads(out.read_text()))
            imported[k] = sorted(m for m in HEAVY if m in mods)
        load = os.getloadavg()
    finally:
        os.chdir(ROOT)
        shutil.rmtree(work, ignore_errors=True)  # a --venv folder lives outside it and is kept

    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for k in cmds:
        ok = med[k] < TARGET
        label = f"`lorahub {' '.join(cmds[k][:-2])}`" + (" (stdout a terminal)" if k in tty else "")
        rows.append(f"| {label} | {med[k]:.3f} s | {min(times[k]):.3f}–{max(times[k]):.3f} s | "
                    f"{statistics.median(CPU[k]):.3f} s | {med[k] / med['python -c pass']:.1f}× | "
                    f"{'met' if ok else 'NOT met'} | {', '.join(imported[k]) or 'none'} |")
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dep = ", ".join(f"{n} {versions[n]}" for n in ("typer", "click", "rich", "sqlite-utils", "pydantic", "numpy")
                    if n in versions)
    shared = ("quiet" if load[0] < 1.0 else
              f"shared with other jobs (load average {load[0]:.1f} on {os.cpu_count()} CPUs): figures are inflated")
    md = f"""## Start-up of the catalogue commands (a new user's install)

Command: `python benchmarks/startup.py{' --out ' + str(args.out) if args.out else ''}` — {now}, {platform.node() or 'host'},
{platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}. Interpreter: {how}.
Installed: {dep}{'' if 'pydantic' in versions else ' (pydantic not installed)'}.
Registry: {args.entries} entries. Each figure is the median of {args.repeat} new processes of the `lorahub`
console script (interleaved with a bare `python -c pass`, median {med['python -c pass']:.3f} s wall,
{statistics.median(CPU['python -c pass']):.3f} s CPU); the machine was {shared}
(load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}).

| command | median wall | range | median CPU (user+sys) | × bare python | target < {TARGET} s (wall) | heavy packages imported |
|---|---|---|---|---|---|---|
""" + "\n".join(rows) + """

`lorahub list` and `search` print plain text, without rich: into a pipe (every row above but the one
marked) one tab-separated line per entry, on a terminal aligned columns fitted to its width (measured on
a pseudo-terminal). Before, they printed a rich table, about 1 ms per row: `list` took 0.43 s with 300
entries (`list --json`, same query without a table, 0.15 s). "Heavy packages imported" lists which of
pydantic, torch, numpy, diffusers, transformers, peft, safetensors and rich the command's process had
loaded when it ended (`show` still prints with rich). typer 0.29 imported pydantic (about 70 ms) while
parsing any argument; the pin to typer 0.28.0 removes it.
"""
    print(md)
    if out_path:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(md)


if __name__ == "__main__":
    main()
