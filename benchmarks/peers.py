#!/usr/bin/env python
"""Benchmark: lorahub against the peers' own tools, side by side, on the same SD1.5-shaped inputs.

    python benchmarks/peers.py --kohya-dir /work/peers/sd-scripts \
        --peer-python /work/peers/venv-peers/bin/python --out benchmarks/results/peers.md

Peers (never project dependencies; give them their own throwaway venv, ``--peer-python``):

* kohya-ss/sd-scripts, a checkout at ``--kohya-dir`` (not on the package registry):
  ``networks/resize_lora.py``, ``networks/svd_merge_lora.py``, ``networks/merge_lora.py --concat`` and
  ``networks/extract_lora_from_models.py``, run as their README shows. Their venv needs
  sd-scripts' requirements (diffusers 0.32, transformers 4.54, accelerate, opencv, toml, voluptuous,
  imagesize, ftfy, einops). torchvision's wheels on the package registry need a CUDA build of torch;
  when the peer interpreter cannot import it, a stand-in module that only defines the names
  sd-scripts' ``library`` imports at module level is put on its path (the four scripts never call
  torchvision; the stand-in raises if anything does).
* LyCORIS (``lycoris-lora`` from the package registry): ``lycoris.utils.extract_diff`` on the two
  models loaded by sd-scripts' own checkpoint loader, as LyCORIS's extract tool does (mode "fixed").

Inputs (generated once into ``benchmarks/_work/peers``, git-ignored):

* an SD1.5-shaped rank-128 kohya LoRA (the 192 UNet attention modules + 72 CLIP-L modules kohya
  targets by default), fp16, alpha 64, random factors with a decaying column scale;
* three SD1.5-shaped rank-32 LoRAs (alphas 32, 16, 8; fp32);
* two full SD1.5-shaped checkpoints in the original single-file layout (UNet + VAE + CLIP-L, fp16),
  written by sd-scripts' own ``save_stable_diffusion_checkpoint``: random base weights N(0, 0.02²), and
  a "fine-tune" that adds to every attention-block Linear / 1×1 conv ΔW = G₁·diag(exp(−i/30))·G₂ over 256
  directions plus a full-rank floor, scaled to RMS 2e-3.

Runs, each in its own child process (wall time, and the child's peak RSS from wait4), pairs back to back:

* resize to rank 32; dynamic resize keeping 90 % of the Frobenius norm (kohya ``sv_fro 0.9``, lorahub
  ``--sv-fro 0.9``, cap 128);
* svd merge of the three LoRAs with weights 0.8, 0.6, −0.3 to rank 64 (kohya ``svd_merge_lora.py``);
* concat merge of the first two with weights 0.8, 0.6 (kohya ``merge_lora.py --concat``);
* extract at rank 64 (kohya at its default ``--clamp_quantile 0.99``; lorahub without clamp and with
  ``--clamp-quantile 0.99``, kohya's rule; LyCORIS ``extract_diff`` fixed rank 64).

Fidelity, per layer, in float64 after all runs: the Frobenius fraction of the target (the input LoRA's
ΔW; the exact weighted sum; tuned − base) that each output keeps, √(1 − ‖target − output‖²/‖target‖²),
against the exact optimum at the output's own rank (Eckart–Young, from the target's singular values).
No GPU is used (``--device cpu`` everywhere).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GEN_VERSION = "1"
WEIGHTS3 = (0.8, 0.6, -0.3)
ALPHAS3 = (32.0, 16.0, 8.0)

CHECKPOINTS = r'''
import sys, torch
from library import model_util
from library.original_unet import UNet2DConditionModel
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel

base_p, tuned_p = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
with torch.no_grad():
    unet = UNet2DConditionModel(**model_util.create_unet_diffusers_config(False))
    vae = AutoencoderKL(**model_util.create_vae_diffusers_config())
    te = CLIPTextModel._from_config(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-05, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, projection_dim=768))
    for m in (unet, vae, te):
        for p in m.parameters():
            p.normal_(0.0, 0.02)
    model_util.save_stable_diffusion_checkpoint(False, base_p, te, unet, None, 0, 0, None, torch.float16, vae)
    g = torch.Generator().manual_seed(1)
    n = 0
    for name, mod in unet.named_modules():
        if mod.__class__.__name__ != "Transformer2DModel":
            continue
        for cname, child in mod.named_modules():
            if not isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            w = child.weight
            if w.dim() == 4 and tuple(w.shape[2:]) != (1, 1):
                continue
            m_, k_ = w.shape[0], w[0].numel()
            r = min(256, m_, k_)
            s = torch.exp(-torch.arange(r, dtype=torch.float32) / 30.0)
            d = (torch.randn(m_, r, generator=g) * s) @ torch.randn(r, k_, generator=g)
            d /= d.pow(2).mean().sqrt()
            d += 0.15 * torch.randn(m_, k_, generator=g)
            d *= 2e-3 / d.pow(2).mean().sqrt()
            w += d.reshape(w.shape)
            n += 1
    model_util.save_stable_diffusion_checkpoint(False, tuned_p, te, unet, None, 0, 0, None, torch.float16, vae)
    print(n)
'''

LYCORIS = r'''
import sys, torch
from safetensors.torch import save_file
from library import model_util
from lycoris.utils import extract_diff

base_p, tuned_p, out_p, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
te_o, _, unet_o = model_util.load_models_from_stable_diffusion_checkpoint(False, base_p)
te_t, _, unet_t = model_util.load_models_from_stable_diffusion_checkpoint(False, tuned_p)
sd = extract_diff([te_o], [te_t], unet_o, unet_t, mode="fixed", linear_mode_param=rank, conv_mode_param=rank,
                  extract_device="cpu", use_bias=False, small_conv=False)
save_file({k: v.contiguous() for k, v in sd.items()}, out_p)
'''

TV_SHIM = {
    "torchvision/__init__.py": '"""Stand-in for torchvision (see benchmarks/peers.py): only the names sd-scripts\' library '
                               'imports at module level."""\n',
    "torchvision/transforms/__init__.py": (
        "from . import functional  # noqa: F401\n\n\nclass _Unavailable:\n    def __init__(self, *a, **k):\n"
        "        pass\n\n    def __call__(self, *a, **k):\n        raise RuntimeError('torchvision is not "
        "available in this benchmark environment')\n\n\nCompose = ToTensor = Normalize = _Unavailable\n"),
    "torchvision/transforms/functional.py": (
        "def __getattr__(name):\n    raise RuntimeError('torchvision is not available in this benchmark "
        "environment')\n"),
}


# ----------------------------------------------------------------------------------------------- inputs
QUICK = False  # --quick: a few modules only (a smoke test of the harness; not a result)


def sd15_targets():
    from lorahub.tiny_loras import sd15_targets as targets

    if QUICK:
        return [(k, s) for k, s in targets() if k.startswith(("unet.mid_block.", "text_encoder.text_model.encoder.layers.0."))]
    return targets()


def make_lora(rank: int, alpha: float, seed: int, dtype):
    import torch

    from lorahub.formats.canonical import LoraLayer, LoraModel

    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, shape in sd15_targets():
        out, inp = shape[0], shape[1]
        r = min(rank, out, inp)
        col = torch.exp(-torch.arange(r, dtype=torch.float32) / (r / 4))  # a trained LoRA's decaying spectrum
        up = torch.randn(out, r, generator=g) / r ** 0.5 * col
        down = torch.randn(r, inp, generator=g) / inp ** 0.5
        if len(shape) == 4:  # SD1.5 proj_in / proj_out are 1×1 convs
            up, down = up.reshape(out, r, 1, 1), down.reshape(r, inp, 1, 1)
        layers[name] = LoraLayer(kind="lora", weights={"up": up.to(dtype), "down": down.to(dtype)}, alpha=alpha)
    return LoraModel(layers=layers, base="sd1", source_format="kohya",
                     metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                               "ss_network_alpha": str(alpha), "ss_base_model_version": "sd_v1", "ss_v2": "False"})


def make_inputs(work: Path, peer_env: dict, peer_python: str) -> dict[str, Path]:
    import torch

    from lorahub.formats.io import save_lora

    work.mkdir(parents=True, exist_ok=True)
    q = "-quick" if QUICK else ""
    p = {"r128": work / f"sd15-r128{q}-v{GEN_VERSION}.safetensors",
         **{f"m{i}": work / f"sd15-r32-{i}{q}-v{GEN_VERSION}.safetensors" for i in range(3)},
         "base": work / f"sd15-base-v{GEN_VERSION}.safetensors", "tuned": work / f"sd15-tuned-v{GEN_VERSION}.safetensors"}
    if not p["r128"].exists():
        save_lora(make_lora(128, 64.0, 0, torch.float16), p["r128"], dialect="kohya")
    for i in range(3):
        if not p[f"m{i}"].exists():
            save_lora(make_lora(32, ALPHAS3[i], 100 + i, torch.float32), p[f"m{i}"], dialect="kohya")
    if not (p["base"].exists() and p["tuned"].exists()):
        print("generating the SD1.5-shaped checkpoints with sd-scripts' writer ...", file=sys.stderr)
        t0 = time.time()
        r = subprocess.run([peer_python, "-c", CHECKPOINTS, str(p["base"]), str(p["tuned"])], env=peer_env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"checkpoint generation failed:\n{r.stderr[-3000:]}")
        print(f"  {r.stdout.strip()} layers fine-tuned, {time.time() - t0:.0f} s", file=sys.stderr)
    return p


# ----------------------------------------------------------------------------------------------- runs
def run_child(cmd: list[str], env: dict, log: Path, cwd: Path | None = None) -> dict:
    """Wall seconds and peak RSS (GB, from wait4) of one child process; stdout/stderr go to ``log``."""
    with open(log, "w") as f:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"child failed ({p.returncode}): {' '.join(map(str, cmd))}\n{log.read_text()[-3000:]}")
    return {"wall_s": wall, "peak_rss_gb": ru.ru_maxrss / 1024 ** 2, "cmd": " ".join(map(str, cmd))}


def plan(p: dict[str, Path], out: Path, kohya: Path, peer: str, lh: list[str]) -> list[tuple[str, str, list[str], Path]]:
    """(operation, tool, command, output file) in run order: each operation's tools back to back."""
    k = lambda script: [peer, str(kohya / "networks" / script)]  # noqa: E731
    m = [str(p[f"m{i}"]) for i in range(3)]
    o = lambda name: out / f"{name}.safetensors"  # noqa: E731
    return [
        ("resize r128→32", "kohya", k("resize_lora.py") + ["--model", str(p["r128"]), "--save_to", str(o("resize-kohya")),
                                                          "--new_rank", "32", "--save_precision", "fp16", "--device", "cpu"],
         o("resize-kohya")),
        ("resize r128→32", "lorahub", lh + ["resize", str(p["r128"]), "--rank", "32", "--out", str(o("resize-lorahub")),
                                            "--force", "--json"], o("resize-lorahub")),
        ("dynamic resize sv_fro 0.9", "kohya", k("resize_lora.py") + [
            "--model", str(p["r128"]), "--save_to", str(o("dyn-kohya")), "--new_rank", "128", "--dynamic_method",
            "sv_fro", "--dynamic_param", "0.9", "--save_precision", "fp16", "--device", "cpu"], o("dyn-kohya")),
        ("dynamic resize sv_fro 0.9", "lorahub", lh + ["resize", str(p["r128"]), "--sv-fro", "0.9", "--rank", "128",
                                                       "--out", str(o("dyn-lorahub")), "--force", "--json"], o("dyn-lorahub")),
        ("svd merge 3×r32→64", "kohya", k("svd_merge_lora.py") + [
            "--models", *m, "--ratios", *map(str, WEIGHTS3), "--new_rank", "64", "--save_to", str(o("svd-kohya")),
            "--precision", "float", "--save_precision", "float", "--device", "cpu"], o("svd-kohya")),
        ("svd merge 3×r32→64", "lorahub", lh + ["merge", *(f"{a}:{w}" for a, w in zip(m, WEIGHTS3)), "--rank", "64",
                                                "--method", "svd", "--dtype", "fp32", "--out", str(o("svd-lorahub")),
                                                "--force", "--json"], o("svd-lorahub")),
        ("concat merge 2×r32", "kohya", k("merge_lora.py") + [
            "--models", *m[:2], "--ratios", *map(str, WEIGHTS3[:2]), "--concat", "--save_to", str(o("concat-kohya")),
            "--precision", "float", "--save_precision", "float"], o("concat-kohya")),
        ("concat merge 2×r32", "lorahub", lh + ["merge", *(f"{a}:{w}" for a, w in zip(m[:2], WEIGHTS3[:2])),
                                                "--method", "concat", "--dtype", "fp32",
                                                "--out", str(o("concat-lorahub")), "--force", "--json"], o("concat-lorahub")),
        ("extract r64", "kohya (clamp 0.99)", k("extract_lora_from_models.py") + [
            "--model_org", str(p["base"]), "--model_tuned", str(p["tuned"]), "--save_to", str(o("extract-kohya")),
            "--dim", "64", "--save_precision", "fp16", "--device", "cpu"], o("extract-kohya")),
        ("extract r64", "lorahub", lh + ["extract", str(p["base"]), str(p["tuned"]), "--rank", "64", "--dtype", "fp16",
                                         "--out", str(o("extract-lorahub")), "--force", "--json"], o("extract-lorahub")),
        ("extract r64", "lorahub (clamp 0.99)", lh + ["extract", str(p["base"]), str(p["tuned"]), "--rank", "64",
                                                      "--dtype", "fp16", "--clamp-quantile", "0.99",
                                                      "--out", str(o("extract-lorahub-clamp")), "--force", "--json"],
         o("extract-lorahub-clamp")),
        ("extract r64", "LyCORIS", [peer, "-c", LYCORIS, str(p["base"]), str(p["tuned"]), str(o("extract-lycoris")), "64"],
         o("extract-lycoris")),
    ]


# ----------------------------------------------------------------------------------------------- fidelity
def _factors(layer):
    from lorahub.ops.merge import layer_factors

    up, down, scale, _ = layer_factors(layer, __import__("torch").float64)
    return up, down, scale


def _score(target: list, out_layer, S) -> tuple[float, float, float, int]:
    """(‖target‖², retained, optimum, rank) of one output layer against a factored target."""
    from lorahub.linalg import lowrank

    tu, td = lowrank.stack(target)
    norm2 = lowrank.frobenius_norm(tu, td) ** 2
    if out_layer is None:
        return norm2, 0.0, 0.0, 0
    u, d, s = _factors(out_layer)
    eu, ed = lowrank.stack([(u, d.reshape(d.shape[0], -1), -s)] + target)
    err2 = lowrank.frobenius_norm(eu, ed) ** 2
    k = int(u.shape[1])
    ret = math.sqrt(max(0.0, 1.0 - err2 / norm2)) if norm2 > 0 else 1.0
    return norm2, ret, lowrank.retained(S, k), k


def summarise(rows: list[tuple[float, float, float, int]]) -> dict:
    tot = sum(r[0] for r in rows)
    kept = sum(r[0] * r[1] ** 2 for r in rows)
    best = sum(r[0] * r[2] ** 2 for r in rows)
    short = [r[2] - r[1] for r in rows]
    return {"layers": len(rows), "retained": math.sqrt(kept / tot), "optimum": math.sqrt(best / tot),
            "rel_error": math.sqrt(max(0.0, 1 - kept / tot)), "optimum_rel_error": math.sqrt(max(0.0, 1 - best / tot)),
            "mean_shortfall": sum(short) / len(short), "max_shortfall": max(short),
            "above_optimum": sum(s < -1e-9 for s in short), "rank_min": min(r[3] for r in rows),
            "rank_max": max(r[3] for r in rows), "rank_sum": sum(r[3] for r in rows)}


def fidelity_lora(target_models: list[tuple[object, float]], out_path: Path) -> dict:
    """Outputs of resize / merge against the (weighted sum of the) input LoRA(s), layer by layer."""
    from lorahub.formats.io import load_lora
    from lorahub.linalg import lowrank

    out = load_lora(out_path)
    rows = []
    keys = sorted({k for m, _ in target_models for k in m.layers})
    for key in keys:
        target = []
        for m, w in target_models:
            if key in m.layers:
                u, d, s = _factors(m.layers[key])
                target.append((u, d, s * w))
        S = lowrank.singular_values(*lowrank.stack(target))
        rows.append(_score(target, out.layers.get(key), S))
    return summarise(rows)


def fidelity_extract(base: Path, tuned: Path, outs: dict[str, Path]) -> dict[str, dict]:
    """Outputs of extract against tuned − base, layer by layer (float64 Gram spectra)."""
    import torch

    from lorahub.formats.io import load_lora
    from lorahub.linalg import lowrank
    from lorahub.ops.checkpoints import open_checkpoint

    models = {tool: load_lora(p) for tool, p in outs.items()}
    keys = sorted({k for m in models.values() for k in m.layers})
    rows: dict[str, list] = {tool: [] for tool in models}
    with open_checkpoint(base) as b, open_checkpoint(tuned) as t:
        for key in keys:
            A = (t.get(key + ".weight", torch.float32).double() - b.get(key + ".weight", torch.float32).double())
            A = A.reshape(A.shape[0], -1)
            X = A if A.shape[0] <= A.shape[1] else A.T
            S = torch.sqrt(torch.clamp(torch.linalg.eigvalsh(X @ X.T), min=0.0)).flip(0)
            for tool, m in models.items():
                layer = m.layers.get(key)
                norm2 = float((A * A).sum())
                if layer is None:
                    rows[tool].append((norm2, 0.0, 0.0, 0))
                    continue
                B = layer.delta(torch.float64).reshape(A.shape)
                err2 = float(((A - B) ** 2).sum())
                k = int(layer.rank)
                rows[tool].append((norm2, math.sqrt(max(0.0, 1 - err2 / norm2)), lowrank.retained(S, k), k))
    return {tool: summarise(r) for tool, r in rows.items()}


# ----------------------------------------------------------------------------------------------- report
def _short(x: float) -> str:
    return f"{x:.4f}" if abs(x) >= 1e-4 else f"{x:.1e}"


def report(results: list[dict], fid: dict, args, peers: dict, started: str, loads: list) -> str:
    by_op: dict[str, list[dict]] = {}
    for r in results:
        by_op.setdefault(r["op"], []).append(r)
    lines = ["| operation | tool | started (load avg) | wall | peak RSS | Frobenius retained (rel. error) | optimum at its ranks | "
             "worst layer below optimum | ranks | time vs lorahub |", "|---|---|---|---|---|---|---|---|---|---|"]
    for op, rs in by_op.items():
        ref = next((r for r in rs if r["tool"] == "lorahub"), None)
        for r in rs:
            f = fid[r["name"]]
            ratio = f"{r['wall_s'] / ref['wall_s']:.1f}×" if ref else "–"
            lines.append(
                f"| {op} | {r['tool']} | {r['started'][11:]} ({r['load_avg_1min']:.1f}) | {r['wall_s']:.1f} s | "
                f"{r['peak_rss_gb']:.2f} GB | "
                f"{f['retained']:.4f} ({f['rel_error']:.3f}) | {f['optimum']:.4f} ({f['optimum_rel_error']:.3f}) | "
                f"{_short(f['max_shortfall'])} | {f['rank_min']}–{f['rank_max']} (Σ {f['rank_sum']}) | {ratio} |")
    cmds = "\n".join(f"    # {r['op']} — {r['tool']}\n    "
                     + r["cmd"].replace(LYCORIS, '"$LYCORIS"  # the LYCORIS script in benchmarks/peers.py,') for r in results)
    la = ", ".join(f"{a:.1f}" for a in loads)
    shared = ("other jobs were running besides this benchmark (whose own previous run accounts for up to about 2), "
              "so wall times are inflated; ratios taken pair by pair, back to back, are the steadier figure"
              if max(loads) > 2.5 else "besides this benchmark's own previous run (up to about 2) the machine was "
              "nearly quiet for these runs")
    earlier = ""
    if args.earlier:
        rows = [f"| {r['op']} | {r['tool']} | {r['started'][11:]} ({r['load_avg_1min']:.1f}) | {r['wall_s']:.1f} s | "
                f"{r['peak_rss_gb']:.2f} GB |" for r in args.earlier]
        earlier = ("\nEarlier attempts of the same commands in this session, while other engineers' test suites "
                   "loaded the machine (their outputs were replaced by the runs above):\n\n"
                   "| operation | tool | started (load avg) | wall | peak RSS |\n|---|---|---|---|---|\n"
                   + "\n".join(rows) + "\n")
    return f"""## Against the peers' own tools (kohya-ss/sd-scripts, LyCORIS), side by side

Command: `python benchmarks/peers.py {' '.join(sys.argv[1:])}` — report written {started} (each run's start is in the table),
{platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, CPU only: **no GPU was
available in this session**, every tool ran with `--device cpu` (no GPU figure is reported or implied).
Peers: sd-scripts {peers['kohya']}; LyCORIS {peers['lycoris']} (its venv: {peers['stack']}).
Load average (1 min) before each run: {la} on {os.cpu_count()} CPUs — {shared}.

Inputs (see the script's docstring): an SD1.5-shaped rank-128 kohya LoRA (264 modules, fp16); three
SD1.5-shaped rank-32 LoRAs (fp32; weights 0.8, 0.6, −0.3); two full SD1.5-shaped single-file checkpoints
(UNet + VAE + CLIP-L, fp16) whose 192 attention-block layers differ by a decaying-spectrum ΔW.
Fidelity is computed afterwards in float64, per layer: the Frobenius fraction of the target kept by the
output (target: the input LoRA for resize, the exact weighted sum for merges, tuned − base for
extract), next to the Eckart–Young optimum at the output's own ranks; "rel. error" is
‖target − output‖_F / ‖target‖_F overall.

{chr(10).join(lines)}

Exact commands, in the order run (each pair back to back):

{cmds}

Notes:
* kohya's `extract_lora_from_models.py` clamps at its default `--clamp_quantile 0.99`; lorahub is shown without
  clamp (its default) and with `--clamp-quantile 0.99` (kohya's rule). kohya's `svd_merge_lora.py` always clamps
  at 0.99 (a constant in the script), which is where its error above the optimum comes from.
* kohya's `merge_lora.py --concat` keeps the first input's alpha while the rank becomes the sum of the
  ranks, so each input's strength is divided (its error against the exact weighted sum); lorahub's
  concat is exact.
* Peak RSS is the child process's own maximum resident set (wait4), interpreter and libraries included.
* "worst layer below optimum" is the largest per-layer shortfall (optimum − retained); values near 1e-8
  are the fp16 rounding of the saved factors, near 1e-16 float64 round-off.
{earlier}"""


def main() -> None:
    sys.path.insert(0, str(ROOT))  # this checkout's lorahub, in this process and (PYTHONPATH) in the children
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kohya-dir", type=Path, required=True, help="a checkout of kohya-ss/sd-scripts")
    ap.add_argument("--peer-python", default=sys.executable, help="interpreter of the peers' throwaway venv")
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "peers")
    ap.add_argument("--only", help="comma-separated operations, in the order to run them "
                                   "(default resize,dynamic,svd,concat,extract)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs already recorded in the work folder (their outputs and figures)")
    ap.add_argument("--report-only", action="store_true", help="run nothing: report the runs already recorded")
    ap.add_argument("--skip-tools", help="comma-separated tools not to run, e.g. 'lorahub (clamp 0.99)'")
    ap.add_argument("--quick", action="store_true", help="smoke test: LoRAs with a few modules only (not a result)")
    ap.add_argument("--out", type=Path, help="write the Markdown section here (and the figures as JSON beside it)")
    args = ap.parse_args()
    global QUICK
    QUICK = args.quick
    args.kohya_dir = args.kohya_dir.resolve()
    if not (args.kohya_dir / "networks" / "resize_lora.py").exists():
        raise SystemExit(f"{args.kohya_dir}: not a checkout of kohya-ss/sd-scripts")

    work = args.work.resolve()
    outdir = work / "out"
    outdir.mkdir(parents=True, exist_ok=True)
    peer_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    paths = [str(args.kohya_dir), str(args.kohya_dir / "networks")]
    if subprocess.run([args.peer_python, "-c", "import torchvision"], capture_output=True).returncode != 0:
        shim = work / "shim"
        for rel, text in TV_SHIM.items():
            (shim / rel).parent.mkdir(parents=True, exist_ok=True)
            (shim / rel).write_text(text)
        paths.append(str(shim))
    peer_env["PYTHONPATH"] = os.pathsep.join(paths)
    peer_env["HF_HUB_OFFLINE"] = "1"
    lh_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE",)}
    lh_env["PYTHONPATH"] = str(ROOT)
    lh_env["LORAHUB_HOME"] = str(work / "home")
    lh_env["HF_HUB_OFFLINE"] = "1"

    peers = {"kohya": subprocess.run(["git", "-C", str(args.kohya_dir), "rev-parse", "--short", "HEAD"],
                                     capture_output=True, text=True).stdout.strip() or "(checkout without git)",
             "lycoris": subprocess.run([args.peer_python, "-c", "import importlib.metadata as m; print(m.version('lycoris-lora'))"],
                                       capture_output=True, text=True, env=peer_env).stdout.strip(),
             "stack": subprocess.run([args.peer_python, "-c", "import importlib.metadata as m; print(', '.join("
                                      "f'{p} {m.version(p)}' for p in ('torch', 'diffusers', 'transformers', 'accelerate')))"],
                                     capture_output=True, text=True, env=peer_env).stdout.strip()}
    p = make_inputs(work, peer_env, args.peer_python)
    lh = [sys.executable, "-m", "lorahub"]
    key_of = {"resize r128→32": "resize", "dynamic resize sv_fro 0.9": "dynamic", "svd merge 3×r32→64": "svd",
              "concat merge 2×r32": "concat", "extract r64": "extract"}
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results = []
    order = [k for k in (args.only or "resize,dynamic,svd,concat,extract").split(",") if k]
    steps = plan(p, outdir, args.kohya_dir, args.peer_python, lh)
    skip = set((args.skip_tools or "").split(",")) - {""}
    for want in order:
        for op, tool, cmd, out in steps:
            if key_of[op] != want or tool in skip:
                continue
            rec = outdir / f"{out.stem}.json"  # one record per run, so that --resume can continue a session
            if args.report_only and not (rec.exists() and out.exists()):
                continue
            if (args.resume or args.report_only) and rec.exists() and out.exists():
                r = json.loads(rec.read_text())
                print(f"{op} — {tool}: kept from {r['started']}", file=sys.stderr, flush=True)
            else:
                load = os.getloadavg()[0]
                env = lh_env if tool.startswith("lorahub") else peer_env
                print(f"{op} — {tool} ...", file=sys.stderr, flush=True)
                started_at = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
                r = run_child(cmd, env, outdir / f"{out.stem}.log", cwd=args.kohya_dir if tool.startswith("kohya") else None)
                r.update(op=op, tool=tool, name=out.stem, out=str(out), load_avg_1min=load, started=started_at)
                rec.write_text(json.dumps(r, indent=1))
                print(f"  {r['wall_s']:.1f} s, {r['peak_rss_gb']:.2f} GB", file=sys.stderr, flush=True)
            results.append(r)
    loads = [r["load_avg_1min"] for r in results]
    args.earlier = [json.loads(f.read_text()) for f in sorted(outdir.glob("*/*.json"))]

    from lorahub.formats.io import load_lora

    fid = {}
    print("fidelity ...", file=sys.stderr, flush=True)
    r128 = load_lora(p["r128"])
    ms = [load_lora(p[f"m{i}"]) for i in range(3)]
    extract_outs = {}
    for r in results:
        out = Path(r["out"])
        if r["op"].startswith(("resize", "dynamic")):
            fid[r["name"]] = fidelity_lora([(r128, 1.0)], out)
        elif r["op"].startswith("svd"):
            fid[r["name"]] = fidelity_lora(list(zip(ms, WEIGHTS3)), out)
        elif r["op"].startswith("concat"):
            fid[r["name"]] = fidelity_lora(list(zip(ms[:2], WEIGHTS3[:2])), out)
        else:
            extract_outs[r["name"]] = out
    if extract_outs:
        fid.update(fidelity_extract(p["base"], p["tuned"], extract_outs))
    md = report(results, fid, args, peers, started, loads)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md)
        args.out.with_suffix(".json").write_text(json.dumps({"started": started, "load_avg_1min": loads,
                                                              "peers": peers, "runs": results, "fidelity": fid},
                                                             indent=1))


if __name__ == "__main__":
    main()
