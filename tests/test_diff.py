"""`diff`: cosine similarity, norm ratio and subspace overlap against the materialised updates."""

from __future__ import annotations

import pytest
import torch

from lorahub.errors import LorahubError
from lorahub.formats.canonical import LoraLayer, LoraModel
from lorahub.ops.diff import diff_models

Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
V = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"
TE = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
CONV = "unet.up_blocks.0.resnets.0.conv1"


def rnd(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def ll(up, down, alpha=None):
    return LoraLayer(kind="lora", weights={"up": up, "down": down}, alpha=alpha)


def flat(layer):
    d = layer.delta(torch.float64)
    return d.reshape(d.shape[0], -1)


def test_cosine_and_ratio_match_materialised():
    a = LoraModel(layers={
        Q: ll(rnd(40, 8, seed=1), rnd(8, 40, seed=2), alpha=4.0),
        K: ll(rnd(40, 4, seed=3), rnd(4, 24, seed=4)),
        CONV: ll(rnd(32, 4, 1, 1, seed=5), rnd(4, 16, 3, 3, seed=6), alpha=1.0),
        TE: ll(rnd(32, 4, seed=7), rnd(4, 32, seed=8)),
    })
    # B shares Q (correlated with A), K (independent), CONV (different rank, half-shared), misses TE, adds V
    up_q = a.layers[Q].up[:, :4] + 0.3 * rnd(40, 4, seed=9)
    b = LoraModel(layers={
        Q: ll(up_q, a.layers[Q].down[:4].clone(), alpha=2.0),
        K: ll(rnd(40, 6, seed=10), rnd(6, 24, seed=11), alpha=3.0),
        CONV: ll(torch.cat([a.layers[CONV].up[:, :2], rnd(32, 4, 1, 1, seed=12)], 1),
                 torch.cat([a.layers[CONV].down[:2], rnd(4, 16, 3, 3, seed=13)], 0)),
        V: ll(rnd(40, 2, seed=14), rnd(2, 40, seed=15)),
    })
    res = diff_models(a, b)
    per = {p["key"]: p for p in res["per_layer"]}
    assert set(per) == {Q, K, CONV}
    assert res["only_a"] == [TE] and res["only_b"] == [V]
    inner = ea = eb = 0.0
    for key in (Q, K, CONV):
        A, B = flat(a.layers[key]), flat(b.layers[key])
        na, nb = float(A.norm()), float(B.norm())
        cos = float((A * B).sum()) / (na * nb)
        assert per[key]["status"] == "ok"
        assert per[key]["cosine"] == pytest.approx(cos, abs=1e-6)
        assert per[key]["norm_ratio"] == pytest.approx(nb / na, rel=1e-6)
        assert not per[key]["materialised"]
        inner += float((A * B).sum())
        ea += na * na
        eb += nb * nb
        # subspace overlap against an SVD of the materialised matrices
        Ua, Sa, Vha = torch.linalg.svd(A, full_matrices=False)
        Ub, Sb, Vhb = torch.linalg.svd(B, full_matrices=False)
        ka, kb = per[key]["k_a"], per[key]["k_b"]
        ov = float(((Ua[:, :ka].T @ Ub[:, :kb]) ** 2).sum()) / min(ka, kb)
        assert per[key]["overlap_out"] == pytest.approx(ov, abs=1e-6)
        ov_in = float(((Vha[:ka] @ Vhb[:kb].T) ** 2).sum()) / min(ka, kb)
        assert per[key]["overlap_in"] == pytest.approx(ov_in, abs=1e-6)
    assert per[Q]["cosine"] > 0.5 and abs(per[K]["cosine"]) < 0.3
    s = res["summary"]
    assert s["cosine"] == pytest.approx(inner / (ea * eb) ** 0.5, abs=1e-6)
    assert s["norm_ratio"] == pytest.approx((eb / ea) ** 0.5, rel=1e-6)
    assert s["common"] == 3 and s["only_a"] == 1 and s["only_b"] == 1
    ea_te = float(flat(a.layers[TE]).norm()) ** 2
    assert s["energy_a_shared"] == pytest.approx(ea / (ea + ea_te), rel=1e-5)


def test_identical_negated_and_scaled():
    a = LoraModel(layers={Q: ll(rnd(40, 8, seed=1), rnd(8, 40, seed=2)), K: ll(rnd(40, 4, seed=3), rnd(4, 24, seed=4))})
    s = diff_models(a, a)["summary"]
    assert s["cosine"] == pytest.approx(1.0) and s["overlap"] == pytest.approx(1.0) and s["norm_ratio"] == pytest.approx(1.0)
    assert s["verdict"].startswith("strongly aligned")
    neg = LoraModel(layers={k: ll(-3 * v.up, v.down) for k, v in a.layers.items()})
    s = diff_models(a, neg)["summary"]
    assert s["cosine"] == pytest.approx(-1.0) and s["norm_ratio"] == pytest.approx(3.0)
    assert "opposite" in s["verdict"]


def test_orthogonal_vs_same_subspace_different_mix():
    n = 64
    e = torch.eye(n)
    u1, u2, u3, u4 = e[:, 0:1], e[:, 1:2], e[:, 10:11], e[:, 11:12]
    v1, v2, v3, v4 = e[0:1], e[1:2], e[20:21], e[21:22]
    A = LoraModel(layers={Q: ll(torch.cat([u1, u2], 1), torch.cat([v1, v2], 0))})          # u1v1ᵀ + u2v2ᵀ
    B_orth = LoraModel(layers={Q: ll(torch.cat([u3, u4], 1), torch.cat([v3, v4], 0))})     # disjoint directions
    B_mix = LoraModel(layers={Q: ll(torch.cat([u1, u2], 1), torch.cat([v2, v1], 0))})      # u1v2ᵀ + u2v1ᵀ
    s = diff_models(A, B_orth)["summary"]
    assert s["cosine"] == pytest.approx(0.0, abs=1e-9) and s["overlap"] == pytest.approx(0.0, abs=1e-9)
    assert s["verdict"].startswith("independent")
    s = diff_models(A, B_mix)["summary"]
    assert s["cosine"] == pytest.approx(0.0, abs=1e-9) and s["overlap"] == pytest.approx(1.0)
    assert s["verdict"].startswith("same directions")
    assert s["chance"] == pytest.approx(2 / n)


def test_lycoris_layers_materialised_and_shape_mismatch():
    g = torch.Generator().manual_seed(0)
    loha = LoraLayer(kind="loha", weights={"w1a": torch.randn(40, 2, generator=g), "w1b": torch.randn(2, 40, generator=g),
                                           "w2a": torch.randn(40, 2, generator=g), "w2b": torch.randn(2, 40, generator=g)},
                     alpha=1.0, extra={"shape": (40, 40)})
    plain = ll(rnd(40, 4, seed=1), rnd(4, 40, seed=2))
    a = LoraModel(layers={Q: loha, K: ll(rnd(40, 2, seed=3), rnd(2, 24, seed=4))})
    b = LoraModel(layers={Q: plain, K: ll(rnd(40, 2, seed=3), rnd(2, 32, seed=4))})
    res = diff_models(a, b)
    per = {p["key"]: p for p in res["per_layer"]}
    A, B = flat(loha), flat(plain)
    assert per[Q]["materialised"] and per[Q]["cosine"] == pytest.approx(float((A * B).sum() / (A.norm() * B.norm())), abs=1e-9)
    assert per[K]["status"] == "shape-mismatch" and per[K]["cosine"] is None
    assert res["summary"]["shape_mismatch"] == 1


def test_no_common_layers_and_bad_layers():
    a = LoraModel(layers={Q: ll(rnd(40, 2, seed=1), rnd(2, 40, seed=2))})
    b = LoraModel(layers={TE: ll(rnd(32, 2, seed=3), rnd(2, 32, seed=4))})
    s = diff_models(a, b)["summary"]
    assert s["common"] == 0 and "disjoint" in s["verdict"]
    bad = LoraModel(layers={Q: ll(rnd(40, 3, seed=1), rnd(2, 40, seed=2))})
    with pytest.raises(LorahubError, match="do not chain"):
        diff_models(a, bad)
    nan = LoraModel(layers={Q: ll(torch.full((40, 2), float("nan")), rnd(2, 40, seed=2))})
    res = diff_models(a, nan)
    assert res["per_layer"][0]["status"] == "nonfinite" and res["summary"]["nonfinite"] == 1


def test_factored_pairs_never_materialise(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("materialised")

    monkeypatch.setattr(LoraLayer, "delta", boom)
    a = LoraModel(layers={Q: ll(rnd(40, 8, seed=1), rnd(8, 40, seed=2)), TE: ll(rnd(32, 4, seed=7), rnd(4, 32, seed=8))})
    b = LoraModel(layers={Q: ll(rnd(40, 3, seed=5), rnd(3, 40, seed=6))})
    res = diff_models(a, b)
    assert res["per_layer"][0]["status"] == "ok" and res["summary"]["energy_a_shared"] < 1.0
