"""extract and bake for Flux.1 / SD3 on the tiny fixtures: diffusers folders and Flux.1 single files in
the original BFL layout; results loaded back and checked against the known ΔW and diffusers' own LoRA."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import safetensors.torch as st
import torch
from safetensors import safe_open

from lorahub import tiny, tiny_loras
from lorahub.errors import LorahubError

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def _tune(folder, dest, changes: dict[str, list[str]], seed=0, rank=2):
    """A copy of the diffusers folder with low-rank updates on the named weights (part -> weight
    names); returns {canonical module: ΔW}."""
    shutil.copytree(folder, dest)
    g = torch.Generator().manual_seed(seed)
    truth = {}
    for part, names in changes.items():
        f = dest / part / ("diffusion_pytorch_model.safetensors" if part == "transformer" else "model.safetensors")
        sd = st.load_file(f)
        for k in names:
            o, i = sd[k].shape
            d = torch.randn(o, rank, generator=g) @ torch.randn(rank, i, generator=g) * 0.1
            sd[k] = sd[k] + d
            truth[f"{part}.{k[:-len('.weight')]}"] = d
        st.save_file(sd, f)
    return truth


FLUX_CHANGES = {"transformer": ["transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.to_k.weight",
                                "transformer_blocks.0.ff.net.2.weight", "single_transformer_blocks.0.proj_mlp.weight",
                                "single_transformer_blocks.0.attn.to_v.weight", "norm_out.linear.weight"],
                "text_encoder_2": ["encoder.block.0.layer.0.SelfAttention.q.weight"]}


@pytest.fixture(scope="module")
def flux_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("fluxpair")
    base = tiny.ensure("flux")
    truth = _tune(base, root / "tuned", FLUX_CHANGES)
    return base, root / "tuned", truth


def _check_deltas(model, truth, tol=1e-5):
    for key, d in truth.items():
        got = model.layers[key].delta(torch.float32)
        assert float((got - d).norm() / d.norm()) < tol, key


def test_extract_flux_from_diffusers_folders(flux_pair, tmp_path):
    from lorahub.formats.io import load_lora
    from lorahub.ops.extract import extract_lora

    base, tuned, truth = flux_pair
    res = extract_lora("tiny-flux", tuned, out=tmp_path / "x.safetensors", rank=4, dtype="fp32",
                       dialect="diffusers")
    assert res.family == "flux" and res.retained > 0.999999
    # T5 (text_encoder_2) included, unchanged layers not; q/k/v (+ the MLP input) as their fused module
    assert {r.name for r in res.layers} == {"transformer.double_blocks.0.img_attn.qkv", "transformer.single_blocks.0.linear1",
                                            "transformer.transformer_blocks.0.ff.net.2", "transformer.norm_out.linear",
                                            "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q"}
    blocks = {b["block"] for b in res.blocks()}
    assert {"transformer.transformer_blocks.0", "transformer.single_transformer_blocks.0", "transformer",
            "text_encoder_2"} <= blocks
    model = load_lora(tmp_path / "x.safetensors")
    assert model.base == "flux" and set(model.layers) == set(truth)
    _check_deltas(model, truth)
    # dynamic rank: each layer takes the rank its ΔW has (2 here; 2 + 2 for two changed parts of a fused module)
    dyn = extract_lora(base, tuned, out=tmp_path / "d.safetensors", energy=0.999999, rank=8, dtype="fp32")
    assert {r.name: r.rank for r in dyn.layers} == {r.name: 4 if r.name.endswith(("qkv", "linear1")) else 2
                                                    for r in res.layers}


def test_extract_sd3_from_diffusers_folders(tmp_path):
    from lorahub.formats.io import load_lora
    from lorahub.ops.extract import extract_lora

    base = tiny.ensure("sd3")
    truth = _tune(base, tmp_path / "tuned", {"transformer": ["transformer_blocks.1.attn.to_q.weight",
                                                             "transformer_blocks.0.attn.add_k_proj.weight",
                                                             "transformer_blocks.0.ff_context.net.2.weight"]})
    res = extract_lora(base, tmp_path / "tuned", out=tmp_path / "x.safetensors", rank=4, dtype="fp32",
                       dialect="diffusers")
    assert res.family == "sd3" and {r.name for r in res.layers} == {"transformer.joint_blocks.1.x_block.attn.qkv",
                                                                    "transformer.joint_blocks.0.context_block.attn.qkv",
                                                                    "transformer.transformer_blocks.0.ff_context.net.2"}
    _check_deltas(load_lora(tmp_path / "x.safetensors"), truth)


def test_extract_flux_from_bfl_single_files(flux_pair, tmp_path):
    """Two BFL-layout single files: the LoRA is kohya's Flux naming (fused qkv / linear1), and read back
    (lorahub's Flux reader) it has the ΔW of every diffusers module."""
    from lorahub.formats.io import load_lora
    from lorahub.ops.extract import extract_lora

    base, tuned, truth = flux_pair
    for name, folder, prefix in (("base", base, ""), ("tuned", tuned, "model.diffusion_model.")):
        # the tuned file as a ComfyUI full checkpoint names it (prefixed): the same layout
        bfl = tiny.flux_to_bfl(st.load_file(folder / WEIGHTS))
        st.save_file({prefix + k: v for k, v in bfl.items()}, tmp_path / f"{name}.safetensors")
    res = extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", out=tmp_path / "x.safetensors",
                       rank=4, dtype="fp32")
    assert res.family == "flux"
    assert {r.name for r in res.layers} == {"double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.2",
                                            "single_blocks.0.linear1", "final_layer.adaLN_modulation.1"}
    # q and k changed: rank 2 + 2 in the fused qkv; v and the MLP input in linear1 likewise
    assert {r.name: r.rank for r in res.layers}["double_blocks.0.img_attn.qkv"] == 4
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["ss_base_model_version"] == "flux1"
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in keys
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert tuple(f.get_tensor("lora_unet_single_blocks_0_linear1.lora_up.weight").shape) == (3 * 32 + 128, 4)
    model = load_lora(tmp_path / "x.safetensors")
    assert model.base == "flux"
    _check_deltas(model, {k: v for k, v in truth.items() if k.startswith("transformer.")})
    # v of the double block did not change: its part of the fused layer is (numerically) zero, if kept
    v = model.layers.get("transformer.transformer_blocks.0.attn.to_v")
    assert v is None or float(v.delta().abs().max()) < 1e-5
    # mixing layouts is refused in one line
    with pytest.raises(LorahubError, match="same layout"):
        extract_lora(tmp_path / "base.safetensors", tuned, out=tmp_path / "y.safetensors", rank=4)


def _flux_lora():
    from lorahub.ops.models import load_pipeline

    pipe = load_pipeline("tiny-flux")
    model, raw = tiny_loras.pipeline_lora(pipe, seed=4, rank=4, scale=0.3, keep={"transformer": lambda p: True})
    model.base = "flux"
    return model, raw


def _image(folder, raw=None):
    import diffusers

    pipe = diffusers.FluxPipeline.from_pretrained(folder, local_files_only=True)
    if raw is not None:
        pipe.load_lora_weights({k: v.clone() for k, v in raw.items()})
    pipe.set_progress_bar_config(disable=True)
    im = pipe("a cat", num_inference_steps=2, height=32, width=32, max_sequence_length=tiny.T5_MAX_LENGTH,
              generator=torch.Generator().manual_seed(1)).images[0]
    return np.asarray(im).astype(int)


def test_bake_flux_into_folder_and_bfl_file(tmp_path):
    """Baked into the diffusers folder, the model renders what diffusers renders with the LoRA loaded;
    baked into a BFL file, every fused weight is the folder's result fused as BFL fuses it."""
    from lorahub.ops.bake import bake

    folder = tiny.ensure("flux")
    model, raw = _flux_lora()
    rep = bake(folder, model, tmp_path / "baked")
    assert rep.layout == "diffusers" and rep.family == "flux" and rep.layers == len(model.layers)
    baked = _image(tmp_path / "baked")
    assert np.abs(baked - _image(folder, raw)).max() <= 2
    assert np.abs(baked - _image(folder)).max() > 4
    st.save_file(tiny.flux_to_bfl(st.load_file(folder / WEIGHTS)), tmp_path / "base.safetensors")
    rep = bake(tmp_path / "base.safetensors", model, tmp_path / "baked.safetensors")
    assert rep.layout == "bfl" and rep.layers < len(model.layers)  # q/k/v (+ mlp) land on one fused weight
    got = st.load_file(tmp_path / "baked.safetensors")
    want = tiny.flux_to_bfl(st.load_file(tmp_path / "baked" / WEIGHTS))
    assert set(got) == set(want)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    # a text-encoder layer cannot go into a transformer-only file: refused before anything is written
    model.layers["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"] = next(iter(model.layers.values()))
    with pytest.raises(LorahubError, match="holds only the transformer"):
        bake(tmp_path / "base.safetensors", model, tmp_path / "no.safetensors")
    assert not (tmp_path / "no.safetensors").exists()


def test_cli_bakes_into_a_bfl_file(run, tmp_path):
    """`lorahub merge LORA:0.5 --checkpoint --base BFL.safetensors`: the fused qkv / linear1 weights gain
    0.5 · the stacked ΔW of their parts (q, k, v, then the MLP input), computed here from the LoRA."""
    import json

    from lorahub.formats.io import save_lora

    folder = tiny.ensure("flux")
    model, _raw = _flux_lora()
    lora = save_lora(model, tmp_path / "x.safetensors", dialect="diffusers")
    base_sd = tiny.flux_to_bfl(st.load_file(folder / WEIGHTS))
    st.save_file(base_sd, tmp_path / "base.safetensors")
    code, out, err = run("merge", f"{lora}:0.5", "--checkpoint", "--base", tmp_path / "base.safetensors",
                         "--out", tmp_path / "baked.safetensors", "--json")
    assert code == 0, err
    assert json.loads(out)["layout"] == "bfl"
    got = st.load_file(tmp_path / "baked.safetensors")

    def d(key):
        return model.layers[f"transformer.{key}"].delta(torch.float32)

    qkv = torch.cat([d(f"transformer_blocks.0.attn.to_{x}") for x in "qkv"])
    torch.testing.assert_close(got["double_blocks.0.img_attn.qkv.weight"],
                               base_sd["double_blocks.0.img_attn.qkv.weight"] + 0.5 * qkv, rtol=0, atol=1e-6)
    lin1 = torch.cat([d(f"single_transformer_blocks.0.attn.to_{x}") for x in "qkv"]
                     + [d("single_transformer_blocks.0.proj_mlp")])
    torch.testing.assert_close(got["single_blocks.0.linear1.weight"],
                               base_sd["single_blocks.0.linear1.weight"] + 0.5 * lin1, rtol=0, atol=1e-6)
    # the final adaLN modulation: BFL stores (shift, scale), diffusers (scale, shift)
    ada = d("norm_out.linear")
    ada = torch.cat([ada[ada.shape[0] // 2:], ada[: ada.shape[0] // 2]])
    torch.testing.assert_close(got["final_layer.adaLN_modulation.1.weight"],
                               base_sd["final_layer.adaLN_modulation.1.weight"] + 0.5 * ada, rtol=0, atol=1e-6)
    # weights no layer adapts are copied bit for bit
    assert torch.equal(got["double_blocks.0.img_attn.norm.query_norm.scale"],
                       base_sd["double_blocks.0.img_attn.norm.query_norm.scale"])


def test_bake_sd3_into_folder_matches_diffusers_lora(tmp_path):
    import diffusers

    from lorahub.ops.bake import bake
    from lorahub.ops.models import load_pipeline

    folder = tiny.ensure("sd3")
    model, raw = tiny_loras.pipeline_lora(load_pipeline("tiny-sd3"), seed=5, rank=4, scale=0.3,
                                          keep={"transformer": lambda p: "transformer_blocks." in p})
    model.base = "sd3"
    rep = bake(folder, model, tmp_path / "baked")
    assert rep.family == "sd3" and rep.layers == len(model.layers)

    def image(path, lora=None):
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(path, local_files_only=True)
        if lora is not None:
            pipe.load_lora_weights({k: v.clone() for k, v in lora.items()})
        pipe.set_progress_bar_config(disable=True)
        return np.asarray(pipe("a cat", num_inference_steps=2, height=32, width=32,
                               max_sequence_length=tiny.T5_MAX_LENGTH,
                               generator=torch.Generator().manual_seed(2)).images[0]).astype(int)

    baked = image(tmp_path / "baked")
    assert np.abs(baked - image(folder, raw)).max() <= 2
    assert np.abs(baked - image(folder)).max() > 4


def test_bfl_checkpoint_shows_canonical_weights(run, tmp_path):
    """A BFL file answers canonical transformer names with the rows of its fused weights (adaLN halves
    swapped back), so `inspect --base BFL.safetensors` reports what `--base tiny-flux` reports."""
    import json

    from lorahub.formats.io import save_lora
    from lorahub.ops.checkpoints import open_checkpoint

    folder = tiny.ensure("flux")
    sd = st.load_file(folder / WEIGHTS)
    st.save_file(tiny.flux_to_bfl(sd), tmp_path / "base.safetensors")
    with open_checkpoint(tmp_path / "base.safetensors") as ck:
        assert ck.layout == "bfl" and ck.family == "flux"
        assert "double_blocks.0.img_attn.qkv.weight" in ck.keys()
        linear = [k for k in sd if not k.split(".")[-2].startswith("norm_")]  # RMSNorm scales have no view
        for k in linear:
            name = f"transformer.{k}"
            assert name in ck and tuple(ck.shape(name)) == tuple(sd[k].shape), k
            assert torch.equal(ck.get(name), sd[k]), k
        assert "transformer.transformer_blocks.0.attn.nope.weight" not in ck
    model, _raw = _flux_lora()
    lora = save_lora(model, tmp_path / "x.safetensors", dialect="diffusers")
    reports = []
    for base in (tmp_path / "base.safetensors", "tiny-flux"):
        code, out, err = run("inspect", lora, "--base", base, "--json")
        assert code == 0, err
        reports.append({s["key"]: s["rel_strength"] for s in json.loads(out)["per_layer"]})
    assert reports[0] == reports[1] and all(v > 0 for v in reports[0].values())
