"""inspect --base (relative strength against the tiny SD1 weights) and the heat-map PNG."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from lorahub.errors import LorahubError
from lorahub.formats.canonical import LoraLayer, LoraModel
from lorahub.ops import heatmap
from lorahub.ops import inspect as ins
from lorahub.tiny_loras import random_lora


def _tiny_weights(folder):
    out = {}
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        for k in f.keys():
            out["unet." + k] = f.get_tensor(k)
    with safe_open(str(folder / "text_encoder" / "model.safetensors"), "pt") as f:
        for k in f.keys():
            name = k if k.startswith("text_model.") else "text_model." + k
            out["text_encoder." + name] = f.get_tensor(k)
    return out


def _lora_for(weights: dict, keys: list[str], rank: int = 2) -> LoraModel:
    return random_lora({k: tuple(weights[k + ".weight"].shape) for k in keys}, 0, rank, 1.0, scale=0.1)


KEYS = [
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "unet.down_blocks.0.attentions.0.proj_in",
    "unet.up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
    "unet.up_blocks.1.resnets.0.conv1",
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    "text_encoder.text_model.encoder.layers.1.mlp.fc1",
]


def test_relative_strength_against_tiny_sd1(tiny_sd1):
    weights = _tiny_weights(tiny_sd1)
    model = _lora_for(weights, KEYS)
    base = ins.open_base("tiny-sd1")
    rep = ins.inspect_model(model, base=base, base_ref="tiny-sd1")
    assert not rep["warnings"]
    for p in rep["per_layer"]:
        w0 = weights[p["key"] + ".weight"].double()
        d = model.layers[p["key"]].delta(torch.float64)
        assert p["base_fro"] == pytest.approx(float(w0.norm()), rel=1e-6)
        assert p["rel_strength"] == pytest.approx(float(d.norm() / w0.norm()), rel=1e-4)
    assert rep["grid"]["quantity"].startswith("‖ΔW‖_F / ‖W0‖_F")
    blk = {b["block"]: b for b in rep["blocks"]}
    keys = [k for k in KEYS if ".down_blocks.0." in k]
    num = math.sqrt(sum(float(model.layers[k].delta(torch.float64).norm()) ** 2 for k in keys))
    den = math.sqrt(sum(float(weights[k + ".weight"].double().norm()) ** 2 for k in keys))
    assert blk["down.0"]["rel_strength"] == pytest.approx(num / den, rel=1e-4)


def test_base_mismatch_is_a_clear_error(tiny_sd1):
    weights = _tiny_weights(tiny_sd1)
    model = _lora_for(weights, KEYS[:2])
    wrong = model.layers[KEYS[0]]
    model.layers[KEYS[0]] = LoraLayer(kind="lora", weights={"up": torch.randn(77, 2), "down": wrong.down}, alpha=1.0)
    with pytest.raises(LorahubError, match="not for tiny-sd1"):
        ins.inspect_model(model, base=ins.open_base("tiny-sd1"), base_ref="tiny-sd1")
    # an SDXL-only key set has nothing in the SD1 model
    other = LoraModel(layers={"unet.down_blocks.2.attentions.5.transformer_blocks.9.attn1.to_q":
                              LoraLayer(kind="lora", weights={"up": torch.randn(8, 2), "down": torch.randn(2, 8)})})
    with pytest.raises(LorahubError, match="not for that model"):
        ins.inspect_model(other, base=ins.open_base("tiny-sd1"), base_ref="tiny-sd1")
    # partly missing: a warning, the rest reported
    model = _lora_for(weights, KEYS[:2])
    model.layers["unet.up_blocks.0.attentions.7.proj_in"] = LoraLayer(
        kind="lora", weights={"up": torch.randn(8, 2), "down": torch.randn(2, 8)})
    rep = ins.inspect_model(model, base=ins.open_base("tiny-sd1"), base_ref="tiny-sd1")
    assert any("not found in the base model" in w for w in rep["warnings"])
    assert sum(p["rel_strength"] is not None for p in rep["per_layer"]) == 2


def test_heatmap_png(tmp_path):
    from PIL import Image

    grid = {"rows": ["down.0", "mid", "up.1", "te.0", "te.1"], "cols": ["self-attn", "cross-attn", "ff/mlp"],
            "values": [[0.5, 1.0, None], [0.25, None, 2.0], [0.0, 1.5, 0.1], [0.3, None, 0.2], [0.1, None, 0.05]],
            "quantity": "‖ΔW‖_F"}
    out = heatmap.render(grid, tmp_path / "sub" / "h.png", title="test heat map")
    assert out.exists() and not list((tmp_path / "sub").glob(".lorahub-tmp-*"))
    img = Image.open(out).convert("RGB")
    assert img.width >= 420 and img.height >= 5 * 24
    colours = {c for _, c in img.getcolors(maxcolors=1 << 20)}
    assert heatmap.colour(1.0) in colours     # the largest cell (and the legend top)
    assert heatmap.colour(0.0) in colours     # the zero cell (and the legend bottom)
    assert heatmap.EMPTY in colours           # cells without a layer
    assert heatmap.colour(0.5) != heatmap.colour(0.6)
    # colours are ordered by luminance (readable in greyscale)
    lum = [0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] for c in (heatmap.colour(t / 10) for t in range(11))]
    assert lum == sorted(lum)
    # a real report's grid renders too, including an empty one
    assert heatmap.render({"rows": [], "cols": [], "values": [], "quantity": "x"}, tmp_path / "e.png").exists()
