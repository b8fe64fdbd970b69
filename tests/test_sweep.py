"""Batched α sweeps against the ordinary diffusers way (load_lora_weights + set_adapters per α).

The key property: one batched pipeline call with a per-sample-α side branch gives the same images as a
pipeline call per α with the LoRA loaded by diffusers/peft and its weight set with set_adapters.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorahub.ops.apply import apply_loras
from lorahub.ops.sweep import Sample, plan_sweep, run_samples, set_scheduler
from lorahub.tiny_loras import pipeline_lora

TOL = 2e-4  # images in [0, 1]; float32 batched vs unbatched matmuls differ by ~1e-6


def _load(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _random_lora(pipe, seed, *, unet=True, te=True, rank=4, std=0.3, select=None):
    """A canonical LoraModel and the same LoRA as diffusers-format keys (lora_A / lora_B)."""
    sel = select or (lambda n: True)
    keep = {}
    if unet:
        keep["unet"] = lambda n: "attentions" in n and sel(n)
    if te:
        keep["text_encoder"] = lambda n: ("self_attn" in n or "mlp" in n) and sel(n)
        keep["text_encoder_2"] = lambda n: "self_attn" in n and sel(n)
    return pipeline_lora(pipe, seed, rank=rank, scale=std, keep=keep)


def _save(sd, path):
    """Write raw diffusers keys (independent of lorahub's writers, so the test checks the reader too)."""
    from safetensors.torch import save_file

    save_file(sd, str(path))
    return path


def _ordinary(pipe, samples, adapters, **kw):
    out = []
    for s in samples:
        pipe.set_adapters(adapters, adapter_weights=list(s.alphas))
        out.append(pipe(s.prompt, generator=torch.Generator("cpu").manual_seed(s.seed), output_type="np",
                        **kw).images[0])
    return out


KW = dict(num_inference_steps=2, height=64, width=64, guidance_scale=7.5)
BKW = dict(steps=2, height=64, width=64, guidance=7.5, output_type="np")


def test_batched_sweep_equals_diffusers_set_adapters_sd1(tiny_sd1, tmp_path):
    torch.manual_seed(0)
    pipe = _load(tiny_sd1)
    model, sd = _random_lora(pipe, 1)
    samples = plan_sweep(["a red cat", "a house"], [1, 2], [0.0, 0.4, 1.0])
    handle = apply_loras(pipe, [model], ["x"])
    assert handle.applied == [len(model.layers)] and handle.unmatched == [[]]
    batched = run_samples(pipe, handle, samples, **BKW)  # 12 images in one batched call
    handle.remove()
    base = {(p, s): pipe(p, generator=torch.Generator("cpu").manual_seed(s), output_type="np", **KW).images[0]
            for p in ("a red cat", "a house") for s in (1, 2)}

    pipe.load_lora_weights(str(_save(sd, tmp_path / "lora.safetensors")), adapter_name="x")
    # diffusers really loaded both parts (the text-encoder half too)
    assert any("lora" in n for n, _ in pipe.text_encoder.named_modules())
    ref = _ordinary(pipe, samples, ["x"], **KW)
    for s, a, b in zip(samples, batched, ref):
        assert np.abs(a - b).max() < TOL, (s, np.abs(a - b).max())
    # and the other ordinary way: fuse the LoRA into the weights at α = 0.4
    pipe.set_adapters(["x"], adapter_weights=[1.0])
    pipe.fuse_lora(lora_scale=0.4, adapter_names=["x"])
    pipe.set_adapters(["x"], adapter_weights=[0.0])  # the fused weights alone carry the LoRA
    fused = pipe("a house", generator=torch.Generator("cpu").manual_seed(2), output_type="np", **KW).images[0]
    i = next(i for i, s in enumerate(samples) if (s.prompt, s.seed, s.alphas) == ("a house", 2, (0.4,)))
    assert np.abs(fused - batched[i]).max() < TOL
    # α = 0 is the base model; the LoRA visibly changes the image at α = 1
    for s, a in zip(samples, batched):
        if s.alphas == (0.0,):
            assert np.abs(a - base[(s.prompt, s.seed)]).max() < 1e-5
        if s.alphas == (1.0,):
            assert np.abs(a - base[(s.prompt, s.seed)]).max() > 0.05


def test_text_encoder_branch_follows_per_sample_alpha(tiny_sd1, tmp_path):
    """A LoRA on the text encoder only: the per-sample α must reach the text encoder."""
    pipe = _load(tiny_sd1)
    model, sd = _random_lora(pipe, 2, unet=False, std=0.5)
    assert model.parts() == ["text_encoder"]
    samples = plan_sweep(["a blue dog"], [3], [0.0, 0.5, 1.0])
    handle = apply_loras(pipe, [model], ["te"])
    batched = run_samples(pipe, handle, samples, **BKW)
    handle.remove()
    pipe.load_lora_weights(str(_save(sd, tmp_path / "te.safetensors")), adapter_name="te")
    ref = _ordinary(pipe, samples, ["te"], **KW)
    for a, b in zip(batched, ref):
        assert np.abs(a - b).max() < TOL
    assert np.abs(batched[0] - batched[2]).max() > 0.01  # the text-encoder LoRA matters


def test_alpha_zero_is_bitwise_base_and_removal_restores(tiny_sd1):
    pipe = _load(tiny_sd1)
    model, _ = _random_lora(pipe, 3)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    base = pipe("a cat", generator=torch.Generator("cpu").manual_seed(5), output_type="np", **KW).images[0]
    with apply_loras(pipe, [model]) as handle:
        only0 = run_samples(pipe, handle, [Sample("a cat", 5, (0.0,))], **BKW)[0]
        assert any(type(m).__name__ == "LoraBranch" for m in pipe.unet.modules())
    # a batch of α=0 skips every branch: identical to the plain pipeline, bit for bit
    assert np.array_equal(only0, base)
    assert not any(type(m).__name__ == "LoraBranch" for m in pipe.unet.modules())
    after = pipe.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    again = pipe("a cat", generator=torch.Generator("cpu").manual_seed(5), output_type="np", **KW).images[0]
    assert np.array_equal(again, base)


def test_two_lora_grid_equals_two_adapters(tiny_sd1, tmp_path):
    pipe = _load(tiny_sd1)
    m1, sd1 = _random_lora(pipe, 4, te=False, select=lambda n: "attn1" in n)
    m2, sd2 = _random_lora(pipe, 5, te=False, select=lambda n: "attn2" in n or "ff" in n)
    samples = plan_sweep(["a tree"], [7], [0.0, 1.0], [0.0, 0.6])
    assert [s.alphas for s in samples] == [(0.0, 0.0), (1.0, 0.0), (0.0, 0.6), (1.0, 0.6)]
    handle = apply_loras(pipe, [m1, m2], ["a", "b"])
    batched = run_samples(pipe, handle, samples, batch=3, **BKW)  # 2 calls: 3 + 1
    handle.remove()
    pipe.load_lora_weights(str(_save(sd1, tmp_path / "a.safetensors")), adapter_name="a")
    pipe.load_lora_weights(str(_save(sd2, tmp_path / "b.safetensors")), adapter_name="b")
    ref = _ordinary(pipe, samples, ["a", "b"], **KW)
    for a, b in zip(batched, ref):
        assert np.abs(a - b).max() < TOL


def test_stochastic_scheduler_keeps_per_sample_noise(tiny_sd1, tmp_path):
    """Euler ancestral draws noise every step: each sample keeps its own generator, as a single call does."""
    pipe = _load(tiny_sd1)
    set_scheduler(pipe, "euler_a")
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    model, sd = _random_lora(pipe, 6, te=False)
    samples = plan_sweep(["a boat"], [11, 12], [0.0, 1.0])
    handle = apply_loras(pipe, [model], ["x"])
    batched = run_samples(pipe, handle, samples, steps=3, height=64, width=64, guidance=5.0, output_type="np")
    handle.remove()
    pipe.load_lora_weights(str(_save(sd, tmp_path / "x.safetensors")), adapter_name="x")
    ref = _ordinary(pipe, samples, ["x"], num_inference_steps=3, height=64, width=64, guidance_scale=5.0)
    for a, b in zip(batched, ref):
        assert np.abs(a - b).max() < TOL


def test_batched_sweep_equals_set_adapters_sdxl(tiny_sdxl, tmp_path):
    pipe = _load(tiny_sdxl)
    model, sd = _random_lora(pipe, 7, std=0.2)
    assert set(model.parts()) == {"unet", "text_encoder", "text_encoder_2"}
    samples = plan_sweep(["a lamp"], [2], [0.0, 0.5, 1.0])
    handle = apply_loras(pipe, [model], ["x"])
    assert handle.unmatched == [[]]
    batched = run_samples(pipe, handle, samples, **BKW)
    handle.remove()
    pipe.load_lora_weights(str(_save(sd, tmp_path / "xl.safetensors")), adapter_name="x")
    ref = _ordinary(pipe, samples, ["x"], **KW)
    for a, b in zip(batched, ref):
        assert np.abs(a - b).max() < TOL
    assert np.abs(batched[0] - batched[2]).max() > 0.02


def test_inpainting_sweep_rows_share_noise(tiny_sd1):
    from PIL import Image

    from lorahub.ops.models import to_inpaint

    pipe = to_inpaint(_load(tiny_sd1))
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline"
    model, _ = _random_lora(pipe, 8, te=False)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    samples = plan_sweep(["a hole"], [1], [0.0, 1.0, 0.0])  # the same sample twice in one batch
    handle = apply_loras(pipe, [model])
    out = run_samples(pipe, handle, samples, image=image, mask=mask, **BKW)
    handle.remove()
    assert len(out) == 3 and out[0].shape == (64, 64, 3)
    assert np.abs(out[0] - out[2]).max() < 1e-5  # same seed, same noise, same α: same image
    assert np.abs(out[0] - out[1]).max() > 0.01  # only α differs along the row


def test_unknown_scheduler_is_a_clear_error(tiny_sd1):
    from lorahub.errors import LorahubError

    pipe = _load(tiny_sd1)
    with pytest.raises(LorahubError, match="unknown scheduler"):
        set_scheduler(pipe, "nope")


def test_single_file_checkpoint_with_local_config(tiny_sd1, tmp_path):
    """A single-file (LDM layout) checkpoint loads offline with --config; same images as the folder."""
    from lorahub.errors import LorahubError
    from lorahub.ops.checkpoints import open_checkpoint, save_single_file
    from lorahub.ops.models import load_pipeline

    ckpt = save_single_file(open_checkpoint(tiny_sd1), tmp_path / "tiny.safetensors")  # UNet + CLIP, no VAE
    with pytest.raises(LorahubError, match="needs a config"):
        load_pipeline(str(ckpt))
    single = load_pipeline(str(ckpt), config=tiny_sd1)
    folder = _load(tiny_sd1)
    assert type(single).__name__ == "StableDiffusionPipeline"
    for (n, a), (_, b) in zip(sorted(single.unet.state_dict().items()), sorted(folder.unet.state_dict().items())):
        assert torch.equal(a, b), n
    single.set_progress_bar_config(disable=True)
    imgs = [p("a cat", generator=torch.Generator("cpu").manual_seed(1), output_type="np", **KW).images[0]
            for p in (single, folder)]
    assert np.abs(imgs[0] - imgs[1]).max() < 1e-5


def test_sdxl_single_file_weights_come_from_the_file(tiny_sdxl, tmp_path):
    """SDXL single file with UNet + CLIP-L (no OpenCLIP, no VAE): those two from the file, the rest from --config."""
    from lorahub.ops.checkpoints import open_checkpoint, save_single_file
    from lorahub.ops.models import checkpoint_family, load_pipeline

    def bump(name, x):  # make the file's weights differ from the config folder's
        return x * 1.5 if name.startswith(("text_encoder.", "unet.conv_in")) and x.is_floating_point() else x

    ckpt = save_single_file(open_checkpoint(tiny_sdxl), tmp_path / "xl.safetensors", transform=bump)
    assert checkpoint_family(ckpt) == ("sdxl", False)
    single = load_pipeline(str(ckpt), config=tiny_sdxl)
    folder = _load(tiny_sdxl)
    assert type(single).__name__ == "StableDiffusionXLPipeline"
    te_s, te_f = single.text_encoder.state_dict(), folder.text_encoder.state_dict()
    w = "encoder.layers.0.self_attn.q_proj.weight"
    w = w if w in te_f else "text_model." + w
    assert torch.allclose(te_s[w], te_f[w] * 1.5)
    assert torch.allclose(single.unet.conv_in.weight, folder.unet.conv_in.weight * 1.5)
    assert torch.equal(single.unet.conv_out.weight, folder.unet.conv_out.weight)
    for k, v in folder.text_encoder_2.state_dict().items():  # not in the file: from --config
        assert torch.equal(single.text_encoder_2.state_dict()[k], v)
