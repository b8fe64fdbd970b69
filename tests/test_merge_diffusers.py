"""Cross-checks with diffusers on the tiny SD1 pipeline: merged LoRA vs set_adapters, bake vs fuse_lora."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from lorahub.formats.canonical import LoraModel
from lorahub.formats.io import load_lora, save_lora
from lorahub.ops.bake import bake
from lorahub.ops.merge import MergeInput, exact_delta, merge
from lorahub.tiny_loras import random_lora

UNET_LAYERS = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (32, 32),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj": (256, 32),
    "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v": (64, 32),
    "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0": (32, 32),
    "unet.down_blocks.0.attentions.0.proj_in": (32, 32, 1, 1),  # 1x1 conv
    "unet.down_blocks.0.resnets.0.conv1": (32, 32, 3, 3),  # LoCon 3x3
    "unet.up_blocks.0.resnets.1.conv1": (64, 96, 3, 3),
}


def make_lora(seed: int, rank: int, keys, scale: float = 0.05, alpha: float | None = None) -> LoraModel:
    return random_lora({k: UNET_LAYERS[k] for k in keys}, seed, rank, alpha, scale=scale)


# kohya files are not used as diffusers inputs here: diffusers 0.42 drops the kohya alphas of SD1
# attention layers (alpha_pattern keys "...processor.to_q_lora..." match no module), a loader quirk.
DIALECT = {"a": "diffusers", "b": "diffusers", "c": "diffusers"}


def write_lora(model: LoraModel, path, dialect: str = "diffusers"):
    """Write with lorahub's own writer and read back (the path the CLI takes)."""
    save_lora(model, path, dialect=dialect, dtype=torch.float32)
    return load_lora(path, arch="tiny-sd1")


def unet_out(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    ehs = torch.randn(1, 5, 32, generator=gen)
    with torch.no_grad():
        return pipe.unet(sample, 10, encoder_hidden_states=ehs).sample


@pytest.fixture(scope="module")
def loras():
    keys = list(UNET_LAYERS)
    a = make_lora(1, 4, keys, alpha=2.0)
    b = make_lora(2, 2, keys[:3] + keys[5:7], alpha=4.0)  # different rank, subset of the layers
    c = make_lora(3, 3, keys[2:])
    return a, b, c


def _pipe(tiny_sd1):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(tiny_sd1), local_files_only=True)


def test_merged_lora_matches_set_adapters(tiny_sd1, tmp_path, loras):
    weights = [0.8, -0.6, 1.1]
    paths, loaded = [], []
    for name, m in zip("abc", loras):
        p = tmp_path / f"{name}.safetensors"
        loaded.append(write_lora(m, p, DIALECT[name]))
        paths.append(p)
    inputs = [MergeInput(m, w) for m, w in zip(loaded, weights)]

    pipe = _pipe(tiny_sd1)
    base_out = unet_out(pipe)
    for name, p in zip("abc", paths):
        pipe.load_lora_weights(str(p), adapter_name=name)
    pipe.set_adapters(["a", "b", "c"], adapter_weights=weights)
    ref = unet_out(pipe)
    assert (ref - base_out).abs().max() > 1e-3  # the LoRAs do change the output

    for method, rank, dialect in (("concat", None, "kohya"), ("svd", 9, "diffusers")):  # 9 = 4 + 2 + 3
        res = merge(inputs, method=method, rank=rank)
        out = tmp_path / f"merged-{method}.safetensors"
        write_lora(res.model, out, dialect)
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(out), adapter_name="merged")
        got = unet_out(pipe)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # a lower-rank svd merge is close but not equal, and the report says how much is kept
    res = merge(inputs, method="svd", rank=2)
    assert res.retained < 0.999
    pipe.unload_lora_weights()
    write_lora(res.model, tmp_path / "low.safetensors")
    pipe.load_lora_weights(str(tmp_path / "low.safetensors"), adapter_name="low")
    low = unet_out(pipe)
    assert (low - ref).abs().max() > 1e-6


def test_bake_matches_diffusers_fuse(tiny_sd1, tmp_path, loras):
    weights = [0.7, 0.5, -0.4]
    inputs = [MergeInput(m, w) for m, w in zip(loras, weights)]
    exact = merge(inputs, method="concat").model
    out = tmp_path / "baked"
    rep = bake(tiny_sd1, exact, out, recipe_text="name = 'x'\n")
    assert rep.layers == len(UNET_LAYERS)
    assert (out / "lorahub_recipe.toml").read_text() == "name = 'x'\n"

    pipe = _pipe(tiny_sd1)
    for name, m in zip("abc", loras):
        p = tmp_path / f"{name}.safetensors"
        write_lora(m, p, DIALECT[name])
        pipe.load_lora_weights(str(p), adapter_name=name)
    pipe.set_adapters(["a", "b", "c"], adapter_weights=weights)
    pipe.fuse_lora(adapter_names=["a", "b", "c"])
    pipe.unload_lora_weights()
    fused = {k: v for k, v in pipe.unet.state_dict().items()}

    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        baked = {k: f.get_tensor(k) for k in f.keys()}
    assert set(baked) == set(fused)
    with safe_open(str(tiny_sd1 / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        base = {k: f.get_tensor(k) for k in f.keys()}
    changed = 0
    for k in baked:
        torch.testing.assert_close(baked[k], fused[k], rtol=1e-5, atol=1e-6)
        if not torch.equal(baked[k], base[k]):
            changed += 1
        else:
            assert k[: -len(".weight")] not in {x.split(".", 1)[1] for x in UNET_LAYERS}
    assert changed == len(UNET_LAYERS)
    # materialised reference: W0 + Σ αᵢ ΔWᵢ
    key = "unet.up_blocks.0.resnets.1.conv1"
    w = base["up_blocks.0.resnets.1.conv1.weight"] + exact_delta(inputs, key, dtype=torch.float32)
    torch.testing.assert_close(baked["up_blocks.0.resnets.1.conv1.weight"], w, rtol=1e-5, atol=1e-6)
    # the baked folder loads as a pipeline and other components are untouched copies
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (tiny_sd1 / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
