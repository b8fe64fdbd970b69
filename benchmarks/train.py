"""Training throughput and memory: lorahub's dreambooth-LoRA loop vs full UNet fine-tuning vs a plain PEFT loop.

Default (GPU): SD1.5-shaped random-weight UNet + CLIP text encoder + VAE at 512x512, rank 16, batch 4,
bf16. Three variants of the same noise-prediction step, run one after another in this process:

  lorahub   LoRA (peft, to_q/to_k/to_v/to_out.0, rank 16) with lorahub's speed work: latents and text
            embeddings cached (no VAE / text encoder in the step), SDPA attention, channels-last UNet,
            frozen base in bf16, fused AdamW.  Uses lorahub.train.trainer.add_lora / diffusion_loss.
  full      the same loop, but every UNet weight trains (fp32 master weights, bf16 autocast, fused AdamW):
            DreamBooth without LoRA.
  plain     LoRA through a plain PEFT loop without the speed work: VAE encode + text encode every step,
            classic (non-SDPA) attention processor, default memory format, non-fused AdamW.

Reports it/s and peak GPU memory (torch.cuda.max_memory_allocated) per variant and the ratios
lorahub/full and lorahub/plain. Target from the issue: >= 2x full fine-tuning throughput at < 1/2 its memory.

``--tiny`` runs the same three loops on the tiny fixture-shaped models on CPU (a smoke test of the code
path; its numbers say nothing about GPU performance).

    python benchmarks/train.py                 # GPU, SD1.5 shapes, 512 px, batch 4, bf16
    python benchmarks/train.py --tiny          # CPU smoke run, a few seconds
"""

from __future__ import annotations

import argparse
import warnings
import gc
import json
import platform
import sys
import time

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280],
                 down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                 cross_attention_dim=768, attention_head_dim=8)
SD15_TE = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
               max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, sample_size=512)


def build(tiny: bool):
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    if tiny:
        from lorahub import tiny as tinymod

        unet, te, vae = tinymod.make_unet("sd1"), tinymod.make_text_encoder(1), tinymod.make_vae()
    else:
        unet = UNet2DConditionModel(**SD15_UNET)
        te = CLIPTextModel(CLIPTextConfig(**SD15_TE))
        vae = AutoencoderKL(**SD15_VAE)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012)
    return unet, te, vae, sched


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench(variant: str, *, tiny: bool, res: int, batch: int, rank: int, steps: int, warmup: int, dtype_name: str):
    import torch
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from lorahub.train.trainer import add_lora, diffusion_loss

    dev = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    unet, te, vae, sched = build(tiny)
    for m in (unet, te, vae):
        m.requires_grad_(False)
    vae.to(dev)
    te.to(dev, dtype=amp if variant != "plain" else amp)
    g = torch.Generator(dev).manual_seed(0)
    pixels = torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(1)).to(dev) * 2 - 1
    ids = torch.randint(0, te.config.vocab_size - 2, (batch, 77), generator=torch.Generator().manual_seed(2)).to(dev)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    if variant == "full":
        unet.to(dev, dtype=torch.float32)
        unet.requires_grad_(True)
        params = list(unet.parameters())
        unet.set_attn_processor(AttnProcessor2_0())
    else:
        unet.to(dev, dtype=amp)
        params = add_lora(unet, rank, rank, targets)
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        unet.set_attn_processor(AttnProcessor2_0() if variant == "lorahub" else AttnProcessor())
    if variant in ("lorahub", "full") and dev.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    fused = variant in ("lorahub", "full") and dev.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if fused else {"foreach": False}))
    unet.train()
    autocast = torch.autocast(dev.type, dtype=amp, enabled=amp != torch.float32)

    def encode():
        with torch.no_grad(), autocast:
            lat = vae.encode(pixels).latent_dist.sample(generator=g) * vae.config.scaling_factor
            enc = te(ids)[0]
        return lat.float(), enc

    cached = encode() if variant in ("lorahub", "full") else None
    if variant in ("lorahub", "full"):
        del vae, te  # not needed in the step any more
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        lat, enc = cached if cached is not None else encode()
        if variant != "plain" and dev.type == "cuda":
            lat = lat.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss, _, _ = diffusion_loss(unet, sched, lat, enc, g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(dev)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    out = {"variant": variant, "it_s": steps / dt, "s_per_it": dt / steps, "peak_gib": peak,
           "trainable_params": sum(p.numel() for p in params), "final_loss": float(loss.detach())}
    del unet, opt, params, cached
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny fixture-shaped models")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--variants", default="lorahub,full,plain")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    if not args.tiny and not torch.cuda.is_available():
        sys.exit("no CUDA device: the SD1.5-shaped benchmark needs a GPU (use --tiny for the CPU smoke run)")
    if args.tiny:
        torch.set_num_threads(1)  # tiny models; avoids OpenMP spinning on a shared machine
    res = args.resolution or (32 if args.tiny else 512)
    if args.tiny and args.batch == 4:
        args.batch = 2
    steps = args.steps or 20
    warmup = args.warmup if args.warmup is not None else 3
    dtype = args.dtype or ("fp32" if args.tiny else "bf16")
    rows = []
    for v in args.variants.split(","):
        rows.append(bench(v.strip(), tiny=args.tiny, res=res, batch=args.batch, rank=args.rank, steps=steps,
                          warmup=warmup, dtype_name=dtype))
    by = {r["variant"]: r for r in rows}
    ratios = {}
    if "lorahub" in by:
        for other in ("full", "plain"):
            if other in by:
                ratios[f"speed lorahub/{other}"] = by["lorahub"]["it_s"] / by[other]["it_s"]
                if by[other]["peak_gib"]:
                    ratios[f"memory lorahub/{other}"] = by["lorahub"]["peak_gib"] / by[other]["peak_gib"]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.tiny else platform.processor() or "cpu"
    report = {"device": device, "torch": torch.__version__, "resolution": res, "batch": args.batch,
              "rank": args.rank, "dtype": dtype, "steps": steps, "warmup": warmup, "tiny": args.tiny,
              "results": rows, "ratios": ratios}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"device {device}  torch {torch.__version__}  {res}x{res} batch {args.batch} rank {args.rank} {dtype}"
          f"  ({steps} timed steps after {warmup} warm-up)")
    print(f"{'variant':10} {'it/s':>8} {'s/it':>8} {'peak GiB':>9} {'trainable':>12}")
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        print(f"{r['variant']:10} {r['it_s']:8.3f} {r['s_per_it']:8.3f} {peak:>9} {r['trainable_params']:12,d}")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")


if __name__ == "__main__":
    main()
