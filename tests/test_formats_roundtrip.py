"""Lossless conversion: A→B→A gives the same tensors bit for bit (same dtype) and the same metadata,
for every dialect pair; files written independently (lorahub.tiny_loras) come back key for key."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorahub.errors import FormatError
from lorahub.formats.detect import detect
from lorahub.formats.io import check_finite, load_lora, save_lora

REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "real-loras"


@pytest.fixture(scope="module")
def files():
    from lorahub import tiny_loras

    return tiny_loras.ensure()


def _read(path):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), meta


def _assert_same_tensors(a: dict, b: dict):
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def _dialects_for(model):
    out = ["kohya"]
    if all(layer.kind == "lora" and layer.mid is None and layer.dora_scale is None
           for layer in model.layers.values()) and not model.embeddings:
        out.append("diffusers")
        if len(model.parts()) == 1:
            out.append("peft")
    return out


@pytest.mark.parametrize("src", ["sd1-kohya", "sd1-diffusers", "sd1-peft", "sd1-locon", "sd1-loha", "sd1-lokr",
                                 "sd1-dora", "sdxl-kohya", "sdxl-diffusers", "sd1-ti-webui", "sd1-ti-diffusers",
                                 "sdxl-ti"])
def test_every_pair_round_trips_bit_for_bit(src, files, tmp_path):
    model = load_lora(files[src])
    dialects = _dialects_for(model) if model.layers else ["kohya", "diffusers"]
    if src == "sdxl-ti":
        dialects = ["kohya"]
    for a, b in itertools.product(dialects, repeat=2):
        p_a = save_lora(model, tmp_path / f"{a}.safetensors", a)
        p_b = save_lora(load_lora(p_a), tmp_path / f"{a}-{b}.safetensors", b)
        p_a2 = save_lora(load_lora(p_b), tmp_path / f"{a}-{b}-{a}.safetensors", a)
        ta, ma = _read(p_a)
        ta2, ma2 = _read(p_a2)
        _assert_same_tensors(ta, ta2)
        assert ma == ma2, (a, b)
        assert p_a.read_bytes() == p_a2.read_bytes(), (a, b)


@pytest.mark.parametrize("src,via", [("sd1-kohya", "diffusers"), ("sdxl-kohya", "diffusers"),
                                     ("sd1-diffusers", "kohya"), ("sdxl-diffusers", "kohya"),
                                     ("sd1-locon", "kohya"), ("sd1-loha", "kohya"), ("sd1-lokr", "kohya"),
                                     ("sd1-dora", "kohya"), ("sd1-ti-webui", "diffusers")])
def test_independent_files_come_back_key_for_key(src, via, files, tmp_path):
    """A file written without lorahub's writers → B → its own dialect: same keys, tensors, metadata."""
    orig_t, orig_m = _read(files[src])
    model = load_lora(files[src])
    back_dialect = {"kohya": "kohya", "lycoris": "kohya", "diffusers": "diffusers",
                    "embedding": "kohya"}[detect(files[src]).format]
    mid = save_lora(model, tmp_path / "mid.safetensors", via)
    back = save_lora(load_lora(mid), tmp_path / "back.safetensors", back_dialect)
    t, m = _read(back)
    _assert_same_tensors(orig_t, t)
    assert m == orig_m


def test_metadata_and_triggers_survive(files, tmp_path):
    model = load_lora(files["sd1-kohya"])
    p = save_lora(model, tmp_path / "d.safetensors", "diffusers")
    _, meta = _read(p)
    for k in ("ss_tag_frequency", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
              "modelspec.architecture"):
        assert meta[k] == model.metadata[k]
    assert "tinychar" in json.loads(meta["ss_tag_frequency"])["10_tinychar"]
    d = detect(p)
    assert (d.format, d.base, d.rank, d.alpha) == ("diffusers", "sd1", 4, 2.0)


def test_dtype_cast(files, tmp_path):
    model = load_lora(files["sd1-kohya"])
    p = save_lora(model, tmp_path / "h.safetensors", "diffusers", dtype="fp16")
    t, _ = _read(p)
    assert {v.dtype for v in t.values()} == {torch.float16}
    back = load_lora(p)
    for n, layer in model.items():
        assert torch.equal(back.layers[n].up, layer.up.half())
        assert back.layers[n].alpha == layer.alpha
    p = save_lora(model, tmp_path / "b.safetensors", "kohya", dtype="bf16")
    assert {v.dtype for v in _read(p)[0].values()} == {torch.bfloat16}


def test_lycoris_and_dora_refused_for_diffusers(files, tmp_path):
    for src, word in (("sd1-loha", "loha"), ("sd1-lokr", "lokr"), ("sd1-dora", "DoRA"), ("sd1-cloneofsimo", "embedding")):
        model = load_lora(files[src])
        with pytest.raises(FormatError, match=word):
            save_lora(model, tmp_path / "x.safetensors", "diffusers")
        assert not (tmp_path / "x.safetensors").exists()


def test_lycoris_delta_matches_formula(files):
    loha = load_lora(files["sd1-loha"])
    name, layer = next(iter(loha.items()))
    w = layer.weights
    expect = (w["w1a"] @ w["w1b"]) * (w["w2a"] @ w["w2b"]) * (layer.alpha / w["w1b"].shape[0])
    assert torch.allclose(layer.delta(), expect)
    lokr = load_lora(files["sd1-lokr"])
    name, layer = next(iter(lokr.items()))
    w = layer.weights
    expect = torch.kron(w["w1"], w["w2a"] @ w["w2b"]) * (layer.alpha / w["w2a"].shape[1])
    assert torch.allclose(layer.delta(), expect)
    assert layer.delta().shape == tuple(layer.extra["shape"])


def test_peft_file_loads_into_peft(files, tmp_path, tiny_sd1):
    """Our peft-dialect file loads with peft's own set_peft_model_state_dict and gives ΔW."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    model = load_lora(files["sd1-peft"])
    p = save_lora(model, tmp_path / "adapter_model.safetensors", "peft")
    t, meta = _read(p)
    cfg = json.loads(meta["lora_adapter_metadata"])
    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd1), subfolder="unet", local_files_only=True)
    unet = inject_adapter_in_model(LoraConfig(**cfg), unet)
    res = set_peft_model_state_dict(unet, {k.removeprefix("base_model.model."): v for k, v in t.items()})
    assert not res.unexpected_keys
    name, layer = next((n, layer) for n, layer in model.items() if layer.down.dim() == 2)
    mod = unet.get_submodule(name.removeprefix("unet."))
    x = torch.randn(2, mod.in_features)
    with torch.no_grad():
        want = x @ (mod.base_layer.weight + layer.delta()).T
        if mod.base_layer.bias is not None:
            want = want + mod.base_layer.bias
        assert torch.allclose(mod(x), want, atol=1e-5)


@pytest.mark.skipif(not REAL.exists(), reason="no shared real LoRAs")
def test_real_cloneofsimo_replays_the_module_walk(tmp_path):
    model = load_lora(REAL / "analog_svd_rank4.safetensors")
    assert (model.arch, model.base, len(model.layers)) == ("sd1", "sd1", 192)
    raw = load_file(str(REAL / "analog_svd_rank4.safetensors"))
    # index 4 is the first GEGLU projection (2560 x 320) in the diffusers <= 0.11 block order
    names_ = list(model.layers)
    assert model.layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"].up.shape == (2560, 4)
    assert torch.equal(model.layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"].up,
                       raw["unet:4:up"])
    assert torch.equal(model.layers["text_encoder.text_model.encoder.layers.0.self_attn.k_proj"].down,
                       raw["text_encoder:0:down"])
    assert len([n for n in names_ if n.startswith("unet.")]) == 144
    p = save_lora(model, tmp_path / "k.safetensors", "kohya")
    t, _ = _read(p)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_up.weight" in t
    assert t["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_up.weight"].dtype \
        == torch.float16
    disney = load_lora(REAL / "lora_disney.safetensors")
    assert set(disney.embeddings) == {"<s1>", "<s2>"}
    p = save_lora(disney, tmp_path / "d.safetensors", "kohya")
    t, _ = _read(p)
    assert torch.equal(t["bundle_emb.<s1>.string_to_param.*"].flatten(),
                       load_file(str(REAL / "lora_disney.safetensors"))["<s1>"])


def _write(tmp_path, tensors, meta=None):
    p = tmp_path / "bad.safetensors"
    save_file(tensors, str(p), metadata=meta)
    return p


def test_bad_factors_are_clear_errors(tmp_path, files):
    base = load_file(str(files["sd1-kohya"]))
    k = next(k for k in base if k.endswith("lora_down.weight"))
    bad = dict(base)
    bad[k] = torch.randn(3, base[k].shape[1])
    with pytest.raises(FormatError, match="different ranks"):
        load_lora(_write(tmp_path, bad, {"ss_base_model_version": "sd_v1"}))
    zero = dict(base)
    zero[k] = torch.zeros(0, base[k].shape[1])
    zero[k.replace("lora_down", "lora_up")] = torch.zeros(base[k.replace("lora_down", "lora_up")].shape[0], 0)
    with pytest.raises(FormatError, match="rank 0"):
        load_lora(_write(tmp_path, zero))
    lone = {k: base[k]}
    with pytest.raises(FormatError, match="lacks"):
        load_lora(_write(tmp_path, lone))
    # names no table holds are kept (unmapped, under their kohya names) with a note saying which; the
    # rest are mapped; writing a dialect that needs module paths says which layers and why
    wrong = {k.replace("down_blocks_0", "down_blocks_7"): v for k, v in base.items()}
    m = load_lora(_write(tmp_path, wrong))
    moved = [k for k in m.layers if "down_blocks_7" in k]
    assert moved and all(k.startswith("unet.lora_unet_down_blocks_7_") for k in moved)
    assert all(k.split(".", 1)[1][:5] != "lora_" for k in m.layers if k not in moved)
    assert any(f"{len(moved)} layer(s) are not modules of" in n and "kept under their kohya names" in n
               for n in m.notes)
    assert m.arch == "tiny-sd1"
    back = save_lora(m, tmp_path / "back.safetensors")
    assert sorted(load_file(str(back))) == sorted(wrong)  # kohya names come back verbatim
    with pytest.raises(FormatError, match="no known module path"):
        save_lora(m, tmp_path / "x.safetensors", dialect="diffusers")


def test_nan_is_reported(files):
    model = load_lora(files["sd1-kohya"])
    assert check_finite(model) == []
    name = next(iter(model.layers))
    model.layers[name].weights["up"] = model.layers[name].up.clone()
    model.layers[name].weights["up"][0, 0] = float("nan")
    assert check_finite(model) == [name]


def test_older_diffusers_forms_read_like_the_new_one(files, tmp_path):
    new = load_lora(files["sd1-diffusers"])
    raw = load_file(str(files["sd1-diffusers"]))
    old, proc = {}, {}
    for k, v in raw.items():
        mod, ab = k.rsplit(".lora_", 1)
        ud = "down" if ab.startswith("A") else "up"
        old[f"{mod}.lora.{ud}.weight"] = v
        head, _, proj = mod.rpartition(".")
        if mod.endswith(("attn1.to_q", "attn2.to_k")):
            proc[f"{head}.processor.{proj}_lora.{ud}.weight"] = v
        elif mod.endswith("to_out.0"):
            proc[f"{mod[:-len('.to_out.0')]}.processor.to_out_lora.{ud}.weight"] = v
    for i, sd in enumerate((old, proc)):
        p = tmp_path / f"old{i}.safetensors"
        save_file(sd, str(p))
        m = load_lora(p)
        assert m.arch == "tiny-sd1" and m.layers
        for n, layer in m.layers.items():
            assert torch.equal(layer.up, new.layers[n].up) and torch.equal(layer.down, new.layers[n].down)
        if i == 0:
            assert set(m.layers) == set(new.layers)


def test_sdxl_kohya_in_diffusers_layout_keeps_its_layout(files, tmp_path):
    """Some tools name SDXL kohya modules by diffusers paths: read them, and write them back that way."""
    from lorahub.formats import names

    a = names.get_arch("tiny-sdxl")
    raw = load_file(str(files["sdxl-kohya"]))
    sgm_to_diff = {names.to_kohya(c, a): names.to_kohya(c, a, sgm=False) for c in a.modules}
    renamed = {}
    for k, v in raw.items():
        mod, suffix = k.split(".", 1)
        renamed[f"{sgm_to_diff.get(mod, mod)}.{suffix}"] = v
    assert renamed.keys() != raw.keys()
    p = tmp_path / "difflayout.safetensors"
    save_file(renamed, str(p))
    model = load_lora(p)
    assert model.arch == "tiny-sdxl"
    assert set(model.layers) == set(load_lora(files["sdxl-kohya"]).layers)
    mid = save_lora(model, tmp_path / "mid.safetensors", "diffusers")
    back = save_lora(load_lora(mid), tmp_path / "back.safetensors", "kohya")
    _assert_same_tensors(renamed, load_file(str(back)))
