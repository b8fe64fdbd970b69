"""Baking W0 + Σ αᵢ ΔWᵢ into checkpoints: dtype kept, single-file layout, text encoder, refusals."""

from __future__ import annotations

import pytest
import torch

from lorahub.errors import LorahubError
from lorahub.ops.bake import bake, weight_name
from lorahub.ops.checkpoints import open_checkpoint, save_single_file
from lorahub.ops.merge import MergeInput, exact_delta, merge
from lorahub.tiny_loras import random_lora

LAYERS = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": (32, 32),
    "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2": (64, 256),
    "unet.up_blocks.1.resnets.0.conv1": (32, 96, 3, 3),
    "text_encoder.text_model.encoder.layers.1.self_attn.q_proj": (32, 32),
    "text_encoder.text_model.encoder.layers.0.mlp.fc1": (64, 32),
}


def make(seed, rank, alpha):
    return random_lora(LAYERS, seed, rank, alpha)


@pytest.fixture(scope="module")
def inputs():
    return [MergeInput(make(1, 4, 2.0), 0.9), MergeInput(make(2, 2, None), -0.5)]


@pytest.fixture(scope="module")
def single_fp16(tiny_sd1, tmp_path_factory):
    p = tmp_path_factory.mktemp("ck") / "tiny-sd1-fp16.safetensors"
    with open_checkpoint(tiny_sd1) as ck:
        save_single_file(ck, p, dtype=torch.float16)
    return p


def check_baked(base_path, out_path, inputs, dtype):
    with open_checkpoint(base_path) as b, open_checkpoint(out_path) as o:
        assert set(o.keys()) == set(b.keys())
        touched = {weight_name(k) for k in LAYERS}
        for name in o.keys():
            got = o.get(name)
            w0 = b.get(name)
            assert got.dtype == w0.dtype
            if name in touched:
                assert got.dtype == dtype
                key = name[: -len(".weight")]
                ref = (w0.float() + exact_delta(inputs, key, dtype=torch.float32).reshape(w0.shape)).to(dtype)
                torch.testing.assert_close(got, ref, rtol=1e-5 if dtype == torch.float32 else 1e-3,
                                           atol=1e-6 if dtype == torch.float32 else 1e-3)
                assert not torch.equal(got, w0)
            else:
                assert torch.equal(got, w0), name


def test_bake_folder_unet_and_text_encoder(tiny_sd1, tmp_path, inputs):
    merged = merge(inputs, method="concat").model
    out = tmp_path / "baked"
    rep = bake(tiny_sd1, merged, out, recipe_text="x = 1\n")
    assert rep.layers == len(LAYERS) and rep.layout == "diffusers"
    assert (out / "lorahub_recipe.toml").read_text() == "x = 1\n"
    check_baked(tiny_sd1, out, inputs, torch.float32)
    with pytest.raises(LorahubError, match="already exists"):
        bake(tiny_sd1, merged, out)


def test_bake_single_file_keeps_fp16(single_fp16, tmp_path, inputs):
    merged = merge(inputs, method="concat").model
    out = tmp_path / "baked.safetensors"
    rep = bake(single_fp16, merged, out, recipe_text="name = \"r\"\n")
    assert rep.layout != "diffusers" and rep.dtypes == {"F16": len(LAYERS)}
    check_baked(single_fp16, out, inputs, torch.float16)
    with open_checkpoint(out) as o:
        meta = o.metadata()
    assert meta.get("lorahub.recipe") == "name = \"r\"\n"
    assert not out.with_name(out.name + ".recipe.toml").exists()


def test_bake_refuses_wrong_base(tiny_sdxl, tiny_sd1, tmp_path, inputs):
    merged = merge(inputs, method="concat").model
    with pytest.raises(LorahubError, match="right model"):
        bake(tiny_sdxl, merged, tmp_path / "x")
    with pytest.raises(LorahubError, match="folder"):
        bake(tiny_sd1, merged, tmp_path / "x.safetensors")
    assert not (tmp_path / "x").exists()


def test_bake_sdxl_folder_with_second_text_encoder(tiny_sdxl, tmp_path):
    from lorahub.formats.names import get_arch

    mods = get_arch("tiny-sdxl").modules
    keys = [next(k for k in mods if k.startswith("unet.") and k.endswith("attn2.to_k")),
            next(k for k in mods if k.startswith("text_encoder_2.") and k.endswith("mlp.fc2")),
            next(k for k in mods if k.startswith("text_encoder.") and k.endswith("self_attn.v_proj"))]
    m = random_lora({k: mods[k] for k in keys}, 9, 3, 1.5, scale=1.0, base="sdxl")
    inputs = [MergeInput(m, 0.3)]
    merged = merge(inputs, method="concat").model
    out = tmp_path / "sdxl-baked"
    rep = bake(tiny_sdxl, merged, out)
    assert rep.layers == 3 and rep.family == "sdxl"
    with open_checkpoint(tiny_sdxl) as b, open_checkpoint(out) as o:
        for k in keys:
            name = weight_name(k)
            ref = b.get(name) + exact_delta(inputs, k, dtype=torch.float32)
            torch.testing.assert_close(o.get(name), ref, rtol=1e-5, atol=1e-5)
