"""ops.checkpoints: streaming reads/writes of diffusers folders and LDM/SGM single files."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorahub.errors import FormatError, LorahubError
from lorahub.ops import checkpoints as C
from lorahub.tiny_loras import kohya_file


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_single_file_layout_matches_diffusers_from_single_file(kind, tiny_sd1, tiny_sdxl, tmp_path):
    from diffusers import UNet2DConditionModel

    folder = tiny_sd1 if kind == "sd1" else tiny_sdxl
    single = tmp_path / f"{kind}.safetensors"
    with C.open_checkpoint(folder) as ck:
        assert ck.layout == "diffusers" and ck.family == kind
        C.save_single_file(ck, single)
        with C.open_checkpoint(single) as s:
            assert s.layout == ("sgm" if kind == "sdxl" else "ldm") and s.family == kind
            raw = safe_open(str(single), "pt").keys()
            assert all(k.startswith(("model.diffusion_model.", "cond_stage_model.transformer.",
                                     "conditioner.embedders.0.transformer.")) for k in raw)
            for name in s.keys():
                assert torch.equal(s.get(name), ck.get(name)), name
            assert {n for n in ck.keys() if n.startswith(("unet.", "text_encoder."))} == set(s.keys())
    # diffusers' own single-file loader reads our LDM/SGM layout into the same UNet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        u = UNet2DConditionModel.from_single_file(str(single), config=str(folder), subfolder="unet",
                                                  local_files_only=True)
        ref = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    a, b = u.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


def test_canonical_names_match_live_modules(tiny_sdxl):
    with C.open_checkpoint(tiny_sdxl) as ck:
        names = set(ck.keys())
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight" in names
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight" in names
    assert "text_encoder_2.text_model.encoder.layers.1.mlp.fc2.weight" in names
    assert "text_encoder_2.text_projection.weight" in names


def test_write_like_folder_transforms_and_copies(tiny_sd1, tmp_path):
    with C.open_checkpoint(tiny_sd1) as ck:
        C.write_like(ck, tmp_path / "out", transform=lambda n, t: t * 2 if n.startswith("unet.") else t,
                     dtype=torch.float16)
        with C.open_checkpoint(tmp_path / "out") as o:
            for n in ck.keys():
                want = (ck.get(n) * (2 if n.startswith("unet.") else 1)).to(torch.float16)
                assert torch.equal(o.get(n), want), n
                assert o.dtype(n) == "F16"
    # non-weight files and the VAE are carried over byte for byte
    for rel in ("model_index.json", "unet/config.json", "vae/diffusion_pytorch_model.safetensors",
                "tokenizer/tokenizer.json"):
        assert (tmp_path / "out" / rel).read_bytes() == (tiny_sd1 / rel).read_bytes()
    with pytest.raises(LorahubError, match="shape"):
        with C.open_checkpoint(tiny_sd1) as ck:
            C.write_like(ck, tmp_path / "bad", transform=lambda n, t: t.flatten())
    assert not (tmp_path / "bad").exists()


def _sgm_file(tiny_sdxl, path):
    """A hand-made SGM single file: UNet, CLIP-L (HF layout), OpenCLIP bigG (fused q/k/v), a VAE tensor."""
    te2 = load_file(str(tiny_sdxl / "text_encoder_2" / "model.safetensors"))
    out = {}
    with C.open_checkpoint(tiny_sdxl) as ck:
        C.save_single_file(ck, path)
    out.update(load_file(str(path)))
    P = "conditioner.embedders.1.model."
    n_layers = 1 + max(int(k.split(".")[3]) for k in te2 if k.startswith("text_model.encoder.layers."))
    for i in range(n_layers):
        L = f"text_model.encoder.layers.{i}."
        for suf in ("weight", "bias"):
            out[f"{P}transformer.resblocks.{i}.attn.in_proj_{suf}"] = torch.cat(
                [te2[f"{L}self_attn.{p}_proj.{suf}"] for p in "qkv"])
            out[f"{P}transformer.resblocks.{i}.attn.out_proj.{suf}"] = te2[f"{L}self_attn.out_proj.{suf}"]
            out[f"{P}transformer.resblocks.{i}.ln_1.{suf}"] = te2[f"{L}layer_norm1.{suf}"]
            out[f"{P}transformer.resblocks.{i}.ln_2.{suf}"] = te2[f"{L}layer_norm2.{suf}"]
            out[f"{P}transformer.resblocks.{i}.mlp.c_fc.{suf}"] = te2[f"{L}mlp.fc1.{suf}"]
            out[f"{P}transformer.resblocks.{i}.mlp.c_proj.{suf}"] = te2[f"{L}mlp.fc2.{suf}"]
    out[P + "token_embedding.weight"] = te2["text_model.embeddings.token_embedding.weight"]
    out[P + "positional_embedding"] = te2["text_model.embeddings.position_embedding.weight"]
    out[P + "ln_final.weight"] = te2["text_model.final_layer_norm.weight"]
    out[P + "ln_final.bias"] = te2["text_model.final_layer_norm.bias"]
    out[P + "text_projection"] = te2["text_projection.weight"].T.contiguous()
    out[P + "logit_scale"] = torch.tensor(4.6)
    out["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3)
    save_file(out, str(path), metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base"})
    return te2


def test_openclip_tower_is_mapped_and_written_back(tiny_sdxl, tmp_path):
    path = tmp_path / "sgm.safetensors"
    te2 = _sgm_file(tiny_sdxl, path)
    with C.open_checkpoint(path) as ck:
        assert ck.family == "sdxl" and ck.layout == "sgm"
        for k, v in te2.items():
            assert torch.equal(ck.get("text_encoder_2." + k), v), k
        assert ck.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
        # identity rewrite: byte-identical tensors, unmapped ones (VAE, logit_scale) included
        C.write_like(ck, tmp_path / "copy.safetensors")
        bump = "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.weight"
        C.write_like(ck, tmp_path / "bump.safetensors", transform=lambda n, t: t + 1 if n == bump else t)
    a, b = load_file(str(path)), load_file(str(tmp_path / "copy.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(str(tmp_path / "bump.safetensors"))
    key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    d = te2["text_model.encoder.layers.0.self_attn.q_proj.weight"].shape[0]
    assert torch.equal(c[key][:d], a[key][:d]) and torch.equal(c[key][d:2 * d], a[key][d:2 * d] + 1)
    assert torch.equal(c[key][2 * d:], a[key][2 * d:])
    assert safe_open(str(tmp_path / "bump.safetensors"), "pt").metadata()["modelspec.architecture"]


def test_sharded_and_variant_folders(tiny_sd1, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_sd1, folder)
    unet = folder / "unet"
    sd = load_file(str(unet / "diffusion_pytorch_model.safetensors"))
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(sd)
    half = len(keys) // 2
    save_file({k: sd[k] for k in keys[:half]}, str(unet / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[half:]}, str(unet / "diffusion_pytorch_model-00002-of-00002.safetensors"))
    wm = {k: f"diffusion_pytorch_model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    te = folder / "text_encoder"
    (te / "model.safetensors").rename(te / "model.fp16.safetensors")
    with C.open_checkpoint(folder) as ck, C.open_checkpoint(tiny_sd1) as ref:
        assert set(ck.keys()) == set(ref.keys())
        for n in ref.keys():
            assert torch.equal(ck.get(n), ref.get(n))
        C.write_like(ck, tmp_path / "resharded")
    assert (tmp_path / "resharded" / "unet" / "diffusion_pytorch_model-00002-of-00002.safetensors").exists()
    with C.open_checkpoint(tmp_path / "resharded") as ck, C.open_checkpoint(tiny_sd1) as ref:
        assert all(torch.equal(ck.get(n), ref.get(n)) for n in ref.keys())


def test_refuses_what_it_cannot_read(tmp_path, tiny_sd1):
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(FormatError, match="pickle"):
        C.open_checkpoint(ckpt)
    lora = kohya_file(tmp_path / "lora.safetensors")
    with pytest.raises(FormatError, match="not a Stable Diffusion checkpoint"):
        C.open_checkpoint(lora)
    with pytest.raises(LorahubError, match="no such"):
        C.open_checkpoint(tmp_path / "missing.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FormatError):
        C.open_checkpoint(empty)


def test_stream_writer_round_trip(tmp_path):
    ts = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64),
          "c": torch.randn(2, 2).to(torch.bfloat16), "d": torch.tensor(1.5, dtype=torch.float16)}
    p = tmp_path / "s.safetensors"
    w = C.StreamWriter(p, [(k, C._st_dtype(v.dtype), tuple(v.shape)) for k, v in ts.items()], {"x": "y"})
    for k, v in ts.items():
        w.write(k, v)
    w.close()
    back = load_file(str(p))
    assert all(torch.equal(back[k], v) for k, v in ts.items())
    assert safe_open(str(p), "pt").metadata() == {"x": "y"}
    f = C._File(p)
    assert all(torch.equal(f.read(k), v) for k, v in ts.items())
    f.close()


def test_reads_are_streamed_not_memory_mapped(tiny_sd1):
    """Tensors are read with positioned reads: the weight files never appear in the process's maps."""
    import os

    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc")
    with C.open_checkpoint(tiny_sd1) as ck:
        for n in ck.keys():
            ck.get(n)
        maps = open("/proc/self/maps").read()
        assert not any(str(p) in maps for p in ck.files())
