"""Benchmark: lorahub's batched α sweep versus the ordinary diffusers loop, same run.

5 alphas × 2 seeds × 1 prompt (10 images). Two ways to render them:

* ``loop``    — the ordinary diffusers way: ``load_lora_weights`` once, then for every image
  ``set_adapters(weights=α)`` and one pipeline call (batch 1, classifier-free guidance inside).
* ``batched`` — lorahub: the LoRA installed once as a per-sample-α side branch
  (``lorahub.ops.apply``), all 10 images in one pipeline call (one batched UNet call per step,
  guidance included: UNet batch 20).

Each mode runs in its own child process (so its peak memory is its own) after one warm-up call; the
parent alternates the modes ``--repeat`` times and reports images/s, the speed ratio, peak memory
(CPU: peak RSS of the child; CUDA: ``torch.cuda.max_memory_allocated``) and the largest pixel
difference between the two modes' images (they must agree).

Models: ``tiny`` (the tiny SD1 fixture pipeline; default: CPU, 64 px, 5 steps) and ``sd15``
(an SD1.5-shaped pipeline with random weights: UNet 320/640/1280/1280, CLIP ViT-L/14-sized text
encoder, SD VAE; default 512 px, 20 steps, fp16 on CUDA). Nothing is downloaded.

    python benchmarks/sweep.py                                  # tiny, CPU
    python benchmarks/sweep.py --model sd15 --device cuda       # needs a GPU
    python benchmarks/sweep.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]
SEEDS = [1, 2]
PROMPT = "a watercolor painting of a lighthouse"


# ----------------------------------------------------------------------------------------- child

def _sd15_pipeline(dtype):
    """SD1.5-shaped pipeline with random weights (configs from lorahub/data/configs/real)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorahub import tiny
    from lorahub.resources import model_config

    def cfg(name):
        c = model_config("real", name)
        return {k: v for k, v in c.items() if not k.startswith("_")}

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg("sd15_unet"))
    te_cfg = cfg("clip_vit_l14_text")
    te_cfg.update(vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513)  # tiny byte tokenizer
    te = CLIPTextModel(CLIPTextConfig(**te_cfg))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=[128, 256, 512, 512], layers_per_block=2)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=te, tokenizer=tiny.make_tokenizer(),
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    return pipe.to(dtype=dtype)


def _random_lora(pipe, rank: int, std: float):
    """Canonical model + the same LoRA as diffusers keys: UNet attention (+1×1 proj convs) and TE attention;
    down factors N(0, 1/fan-in), up factors N(0, std²)."""
    from lorahub.tiny_loras import pipeline_lora

    return pipeline_lora(pipe, 1234, rank=rank, scale=std, fan_in=True,
                         keep={"unet": lambda n: "attentions" in n, "text_encoder": lambda n: "self_attn" in n})


def _peak(device: str) -> float:
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)


def child(args) -> dict:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    import diffusers.utils.logging as dlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.model == "tiny":
        from diffusers import StableDiffusionPipeline

        from lorahub import tiny

        pipe = StableDiffusionPipeline.from_pretrained(str(tiny.ensure("sd1")), local_files_only=True, dtype=dtype)
        rank, std = 4, 0.3
    else:
        pipe = _sd15_pipeline(dtype)
        rank, std = 16, 0.05
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    model, sd = _random_lora(pipe, rank, std)
    common = dict(height=args.size, width=args.size, guidance_scale=args.guidance)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    images = []
    t_setup = time.perf_counter()
    if args.mode == "loop":
        with tempfile.TemporaryDirectory() as tmp:
            save_file({k: v.contiguous() for k, v in sd.items()}, f"{tmp}/lora.safetensors")
            pipe.load_lora_weights(f"{tmp}/lora.safetensors", adapter_name="x")
        setup = time.perf_counter() - t_setup
        pipe.set_adapters(["x"], adapter_weights=[0.5])
        pipe(PROMPT, num_inference_steps=1, output_type="np", **common)  # warm-up
        sync()
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for seed in SEEDS:
            for a in ALPHAS:
                pipe.set_adapters(["x"], adapter_weights=[a])
                g = torch.Generator("cpu").manual_seed(seed)
                images.append(pipe(PROMPT, generator=g, num_inference_steps=args.steps, output_type="np",
                                   **common).images[0])
        sync()
        elapsed = time.perf_counter() - t0
    else:
        from lorahub.ops.apply import apply_loras
        from lorahub.ops.sweep import plan_sweep, run_samples

        handle = apply_loras(pipe, [model], ["x"])
        setup = time.perf_counter() - t_setup
        samples = plan_sweep([PROMPT], SEEDS, ALPHAS)
        run_samples(pipe, handle, samples[:2], steps=1, height=args.size, width=args.size,
                    guidance=args.guidance, output_type="np")  # warm-up
        sync()
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        images = run_samples(pipe, handle, samples, batch=args.batch, steps=args.steps, height=args.size,
                             width=args.size, guidance=args.guidance, output_type="np")
        sync()
        elapsed = time.perf_counter() - t0
        handle.remove()
    np.save(args.images, np.stack(images).astype(np.float32))
    return {"mode": args.mode, "seconds": elapsed, "images": len(images), "images_per_s": len(images) / elapsed,
            "setup_s": setup, "peak_mib": _peak(args.device)}


# ---------------------------------------------------------------------------------------- parent

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch", type=int, default=10, help="images per batched call (10: the whole sweep)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadiest on a shared machine)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", choices=["loop", "batched"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--images", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("fp16" if gpu else "fp32")
    args.size = args.size or (512 if args.model == "sd15" else 64)
    args.steps = args.steps or (20 if args.model == "sd15" else 5)
    if args.child:
        args.mode = args.child
        print(json.dumps(child(args)))
        return
    if gpu:
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device here")
        device_name = torch.cuda.get_device_name(0)
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
                      f"{args.threads} torch threads)"
    import numpy as np

    runs = {"loop": [], "batched": []}
    diffs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            arrays = {}
            for mode in ("loop", "batched") if r % 2 == 0 else ("batched", "loop"):
                img = f"{tmp}/{mode}.npy"
                cmd = [sys.executable, __file__, "--child", mode, "--images", img, "--model", args.model,
                       "--device", args.device, "--dtype", args.dtype, "--size", str(args.size), "--steps",
                       str(args.steps), "--guidance", str(args.guidance), "--batch", str(args.batch),
                       "--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"{mode} run failed:\n{out.stderr[-3000:]}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                runs[mode].append(res)
                arrays[mode] = np.load(img)
                print(f"  run {r + 1} {mode:8s} {res['seconds']:7.2f} s  {res['images_per_s']:6.2f} img/s  "
                      f"peak {res['peak_mib']:8.0f} MiB", file=sys.stderr)
            diffs.append(float(np.abs(arrays["loop"] - arrays["batched"]).max()))

    def best(mode):
        return min(runs[mode], key=lambda x: x["seconds"])

    loop, batched = best("loop"), best("batched")
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": device_name, "model": args.model, "dtype": args.dtype, "size": args.size, "steps": args.steps,
        "guidance": args.guidance, "images": len(ALPHAS) * len(SEEDS), "alphas": ALPHAS, "seeds": SEEDS,
        "batch": args.batch,
        "loop": loop, "batched": batched,
        "speedup": loop["seconds"] / batched["seconds"],
        "max_abs_pixel_diff": max(diffs),
        "command": "python benchmarks/sweep.py " + " ".join(a for a in sys.argv[1:]),
    }
    print(f"{args.model} on {device_name}, {args.dtype}, {args.size}px, {args.steps} steps, "
          f"5 alphas x 2 seeds (best of {args.repeat}):")
    print(f"  ordinary loop (set_adapters per α): {loop['images_per_s']:.2f} img/s, peak {loop['peak_mib']:.0f} MiB")
    print(f"  lorahub batched sweep:              {batched['images_per_s']:.2f} img/s, peak "
          f"{batched['peak_mib']:.0f} MiB")
    print(f"  speed-up {summary['speedup']:.2f}x; largest pixel difference between the two: "
          f"{summary['max_abs_pixel_diff']:.2e}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
