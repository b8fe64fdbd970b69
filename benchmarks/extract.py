"""Benchmark: `lorahub extract` vs the common approach (exact SVD of every full difference matrix).

Generates SD1.5-shaped UNet checkpoints as single fp16 ``.safetensors`` files in the original LDM layout
(``model.diffusion_model.*``) into ``benchmarks/_work/`` (git-ignored; reused when present):

* base  : random weights, N(0, 0.02²);
* tuned : base + ΔW on every layer the extraction adapts, ΔW = G₁·diag(s)·G₂ with a decaying spectrum
          sᵢ = exp(−i/30) over 256 directions, plus a full-rank noise floor (a fine-tune's heavy tail),
          scaled to an RMS of 2e-3 (about a tenth of the weights).

Then, each in its own child process (time and peak RSS measured per child with wait4):

* reference : loads both checkpoints whole (``safetensors.torch.load_file``), and for every adapted layer
              takes ``torch.linalg.svd`` of the float32 difference (full_matrices=True, as popular
              extraction scripts do), keeps the top 64: the Eckart–Young optimum. No clamping.
* lorahub   : ``python -m lorahub extract BASE TUNED --rank 64 --dtype fp16 --json`` (streams layer by
              layer, randomized SVD checked against the exact optimum, fp16 output file, sha256 of both
              models, metadata) — the whole command, interpreter start-up included.

Reported: wall time, peak RSS, Frobenius norm retained (overall, energy-weighted) and the ratios.
Target (2-core CPU): ≥ 4× faster at ≤ 0.5 % less Frobenius retained, peak memory < 4 GB.

    python benchmarks/extract.py            # UNet attention/feed-forward/projection layers (LoRA)
    python benchmarks/extract.py --conv     # also 3×3 convs at conv-rank 64 (LoCon; slow reference)
    python benchmarks/extract.py --quick    # smoke test: mid block + one up block only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
GEN_VERSION = "2"
RANK = 64


def _adapted(ldm_key: str, shape, conv: bool) -> bool:
    """The layers the reference extracts, by LDM name (same rule as lorahub's: attention blocks'
    linear and 1×1 layers; with --conv also resnet/down/upsampler convs and their linear/1×1 layers)."""
    if not ldm_key.endswith(".weight") or len(shape) not in (2, 4):
        return False
    if ".transformer_blocks." in ldm_key or re.search(r"\.1\.proj_(in|out)\.weight$", ldm_key):
        return len(shape) == 2 or tuple(shape[2:]) == (1, 1)
    if conv and re.search(r"(in_layers\.2|out_layers\.3|skip_connection|emb_layers\.1|\.op|\.conv)\.weight$",
                          ldm_key) and ("input_blocks" in ldm_key or "output_blocks" in ldm_key
                                        or "middle_block" in ldm_key) and not ldm_key.startswith("model.diffusion_model.input_blocks.0."):
        return True
    return False


def generate(quick: bool, conv: bool) -> tuple[Path, Path]:
    import torch
    from diffusers import UNet2DConditionModel

    from lorahub import fsutil
    from lorahub.formats.names import unet_to_ldm
    from lorahub.ops.checkpoints import StreamWriter

    tag = f"sd15{'-quick' if quick else ''}{'-conv' if conv else ''}-v{GEN_VERSION}"
    base_p, tuned_p = WORK / f"base-{tag}.safetensors", WORK / f"tuned-{tag}.safetensors"
    if base_p.exists() and tuned_p.exists():
        return base_p, tuned_p
    WORK.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)  # the SD1.x UNet configuration
    entries = []
    for name, p in unet.state_dict().items():
        if quick and not name.startswith(("mid_block.", "up_blocks.1.", "down_blocks.0.downsamplers.")):
            continue
        k = unet_to_ldm(name, 2, lambda i: i in (1, 2, 3))
        entries.append(("model.diffusion_model." + k, tuple(p.shape)))
    t0 = time.time()
    print(f"generating {len(entries)} tensors into {WORK} ...", file=sys.stderr)
    spec = [(k, "F16", s) for k, s in entries]
    with fsutil.atomic_path(base_p) as tb, fsutil.atomic_path(tuned_p) as tt:
        wb, wt = StreamWriter(tb, spec), StreamWriter(tt, spec)
        for i, (k, shape) in enumerate(entries):
            g = torch.Generator().manual_seed(1000 + i)
            w = torch.randn(shape, generator=g) * 0.02
            wb.write(k, w.half())
            if _adapted(k, shape, conv):
                m = shape[0]
                n = int(torch.tensor(shape[1:]).prod())
                r = min(256, m, n)
                s = torch.exp(-torch.arange(r, dtype=torch.float32) / 30.0)
                d = (torch.randn(m, r, generator=g) * s) @ torch.randn(r, n, generator=g)
                d /= d.pow(2).mean().sqrt()
                d += 0.15 * torch.randn(m, n, generator=g)
                d *= 2e-3 / d.pow(2).mean().sqrt()
                w = w + d.reshape(shape)
            wt.write(k, w.half())
        wb.close()
        wt.close()
    print(f"generated in {time.time() - t0:.0f} s", file=sys.stderr)
    return base_p, tuned_p


REFERENCE = r'''
import importlib.util, json, sys, time, torch
from safetensors.torch import load_file
spec = importlib.util.spec_from_file_location("bench_extract", sys.argv[4])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
_adapted = mod._adapted
t0 = time.perf_counter()
base = load_file(sys.argv[1]); tuned = load_file(sys.argv[2]); conv = sys.argv[3] == "1"
rank = %d
kept = total = 0.0
n = 0
out = {}
for k, w in tuned.items():
    if not _adapted(k, tuple(w.shape), conv):
        continue
    mat = (w.float() - base[k].float()).reshape(w.shape[0], -1)
    U, S, Vh = torch.linalg.svd(mat)          # full_matrices=True, as the popular scripts call it
    U = U[:, :rank] @ torch.diag(S[:rank]); Vh = Vh[:rank]
    out[k] = (U.half(), Vh.half())
    s2 = S.double() ** 2
    kept += float(s2[:rank].sum()); total += float(s2.sum()); n += 1
print(json.dumps({"seconds": time.perf_counter() - t0, "layers": n, "retained": (kept / total) ** 0.5}))
''' % RANK


def run_child(cmd: list[str], env=None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of a child process (RSS reported by the child itself)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.stderr.write(err[-3000:])
        raise SystemExit(f"child failed: {' '.join(cmd[:4])} ...")
    peak = _peak_from_time(err)
    return wall, peak, out


def _peak_from_time(stderr: str) -> float:
    m = re.search(r"PEAK_RSS_KB=(\d+)", stderr)
    return int(m[1]) / 1024 if m else float("nan")


WRAP = r'''
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    if sys.argv[0] == "-m":
        sys.argv = sys.argv[1:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    sys.stderr.write("PEAK_RSS_KB=%d\n" % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="mid block + up_blocks.1 only (smoke test)")
    ap.add_argument("--conv", action="store_true", help="include 3×3 conv layers at conv-rank 64")
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()

    base, tuned = generate(args.quick, args.conv)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    wrap = WORK / "_wrap.py"
    wrap.write_text(WRAP)
    ref_script = WORK / "_reference.py"
    ref_script.write_text(REFERENCE)
    out = WORK / "extracted.safetensors"
    cmd = [sys.executable, str(wrap), "-m", "lorahub", "extract", str(base), str(tuned), "--rank", str(RANK),
           "--dtype", "fp16", "--out", str(out), "--force", "--json"]
    if args.conv:
        cmd += ["--conv-rank", str(RANK)]
    print("lorahub extract ...", file=sys.stderr)
    lw, lpeak, lout = run_child(cmd, env)
    lrep = json.loads(lout)
    methods = {}
    for r in lrep["per_layer"]:
        methods[r["method"]] = methods.get(r["method"], 0) + 1
    result = {"lorahub": {"wall_s": lw, "peak_rss_mb": lpeak, "retained": lrep["frobenius_retained"],
                          "layers": lrep["layers"], "methods": methods,
                          "out_mb": out.stat().st_size / 2**20}}
    if not args.skip_reference:
        print("reference (exact SVD of every full difference) ...", file=sys.stderr)
        rw, rpeak, rout = run_child([sys.executable, str(wrap), str(ref_script), str(base), str(tuned),
                                     "1" if args.conv else "0", str(Path(__file__).resolve())], env)
        rrep = json.loads(rout)
        result["reference"] = {"wall_s": rw, "peak_rss_mb": rpeak, "retained": rrep["retained"],
                               "layers": rrep["layers"]}
        if rrep["layers"] != lrep["layers"]:
            raise SystemExit(f"layer sets differ: reference {rrep['layers']} vs lorahub {lrep['layers']}")
        result["speedup"] = rw / lw
        result["retained_loss_pct"] = 100 * (rrep["retained"] - lrep["frobenius_retained"]) / rrep["retained"]
    result["checkpoint_mb"] = base.stat().st_size / 2**20
    result["machine"] = f"{platform.machine()} {os.cpu_count()} CPU, {platform.python_version()}"
    print(json.dumps(result, indent=2))
    L = result["lorahub"]
    print(f"\nlorahub   : {L['wall_s']:.1f} s, peak RSS {L['peak_rss_mb']:.0f} MB, retained {100 * L['retained']:.3f} %"
          f"  ({L['layers']} layers: {L['methods']})")
    if "reference" in result:
        R = result["reference"]
        print(f"reference : {R['wall_s']:.1f} s, peak RSS {R['peak_rss_mb']:.0f} MB, retained {100 * R['retained']:.3f} %")
        print(f"speed-up {result['speedup']:.2f}x, Frobenius retained {result['retained_loss_pct']:+.3f} % "
              f"(relative, reference minus lorahub)")


if __name__ == "__main__":
    main()
