"""LyCORIS layers read from kohya-named files: ΔW against explicit sums (Tucker conventions included)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lorahub.formats.detect import detect
from lorahub.formats.io import load_lora, save_lora

CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # tiny-sd1: Conv2d(32, 32, 3x3)
CANON = "unet.down_blocks.0.resnets.0.conv1"
OUT, IN, K = 32, 32, 3
R = 3


def _g(seed=0):
    g = torch.Generator().manual_seed(seed)
    return lambda *s: torch.randn(*s, generator=g)


def _tucker_ref(t, wa, wb):
    """Σ_ab t[a, b, h, w] · wa[a, o] · wb[b, i], summed term by term (wa, wb stored rank-first)."""
    out = torch.zeros(wa.shape[1], wb.shape[1], *t.shape[2:])
    for a in range(t.shape[0]):
        for b in range(t.shape[1]):
            out += torch.outer(wa[a], wb[b])[:, :, None, None] * t[a, b][None, None]
    return out


def _save(tmp_path, tensors, name="x.safetensors"):
    p = tmp_path / name
    save_file(tensors, str(p), metadata={"ss_base_model_version": "sd_v1"})
    return p


def test_loha_tucker_conv(tmp_path):
    r = _g(1)
    t = {f"{CONV}.hada_t1": r(R, R, K, K), f"{CONV}.hada_w1_a": r(R, OUT), f"{CONV}.hada_w1_b": r(R, IN),
         f"{CONV}.hada_t2": r(R, R, K, K), f"{CONV}.hada_w2_a": r(R, OUT), f"{CONV}.hada_w2_b": r(R, IN),
         f"{CONV}.alpha": torch.tensor(1.5)}
    p = _save(tmp_path, t)
    d = detect(p)
    assert (d.kind, d.rank, d.alpha) == ("loha", R, 1.5)
    layer = load_lora(p).layers[CANON]
    want = (_tucker_ref(t[f"{CONV}.hada_t1"], t[f"{CONV}.hada_w1_a"], t[f"{CONV}.hada_w1_b"])
            * _tucker_ref(t[f"{CONV}.hada_t2"], t[f"{CONV}.hada_w2_a"], t[f"{CONV}.hada_w2_b"]) * (1.5 / R))
    torch.testing.assert_close(layer.delta(), want, rtol=1e-5, atol=1e-5)


def test_loha_plain_conv_and_round_trip(tmp_path):
    r = _g(2)
    t = {f"{CONV}.hada_w1_a": r(OUT, R), f"{CONV}.hada_w1_b": r(R, IN * K * K),
         f"{CONV}.hada_w2_a": r(OUT, R), f"{CONV}.hada_w2_b": r(R, IN * K * K), f"{CONV}.alpha": torch.tensor(2.0)}
    p = _save(tmp_path, t)
    layer = load_lora(p).layers[CANON]
    want = ((t[f"{CONV}.hada_w1_a"] @ t[f"{CONV}.hada_w1_b"]) * (t[f"{CONV}.hada_w2_a"] @ t[f"{CONV}.hada_w2_b"])
            * (2.0 / R)).reshape(OUT, IN, K, K)
    torch.testing.assert_close(layer.delta(), want)
    back = save_lora(load_lora(p), tmp_path / "b.safetensors", "kohya")
    from safetensors.torch import load_file

    got = load_file(str(back))
    assert set(got) == set(t) and all(torch.equal(got[k], t[k]) for k in t)


def test_lokr_tucker_conv(tmp_path):
    r = _g(3)
    f1o, f1i = 4, 2  # w1 (4, 2) full; w2 (8, 16, 3, 3) from Tucker factors
    t = {f"{CONV}.lokr_w1": r(f1o, f1i), f"{CONV}.lokr_t2": r(R, R, K, K),
         f"{CONV}.lokr_w2_a": r(R, OUT // f1o), f"{CONV}.lokr_w2_b": r(R, IN // f1i),
         f"{CONV}.alpha": torch.tensor(3.0)}
    p = _save(tmp_path, t)
    assert detect(p).rank == R
    layer = load_lora(p).layers[CANON]
    assert layer.rank == R
    w2 = _tucker_ref(t[f"{CONV}.lokr_t2"], t[f"{CONV}.lokr_w2_a"], t[f"{CONV}.lokr_w2_b"])
    want = torch.zeros(OUT, IN, K, K)
    w1 = t[f"{CONV}.lokr_w1"]
    for a in range(f1o):
        for b in range(f1i):
            want[a * w2.shape[0]:(a + 1) * w2.shape[0], b * w2.shape[1]:(b + 1) * w2.shape[1]] = w1[a, b] * w2
    torch.testing.assert_close(layer.delta(), want * (3.0 / R), rtol=1e-5, atol=1e-5)


def test_locon_tucker_mid(tmp_path):
    r = _g(4)
    t = {f"{CONV}.lora_down.weight": r(R, IN, 1, 1), f"{CONV}.lora_mid.weight": r(R, R, K, K),
         f"{CONV}.lora_up.weight": r(OUT, R, 1, 1), f"{CONV}.alpha": torch.tensor(1.0)}
    p = _save(tmp_path, t)
    assert detect(p).kind == "locon"
    layer = load_lora(p).layers[CANON]
    want = _tucker_ref(t[f"{CONV}.lora_mid.weight"], t[f"{CONV}.lora_up.weight"].flatten(1).T,
                       t[f"{CONV}.lora_down.weight"].flatten(1)) / R
    torch.testing.assert_close(layer.delta(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="Tucker"):
        save_lora(load_lora(p), tmp_path / "d.safetensors", "diffusers")


def test_dora_weight_per_input_and_per_output():
    from lorahub.formats.canonical import LoraLayer
    from lorahub.formats.lycoris_math import dora_weight

    r = _g(5)
    w0, down, up = r(6, 5), r(2, 5), r(6, 2)
    for scale_shape in ((1, 5), (6, 1)):
        m = r(*scale_shape).abs() + 0.5
        layer = LoraLayer("lora", {"down": down, "up": up}, alpha=1.0, dora_scale=m)
        w = w0 + 0.7 * (up @ down) * 0.5
        want = torch.empty_like(w)
        for o in range(6):
            for i in range(5):
                if scale_shape == (1, 5):
                    want[o, i] = m[0, i] * w[o, i] / w[:, i].norm()
                else:
                    want[o, i] = m[o, 0] * w[o, i] / w[o, :].norm()
        torch.testing.assert_close(dora_weight(layer, w0, multiplier=0.7), want)
