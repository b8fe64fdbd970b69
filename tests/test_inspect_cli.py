"""`lorahub inspect` / `lorahub diff` end to end: real files written with save_lora, read back, numbers
compared with the materialised ΔW; registry references; bad input exits 2 without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

KEYS = [
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "unet.down_blocks.0.attentions.0.proj_in",
    "unet.up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    "text_encoder.text_model.encoder.layers.1.mlp.fc1",
]
META = {"ss_tag_frequency": json.dumps({"10_cat": {"cat": 10, "tabby": 3}, "2_dog": {"dog": 4, "cat": 2}}),
        "ss_num_epochs": "4", "ss_resolution": "(512, 512)", "ss_learning_rate": "0.0001",
        "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors"}


def write_lora(path, seed=0, rank=4, keys=KEYS, meta=META):
    """An fp16 kohya LoRA on tiny-sd1 modules, N(0, 1) factors, alpha rank/2, written by save_lora."""
    from lorahub.formats.names import get_arch
    from lorahub.tiny_loras import lora_file

    shapes = get_arch("tiny-sd1").modules
    return lora_file(path, {k: shapes[k] for k in keys}, seed, rank, rank / 2, scale=1.0, dtype=torch.float16,
                     metadata=meta)


def materialised(path):
    from lorahub.formats.io import load_lora

    m = load_lora(path)
    out = {}
    for k, layer in m.layers.items():
        d = layer.delta(torch.float64)
        S = torch.linalg.svdvals(d.reshape(d.shape[0], -1))
        out[k] = (float(d.norm()), float(S[0]))
    return out


def test_inspect_json_plot_and_registry(tmp_path, home, run):
    from PIL import Image

    f = write_lora(tmp_path / "a.safetensors")
    png = tmp_path / "plots" / "a.png"
    rc, out, err = run("inspect", f, "--json", "--plot", png)
    assert rc == 0, err
    rep = json.loads(out)
    ref = materialised(f)
    assert rep["format"] == "kohya" and rep["base"] == "sd1" and rep["kind"] == "lora"
    assert rep["parts"] == ["unet", "text_encoder"] and rep["layers"] == len(KEYS)
    assert rep["size"] == f.stat().st_size
    assert rep["rank"] == {"min": 4, "median": 4, "max": 4} and rep["alpha"] == 2.0 and rep["scale"] == 0.5
    assert rep["dtypes"] == ["float16"]
    for p in rep["per_layer"]:
        assert p["fro"] == pytest.approx(ref[p["key"]][0], rel=1e-4)
        assert p["spectral"] == pytest.approx(ref[p["key"]][1], rel=1e-4)
    meta = rep["metadata"]
    assert meta["tags"][:3] == [["cat", 12], ["dog", 4], ["tabby", 3]]
    assert meta["fields"]["epochs"] == "4" and meta["fields"]["base_model_name"].startswith("v1-5")
    img = Image.open(png)
    assert img.format == "PNG" and img.width > 300
    assert {b["block"] for b in rep["blocks"]} == {"down.0", "up.1", "te.0", "te.1"}

    # the same file through the registry, by id
    from lorahub.registry import Registry

    entry, _ = Registry.open(home).add_file(f)
    rc, out, err = run("inspect", entry["id"], "--json", "--home", home)
    assert rc == 0, err
    rep2 = json.loads(out)
    assert rep2["entry"]["id"] == entry["id"]
    assert [p["fro"] for p in rep2["per_layer"]] == [p["fro"] for p in rep["per_layer"]]

    # human output: summary, tags, per-block table, filtered layers
    rc, out, err = run("inspect", f, "--layers", "*attn2*")
    assert rc == 0, err
    assert "kohya" in out and "cat (12)" in out and "per block" in out and "attn2.to_k" in out
    assert "attn1.to_q" not in out


def test_inspect_with_base_and_diff(tmp_path, run):
    a = write_lora(tmp_path / "a.safetensors", seed=0)
    b = write_lora(tmp_path / "b.safetensors", seed=1, keys=KEYS[:4] + [
        "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_v"])
    rc, out, err = run("inspect", a, "--base", "tiny-sd1", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert all(p["rel_strength"] is not None and p["rel_strength"] > 0 for p in rep["per_layer"])
    assert rep["base_model"] == "tiny-sd1"

    rc, out, err = run("diff", a, b, "--json")
    assert rc == 0, err
    res = json.loads(out)
    from lorahub.formats.io import load_lora

    ma, mb = load_lora(a), load_lora(b)
    for p in res["per_layer"]:
        A = ma.layers[p["key"]].delta(torch.float64).flatten()
        B = mb.layers[p["key"]].delta(torch.float64).flatten()
        assert p["cosine"] == pytest.approx(float(A @ B / (A.norm() * B.norm())), abs=1e-5)
        assert p["norm_ratio"] == pytest.approx(float(B.norm() / A.norm()), rel=1e-4)
    assert set(res["only_a"]) == set(KEYS[4:])
    assert res["only_b"] == ["unet.up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_v"]
    rc, out, err = run("diff", a, a)
    assert rc == 0 and "strongly aligned" in out


def _poke(src, dst, key_part, fn):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as h:
        meta = h.metadata()
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    hit = [k for k in tensors if key_part in k]
    assert hit, key_part
    for k in hit:
        tensors[k] = fn(tensors[k])
    save_file(tensors, str(dst), metadata=meta)
    return dst


def cli(*args, home=None):
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if home is not None:
        env["LORAHUB_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "lorahub", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_bad_input(tmp_path, home, run):
    good = write_lora(tmp_path / "good.safetensors")

    def with_nan(t):
        t = t.clone()
        t.view(-1)[0] = float("nan")
        return t

    nan = _poke(good, tmp_path / "nan.safetensors", "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up", with_nan)
    rc, out, err = run("inspect", nan, "--json")
    assert rc == 0, err
    assert "WARNING" in err and "NaN/Inf" in err
    rep = json.loads(out)
    bad = [x for x in rep["per_layer"] if not x["finite"]]
    assert [x["key"] for x in bad] == ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]
    assert sum(x["fro"] is not None for x in rep["per_layer"]) == len(KEYS) - 1

    # up factor with a rank that does not match down: clear error, exit 2, no traceback (a real process)
    mism = _poke(good, tmp_path / "mism.safetensors", "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up",
                 lambda t: torch.cat([t, t[:, :1]], 1))
    p = cli("inspect", mism, home=home)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1

    # a registry reference that does not exist
    rc, out, err = run("diff", good, "deadbeefcafe", "--home", home)
    assert rc == 2 and err.startswith("error:") and "deadbeefcafe" in err


def test_rank_zero_layer_is_an_error(tmp_path, run):
    good = write_lora(tmp_path / "good.safetensors")
    zero = _poke(good, tmp_path / "zero.safetensors", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_",
                 lambda t: t[:, :0] if t.shape[1] == 4 else t[:0])
    rc, out, err = run("inspect", zero)
    assert rc == 2 and "rank 0" in err, err


def test_ops_do_not_import_diffusers(tmp_path):
    code = r"""
import sys, torch
from lorahub.formats.canonical import LoraLayer, LoraModel
from lorahub.ops.inspect import inspect_model
from lorahub.ops.diff import diff_models
from lorahub.ops.heatmap import render
k = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
m = LoraModel(layers={k: LoraLayer(kind="lora", weights={"up": torch.randn(8, 2), "down": torch.randn(2, 8)})})
rep = inspect_model(m)
diff_models(m, m)
render(rep["grid"], sys.argv[1])
bad = [n for n in ("diffusers", "transformers", "matplotlib") if n in sys.modules]
assert not bad, bad
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_real_published_file(run):
    """A cloneofsimo LoRA from the wild (rank 4, fp16, SD1.5 shapes): numbers match the materialised ΔW."""
    from pathlib import Path

    from lorahub.formats.io import load_lora

    f = Path(__file__).resolve().parent.parent.parent / "shared" / "real-loras" / "analog_svd_rank4.safetensors"
    if not f.exists():
        pytest.skip("shared real-loras folder not present")
    rc, out, err = run("inspect", f, "--json")
    assert rc == 0, err
    rep = json.loads(out)
    model = load_lora(f)
    assert rep["format"] == "cloneofsimo" and rep["layers"] == len(model.layers) == 192
    assert rep["rank"]["max"] == 4
    per = {p["key"]: p for p in rep["per_layer"]}
    for key in list(model.layers)[::12]:
        d = model.layers[key].delta(torch.float64)
        S = torch.linalg.svdvals(d.reshape(d.shape[0], -1))
        assert per[key]["fro"] == pytest.approx(float(d.norm()), rel=1e-4)
        assert per[key]["spectral"] == pytest.approx(float(S[0]), rel=1e-4)
        assert per[key]["eff_rank_99"] <= 4
