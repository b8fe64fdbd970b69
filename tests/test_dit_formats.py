"""Flux.1 and SD3 LoRA dialects (lorahub.formats.dit): every dialect read into canonical form agrees with
diffusers' own converters module by module; files lorahub writes load into diffusers' own transformer
classes with every module injected and give the output our ΔW gives; kohya -> diffusers -> kohya is
bit-exact; separately trained q/k/v fuse block-diagonally, exactly."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorahub.tiny_loras import kohya_tensors, random_lora

W = 3072  # FLUX.1's width (diffusers' kohya converter knows only this one for single blocks)


def kohya_flux(double=(0,), single=(0,), width=W, rank=4, alpha=2.0, seed=0, top=True, dtype="float32") -> dict:
    """Raw kohya sd-scripts Flux tensors (BFL names) on the given blocks, at ``width``."""
    mods = {}
    for i in double:
        mods |= {f"lora_unet_double_blocks_{i}_img_attn_qkv": (3 * width, width),
                 f"lora_unet_double_blocks_{i}_img_attn_proj": (width, width),
                 f"lora_unet_double_blocks_{i}_img_mlp_0": (4 * width, width),
                 f"lora_unet_double_blocks_{i}_img_mlp_2": (width, 4 * width),
                 f"lora_unet_double_blocks_{i}_img_mod_lin": (6 * width, width),
                 f"lora_unet_double_blocks_{i}_txt_attn_qkv": (3 * width, width),
                 f"lora_unet_double_blocks_{i}_txt_attn_proj": (width, width),
                 f"lora_unet_double_blocks_{i}_txt_mlp_0": (4 * width, width),
                 f"lora_unet_double_blocks_{i}_txt_mlp_2": (width, 4 * width),
                 f"lora_unet_double_blocks_{i}_txt_mod_lin": (6 * width, width)}
    for i in single:
        mods |= {f"lora_unet_single_blocks_{i}_linear1": (7 * width, width),
                 f"lora_unet_single_blocks_{i}_linear2": (width, 5 * width),
                 f"lora_unet_single_blocks_{i}_modulation_lin": (3 * width, width)}
    if top:
        real = width == W  # FLUX.1-dev's in-channels, T5 and CLIP widths; the tiny model's otherwise
        latent, t5, clip = (64, 4096, 768) if real else (4, 32, 32)
        mods |= {"lora_unet_img_in": (width, latent), "lora_unet_txt_in": (width, t5),
                 "lora_unet_time_in_in_layer": (width, 256), "lora_unet_time_in_out_layer": (width, width),
                 "lora_unet_vector_in_in_layer": (width, clip), "lora_unet_vector_in_out_layer": (width, width),
                 "lora_unet_final_layer_linear": (latent, width),
                 "lora_unet_final_layer_adaLN_modulation_1": (2 * width, width)}
    t = kohya_tensors(mods, rank=rank, alpha=alpha, seed=seed, dtype=dtype, scale=0.1)
    return {k: torch.from_numpy(v) for k, v in t.items()}


def probe(delta_fn, inn: int, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return delta_fn(torch.randn(inn, 8, generator=g, dtype=torch.float64))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def ours_times(layer, x):
    """ΔW·x from a canonical layer's factors (never forming ΔW)."""
    return layer.up.double() @ (layer.down.double() @ x) * layer.scale


def peft_times(sd, mod, x, scale=1.0):
    return sd[f"{mod}.lora_B.weight"].double() @ (sd[f"{mod}.lora_A.weight"].double() @ x) * scale


def read(tensors, tmp_path, name="f.safetensors", metadata=None):
    from lorahub.formats.io import load_lora

    p = tmp_path / name
    save_file(tensors, str(p), metadata=metadata)
    return p, load_lora(p)


# ------------------------------------------------------------------------------------------------
# reading: agreement with diffusers' converters

def test_kohya_flux_reads_as_diffusers_converter_reads_it(tmp_path):
    """Every module diffusers' _convert_kohya_flux_lora_to_diffusers makes from a kohya file at FLUX.1's
    width, ours too, with the same ΔW (rel 1e-5 on random probes); q/k/v share one lora_A tensor and keep
    the file's alpha (the converter folds it into the factors)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    t = kohya_flux(double=(0, 18), single=(0, 37), alpha=2.0)
    t["lora_unet_final_layer_adaLN_modulation_1.alpha"] = torch.tensor(4.0)  # = rank: diffusers ignores it here
    t["lora_unet_final_layer_linear.alpha"] = torch.tensor(4.0)
    p, m = read(t, tmp_path)
    conv = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in t.items()})
    mods = {k.rsplit(".lora_", 1)[0] for k in conv}
    canon = {k if k.startswith("transformer.") else "transformer." + k for k in mods}
    assert set(m.layers) == canon and m.base == "flux" and m.arch == "flux" and m.source_format == "kohya"
    for mod in mods:
        layer = m.layers[mod if mod.startswith("transformer.") else "transformer." + mod]
        x = probe(lambda z: z, layer.down.shape[1])
        assert rel(ours_times(layer, x), peft_times(conv, mod, x)) < 1e-5, mod
    q, k, v = (m.layers[f"transformer.single_transformer_blocks.37.attn.to_{c}"] for c in "qkv")
    mlp = m.layers["transformer.single_transformer_blocks.37.proj_mlp"]
    assert q.down is k.down is v.down is mlp.down and q.alpha == 2.0 and q.rank == 4
    assert torch.equal(q.down, t["lora_unet_single_blocks_37_linear1.lora_down.weight"])
    assert mlp.up.shape == (4 * W, 4)


def test_block_diagonal_kohya_qkv_splits_like_diffusers(tmp_path):
    """A fused qkv whose up is block-diagonal (separately trained q, k, v) splits into three rank-r/3
    layers with their own rows of lora_down, as the converter's 'sparse' case does; ΔW equal."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    t = kohya_flux(double=(3,), single=(), top=False, rank=6, alpha=3.0)
    up = t["lora_unet_double_blocks_3_img_attn_qkv.lora_up.weight"]
    for j in range(3):
        for c in range(3):
            if j != c:
                up[j * W:(j + 1) * W, c * 2:(c + 1) * 2] = 0
    p, m = read(t, tmp_path)
    conv = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in t.items()})
    for c in "qkv":
        mod = f"transformer.transformer_blocks.3.attn.to_{c}"
        layer = m.layers[mod]
        assert layer.rank == 2 == conv[f"{mod}.lora_A.weight"].shape[0] and layer.scale == 0.5
        x = probe(lambda z: z, W)
        assert rel(ours_times(layer, x), peft_times(conv, mod, x)) < 1e-5
    # and back to kohya: the same fused layer, bit for bit
    from lorahub.formats.io import save_lora

    save_lora(m, tmp_path / "k.safetensors", "kohya")
    back = load_file(str(tmp_path / "k.safetensors"))
    assert back.keys() == t.keys() and all(torch.equal(back[k], t[k]) for k in t)


def test_xlabs_flux_reads_as_diffusers_reads_it(tmp_path):
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(1)
    t = {}
    for i in (0, 1):
        for n, (o, inn) in {"qkv_lora1": (96, 32), "proj_lora1": (32, 32), "qkv_lora2": (96, 32),
                            "proj_lora2": (32, 32)}.items():
            t[f"double_blocks.{i}.processor.{n}.down.weight"] = torch.randn(4, inn, generator=g)
            t[f"double_blocks.{i}.processor.{n}.up.weight"] = torch.randn(o, 4, generator=g)
    from lorahub.formats.detect import detect

    p, m = read(t, tmp_path)
    d = detect(p)
    assert (d.format, d.base, d.n_layers, d.rank) == ("xlabs", "flux", 8, 4)
    ref = FluxPipeline.lora_state_dict(str(p))
    mods = {k.rsplit(".lora_", 1)[0] for k in ref}
    assert set(m.layers) == mods and len(mods) == 16 and m.source_format == "xlabs"
    for mod in mods:
        x = probe(lambda z: z, 32)
        assert rel(ours_times(m.layers[mod], x), peft_times(ref, mod, x)) < 1e-5


def test_comfyui_and_bfl_peft_flux_files(tmp_path):
    """ComfyUI (diffusion_model. + kohya factors: diffusers reads these through its kohya converter),
    ComfyUI/ai-toolkit with PEFT factors and PEFT files on BFL paths (diffusers leaves those keys as they
    are): all read to the same canonical layers as the kohya file they restate."""
    from diffusers import FluxPipeline

    from lorahub.formats.detect import detect

    t = kohya_flux(double=(0,), single=(2,), top=False, rank=4, alpha=2.0)
    _, ref = read(t, tmp_path, "kohya.safetensors")
    comfy_k = {k.replace("lora_unet_double_blocks_0_img_attn_", "diffusion_model.double_blocks.0.img_attn.")
                .replace("lora_unet_double_blocks_0_txt_attn_", "diffusion_model.double_blocks.0.txt_attn.")
                .replace("lora_unet_double_blocks_0_img_mlp_", "diffusion_model.double_blocks.0.img_mlp.")
                .replace("lora_unet_double_blocks_0_txt_mlp_", "diffusion_model.double_blocks.0.txt_mlp.")
                .replace("lora_unet_double_blocks_0_img_mod_lin", "diffusion_model.double_blocks.0.img_mod.lin")
                .replace("lora_unet_double_blocks_0_txt_mod_lin", "diffusion_model.double_blocks.0.txt_mod.lin")
                .replace("lora_unet_single_blocks_2_modulation_lin", "diffusion_model.single_blocks.2.modulation.lin")
                .replace("lora_unet_single_blocks_2_", "diffusion_model.single_blocks.2."): v for k, v in t.items()}
    assert all(k.startswith("diffusion_model.") for k in comfy_k)
    p, m = read(comfy_k, tmp_path, "comfy.safetensors")
    assert (detect(p).format, detect(p).base, m.source_format) == ("comfyui", "flux", "comfyui")
    conv = FluxPipeline.lora_state_dict(str(p))  # diffusers: ComfyUI keys through its kohya converter
    assert {k.rsplit(".lora_", 1)[0] for k in conv} == set(m.layers) == set(ref.layers)
    for mod, layer in m.layers.items():
        x = probe(lambda z: z, layer.down.shape[1])
        assert rel(ours_times(layer, x), peft_times(conv, mod, x)) < 1e-5
        assert rel(ours_times(layer, x), ours_times(ref.layers[mod], x)) < 1e-12
    for prefix, fmt in (("diffusion_model.", "comfyui"), ("base_model.model.", "bfl"), ("", "bfl")):
        peft = {}
        for k, v in comfy_k.items():
            k = k.removeprefix("diffusion_model.")
            if k.endswith(".alpha"):
                continue
            peft[prefix + k.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight")] = v
        p, m = read(peft, tmp_path, f"peft-{fmt}.safetensors")
        assert (detect(p).format, m.source_format, m.base) == (fmt, fmt, "flux")
        assert set(m.layers) == set(ref.layers)
        for mod, layer in m.layers.items():  # no alpha in these files: scale 1 (the kohya file has 0.5)
            x = probe(lambda z: z, layer.down.shape[1])
            assert rel(ours_times(layer, x) * 0.5, ours_times(ref.layers[mod], x)) < 1e-12


def test_newer_family_reads_through_its_diffusers_loader(tmp_path):
    """A kohya Qwen-Image LoRA: read through QwenImagePipeline.lora_state_dict into diffusers module
    paths; ΔW per module equals up·down·alpha/r of the raw file."""
    t = {k: torch.from_numpy(v) for k, v in kohya_tensors(
        {"lora_unet_transformer_blocks_0_attn_to_q": (64, 64), "lora_unet_transformer_blocks_0_attn_add_k_proj": (64, 64),
         "lora_unet_transformer_blocks_1_img_mlp_net_0_proj": (256, 64),
         "lora_unet_transformer_blocks_1_txt_mod_1": (384, 64)}, rank=4, alpha=8.0, dtype="float32").items()}
    p, m = read(t, tmp_path)
    assert m.base == "other:qwen-image" and m.source_format == "kohya"
    names = {"transformer.transformer_blocks.0.attn.to_q": "lora_unet_transformer_blocks_0_attn_to_q",
             "transformer.transformer_blocks.0.attn.add_k_proj": "lora_unet_transformer_blocks_0_attn_add_k_proj",
             "transformer.transformer_blocks.1.img_mlp.net.0.proj": "lora_unet_transformer_blocks_1_img_mlp_net_0_proj",
             "transformer.transformer_blocks.1.txt_mod.1": "lora_unet_transformer_blocks_1_txt_mod_1"}
    assert set(m.layers) == set(names)
    for canon, k in names.items():
        want = t[f"{k}.lora_up.weight"].double() @ t[f"{k}.lora_down.weight"].double() * 2.0
        assert rel(m.layers[canon].delta(torch.float64), want) < 1e-6
    assert any("QwenImagePipeline.lora_state_dict" in n for n in m.notes)


def test_newer_family_lokr_reads_through_its_diffusers_loader(tmp_path):
    """An ai-toolkit Z-Image LoKr (diffusion_model.<path>.lokr_*): detected as LyCORIS of z-image, read
    through ZImagePipeline.lora_state_dict (alpha baked into w1) as LoKr layers with the raw file's ΔW."""
    from lorahub.formats.detect import detect

    g = torch.Generator().manual_seed(4)
    t = {"diffusion_model.layers.0.attention.to_q.lokr_w1": torch.randn(8, 8, generator=g),
         "diffusion_model.layers.0.attention.to_q.lokr_w2": torch.randn(480, 480, generator=g) * 0.01,
         "diffusion_model.layers.0.attention.to_k.lokr_w1": torch.randn(8, 8, generator=g),
         "diffusion_model.layers.0.attention.to_k.lokr_w2_a": torch.randn(480, 4, generator=g),
         "diffusion_model.layers.0.attention.to_k.lokr_w2_b": torch.randn(4, 480, generator=g),
         "diffusion_model.layers.0.attention.to_k.alpha": torch.tensor(2.0)}
    p, m = read(t, tmp_path)
    d = detect(p)
    assert (d.format, d.base, d.kind) == ("lycoris", "other:z-image", "lokr")
    assert m.source_format == "lycoris" and m.base == "other:z-image" and m.kind == "lokr"
    q = torch.kron(t["diffusion_model.layers.0.attention.to_q.lokr_w1"], t["diffusion_model.layers.0.attention.to_q.lokr_w2"])
    k = torch.kron(t["diffusion_model.layers.0.attention.to_k.lokr_w1"],
                   t["diffusion_model.layers.0.attention.to_k.lokr_w2_a"] @ t["diffusion_model.layers.0.attention.to_k.lokr_w2_b"]) * 0.5
    assert rel(m.layers["transformer.layers.0.attention.to_q"].delta(torch.float64), q.double()) < 1e-6
    assert rel(m.layers["transformer.layers.0.attention.to_k"].delta(torch.float64), k.double()) < 1e-6


@pytest.mark.parametrize("case,fmt,base", [
    ("kohya-flux", "kohya", "flux"), ("kohya-sd3", "kohya", "sd3"), ("diffusers-flux", "diffusers", "flux"),
])
def test_detection_names_family_and_dialect(tmp_path, case, fmt, base):
    from lorahub.formats.detect import detect
    from lorahub.formats.io import save_lora

    if case == "kohya-flux":
        p = tmp_path / "f.safetensors"
        save_file(kohya_flux(double=range(19), single=range(38), top=False, rank=1), str(p))
    elif case == "kohya-sd3":
        p = save_lora(sd3_lora(1536, 24, rank=1), tmp_path / "s.safetensors", "kohya")
    else:
        p = save_lora(tiny_flux_lora(), tmp_path / "d.safetensors", "diffusers")
    d = detect(p)
    assert (d.format, d.base) == (fmt, base)


# ------------------------------------------------------------------------------------------------
# writing: diffusers' own transformers load our files; kohya round trips

def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()


def linear_modules(model) -> dict[str, tuple]:
    return {f"transformer.{n}": tuple(mod.weight.shape) for n, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear)}


def tiny_flux_lora(seed=0, alpha=2.0):
    return random_lora(linear_modules(tiny_flux()), seed=seed, rank=4, alpha=alpha, scale=0.2, base="flux")


def sd3_lora(width, blocks, rank=4, seed=0, last=True):
    """A canonical SD3 LoRA on every joint block's modules at ``width`` (no model built); ``last``: the
    last of ``blocks`` is the context_pre_only one."""
    mods = {}
    for i in range(blocks):
        b = f"transformer.transformer_blocks.{i}."
        mods |= {b + p: (width, width) for p in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                                 "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
        mods |= {b + "norm1.linear": (6 * width, width), b + "ff.net.0.proj": (4 * width, width),
                 b + "ff.net.2": (width, 4 * width)}
        last = last and i == blocks - 1
        mods[b + "norm1_context.linear"] = (2 * width if last else 6 * width, width)
        if not last:
            mods |= {b + "attn.to_add_out": (width, width), b + "ff_context.net.0.proj": (4 * width, width),
                     b + "ff_context.net.2": (width, 4 * width)}
    return random_lora(mods, seed=seed, rank=rank, alpha=rank / 2, scale=0.2, base="sd3")


def _inputs_flux():
    g = torch.Generator().manual_seed(3)
    n = 4
    return dict(hidden_states=torch.randn(1, n, 4, generator=g), encoder_hidden_states=torch.randn(1, 3, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(n, 3), txt_ids=torch.zeros(3, 3), return_dict=False)


def _inputs_sd3():
    g = torch.Generator().manual_seed(3)
    return dict(hidden_states=torch.randn(1, 4, 4, 4, generator=g), encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
                pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([500.0]), return_dict=False)


def _check_loads(model_fn, inputs, lora, path, caplog):
    """Load ``path`` into a fresh model as the family's pipeline ``load_lora_weights`` does (its
    ``lora_state_dict`` with the file's LoraConfig metadata, then ``load_lora_into_transformer``): no
    unexpected/missing keys, every layer injected, and the output equals the base model with our ΔW
    added to its weights."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    model = model_fn()
    flux = type(model).__name__.startswith("Flux")
    pipe = FluxPipeline if flux else StableDiffusion3Pipeline
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        sd, meta = pipe.lora_state_dict(str(path), return_lora_metadata=True)
        pipe.load_lora_into_transformer(sd, transformer=model, adapter_name="x", metadata=meta,
                                        **({"network_alphas": None} if flux else {}))
    said = [r.getMessage().lower() for r in caplog.records] + [str(w.message).lower() for w in warned]
    assert not [m for m in said if "unexpected" in m or "missing" in m or "inconsisten" in m], said
    injected = {f"transformer.{n}" for n, mod in model.named_modules() if hasattr(mod, "lora_A") and "x" in mod.lora_A}
    assert injected == set(lora.layers)
    with torch.no_grad():
        got = model(**inputs)[0]
        ref = model_fn()
        for key, layer in lora.layers.items():
            ref.get_submodule(key.split(".", 1)[1]).weight += layer.delta(torch.float32)
        want = ref(**inputs)[0]
        plain = model_fn()(**inputs)[0]
    assert rel(got, want) < 1e-4 and rel(plain, want) > 1e-3  # the LoRA does something, and the same thing


def test_flux_written_as_diffusers_loads_into_flux_transformer(tmp_path, caplog):
    """Every linear of a tiny FluxTransformer2DModel: our kohya file (BFL names) -> diffusers -> peft
    injects every module, output = our ΔW on the weights."""
    from lorahub.formats.io import load_lora, save_lora
    from lorahub.ops.convert import convert

    lora = tiny_flux_lora()
    k = save_lora(lora, tmp_path / "k.safetensors", "kohya")
    assert all(key.startswith("lora_unet_") for key in load_file(str(k)))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in load_file(str(k))
    res = convert(k, "diffusers", out=tmp_path / "d.safetensors")
    assert res.source_format == "kohya" and res.base == "flux" and "block-diagonal" not in " ".join(res.notes)
    back = load_lora(res.out)
    assert set(back.layers) == set(lora.layers)
    _check_loads(tiny_flux, _inputs_flux(), lora, res.out, caplog)


def test_sd3_written_as_diffusers_loads_into_sd3_transformer(tmp_path, caplog):
    from lorahub.formats.io import load_lora, save_lora

    lora = random_lora(linear_modules(tiny_sd3()), seed=2, rank=4, alpha=2.0, scale=0.2, base="sd3")
    k = save_lora(lora, tmp_path / "k.safetensors", "kohya")
    keys = set(load_file(str(k)))
    assert "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_up.weight" in keys
    assert "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight" in keys
    m = load_lora(k)
    assert m.base == "sd3" and set(m.layers) == set(lora.layers)
    for key, layer in lora.layers.items():
        assert rel(m.layers[key].delta(torch.float64), layer.delta(torch.float64)) < 1e-6, key
    d = save_lora(m, tmp_path / "d.safetensors", "diffusers")
    _check_loads(tiny_sd3, _inputs_sd3(), lora, d, caplog)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_kohya_to_diffusers_to_kohya_is_bit_exact(tmp_path, run, family):
    """A raw kohya file (fp16 factors, fp32 alpha, text-encoder layers, metadata with kohya's hashes):
    kohya -> diffusers -> kohya gives the same keys, dtypes and bits; the diffusers file keeps no stale
    sshs_* hash; the hashes come back recomputed."""
    from lorahub.formats.io import save_lora

    if family == "flux":
        t = kohya_flux(double=(0, 1), single=(0,), width=64, rank=4, alpha=2.0, dtype="float16")
        t = {k: (v.float() if k.endswith(".alpha") else v) for k, v in t.items()}
        te = {k: torch.from_numpy(v) for k, v in kohya_tensors(
            {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)}, rank=4, dtype="float16").items()}
        t |= te
        p = tmp_path / "k.safetensors"
        save_file(t, str(p), metadata={"ss_network_dim": "4", "sshs_model_hash": "stale"})
        src = p
    else:
        src = save_lora(sd3_lora(1536, 2, last=False), tmp_path / "s.safetensors", "kohya")
        t = load_file(str(src))
    rc, out, err = run("convert", str(src), "--to", "diffusers", "--out", str(tmp_path / "d.safetensors"), "--json")
    assert rc == 0, err
    assert json.loads(out)["notes"] == []
    from safetensors import safe_open

    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        meta = f.metadata() or {}
        assert all(k.startswith(("transformer.", "text_encoder.")) and ".lora_" in k for k in f.keys())
    assert not any(k.startswith("sshs_") for k in meta)
    rc, out, err = run("convert", str(tmp_path / "d.safetensors"), "--to", "kohya", "--out", str(tmp_path / "k2.safetensors"))
    assert rc == 0, err
    back = load_file(str(tmp_path / "k2.safetensors"))
    assert back.keys() == t.keys()
    assert all(back[k].dtype == t[k].dtype and torch.equal(back[k], t[k]) for k in t)
    if family == "flux":
        with safe_open(str(tmp_path / "k2.safetensors"), "pt") as f:
            meta2 = f.metadata()
        assert meta2["ss_network_dim"] == "4" and len(meta2["sshs_model_hash"]) == 64  # recomputed, not "stale"


def test_separately_trained_qkv_fuse_block_diagonally_and_exactly(tmp_path, run):
    """q/k/v (and proj_mlp) with their own lora_A: one kohya layer of rank Σr with a block-diagonal up,
    ΔW equal; convert says so; reading it back gives the parts their own factors again."""
    from lorahub.formats.dit import flux
    from lorahub.formats.io import load_lora, save_lora

    lora = tiny_flux_lora(seed=5)  # random_lora: every module its own lora_A
    bfl = flux.to_bfl_layers(lora)
    qkv = bfl["double_blocks.0.img_attn.qkv"]
    assert qkv.rank == 12 and qkv.extra["fusion"] == "block-diagonal" and qkv.extra["fused_ranks"] == [4, 4, 4]
    assert bfl["single_blocks.0.linear1"].rank == 16 and bfl["double_blocks.0.img_attn.proj"].rank == 4
    full = qkv.delta(torch.float64)
    for j, c in enumerate("qkv"):
        part = lora.layers[f"transformer.transformer_blocks.0.attn.to_{c}"].delta(torch.float64)
        assert rel(full[j * 32:(j + 1) * 32], part) < 1e-12
    # norm_out: the adaLN halves swap between the layouts
    fo = bfl["final_layer.adaLN_modulation.1"].delta(torch.float64)
    no = lora.layers["transformer.norm_out.linear"].delta(torch.float64)
    assert torch.equal(fo[:32], no[32:]) and torch.equal(fo[32:], no[:32])
    d = save_lora(lora, tmp_path / "d.safetensors", "diffusers")
    rc, out, err = run("convert", str(d), "--to", "kohya", "--out", str(tmp_path / "k.safetensors"), "--json")
    assert rc == 0, err
    notes = " ".join(json.loads(out)["notes"])
    assert "block-diagonal" in notes and "exact, rank 3r" in notes and "rank 4r" in notes
    back = load_lora(tmp_path / "k.safetensors")
    assert set(back.layers) == set(lora.layers)
    for key, layer in lora.layers.items():
        assert back.layers[key].rank == 4 and torch.equal(back.layers[key].down, layer.down), key
        assert rel(back.layers[key].delta(torch.float64), layer.delta(torch.float64)) < 1e-6


def test_shared_lora_a_fuses_at_the_same_rank_and_missing_parts_are_zero_rows():
    from lorahub.formats.canonical import LoraLayer, LoraModel
    from lorahub.formats.dit import flux

    g = torch.Generator().manual_seed(0)
    down = torch.randn(4, 32, generator=g)
    m = LoraModel(base="flux")
    for c in "qk":  # no to_v
        m.layers[f"transformer.transformer_blocks.0.attn.to_{c}"] = LoraLayer(
            "lora", {"down": down.clone(), "up": torch.randn(32, 4, generator=g)}, alpha=2.0)
    fused = flux.to_bfl_layers(m)["double_blocks.0.img_attn.qkv"]
    assert fused.rank == 4 and fused.extra["fusion"] == "shared" and fused.alpha == 2.0
    assert torch.equal(fused.up[64:], torch.zeros(32, 4))
    back = flux.from_bfl_layers({"double_blocks.0.img_attn.qkv": fused})
    assert set(back) == {"transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_k"}
    for k, layer in back.items():
        assert torch.equal(layer.up, m.layers[k].up) and torch.equal(layer.down, down) and layer.alpha == 2.0


# ------------------------------------------------------------------------------------------------
# commands on Flux and SD3 files

@pytest.fixture
def dit_files(tmp_path):
    from lorahub.formats.io import save_lora

    out = {}
    for seed in (1, 2):
        p = tmp_path / f"flux-{seed}.safetensors"
        save_file(kohya_flux(double=(0, 1), single=(0, 1, 2), width=64, rank=4, alpha=2.0, seed=seed, top=False), str(p))
        out[f"flux{seed}"] = p
        out[f"sd3{seed}"] = save_lora(sd3_lora(32, 3, seed=seed), tmp_path / f"sd3-{seed}.safetensors", "kohya")
    return out


@pytest.mark.parametrize("family,blocks", [
    ("flux", {"double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1", "single_blocks.2"}),
    ("sd3", {"joint_blocks.0", "joint_blocks.1", "joint_blocks.2"}),
])
def test_inspect_diff_resize_merge_on_dit_files(dit_files, tmp_path, run, family, blocks):
    from lorahub.formats.io import load_lora

    a, b = dit_files[f"{family}1"], dit_files[f"{family}2"]
    rc, out, err = run("inspect", str(a), "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert {x["block"] for x in rep["blocks"]} == blocks and rep["base"] == family
    model = load_lora(a)
    per = {s["key"]: s for s in rep["per_layer"]}
    for key, layer in model.layers.items():
        assert per[key]["fro"] == pytest.approx(float(layer.delta(torch.float64).norm()), rel=1e-5)
    rc, out, err = run("inspect", str(a))
    assert rc == 0 and blocks.pop() in out
    rc, out, err = run("diff", str(a), str(b), "--json")
    assert rc == 0, err
    drep = json.loads(out)
    assert {d["block"] for d in drep["per_layer"]} >= {x["block"] for x in rep["blocks"]}
    rc, out, err = run("resize", str(a), "--rank", "2", "--out", str(tmp_path / "r.safetensors"))
    assert rc == 0, err
    small = load_lora(tmp_path / "r.safetensors")
    assert set(small.layers) == set(model.layers) and {la.rank for la in small.layers.values()} == {2}
    rc, out, err = run("merge", f"{a}:0.7", f"{b}:0.3", "--method", "concat", "--out", str(tmp_path / "m.safetensors"))
    assert rc == 0, err
    merged, mb = load_lora(tmp_path / "m.safetensors"), load_lora(b)
    assert set(merged.layers) == set(model.layers)
    for key in model.layers:
        want = 0.7 * model.layers[key].delta(torch.float64) + 0.3 * mb.layers[key].delta(torch.float64)
        assert rel(merged.layers[key].delta(torch.float64), want) < 1e-5


def test_bad_dit_input_is_one_error_line(tmp_path, run):
    t = kohya_flux(double=(0,), single=(), width=32, top=False)
    t["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = torch.randn(100, 4)  # not 3 × width
    save_file(t, str(tmp_path / "bad.safetensors"))
    for cmd in (("inspect", str(tmp_path / "bad.safetensors")),
                ("convert", str(tmp_path / "bad.safetensors"), "--to", "diffusers", "--out", str(tmp_path / "o.safetensors"))):
        rc, out, err = run(*cmd)
        assert rc == 2 and err.count("error:") == 1 and "Traceback" not in err
        assert "do not split into to_q/to_k/to_v" in err
    assert not (tmp_path / "o.safetensors").exists()
    # a LoKr layer on a fused qkv cannot become diffusers q/k/v
    lokr = {"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": torch.randn(3, 2),
            "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": torch.randn(32, 16),
            "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(1.0)}
    save_file(lokr, str(tmp_path / "lokr.safetensors"))
    rc, out, err = run("convert", str(tmp_path / "lokr.safetensors"), "--to", "diffusers",
                       "--out", str(tmp_path / "o.safetensors"))
    assert rc == 2 and err.count("error:") == 1 and "Traceback" not in err


def test_kohya_flux_of_a_smaller_model_maps_through_its_own_module_list(tmp_path):
    """A kohya Flux file of a tiny model (its own CLIP text encoder): with the model's architecture
    (derived from its configs) every layer maps, text encoder too; diffusers and kohya writes work and
    kohya comes back bit for bit."""
    from lorahub.formats.io import load_lora, save_lora
    from lorahub.formats.names import PartSpec, derive_arch
    from lorahub.resources import model_config

    cfg = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    clip = {k: v for k, v in model_config("tiny", "clip_text").items() if not k.startswith("_")}
    t5 = {"vocab_size": 64, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2}
    arch = derive_arch({"transformer": PartSpec("diffusers", "FluxTransformer2DModel", cfg),
                        "text_encoder": PartSpec("transformers", "CLIPTextModel", clip),
                        "text_encoder_2": PartSpec("transformers", "T5EncoderModel", t5)})
    t = kohya_flux(double=(0,), single=(0,), width=32, top=True)
    t |= {k: torch.from_numpy(v) for k, v in kohya_tensors(
        {"lora_te1_text_model_encoder_layers_1_self_attn_q_proj": (32, 32),
         "lora_te3_encoder_block_0_layer_0_SelfAttention_q": (16, 16)}, rank=4, dtype="float32").items()}
    p = tmp_path / "tiny.safetensors"
    save_file(t, str(p))
    unmapped_without = [k for k in load_lora(p).layers if k.startswith("text_encoder.lora_")]
    m = load_lora(p, arch=arch)
    assert m.arch == arch.name and m.base == "flux"
    assert all(k in arch.modules for k in m.layers), [k for k in m.layers if k not in arch.modules]
    assert "text_encoder.text_model.encoder.layers.1.self_attn.q_proj" in m.layers
    assert "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q" in m.layers
    # without it, CLIP-L's shapes do not fit: the text-encoder layer keeps its kohya name
    assert unmapped_without == ["text_encoder.lora_te1_text_model_encoder_layers_1_self_attn_q_proj"]
    assert m.notes == []
    save_lora(m, tmp_path / "d.safetensors", "diffusers")
    from lorahub.formats.dit import diffusers_notes

    assert diffusers_notes(m) == ["1 layer(s) of text_encoder_2 (T5): diffusers' flux pipeline loads no LoRA into it "
                                  "(load_lora_weights ignores them); they are kept in the file"]
    back = load_lora(tmp_path / "d.safetensors", arch=arch)
    save_lora(back, tmp_path / "k.safetensors", "kohya")
    k2 = load_file(str(tmp_path / "k.safetensors"))
    assert k2.keys() == t.keys() and all(torch.equal(k2[k], t[k]) for k in t)


def test_sai_layout_is_the_inverse_of_diffusers_single_file_sd3_converter():
    """The SAI map checked on weights: a tiny SD3 transformer's weights and biases, fused into the SAI
    layout through lorahub's map (q/k/v stacked, the last block's context adaLN and the final adaLN
    halves swapped), come back unchanged through diffusers' convert_sd3_transformer_checkpoint_to_diffusers."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from lorahub.formats.dit import sd3
    from lorahub.formats.dit.fused import swap_halves

    model = tiny_sd3()
    sd = model.state_dict()
    lay = sd3.layout(model.config.num_layers)
    groups: dict[str, dict[int, str]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            orig, pos = lay.original_of(f"transformer.{name}")
            groups.setdefault(orig, {})[pos] = name
    sai = {"pos_embed": sd["pos_embed.pos_embed"]} if "pos_embed.pos_embed" in sd else {}
    for orig, parts in groups.items():
        spec = lay.spec(orig)
        for what in ("weight", "bias"):
            t = torch.cat([sd[f"{parts[j]}.{what}"] for j in range(len(parts))], dim=0)
            sai[f"{orig}.{what}"] = swap_halves(t) if spec.swap else t
    if "pos_embed" not in sai:  # a buffer the state dict leaves out: the converter still reads it
        sai["pos_embed"] = model.pos_embed.pos_embed
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(sai))
    assert {k for k in back if k != "pos_embed.pos_embed"} == {k for k in sd if k != "pos_embed.pos_embed"}
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
