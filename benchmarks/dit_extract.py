"""Benchmark: `lorahub extract` on a Flux.1-shaped pair (BFL single files) vs per-layer full SVD.

Generates two single-file Flux.1 transformers in the original BFL layout (bf16, as FLUX.1 ships) holding a
subset of the real model's blocks at width 3072, into ``benchmarks/_work/`` (git-ignored; reused when
present):

* modules (default): ``double_blocks.0`` img_attn.qkv 9216×3072, img_attn.proj 3072×3072, img_mlp.0
  12288×3072, img_mlp.2 3072×12288; ``single_blocks.0`` linear1 21504×3072, linear2 3072×15360
  (6 of FLUX.1-dev's 19·10 + 38·3 adaptable weights; ``--quick``: the two img_attn weights only);
* base  : random weights, N(0, 0.02²);
* tuned : base + ΔW, ΔW = G₁·diag(exp(−i/8))·G₂ over 32 directions plus a full-rank noise floor (5 % RMS)
          — low rank plus noise, scaled to an RMS of 2e-3 — then both stored as bf16.

Each arm runs in its own child process (wall time and peak RSS from wait4):

* reference : for each module, both tensors read with ``safetensors.safe_open`` (one at a time), the
              float32 difference factored by ``torch.linalg.svd(full_matrices=False)``, top 32 kept
              (the Eckart–Young optimum; no clamping, no output file).
* lorahub   : ``python -m lorahub extract BASE TUNED --rank 32 --dtype fp32 --out … --json``, the whole
              command (start-up, BLAKE3 of both files, streaming reads, Gram spectrum + randomized
              factors checked against the optimum, kohya-Flux file written).

Reported: wall time, peak RSS, Frobenius retained (overall, energy-weighted) and the ratios. Target:
≥ 4× faster at ≤ 0.5 % less Frobenius retained.

    python benchmarks/dit_extract.py            # the six modules above
    python benchmarks/dit_extract.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
GEN_VERSION = "1"
RANK = 32
W = 3072
MODULES = {
    "double_blocks.0.img_attn.qkv": (3 * W, W),
    "double_blocks.0.img_attn.proj": (W, W),
    "double_blocks.0.img_mlp.0": (4 * W, W),
    "double_blocks.0.img_mlp.2": (W, 4 * W),
    "single_blocks.0.linear1": (7 * W, W),
    "single_blocks.0.linear2": (W, 5 * W),
}
QUICK = ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj")


def generate(mods: dict) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    tag = f"flux-{len(mods)}-v{GEN_VERSION}"
    base_p, tuned_p = WORK / f"{tag}-base.safetensors", WORK / f"{tag}-tuned.safetensors"
    if base_p.exists() and tuned_p.exists():
        return base_p, tuned_p
    WORK.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for name, (out, inn) in mods.items():
        w = torch.randn(out, inn, generator=g) * 0.02
        s = torch.exp(-torch.arange(32, dtype=torch.float32) / 8)
        d = (torch.randn(out, 32, generator=g) * s) @ torch.randn(32, inn, generator=g)
        d = d / d.pow(2).mean().sqrt()
        d += 0.05 * torch.randn(out, inn, generator=g)
        d *= 2e-3 / d.pow(2).mean().sqrt()
        base[f"{name}.weight"] = w.to(torch.bfloat16)
        tuned[f"{name}.weight"] = (w + d).to(torch.bfloat16)
        base[f"{name}.bias"] = torch.zeros(out, dtype=torch.bfloat16)
        tuned[f"{name}.bias"] = torch.zeros(out, dtype=torch.bfloat16)
        del w, d
    save_file(base, str(base_p))
    save_file(tuned, str(tuned_p))
    return base_p, tuned_p


def reference(base: str, tuned: str, modules: list[str]) -> dict:
    """Per-layer full SVD, streamed with safe_open; prints its result as JSON."""
    import torch
    from safetensors import safe_open

    kept = tot = 0.0
    with safe_open(base, "pt") as fb, safe_open(tuned, "pt") as ft:
        for m in modules:
            d = ft.get_tensor(f"{m}.weight").float() - fb.get_tensor(f"{m}.weight").float()
            U, S, Vh = torch.linalg.svd(d, full_matrices=False)
            up, down = U[:, :RANK] * S[:RANK], Vh[:RANK]
            n2 = float(d.double().pow(2).sum())
            r = float((d.double() - up.double() @ down.double()).pow(2).sum())
            kept += n2 - r
            tot += n2
            del d, U, S, Vh
    return {"retained": (kept / tot) ** 0.5, "layers": len(modules)}


def _measure(cmd: list[str], env=None) -> tuple[float, int, str]:
    """Run ``cmd``; (wall seconds, peak RSS bytes, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:5])} failed: {err.decode()[-2000:]}")
    return wall, ru.ru_maxrss * 1024, out.decode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two modules only (smoke test)")
    ap.add_argument("--child-reference", nargs=2, metavar=("BASE", "TUNED"), help=argparse.SUPPRESS)
    ap.add_argument("--modules", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_reference:
        print(json.dumps(reference(*args.child_reference, args.modules.split(","))))
        return
    mods = {k: v for k, v in MODULES.items() if not args.quick or k in QUICK}
    t0 = time.perf_counter()
    base, tuned = generate(mods)
    gen_s = time.perf_counter() - t0
    load = os.getloadavg()[0]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), HF_HUB_OFFLINE="1")
    out = WORK / "dit-extract-out.safetensors"
    lh_s, lh_rss, lh_out = _measure([sys.executable, "-m", "lorahub", "extract", str(base), str(tuned), "--rank",
                                     str(RANK), "--dtype", "fp32", "--out", str(out), "--force", "--json"], env)
    lh = json.loads(lh_out[lh_out.index("{"):])
    ref_s, ref_rss, ref_out = _measure([sys.executable, __file__, "--child-reference", str(base), str(tuned),
                                        "--modules", ",".join(mods)], env)
    ref = json.loads(ref_out)
    lost = ref["retained"] - lh["frobenius_retained"]
    rows = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {__import__('torch').__version__}",
        "load_avg_start": round(load, 2), "modules": list(mods), "rank": RANK,
        "files_mb": round(base.stat().st_size / 1e6), "generate_s": round(gen_s, 1),
        "lorahub": {"seconds": round(lh_s, 2), "peak_rss_mb": round(lh_rss / 1e6), "retained": lh["frobenius_retained"],
                    "layers": lh["layers"]},
        "reference": {"seconds": round(ref_s, 2), "peak_rss_mb": round(ref_rss / 1e6), "retained": ref["retained"]},
        "speedup": round(ref_s / lh_s, 2), "retained_lost_vs_reference_pct": round(100 * lost, 4),
        "target_met": ref_s / lh_s >= 4 and lost <= 0.005,
    }
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
