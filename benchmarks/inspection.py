"""Benchmark: per-layer norms + effective rank from the factors vs materialising every ΔW.

An SD1.5-shaped rank-128 kohya LoRA with random fp16 factors: the 192 UNet attention modules and the
72 text-encoder modules kohya targets by default, with shapes taken from SD1.5's UNet and CLIP-L text
encoder built on the meta device from their published configs (lorahub.formats.names.get_arch("sd1")).
The file is written with lorahub.formats.io.save_lora(dialect="kohya", dtype=fp16).

Measured in one process:
  factors      lorahub.ops.inspect.inspect_model (Gram cores; what `inspect` runs) over all layers
  materialised for each layer ΔW = up·down·scale in float32, torch.linalg.svdvals, then the same
               quantities (‖ΔW‖_F, ‖ΔW‖₂, effective rank 90/99 %)
and the wall time of the whole command `python -m lorahub inspect FILE --json` (a child process:
imports, file read, per-layer work, JSON) — median of max(1, --repeat - 2) runs, plus one fresh process timing each step.

    python benchmarks/inspection.py [--rank 128] [--threads 1] [--repeat 3] [--stride 1] [--out FILE]
"""

from __future__ import annotations

import os
import sys
import argparse
import datetime as dt
import json
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def make_lora(rank: int, seed: int = 0):
    import torch

    from lorahub.formats.canonical import LoraLayer, LoraModel
    from lorahub.tiny_loras import sd15_targets

    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, shape in sd15_targets():
        out, inp = shape[0], shape[1]
        r = min(rank, out, inp)
        up = (torch.randn(out, r, generator=g) / r ** 0.5).to(torch.float16)
        down = (torch.randn(r, inp, generator=g) / inp ** 0.5).to(torch.float16)
        if len(shape) == 4:  # SD1.5 proj_in/proj_out are 1×1 convs
            up = up.reshape(out, r, 1, 1)
            down = down.reshape(r, inp, 1, 1)
        layers[name] = LoraLayer(kind="lora", weights={"up": up, "down": down},
                                 alpha=float(r) / 2, extra={})
    return LoraModel(layers=layers, base="sd1", source_format="kohya",
                     metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2),
                               "ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora"})


def materialised_stats(model):
    import torch

    from lorahub.ops.inspect import effective_rank

    out = {}
    for key, layer in model.layers.items():
        d = layer.delta(torch.float32)
        S = torch.linalg.svdvals(d.reshape(d.shape[0], -1)).to(torch.float64)
        out[key] = (float(torch.sqrt(torch.sum(S * S))), float(S[0]), effective_rank(S, 0.90),
                    effective_rank(S, 0.99))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--stride", type=int, default=1,
                    help="materialise every N-th layer for the baseline and extrapolate (1: all 264 layers)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from lorahub.formats.canonical import LoraModel
    from lorahub.formats.io import load_lora, save_lora
    from lorahub.ops.inspect import inspect_model

    res: dict = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                            f"torch {torch.__version__}, {args.threads} torch thread(s)",
                 "rank": args.rank}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sd15_rank128_kohya.safetensors"
        save_lora(make_lora(args.rank), path, dialect="kohya", dtype=torch.float16)
        res["file_mb"] = round(path.stat().st_size / 2**20, 1)

        t = time.perf_counter()
        model = load_lora(path)
        res["load_s"] = time.perf_counter() - t
        res["layers"] = len(model.layers)
        assert res["layers"] == 264, res["layers"]

        # factors (the code `inspect` runs), best of --repeat
        times, cpus = [], []
        for _ in range(args.repeat):
            t, c = time.perf_counter(), time.process_time()
            report = inspect_model(model, path=path)
            times.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        res["factors_s"] = min(times)
        res["factors_cpu_s"] = min(cpus)

        # materialised baseline (same process, same threads)
        base_model = model
        if args.stride > 1:
            keys = list(model.layers)[::args.stride]
            base_model = LoraModel(layers={k: model.layers[k] for k in keys})
        t, c = time.perf_counter(), time.process_time()
        ref = materialised_stats(base_model)
        mat_s = time.perf_counter() - t
        mat_cpu = time.process_time() - c
        frac = len(base_model.layers) / len(model.layers)
        res["materialised_s"] = mat_s / frac
        res["materialised_cpu_s"] = mat_cpu / frac
        res["speedup_cpu"] = res["materialised_cpu_s"] / res["factors_cpu_s"]
        res["materialised_layers_timed"] = len(base_model.layers)
        res["speedup"] = res["materialised_s"] / res["factors_s"]

        # the two agree
        per = {p["key"]: p for p in report["per_layer"]}
        rel_fro = max(abs(per[k]["fro"] - v[0]) / v[0] for k, v in ref.items())
        rel_spec = max(abs(per[k]["spectral"] - v[1]) / v[1] for k, v in ref.items())
        eff_diff = max(max(abs(per[k]["eff_rank_90"] - v[2]), abs(per[k]["eff_rank_99"] - v[3]))
                       for k, v in ref.items())
        res["max_rel_err_fro"] = rel_fro
        res["max_rel_err_spectral"] = rel_spec
        res["max_eff_rank_diff"] = eff_diff

        # the whole command in a child process
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads),
                   LORAHUB_HOME=str(Path(tmp) / "home"))
        cli, cli_cpu = [], []
        for _ in range(max(1, args.repeat - 2)):
            t = time.perf_counter()
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            p = subprocess.run([sys.executable, "-m", "lorahub", "inspect", str(path), "--json"],
                               capture_output=True, text=True, env=env)
            cli.append(time.perf_counter() - t)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cli_cpu.append((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
            if p.returncode != 0:
                raise SystemExit(f"inspect failed: {p.stderr}")
        json.loads(p.stdout)
        res["cli_inspect_s"] = statistics.median(cli)
        res["cli_inspect_cpu_s"] = statistics.median(cli_cpu)
        # where the command's time goes: the same steps, timed inside one fresh process
        probe = (
            "import json, sys, time\n"
            "T = lambda: (time.perf_counter(), time.process_time())\n"
            "t0 = T(); import torch; t1 = T()\n"
            f"torch.set_num_threads({args.threads})\n"
            "from lorahub.formats.io import load_lora\n"
            "m = load_lora(sys.argv[1]); t2 = T()\n"
            "from lorahub.ops.inspect import inspect_model\n"
            "r = inspect_model(m, path=sys.argv[1]); t3 = T()\n"
            "json.dumps(r); t4 = T()\n"
            "d = lambda a, b: [round(b[0] - a[0], 3), round(b[1] - a[1], 3)]\n"
            "print(json.dumps({'import_torch_s': d(t0, t1), 'load_lora_cold_s': d(t1, t2), 'inspect_s': d(t2, t3),"
            " 'json_s': d(t3, t4), 'diffusers_imported': 'diffusers' in sys.modules}))\n")
        p = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise SystemExit(f"probe failed: {p.stderr}")
        res["cli_breakdown"] = json.loads(p.stdout.strip().splitlines()[-1])
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], env=env, check=True)
        res["python_torch_import_s"] = time.perf_counter() - t

    print(f"SD1.5-shaped rank-{args.rank} kohya LoRA, fp16: {res['layers']} layers, {res['file_mb']} MiB")
    print(f"  load_lora                         {res['load_s']:.3f} s")
    print(f"  per-layer stats from factors      {res['factors_s']:.3f} s wall, {res['factors_cpu_s']:.3f} s CPU")
    print(f"  per-layer stats materialised      {res['materialised_s']:.3f} s wall, {res['materialised_cpu_s']:.3f} s CPU"
          + (f"  (extrapolated from {res['materialised_layers_timed']} layers)" if args.stride > 1 else ""))
    print(f"  speed-up                          {res['speedup']:.1f}x wall, {res['speedup_cpu']:.1f}x CPU   (target >= 20x)")
    print(f"  agreement: max rel err ‖ΔW‖_F {rel_fro:.1e}, ‖ΔW‖₂ {rel_spec:.1e}, eff-rank diff {eff_diff}")
    print(f"  `lorahub inspect FILE --json`     {res['cli_inspect_s']:.3f} s wall, {res['cli_inspect_cpu_s']:.3f} s CPU   (target < 2 s; "
          f"python + import torch alone {res['python_torch_import_s']:.3f} s)")
    b = res["cli_breakdown"]
    w = lambda k: f"{b[k][0]:.2f} s ({b[k][1]:.2f} s CPU)"  # noqa: E731
    print(f"    steps in a fresh process: import torch {w('import_torch_s')}, load_lora cold {w('load_lora_cold_s')} "
          f"(diffusers imported: {b['diffusers_imported']}), per-layer stats {w('inspect_s')}, JSON {w('json_s')}")
    print(f"  {res['machine']}; {res['date']}")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
