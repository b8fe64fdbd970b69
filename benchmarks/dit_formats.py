"""Benchmark: inspect / resize / merge of DiT LoRAs at real shapes, from the factors vs materialising ΔW.

A FLUX.1-dev-shaped rank-32 kohya LoRA (BFL names, as kohya sd-scripts trains it: every linear of the 19
double blocks — img/txt attn qkv + proj, mlp.0/.2, mod.lin — and of the 38 single blocks — linear1,
linear2, modulation.lin — at width 3072), random fp16 factors, alpha 16, written as a raw kohya file.
lorahub reads it into 494 canonical layers (q/k/v and proj_mlp split off the fused modules, sharing
lora_down). Also an SD3.5-large-shaped rank-32 kohya LoRA (38 joint blocks at width 2432, every linear
of x_block and context_block; the last block context_pre_only).

Measured in one process, same threads:
  inspect  lorahub.ops.inspect.inspect_model (r×r Gram cores) vs ΔW = up·down·scale in float32 +
           torch.linalg.svdvals (‖ΔW‖_F, ‖ΔW‖₂, effective ranks)
  resize   lorahub.ops.resize.resize(rank 16) vs ΔW + torch.linalg.svd + truncation to 16
  merge    lorahub.ops.merge.merge(svd, rank 32) of two such LoRAs (weights 0.6/0.4) vs ΔW₁·0.6 + ΔW₂·0.4
           + torch.linalg.svd + truncation to 32
The materialised baselines run on a subset of layers (--baseline-layers attention projections of block 0,
width × width: the smallest layers, where materialising costs least; an SVD of a 3072×18432 ΔW takes tens of
seconds here); the factored path is timed on the same subset, so the ratio compares like with like, and the
factored path's time on every layer is reported beside it. Errors
(Frobenius of the result's ΔW minus the exact ΔW) are compared layer by layer.
Whole command: ``python -m lorahub inspect FILE --json`` in a child process (imports, file read, all
layers, JSON), median of --repeat runs.

    python benchmarks/dit_formats.py [--rank 32] [--threads 1] [--repeat 3] [--baseline-layers 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLUX_DOUBLE = {"img_attn_qkv": (9216, 3072), "img_attn_proj": (3072, 3072), "img_mlp_0": (12288, 3072),
               "img_mlp_2": (3072, 12288), "img_mod_lin": (18432, 3072),
               "txt_attn_qkv": (9216, 3072), "txt_attn_proj": (3072, 3072), "txt_mlp_0": (12288, 3072),
               "txt_mlp_2": (3072, 12288), "txt_mod_lin": (18432, 3072)}
FLUX_SINGLE = {"linear1": (21504, 3072), "linear2": (3072, 15360), "modulation_lin": (9216, 3072)}


def sd35_modules(width=2432, blocks=38) -> dict[str, tuple[int, int]]:
    out = {}
    for i in range(blocks):
        last = i == blocks - 1
        for side in ("x_block", "context_block"):
            mods = {"attn_qkv": (3 * width, width), "adaLN_modulation_1": ((2 if last and side == "context_block" else 6)
                                                                          * width, width)}
            if not (last and side == "context_block"):
                mods |= {"attn_proj": (width, width), "mlp_fc1": (4 * width, width), "mlp_fc2": (width, 4 * width)}
            out |= {f"lora_unet_joint_blocks_{i}_{side}_{k}": v for k, v in mods.items()}
    return out


def flux_modules(double=19, single=38) -> dict[str, tuple[int, int]]:
    out = {}
    for i in range(double):
        out |= {f"lora_unet_double_blocks_{i}_{k}": v for k, v in FLUX_DOUBLE.items()}
    for i in range(single):
        out |= {f"lora_unet_single_blocks_{i}_{k}": v for k, v in FLUX_SINGLE.items()}
    return out


def write_kohya(path: Path, modules: dict, rank: int, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    t = {}
    for name, (out, inn) in modules.items():
        t[f"{name}.lora_down.weight"] = (torch.randn(rank, inn, generator=g) / inn ** 0.5).half()
        t[f"{name}.lora_up.weight"] = (torch.randn(out, rank, generator=g) * 0.02).half()
        t[f"{name}.alpha"] = torch.tensor(float(rank) / 2)
    save_file(t, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2)})


def subset(model, n: int):
    """``n`` canonical layers of block 0 (double, single / joint) of size at most width × width (the
    attention projections): the materialised baselines' subset. Bigger layers cost the baseline more
    (SVD ~ out·in²), the factors the same per rank, so the ratio on these is the conservative one."""
    import re

    pick = [k for k, layer in model.layers.items()
            if re.search(r"transformer_blocks\.0\.attn\.", k) and layer.shape[0] == layer.shape[1]]
    step = max(1, len(pick) // n)
    return {k: model.layers[k] for k in pick[::step][:n]}


def materialised_inspect(layers) -> None:
    import torch

    for layer in layers.values():
        d = layer.delta(torch.float32)
        s = torch.linalg.svdvals(d)
        fro, spec = float(d.norm()), float(s[0])
        e = (s ** 2).cumsum(0) / (s ** 2).sum()
        int((e < 0.9).sum()) + 1, int((e < 0.99).sum()) + 1, fro, spec  # noqa: B018 - the quantities inspect reports


def svd_truncate(d, k):
    import torch

    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def child_inspect(path: Path, threads: int, repeat: int) -> list[float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "lorahub", "inspect", str(path), "--json"], env=env,
                           capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        if r.returncode != 0:
            raise SystemExit(f"inspect failed: {r.stderr[-400:]}")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline-layers", type=int, default=4, help="layers the materialised baselines run on")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from lorahub.formats.io import load_lora
    from lorahub.ops.inspect import inspect_model
    from lorahub.ops.merge import MergeInput, merge
    from lorahub.ops.resize import ResizeOptions, resize

    lines = ["## DiT formats at real shapes (inspect / resize / merge)", "",
             f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPU(s), "
             f"torch {torch.__version__}, {args.threads} torch thread(s)", "",
             "Command: `" + " ".join(["python", "benchmarks/dit_formats.py"] + sys.argv[1:]) + "`", ""]
    tmp = Path(tempfile.mkdtemp(prefix="lorahub-dit-bench-"))
    try:
        fa, fb = tmp / "flux-a.safetensors", tmp / "flux-b.safetensors"
        write_kohya(fa, flux_modules(), args.rank, 1)
        write_kohya(fb, flux_modules(), args.rank, 2)
        t_read, a = timed(lambda: load_lora(fa))
        b = load_lora(fb)
        sub = subset(a, args.baseline_layers)
        sub_model = type(a)(layers=sub, base=a.base)
        lines += [f"### FLUX.1-dev shape, rank {args.rank}", "",
                  f"kohya file: {len(flux_modules())} BFL modules ({fa.stat().st_size / 2**20:.0f} MiB fp16) -> "
                  f"{len(a.layers)} canonical layers, read in {t_read:.2f} s. Baseline subset ({len(sub)} layers, "
                  f"3072×3072 each): {', '.join(k.removeprefix('transformer.') for k in sub)}.", ""]
        rows = []
        # inspect
        t_all, _ = timed(lambda: inspect_model(a))
        t_fac, _ = timed(lambda: inspect_model(sub_model))
        t_mat, _ = timed(lambda: materialised_inspect(sub))
        rows.append(("inspect", t_fac, t_mat, t_all, "-", "-"))
        # resize to rank/2
        k = args.rank // 2
        t_fac, res = timed(lambda: resize(sub_model, ResizeOptions(rank=k)))
        errs_f, errs_m = [], []

        def base_resize():
            for key, layer in sub.items():
                d = layer.delta(torch.float32)
                approx = svd_truncate(d, k)
                errs_m.append(float((approx - d).norm()))
        t_mat, _ = timed(base_resize)
        for key, layer in sub.items():
            errs_f.append(float((res.model.layers[key].delta(torch.float32) - layer.delta(torch.float32)).norm()))
        t_all, _ = timed(lambda: resize(a, ResizeOptions(rank=k)))
        rows.append((f"resize -> {k}", t_fac, t_mat, t_all, f"{sum(errs_f):.6g}", f"{sum(errs_m):.6g}"))
        # merge (svd) two -> rank
        sub_b = type(b)(layers=subset(b, args.baseline_layers), base=b.base)
        t_fac, mres = timed(lambda: merge([MergeInput(sub_model, 0.6), MergeInput(sub_b, 0.4)], method="svd",
                                          rank=args.rank))
        errs_f, errs_m = [], []

        def base_merge():
            for key, layer in sub.items():
                d = 0.6 * layer.delta(torch.float32) + 0.4 * sub_b.layers[key].delta(torch.float32)
                errs_m.append(float((svd_truncate(d, args.rank) - d).norm()))
        t_mat, _ = timed(base_merge)
        for key, layer in sub.items():
            d = 0.6 * layer.delta(torch.float32) + 0.4 * sub_b.layers[key].delta(torch.float32)
            errs_f.append(float((mres.model.layers[key].delta(torch.float32) - d).norm()))
        t_all, _ = timed(lambda: merge([MergeInput(a, 0.6), MergeInput(b, 0.4)], method="svd", rank=args.rank))
        rows.append((f"merge svd 2 -> {args.rank}", t_fac, t_mat, t_all, f"{sum(errs_f):.6g}", f"{sum(errs_m):.6g}"))
        lines += ["| operation | factors, subset (s) | materialised, subset (s) | ratio | factors, all "
                  f"{len(a.layers)} layers (s) | Σ‖err‖_F factors | Σ‖err‖_F materialised |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, f, m, al, ef, em in rows:
            lines.append(f"| {name} | {f:.3f} | {m:.3f} | {m / f:.0f}× | {al:.2f} | {ef} | {em} |")
        ct = child_inspect(fa, args.threads, args.repeat)
        lines += ["", f"Whole command `python -m lorahub inspect FILE --json` (FLUX.1-dev shape): median "
                  f"{statistics.median(ct):.2f} s of {args.repeat} ({', '.join(f'{x:.2f}' for x in ct)})."]
        for f in (fa, fb):
            f.unlink()
        # SD3.5-large
        fs = tmp / "sd35.safetensors"
        write_kohya(fs, sd35_modules(), args.rank, 3)
        m = load_lora(fs)
        sub = subset(m, args.baseline_layers)
        t_fac, _ = timed(lambda: inspect_model(type(m)(layers=sub, base=m.base)))
        t_mat, _ = timed(lambda: materialised_inspect(sub))
        t_all, _ = timed(lambda: inspect_model(m))
        ct = child_inspect(fs, args.threads, args.repeat)
        lines += ["", f"### SD3.5-large shape, rank {args.rank}", "",
                  f"kohya file: {len(sd35_modules())} SAI modules ({fs.stat().st_size / 2**20:.0f} MiB fp16) -> "
                  f"{len(m.layers)} canonical layers (arch {m.arch}).", "",
                  "| operation | factors, subset (s) | materialised, subset (s) | ratio | factors, all layers (s) |",
                  "|---|---:|---:|---:|---:|",
                  f"| inspect ({len(sub)} layers of joint block 0, 2432×2432) | {t_fac:.3f} | "
                  f"{t_mat:.3f} | {t_mat / t_fac:.0f}× | {t_all:.2f} |", "",
                  f"Whole command `python -m lorahub inspect FILE --json` (SD3.5-large shape): median "
                  f"{statistics.median(ct):.2f} s of {args.repeat} ({', '.join(f'{x:.2f}' for x in ct)})."]
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
