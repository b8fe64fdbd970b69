"""extract from diffusers Flux.1 / SD3 folders factors each fused module of the family's original layout
(Flux.1 ``img_attn.qkv`` / ``txt_attn.qkv`` / single-block ``linear1``, SD3 ``attn.qkv``) as one matrix,
as kohya's own Flux extraction does on BFL checkpoints: the parts' differences stacked in the original
row order, one SVD, parts sharing one rank-k ``lora_A``. Written as kohya the fused module has rank k
(not 3k) and ΔW = the best rank-k approximation of the stacked difference; written as diffusers,
diffusers' own loader injects the split rows."""

from __future__ import annotations

import logging
import shutil

import pytest
import safetensors.torch as st
import torch
from safetensors import safe_open

from lorahub import tiny
from lorahub.tiny_loras import flux_injected_deltas

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
W = 32  # the tiny Flux / SD3 transformers' width


def best(d: torch.Tensor, k: int) -> torch.Tensor:
    """The best rank-k approximation of ``d`` (Eckart–Young, full float64 SVD)."""
    u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def kohya_delta(t: dict, mod: str) -> torch.Tensor:
    down, up = t[f"{mod}.lora_down.weight"].double(), t[f"{mod}.lora_up.weight"].double()
    alpha = float(t[f"{mod}.alpha"]) if f"{mod}.alpha" in t else down.shape[0]
    return up @ down * (alpha / down.shape[0])


def tune(folder, dest, fused: dict[tuple[str, ...], int], seed=0) -> dict[tuple[str, ...], torch.Tensor]:
    """A copy of the diffusers folder whose transformer weights gain, per group of weight names, the rows
    of one stacked ΔW of the given rank (a change that shares its structure across the group's parts, as
    a fine-tune of a fused module does); a group of one name is a plain module. Returns {group: ΔW}."""
    shutil.copytree(folder, dest)
    g = torch.Generator().manual_seed(seed)
    sd = st.load_file(dest / WEIGHTS)
    truth = {}
    for names, rank in fused.items():
        rows = [sd[n].shape[0] for n in names]
        d = torch.randn(sum(rows), rank, generator=g) @ torch.randn(rank, sd[names[0]].shape[1], generator=g) * 0.05
        for n, chunk in zip(names, torch.split(d, rows)):
            sd[n] = sd[n] + chunk
        truth[names] = d
    st.save_file(sd, dest / WEIGHTS)
    return truth


IMG_QKV = tuple(f"transformer_blocks.0.attn.to_{x}.weight" for x in "qkv")
LINEAR1 = tuple(f"single_transformer_blocks.0.attn.to_{x}.weight" for x in "qkv") + (
    "single_transformer_blocks.0.proj_mlp.weight",)
FF = ("transformer_blocks.0.ff.net.2.weight",)
ADD_K = ("transformer_blocks.0.attn.add_k_proj.weight",)  # one part of txt_attn.qkv changed, q and v not


@pytest.fixture(scope="module")
def flux_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("fluxfused")
    truth = tune(tiny.ensure("flux"), root / "tuned", {IMG_QKV: 6, LINEAR1: 6, FF: 6, ADD_K: 6})
    return tiny.ensure("flux"), root / "tuned", truth


def test_flux_fused_modules_extract_at_rank_k(flux_pair, tmp_path):
    """kohya output at rank 3: qkv / linear1 lora_down have 3 rows and their ΔW is the best rank-3
    approximation of the stacked difference; the report names the fused modules (optimum = retained)."""
    from lorahub.ops.extract import extract_lora

    base, tuned, truth = flux_pair
    seen = []
    res = extract_lora(base, tuned, out=tmp_path / "k.safetensors", rank=3, dtype="fp32",
                       on_layer=lambda i, n, name: seen.append(name))
    t = st.load_file(tmp_path / "k.safetensors")
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "3" and meta["ss_base_model_version"] == "flux1"
    txt = torch.cat([torch.zeros(W, W), truth[ADD_K], torch.zeros(W, W)])  # q and v rows unchanged
    for mod, d in (("lora_unet_double_blocks_0_img_attn_qkv", truth[IMG_QKV]),
                   ("lora_unet_single_blocks_0_linear1", truth[LINEAR1]),
                   ("lora_unet_double_blocks_0_txt_attn_qkv", txt),
                   ("lora_unet_double_blocks_0_img_mlp_2", truth[FF])):
        assert t[f"{mod}.lora_down.weight"].shape == (3, d.shape[1]), mod
        assert t[f"{mod}.lora_up.weight"].shape == (d.shape[0], 3), mod
        assert rel(kohya_delta(t, mod), best(d, 3)) < 1e-5, mod
    assert {k.rsplit(".", 2)[0] for k in t if k.endswith("lora_down.weight")} == {
        "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1",
        "lora_unet_double_blocks_0_txt_attn_qkv", "lora_unet_double_blocks_0_img_mlp_2"}
    names = ["transformer.double_blocks.0.img_attn.qkv", "transformer.double_blocks.0.txt_attn.qkv",
             "transformer.single_blocks.0.linear1", "transformer.transformer_blocks.0.ff.net.2"]
    reps = {r.name: r for r in res.layers}
    assert set(reps) == set(names)
    assert {r.rank for r in res.layers} == {3}
    for name, d in zip(names, (truth[IMG_QKV], txt, truth[LINEAR1], truth[FF])):
        assert reps[name].shape == tuple(d.shape)
        want = float(best(d, 3).norm() / d.double().norm())
        assert reps[name].optimum == pytest.approx(want, rel=1e-6)
        assert reps[name].retained == pytest.approx(want, rel=1e-5)
    # progress: one step per fused module, not per part
    assert all(seen.count(n) == 1 for n in names)
    assert not [n for n in seen if n.endswith(("to_q", "to_k", "to_v", "_proj", "proj_mlp"))]
    # blocks of the report: the diffusers blocks the fused modules sit in
    assert {b["block"]: b["layers"] for b in res.blocks()} == {"transformer.transformer_blocks.0": 3,
                                                                "transformer.single_transformer_blocks.0": 1}
    assert any("fused module" in n for n in res.notes)
    # canonical form: the parts share one lora_A; the unchanged add_q / add_v have no layer
    lay = res.model.layers
    q, k, v, mlp = (lay[f"transformer.single_transformer_blocks.0.{p}"]
                    for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
    assert q.down is k.down is v.down is mlp.down and q.rank == 3
    assert "transformer.transformer_blocks.0.attn.add_k_proj" in lay
    assert "transformer.transformer_blocks.0.attn.add_q_proj" not in lay
    assert "transformer.transformer_blocks.0.attn.add_v_proj" not in lay


def test_flux_dynamic_rank_is_the_fused_rank(flux_pair, tmp_path):
    """A dynamic criterion chooses the rank of the stacked difference (6), not 3 × 6."""
    from lorahub.ops.extract import extract_lora

    base, tuned, truth = flux_pair
    res = extract_lora(base, tuned, out=tmp_path / "d.safetensors", energy=0.999999, rank=32, dtype="fp32")
    assert {r.rank for r in res.layers} == {6}
    t = st.load_file(tmp_path / "d.safetensors")
    assert t["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (6, W)
    assert rel(kohya_delta(t, "lora_unet_double_blocks_0_img_attn_qkv"), truth[IMG_QKV]) < 1e-5


def _injected(folder, path) -> dict[str, torch.Tensor]:
    """The ΔW peft injects into each module of the folder's transformer, keyed by module path."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(folder / "transformer", local_files_only=True).eval()
    return flux_injected_deltas(model, path, prefix="")


def test_flux_diffusers_output_loads_split_in_diffusers(flux_pair, tmp_path, caplog):
    """Written as diffusers, diffusers' Flux loader injects each part with its rows of the best rank-3
    approximation of the stacked difference, every part with a rank-3 lora_A; read back and written as
    kohya it is the same fused layer."""
    from lorahub.formats.io import load_lora, save_lora
    from lorahub.ops.extract import extract_lora

    base, tuned, truth = flux_pair
    extract_lora(base, tuned, out=tmp_path / "d.safetensors", rank=3, dtype="fp32", dialect="diffusers")
    with caplog.at_level(logging.WARNING):
        got = _injected(base, tmp_path / "d.safetensors")
    said = [r.getMessage().lower() for r in caplog.records]
    assert not [m for m in said if "unexpected" in m or "missing" in m], said
    want = {}
    for names in (IMG_QKV, LINEAR1, FF, ADD_K):
        rows = [4 * W if n.endswith("proj_mlp.weight") else W for n in names]
        for n, chunk in zip(names, torch.split(best(truth[names], 3), rows)):
            want[n[: -len(".weight")]] = chunk
    assert set(got) == set(want)
    for n, d in want.items():
        assert rel(got[n], d) < 1e-5, n
    sd = st.load_file(tmp_path / "d.safetensors")
    assert sd["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"].shape == (3, W)
    assert torch.equal(sd["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"],
                       sd["transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"])
    k = st.load_file(save_lora(load_lora(tmp_path / "d.safetensors"), tmp_path / "k.safetensors", "kohya"))
    assert k["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (3, W)
    assert rel(kohya_delta(k, "lora_unet_double_blocks_0_img_attn_qkv"), best(truth[IMG_QKV], 3)) < 1e-5


def test_sd3_fused_qkv_extracts_at_rank_k(tmp_path):
    """SD3: x_block and context_block q/k/v stacked as the SAI layout fuses them; kohya
    joint_blocks_N_*_attn_qkv at rank 2 with the best rank-2 approximation; as diffusers, every part's
    ΔW is its rows of it."""
    from lorahub.formats.io import load_lora
    from lorahub.ops.extract import extract_lora

    base = tiny.ensure("sd3")
    x_qkv = tuple(f"transformer_blocks.0.attn.to_{x}.weight" for x in "qkv")
    c_qkv = tuple(f"transformer_blocks.1.attn.add_{x}_proj.weight" for x in "qkv")
    truth = tune(base, tmp_path / "tuned", {x_qkv: 5, c_qkv: 4}, seed=3)
    res = extract_lora(base, tmp_path / "tuned", out=tmp_path / "k.safetensors", rank=2, dtype="fp32")
    assert res.family == "sd3"
    assert {r.name: r.rank for r in res.layers} == {"transformer.joint_blocks.0.x_block.attn.qkv": 2,
                                                    "transformer.joint_blocks.1.context_block.attn.qkv": 2}
    t = st.load_file(tmp_path / "k.safetensors")
    for mod, names in (("lora_unet_joint_blocks_0_x_block_attn_qkv", x_qkv),
                       ("lora_unet_joint_blocks_1_context_block_attn_qkv", c_qkv)):
        assert t[f"{mod}.lora_down.weight"].shape == (2, W), mod
        assert rel(kohya_delta(t, mod), best(truth[names], 2)) < 1e-5, mod
    extract_lora(base, tmp_path / "tuned", out=tmp_path / "d.safetensors", rank=2, dtype="fp32",
                 dialect="diffusers")
    model = load_lora(tmp_path / "d.safetensors")
    for names in (x_qkv, c_qkv):
        for n, chunk in zip(names, torch.split(best(truth[names], 2), W)):
            layer = model.layers[f"transformer.{n[: -len('.weight')]}"]
            assert layer.rank == 2 and rel(layer.delta(torch.float64), chunk) < 1e-5, n
