"""resize and svd merge of Flux.1 / SD3 LoRAs work on the family's original fused layers (kohya's
``img_attn_qkv``, single-block ``linear1``, SD3's ``attn_qkv``), as kohya's own tools do: the fused ΔW
gets its best rank-k approximation (SVD), written as kohya at rank k (not 3k), as diffusers split into
q/k/v that diffusers' own loader injects with the right ΔW."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorahub.tiny_loras import flux_injected_deltas, kohya_tensors, random_lora

WIDTH = 32  # the tiny Flux transformer below: 2 heads × 16


def flux_kohya_tensors(rank=8, alpha=4.0, seed=0, te=True) -> dict[str, torch.Tensor]:
    """A raw kohya sd-scripts Flux LoRA (BFL names, q/k/v fused, one lora_down per fused module) on
    every linear of the tiny Flux transformer (:func:`tiny_flux`), plus a CLIP-L text-encoder layer."""
    w = WIDTH
    mods = {}
    for side in ("img", "txt"):
        mods |= {f"lora_unet_double_blocks_0_{side}_attn_qkv": (3 * w, w),
                 f"lora_unet_double_blocks_0_{side}_attn_proj": (w, w),
                 f"lora_unet_double_blocks_0_{side}_mlp_0": (4 * w, w),
                 f"lora_unet_double_blocks_0_{side}_mlp_2": (w, 4 * w),
                 f"lora_unet_double_blocks_0_{side}_mod_lin": (6 * w, w)}
    mods |= {"lora_unet_single_blocks_0_linear1": (7 * w, w), "lora_unet_single_blocks_0_linear2": (w, 5 * w),
             "lora_unet_single_blocks_0_modulation_lin": (3 * w, w),
             "lora_unet_img_in": (w, 4), "lora_unet_txt_in": (w, 32), "lora_unet_time_in_in_layer": (w, 256),
             "lora_unet_time_in_out_layer": (w, w), "lora_unet_vector_in_in_layer": (w, 32),
             "lora_unet_vector_in_out_layer": (w, w), "lora_unet_final_layer_linear": (4, w),
             "lora_unet_final_layer_adaLN_modulation_1": (2 * w, w)}
    if te:
        mods["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] = (768, 768)
    t = kohya_tensors(mods, rank=rank, alpha=alpha, seed=seed, dtype="float32", scale=0.2)
    return {k: torch.from_numpy(v) for k, v in t.items()}


FUSED = ("double_blocks_0_img_attn_qkv", "double_blocks_0_txt_attn_qkv", "single_blocks_0_linear1")


def kohya_delta(t: dict, mod: str) -> torch.Tensor:
    """ΔW of one module of a kohya state dict (float64)."""
    down, up = t[f"{mod}.lora_down.weight"].double(), t[f"{mod}.lora_up.weight"].double()
    alpha = float(t[f"{mod}.alpha"]) if f"{mod}.alpha" in t else down.shape[0]
    return up @ down * (alpha / down.shape[0])


def best(d: torch.Tensor, k: int) -> torch.Tensor:
    """The best rank-k approximation of ``d`` (Eckart–Young, full SVD)."""
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()


def linear_modules(model) -> dict[str, tuple]:
    return {f"transformer.{n}": tuple(mod.weight.shape) for n, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear)}


def write(t: dict, path) -> object:
    save_file(t, str(path))
    return path


# ------------------------------------------------------------------------------------------------
# resize

def test_flux_kohya_resize_gives_rank_k_fused_layers_at_the_best_approximation(tmp_path):
    """kohya Flux LoRA (rank 8) resized to 3: every fused module of the kohya file written back has
    3 rows of lora_down and ΔW = the best rank-3 approximation of the input's fused ΔW; one-part
    modules and the text encoder likewise per module; the report names the fused layers."""
    from lorahub.formats.io import load_lora, save_lora
    from lorahub.ops.resize import ResizeOptions, resize

    t = flux_kohya_tensors()
    model = load_lora(write(t, tmp_path / "in.safetensors"))
    assert model.base == "flux" and "transformer.transformer_blocks.0.attn.to_q" in model.layers
    res = resize(model, ResizeOptions(rank=3))
    back = load_file(str(save_lora(res.model, tmp_path / "k.safetensors", "kohya")))
    assert back.keys() == t.keys()
    mods = {k.rsplit(".", 2)[0] for k in t if k.endswith(".lora_down.weight")}
    for mod in mods:
        assert back[f"{mod}.lora_down.weight"].shape[0] == 3, mod
        want = best(kohya_delta(t, mod), 3)
        assert rel(kohya_delta(back, mod), want) < 1e-5, mod
    reps = {r.name: r for r in res.layers}
    for f in FUSED:
        orig = f.replace("double_blocks_0_", "double_blocks.0.").replace("single_blocks_0_", "single_blocks.0.")
        orig = orig.replace("_attn_qkv", "_attn.qkv")
        r = reps[f"transformer.{orig}"]
        d = kohya_delta(t, f"lora_unet_{f}")
        assert (r.old_rank, r.new_rank) == (8, 3)
        assert r.retained == pytest.approx(float(best(d, 3).norm() / d.norm()), rel=1e-6)
    # no diffusers part of a fused module is reported on its own; the rest are
    assert not any(".attn.to_q" in n or "proj_mlp" in n for n in reps)
    assert "transformer.transformer_blocks.0.attn.to_out.0" in reps and "text_encoder.text_model.encoder.layers.0" \
        ".self_attn.q_proj" in reps
    assert len(reps) == len(mods)
    meta = json.loads(res.model.metadata["lorahub_resize"])
    assert meta["rank_max"] == 3 and "transformer.single_blocks.0.linear1" in meta["layers"]
    # canonical form: q/k/v (and proj_mlp) of one fused module share one lora_A tensor
    q, k, v, mlp = (res.model.layers[f"transformer.single_transformer_blocks.0.{p}"]
                    for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
    assert q.down is k.down is v.down is mlp.down and q.rank == 3


def _injected_deltas(path) -> dict[str, torch.Tensor]:
    """The ΔW peft injects into each module of a tiny FluxTransformer2DModel, keyed by canonical key."""
    return flux_injected_deltas(tiny_flux(), path)


def test_flux_resized_written_as_diffusers_loads_split(tmp_path, caplog):
    """The resized LoRA written as diffusers: diffusers' Flux loader injects every module, and q/k/v
    (and proj_mlp) carry their rows of the best rank-k approximation of the fused ΔW (rank-k lora_A)."""
    from lorahub.formats.io import load_lora, save_lora
    from lorahub.ops.resize import ResizeOptions, resize

    t = flux_kohya_tensors(te=False)
    res = resize(load_lora(write(t, tmp_path / "in.safetensors")), ResizeOptions(rank=3))
    d = save_lora(res.model, tmp_path / "d.safetensors", "diffusers")
    with caplog.at_level(logging.WARNING):
        got = _injected_deltas(d)
    said = [r.getMessage().lower() for r in caplog.records]
    assert not [m for m in said if "unexpected" in m or "missing" in m], said
    assert set(got) == set(linear_modules(tiny_flux())) == set(res.model.layers)
    w = WIDTH
    for fused, prefix, parts in (
            ("double_blocks_0_img_attn_qkv", "transformer.transformer_blocks.0.attn.", ("to_q", "to_k", "to_v")),
            ("double_blocks_0_txt_attn_qkv", "transformer.transformer_blocks.0.attn.",
             ("add_q_proj", "add_k_proj", "add_v_proj")),
            ("single_blocks_0_linear1", "transformer.single_transformer_blocks.0.",
             ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))):
        want = best(kohya_delta(t, f"lora_unet_{fused}"), 3)
        rows = [w, w, w, 4 * w][:len(parts)]
        for p, chunk in zip(parts, torch.split(want, rows)):
            assert rel(got[prefix + p], chunk) < 1e-5, p
    sd = load_file(str(d))
    assert sd["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"].shape == (3, w)


def test_block_diagonal_flux_lora_resizes_per_fused_layer(tmp_path, run):
    """The issue's case: a diffusers-trained Flux LoRA (q, k, v with their own lora_A; kohya would fuse
    them block-diagonally at rank 12, linear1 at 16). `lorahub resize --rank 5` prints and writes rank 5
    per fused layer, at the best approximation of the fused ΔW; a dynamic criterion picks its rank
    from the fused layer's own spectrum."""
    from lorahub.formats.dit import flux
    from lorahub.formats.io import load_lora, save_lora
    from lorahub.linalg.rank import choose_rank
    from lorahub.ops.resize import ResizeOptions, resize

    lora = random_lora(linear_modules(tiny_flux()), seed=3, rank=4, alpha=2.0, scale=0.2, base="flux")
    fused_in = flux.to_bfl_layers(lora)
    assert fused_in["double_blocks.0.img_attn.qkv"].rank == 12
    src = save_lora(lora, tmp_path / "in.safetensors", "kohya")
    rc, out, err = run("resize", src, "--rank", "5", "--out", tmp_path / "r.safetensors", "--format", "kohya")
    assert rc == 0, err
    line = next(ln for ln in out.splitlines() if "transformer.double_blocks.0.img_attn.qkv" in ln)
    cells = [c.strip() for c in line.replace("┃", "│").split("│") if c.strip()]
    assert cells[1:3] == ["12", "5"]
    rc, out, err = run("resize", src, "--rank", "5", "--out", tmp_path / "r2.safetensors", "--json")
    assert rc == 0, err
    rep = {x["name"]: x for x in json.loads(out)["layers"]}
    assert rep["transformer.single_blocks.0.linear1"]["old_rank"] == 16
    assert rep["transformer.single_blocks.0.linear1"]["new_rank"] == 5
    back = load_file(str(tmp_path / "r.safetensors"))
    for mod, orig in (("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv"),
                      ("lora_unet_single_blocks_0_linear1", "single_blocks.0.linear1")):
        assert back[f"{mod}.lora_down.weight"].shape[0] == 5
        assert rel(kohya_delta(back, mod), best(fused_in[orig].delta(torch.float64), 5)) < 1e-5
    # dynamic: the rank is the criterion's on the fused spectrum, one per fused layer
    res = resize(load_lora(src), ResizeOptions(energy=0.9))
    for orig in ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "single_blocks.0.linear1"):
        s = torch.linalg.svdvals(fused_in[orig].delta(torch.float64))
        k = choose_rank(s, energy=0.9)
        assert next(r for r in res.layers if r.name == f"transformer.{orig}").new_rank == k
        assert flux.to_bfl_layers(res.model)[orig].rank == k
        assert rel(flux.to_bfl_layers(res.model)[orig].delta(torch.float64),
                   best(fused_in[orig].delta(torch.float64), k)) < 1e-5


def test_missing_parts_stay_missing(tmp_path):
    """A Flux LoRA without to_q (the first rows of the fused qkv / linear1) and without proj_mlp: the
    resized and the svd-merged LoRA have the same layers (no to_q / proj_mlp made of rounding in the
    factorisation), ΔW the best approximation of the fused one."""
    from lorahub.formats.canonical import LoraModel
    from lorahub.formats.dit import flux
    from lorahub.ops.merge import MergeInput, merge
    from lorahub.ops.resize import ResizeOptions, resize

    mods = {k: v for k, v in linear_modules(tiny_flux()).items() if not k.endswith(("attn.to_q", "proj_mlp"))}
    lora = random_lora(mods, seed=4, rank=4, alpha=4.0, scale=0.2, base="flux")
    res = resize(lora, ResizeOptions(rank=3))
    assert set(res.model.layers) == set(lora.layers)
    for orig in ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"):
        fused_in = flux.to_bfl_layers(lora)[orig].delta(torch.float64)
        fused_out = flux.to_bfl_layers(res.model)[orig]
        assert fused_out.rank == 3 and rel(fused_out.delta(torch.float64), best(fused_in, 3)) < 1e-5
    # merge: one input adapts to_k only, the other to_v only
    ka = {k: v for k, v in lora.layers.items() if k == "transformer.transformer_blocks.0.attn.to_k"}
    vb = {k: v for k, v in lora.layers.items() if k == "transformer.transformer_blocks.0.attn.to_v"}
    a, b = LoraModel(layers=ka, base="flux"), LoraModel(layers=vb, base="flux")
    m = merge([MergeInput(a, 0.5), MergeInput(b, 2.0)], method="svd", rank=3)
    assert set(m.model.layers) == set(ka) | set(vb)
    assert [r.key for r in m.layers] == ["transformer.double_blocks.0.img_attn.qkv"]
    want = 0.5 * flux.to_bfl_layers(a)["double_blocks.0.img_attn.qkv"].delta(torch.float64) \
        + 2.0 * flux.to_bfl_layers(b)["double_blocks.0.img_attn.qkv"].delta(torch.float64)
    got = flux.to_bfl_layers(m.model)["double_blocks.0.img_attn.qkv"]
    assert got.rank == 3 and rel(got.delta(torch.float64), best(want, 3)) < 1e-5


# ------------------------------------------------------------------------------------------------
# merge

def test_flux_svd_merge_truncates_the_fused_sum(tmp_path, run):
    """`lorahub merge A:0.7 B:-0.4 --method svd --rank 5` of two kohya Flux LoRAs (through a recipe):
    every fused module of the kohya file has 5 rows of lora_down and ΔW = the best rank-5
    approximation of the weighted sum of the inputs' fused ΔW; --json reports the fused layers."""
    ta, tb = flux_kohya_tensors(seed=1, te=False), flux_kohya_tensors(seed=2, rank=6, alpha=6.0, te=False)
    a, b = write(ta, tmp_path / "a.safetensors"), write(tb, tmp_path / "b.safetensors")
    rc, out, err = run("merge", f"{a}:0.7", f"{b}:-0.4", "--method", "svd", "--rank", "5", "--dialect", "kohya",
                       "--out", tmp_path / "m.safetensors", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    keys = {r["key"] for r in rep["per_layer"]}
    assert {"transformer.double_blocks.0.img_attn.qkv", "transformer.single_blocks.0.linear1"} <= keys
    assert not any(k.endswith(("to_q", "proj_mlp")) for k in keys)
    m = load_file(str(tmp_path / "m.safetensors"))
    assert m.keys() == ta.keys()
    for mod in {k.rsplit(".", 2)[0] for k in ta if k.endswith(".lora_down.weight")}:
        k = min(5, ta[f"{mod}.lora_down.weight"].shape[1], ta[f"{mod}.lora_up.weight"].shape[0])  # img_in: 4 in
        assert m[f"{mod}.lora_down.weight"].shape[0] == k, mod
        want = best(0.7 * kohya_delta(ta, mod) - 0.4 * kohya_delta(tb, mod), k)
        assert rel(kohya_delta(m, mod), want) < 1e-5, mod


# ------------------------------------------------------------------------------------------------
# SD3; other families

def sd3_modules(width=32, blocks=2) -> dict[str, tuple]:
    mods = {}
    for i in range(blocks):
        b = f"transformer.transformer_blocks.{i}."
        last = i == blocks - 1
        mods |= {b + p: (width, width) for p in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                                 "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
        mods |= {b + "norm1.linear": (6 * width, width), b + "ff.net.0.proj": (4 * width, width),
                 b + "ff.net.2": (width, 4 * width), b + "norm1_context.linear": ((2 if last else 6) * width, width)}
        if not last:
            mods |= {b + "attn.to_add_out": (width, width)}
    return mods


def test_sd3_resize_and_merge_work_on_fused_qkv(tmp_path):
    """SD3: a LoRA with separately trained q/k/v written as kohya (joint_blocks_N_x_block_attn_qkv,
    rank 12), resized to 5 and svd-merged with another to 5: kohya qkv of rank 5 at the best
    approximation of the (weighted sum of the) fused ΔW."""
    from lorahub.formats.dit import sd3
    from lorahub.formats.io import load_lora, save_lora
    from lorahub.ops.merge import MergeInput, merge
    from lorahub.ops.resize import ResizeOptions, resize

    la = random_lora(sd3_modules(), seed=5, rank=4, alpha=2.0, scale=0.2, base="sd3")
    lb = random_lora(sd3_modules(), seed=6, rank=4, alpha=4.0, scale=0.2, base="sd3")
    ka = load_file(str(save_lora(la, tmp_path / "a.safetensors", "kohya")))
    kb = load_file(str(save_lora(lb, tmp_path / "b.safetensors", "kohya")))
    qkv = ("lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_1_context_block_attn_qkv")
    assert ka[f"{qkv[0]}.lora_down.weight"].shape[0] == 12
    a, b = load_lora(tmp_path / "a.safetensors"), load_lora(tmp_path / "b.safetensors")
    res = resize(a, ResizeOptions(rank=5))
    assert "transformer.joint_blocks.1.context_block.attn.qkv" in {r.name for r in res.layers}
    out = load_file(str(save_lora(res.model, tmp_path / "r.safetensors", "kohya")))
    assert out.keys() == ka.keys()
    for mod in qkv:
        assert out[f"{mod}.lora_down.weight"].shape[0] == 5
        assert rel(kohya_delta(out, mod), best(kohya_delta(ka, mod), 5)) < 1e-5
    m = merge([MergeInput(a, 0.6), MergeInput(b, 0.4)], method="svd", rank=5)
    out = load_file(str(save_lora(m.model, tmp_path / "m.safetensors", "kohya")))
    assert out.keys() == ka.keys()
    for mod in qkv:
        assert out[f"{mod}.lora_down.weight"].shape[0] == 5
        want = best(0.6 * kohya_delta(ka, mod) + 0.4 * kohya_delta(kb, mod), 5)
        assert rel(kohya_delta(out, mod), want) < 1e-5
    fused = sd3.to_sai_layers(m.model)["joint_blocks.0.x_block.attn.qkv"]
    assert fused.extra["fusion"] == "shared" and fused.rank == 5


def test_to_original_round_trips_and_other_families_pass_through():
    """to_original fuses only multi-part modules of plain LoRA layers (keys ``transformer.<original
    path>``); back() gives the canonical layers with the same ΔW. An SD1 LoRA is given as it is and
    its resize is per layer, as before."""
    from lorahub.formats.dit import to_original
    from lorahub.ops.resize import ResizeOptions, resize, resize_layer

    lora = random_lora(linear_modules(tiny_flux()), seed=7, rank=4, alpha=2.0, scale=0.2, base="flux")
    layers, back = to_original(lora)
    assert "transformer.double_blocks.0.img_attn.qkv" in layers and "transformer.transformer_blocks.0.attn.to_out.0" \
        in layers
    assert not any(k.endswith(("attn.to_q", "proj_mlp")) for k in layers)
    assert len(layers) == len(lora.layers) - 2 * 2 - 3  # double block: two qkv (3 -> 1); single: 4 -> 1
    again = back(layers)
    assert set(again.layers) == set(lora.layers) and again.base == "flux"
    for key, layer in lora.layers.items():
        assert rel(again.layers[key].delta(torch.float64), layer.delta(torch.float64)) < 1e-12, key

    sd1 = random_lora({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32),
                       "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": (32, 32)},
                      seed=8, rank=4, alpha=2.0)
    layers, back = to_original(sd1)
    assert layers == sd1.layers
    res = resize(sd1, ResizeOptions(rank=2))
    assert [r.name for r in res.layers] == list(sd1.layers)
    for key, layer in sd1.layers.items():
        want, _ = resize_layer(layer, ResizeOptions(rank=2))
        assert torch.equal(res.model.layers[key].up, want.up) and torch.equal(res.model.layers[key].down, want.down)
