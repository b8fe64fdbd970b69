"""Benchmark: three SD1.5-shaped rank-32 LoRAs merged to rank 64.

lorahub (QR of the stacked factors + SVD of the small core, never the full matrix) versus the common
approach (materialise every ΔW, sum them, full ``torch.linalg.svd`` per layer, truncate to 64; this
baseline uses ``full_matrices=False``, which is already cheaper than the default used by popular
scripts). Both run in the same invocation, each in its own child process so that peak memory can be
measured (ru_maxrss above the process's size once the inputs are built).

Shapes come from SD1.5's published configuration facts, built on the meta device (no weights):
UNet block_out_channels 320/640/1280/1280, layers_per_block 2, cross_attention_dim 768, attention
head dim 8, 1×1-conv proj_in/proj_out; CLIP ViT-L/14 text encoder: 12 layers, hidden 768, MLP 3072.
Targets are kohya's defaults: every Linear/Conv inside the transformer blocks (proj_in, proj_out,
attn1/attn2 q/k/v/out, ff) and the text encoder's attention + MLP linears: 192 + 72 = 264 modules.

Error: ‖Σ wᵢΔWᵢ − merged‖_F / ‖Σ wᵢΔWᵢ‖_F per layer against a float64 materialised reference,
aggregated over all layers. Both methods should reach the Eckart–Young optimum.

    python benchmarks/merge.py                 # full run (≈ 1-3 min on 2 CPU cores)
    python benchmarks/merge.py --layers 40     # quicker: only the first 40 modules
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import time

RANK_IN, RANK_OUT, N_LORAS = 32, 64, 3
WEIGHTS = (0.8, 0.6, -0.3)
ALPHAS = (32.0, 16.0, 8.0)


def sd15_modules() -> dict[str, tuple[int, ...]]:
    """Canonical name -> weight shape of the LoRA target modules of SD1.5 (meta device)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, max_position_embeddings=77))
    out = {}
    for name, mod in unet.named_modules():
        if ".attentions." in f".{name}" and isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            out[f"unet.{name}"] = tuple(mod.weight.shape)
    for name, mod in te.named_modules():
        if isinstance(mod, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name):
            path = name if name.startswith("text_model.") else f"text_model.{name}"
            out[f"text_encoder.{path}"] = tuple(mod.weight.shape)
    return out


def build_inputs(modules: dict[str, tuple[int, ...]]):
    import torch

    from lorahub.formats.canonical import LoraLayer, LoraModel
    from lorahub.ops.merge import MergeInput

    inputs = []
    for i in range(N_LORAS):
        gen = torch.Generator().manual_seed(100 + i)
        m = LoraModel(base="sd1")
        for key, shape in modules.items():
            down = torch.randn(RANK_IN, *shape[1:], generator=gen) / math.sqrt(shape[1])
            up = torch.randn(shape[0], RANK_IN, *([1, 1] if len(shape) == 4 else []), generator=gen) * 0.01
            m.layers[key] = LoraLayer("lora", {"down": down, "up": up}, alpha=ALPHAS[i])
        inputs.append(MergeInput(m, WEIGHTS[i], label=f"lora{i}"))
    return inputs


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def run_lorahub(inputs):
    from lorahub.ops.merge import merge

    res = merge(inputs, method="svd", rank=RANK_OUT)
    return {k: (l.up.reshape(l.up.shape[0], -1), l.down.reshape(l.down.shape[0], -1))
            for k, l in res.model.layers.items()}, res


def run_baseline(inputs):
    import torch

    out = {}
    for key in inputs[0].model.layers:
        acc = None
        for inp in inputs:
            layer = inp.model.layers[key]
            up = layer.up.reshape(layer.up.shape[0], -1)
            down = layer.down.reshape(layer.down.shape[0], -1)
            d = (up @ down) * (layer.scale * inp.weight)  # materialised ΔW (fp32)
            acc = d if acc is None else acc + d
        u, s, vh = torch.linalg.svd(acc, full_matrices=False)
        k = RANK_OUT
        out[key] = (u[:, :k] * s[:k], vh[:k])
    return out, None


def child(which: str, n_layers: int | None, threads: int, q) -> None:
    import torch

    torch.set_num_threads(threads)
    modules = sd15_modules()
    if n_layers:
        modules = dict(list(modules.items())[:n_layers])
    inputs = build_inputs(modules)
    for dt in (torch.float32, torch.float64):  # load the LAPACK code paths before measuring memory
        x = torch.randn(64, 48, dtype=dt)
        torch.linalg.qr(x)
        torch.linalg.svd(x, full_matrices=False)
        torch.linalg.svdvals(x @ x.T)
    rss0 = _rss_kib()
    t0, c0 = time.perf_counter(), time.process_time()
    factors, res = (run_lorahub if which == "lorahub" else run_baseline)(inputs)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    # error against a float64 materialised reference (after timing and after reading the peak)
    num = den = 0.0
    for key, (u, d) in factors.items():
        ref = None
        for inp in inputs:
            layer = inp.model.layers[key]
            up = layer.up.reshape(layer.up.shape[0], -1).double()
            down = layer.down.reshape(layer.down.shape[0], -1).double()
            x = (up @ down) * (layer.scale * inp.weight)
            ref = x if ref is None else ref + x
        got = u.double() @ d.double()
        num += float(torch.linalg.norm(ref - got) ** 2)
        den += float(torch.linalg.norm(ref) ** 2)
    q.put({"which": which, "seconds": dt, "cpu_seconds": cpu, "peak_above_inputs_mib": max(0, peak - rss0) / 1024,
           "rel_error": math.sqrt(num / den), "layers": len(factors),
           "retained": res.retained if res is not None else None, "threads": torch.get_num_threads()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="only the first N modules (quick runs)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in each run (default 1: stable timings on a shared machine)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    results = {}
    for which in ("lorahub", "baseline"):
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(which, args.layers, args.threads, q))
        p.start()
        p.join()
        if p.exitcode != 0 or q.empty():
            raise SystemExit(f"{which} run failed (exit code {p.exitcode})")
        results[which] = q.get()
        r = results[which]
        print(f"{which:9s} {r['seconds']:8.3f} s wall {r['cpu_seconds']:8.3f} s CPU  peak +{r['peak_above_inputs_mib']:8.1f} MiB  "
              f"rel. error {r['rel_error']:.7f}  ({r['layers']} layers, {r['threads']} threads)", flush=True)
    lh, bl = results["lorahub"], results["baseline"]
    speedup = bl["seconds"] / lh["seconds"]
    cpu_speedup = bl["cpu_seconds"] / lh["cpu_seconds"]
    print(f"speed-up {speedup:.1f}x wall, {cpu_speedup:.1f}x CPU time; error difference {abs(lh['rel_error'] - bl['rel_error']):.2e} "
          f"(lorahub retained {lh['retained']:.6f} of the Frobenius norm)")
    if args.json:
        print(json.dumps({"results": results, "speedup": speedup, "cpu_speedup": cpu_speedup, "python": sys.version.split()[0],
                          "machine": platform.machine(), "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
