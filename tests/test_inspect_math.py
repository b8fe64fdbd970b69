"""inspect's numbers against the materialised ΔW (torch.linalg.svdvals of LoraLayer.delta())."""

from __future__ import annotations

import math

import pytest
import torch

from lorahub.errors import LorahubError
from lorahub.formats.canonical import LoraLayer, LoraModel
from lorahub.linalg import lowrank
from lorahub.ops import inspect as ins

KEYS = {
    "q": "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "k2": "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "ff": "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "proj": "unet.down_blocks.0.attentions.0.proj_in",
    "conv": "unet.up_blocks.0.resnets.0.conv1",
    "tucker": "unet.down_blocks.1.resnets.0.conv2",
    "te": "text_encoder.text_model.encoder.layers.1.self_attn.q_proj",
    "te_mlp": "text_encoder.text_model.encoder.layers.0.mlp.fc1",
    "loha": "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v",
    "lokr": "unet.up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "full": "text_encoder_2.text_model.encoder.layers.0.mlp.fc2",
}


def lora(out, inp, r, alpha=None, *, k=None, dtype=torch.float32, gen=None, true_rank=None):
    g = gen or torch.Generator().manual_seed(out * 31 + inp * 7 + r)
    up = torch.randn(out, r, generator=g)
    down = torch.randn(r, inp if k is None else inp * k * k, generator=g)
    if true_rank is not None:  # rank-deficient: columns of up repeat
        up = up[:, :true_rank].repeat(1, math.ceil(r / true_rank))[:, :r]
    if k is not None:
        down = down.reshape(r, inp, k, k)
        up = up.reshape(out, r, 1, 1)
    return LoraLayer(kind="lora", weights={"up": up.to(dtype), "down": down.to(dtype)}, alpha=alpha)


def sample_model() -> LoraModel:
    g = torch.Generator().manual_seed(0)
    layers = {
        KEYS["q"]: lora(40, 40, 8, alpha=4.0),
        KEYS["k2"]: lora(64, 24, 4, alpha=1.0, dtype=torch.float16),
        KEYS["ff"]: lora(64, 160, 6, true_rank=2),
        KEYS["proj"]: lora(40, 40, 4, k=1),
        KEYS["conv"]: lora(32, 48, 5, alpha=2.5, k=3),
        KEYS["te"]: lora(32, 32, 16, alpha=8.0),
        KEYS["te_mlp"]: lora(64, 32, 3),
    }
    mid = torch.randn(4, 4, 3, 3, generator=g)
    layers[KEYS["tucker"]] = LoraLayer(kind="lora", weights={
        "up": torch.randn(24, 4, 1, 1, generator=g), "down": torch.randn(4, 16, 1, 1, generator=g), "mid": mid},
        alpha=2.0)
    layers[KEYS["loha"]] = LoraLayer(kind="loha", weights={
        "w1a": torch.randn(40, 4, generator=g), "w1b": torch.randn(4, 40, generator=g),
        "w2a": torch.randn(40, 4, generator=g), "w2b": torch.randn(4, 40, generator=g)},
        alpha=2.0, extra={"shape": (40, 40)})
    layers[KEYS["lokr"]] = LoraLayer(kind="lokr", weights={
        "w1": torch.randn(4, 4, generator=g), "w2a": torch.randn(32, 2, generator=g),
        "w2b": torch.randn(2, 10, generator=g)}, alpha=1.0, extra={"shape": (128, 40)})
    layers[KEYS["full"]] = LoraLayer(kind="full", weights={"diff": torch.randn(24, 48, generator=g) * 0.01})
    return LoraModel(layers=layers, base="sd1", source_format="kohya",
                     metadata={"ss_tag_frequency": '{"5_cat": {"cat": 5, "tabby": 2}, "2_dog": {"cat": 1, "dog": 4}}'})


def ref_svals(layer: LoraLayer) -> torch.Tensor:
    d = layer.delta(torch.float64)
    return torch.linalg.svdvals(d.reshape(d.shape[0], -1))


def ref_eff(S: torch.Tensor, energy: float) -> int:
    e = (S * S) / float((S * S).sum())
    total = 0.0
    for i, v in enumerate(e.tolist()):
        total += v
        if total >= energy - 1e-12:
            return i + 1
    return len(S)


def test_per_layer_numbers_match_materialised():
    model = sample_model()
    report = ins.inspect_model(model)
    per = {p["key"]: p for p in report["per_layer"]}
    assert set(per) == set(model.layers)
    for key, layer in model.layers.items():
        S = ref_svals(layer)
        p = per[key]
        assert p["fro"] == pytest.approx(float(torch.linalg.vector_norm(layer.delta(torch.float64))), rel=1e-4)
        assert p["spectral"] == pytest.approx(float(S[0]), rel=1e-4)
        assert p["eff_rank_90"] == ref_eff(S, 0.90), key
        assert p["eff_rank_99"] == ref_eff(S, 0.99), key
        assert p["rank"] == layer.rank and p["scale"] == pytest.approx(layer.scale)
        assert p["materialised"] == (layer.kind != "lora"), key
    # the rank-deficient layer: 6 stored ranks, ΔW has rank 2
    assert per[KEYS["ff"]]["rank"] == 6 and per[KEYS["ff"]]["eff_rank_99"] <= 2
    assert report["totals"]["fro"] == pytest.approx(
        math.sqrt(sum(float(torch.linalg.vector_norm(l.delta(torch.float64))) ** 2 for l in model.layers.values())),
        rel=1e-4)
    ranks = sorted(model.ranks())
    med = (ranks[len(ranks) // 2] + ranks[(len(ranks) - 1) // 2]) / 2
    assert report["rank"] == {"min": ranks[0], "median": med, "max": ranks[-1]}
    assert ranks[0] == 2 and ranks[-1] == 24  # LoKr w2 rank 2, full diff 24×48
    assert report["parameters"] == sum(l.parameter_count() for l in model.layers.values())


def test_plain_lora_layers_are_never_materialised(monkeypatch):
    from lorahub.formats import lycoris_math

    def boom(*a, **k):
        raise AssertionError("materialised a plain LoRA layer")

    monkeypatch.setattr(lycoris_math, "delta", boom)
    monkeypatch.setattr(lycoris_math, "lora_delta", boom)
    monkeypatch.setattr(LoraLayer, "delta", boom)
    model = sample_model()
    plain = LoraModel(layers={k: v for k, v in model.layers.items() if v.kind == "lora"})
    report = ins.inspect_model(plain)
    assert len(report["per_layer"]) == len(plain.layers)
    assert all(p["fro"] > 0 and not p["materialised"] for p in report["per_layer"])


def test_blocks_types_and_grid():
    model = sample_model()
    assert ins.block_of(KEYS["q"]) == "down.0" and ins.layer_type(KEYS["q"]) == "self-attn"
    assert ins.block_of(KEYS["ff"]) == "mid" and ins.layer_type(KEYS["ff"]) == "ff/mlp"
    assert ins.block_of(KEYS["k2"]) == "up.1" and ins.layer_type(KEYS["k2"]) == "cross-attn"
    assert ins.block_of(KEYS["te"]) == "te.1" and ins.layer_type(KEYS["te"]) == "self-attn"
    assert ins.block_of(KEYS["te_mlp"]) == "te.0" and ins.layer_type(KEYS["te_mlp"]) == "ff/mlp"
    assert ins.block_of(KEYS["full"]) == "te2.0"
    assert ins.block_of("text_encoder.encoder.layers.3.self_attn.k_proj") == "te.3"  # transformers-5 spelling
    assert ins.block_of("unet.conv_in") == "unet.other"
    assert ins.layer_type(KEYS["conv"]) == "resnet" and ins.layer_type(KEYS["proj"]) == "proj"
    report = ins.inspect_model(model)
    blocks = [b["block"] for b in report["blocks"]]
    assert blocks == ["down.0", "down.1", "mid", "up.0", "up.1", "te.0", "te.1", "te2.0"]
    # block totals are root-sum-squares of the materialised norms
    for b in report["blocks"]:
        keys = [k for k in model.layers if ins.block_of(k) == b["block"]]
        ref = math.sqrt(sum(float(torch.linalg.vector_norm(model.layers[k].delta(torch.float64))) ** 2 for k in keys))
        assert b["fro_total"] == pytest.approx(ref, rel=1e-4)
        assert b["layers"] == len(keys)
    g = report["grid"]
    r, c = g["rows"].index("up.1"), g["cols"].index("self-attn")
    assert g["values"][r][c] == pytest.approx(float(torch.linalg.vector_norm(model.layers[KEYS["loha"]].delta())), rel=1e-4)
    assert g["values"][g["rows"].index("mid")][g["cols"].index("proj")] is None


def test_layers_filter():
    model = sample_model()
    rep = ins.inspect_model(model, layers="unet.up_blocks.*")
    assert {p["key"] for p in rep["per_layer"]} == {k for k in model.layers if k.startswith("unet.up_blocks.")}
    assert rep["layers"] == len(model.layers) and rep["layers_shown"] == 4
    rep = ins.inspect_model(model, layers="attn2")
    assert [p["key"] for p in rep["per_layer"]] == [KEYS["k2"]]
    with pytest.raises(LorahubError, match="matches none"):
        ins.inspect_model(model, layers="nothing-like-this")


def test_metadata_summary():
    meta = {
        "ss_tag_frequency": '{"5_cat": {"cat": 5, "tabby": 2, " ": 9}, "2_dog": {"cat": 1, "dog": 4, "x": "bad"}}',
        "ss_dataset_dirs": '{"5_cat": {"n_repeats": 5, "img_count": 12}}',
        "ss_resolution": "(512, 512)", "ss_num_epochs": "10", "ss_learning_rate": "0.0001",
        "ss_unet_lr": "None", "ss_sd_model_name": "v1-5-pruned.safetensors", "ss_network_dim": "16",
    }
    s = ins.metadata_summary(meta)
    assert s["tags"] == [("cat", 6), ("dog", 4), ("tabby", 2)]
    assert s["datasets"] == [{"dir": "5_cat", "repeats": 5, "images": 12}]
    f = s["fields"]
    assert f["resolution"] == "(512, 512)" and f["epochs"] == "10" and f["learning_rate"] == "0.0001"
    assert f["base_model_name"] == "v1-5-pruned.safetensors" and "unet_lr" not in f
    # hostile / malformed metadata is ignored, not fatal
    s = ins.metadata_summary({"ss_tag_frequency": "{not json", "ss_dataset_dirs": "[1, 2]", "ss_datasets": "7"})
    assert s["tags"] == [] and s["datasets"] == []


def test_bad_layers_are_clear_errors():
    ok = lora(8, 8, 2)
    bad = LoraLayer(kind="lora", weights={"up": torch.randn(8, 3), "down": torch.randn(2, 8)})
    with pytest.raises(LorahubError, match="do not chain"):
        ins.inspect_model(LoraModel(layers={KEYS["q"]: ok, KEYS["te"]: bad}))
    zero = LoraLayer(kind="lora", weights={"up": torch.randn(8, 0), "down": torch.randn(0, 8)})
    with pytest.raises(LorahubError, match="rank 0"):
        ins.inspect_model(LoraModel(layers={KEYS["q"]: zero}))
    # a LoKr whose Kronecker product does not have the adapted weight's shape
    lokr = LoraLayer(kind="lokr", weights={"w1": torch.randn(4, 4), "w2a": torch.randn(8, 2), "w2b": torch.randn(2, 10)},
                     extra={"shape": (33, 40)})
    with pytest.raises(LorahubError, match="inconsistent factors"):
        ins.inspect_model(LoraModel(layers={KEYS["lokr"]: lokr}))
    # the error is raised even when --layers would not show the bad layer
    with pytest.raises(LorahubError, match="do not chain"):
        ins.inspect_model(LoraModel(layers={KEYS["q"]: ok, KEYS["te"]: bad}), layers="unet.")


def test_nonfinite_layers_warn_but_report():
    a = lora(8, 8, 2)
    b = lora(16, 8, 2)
    b.weights["up"][0, 0] = float("nan")
    c = lora(8, 16, 2)
    c.weights["down"][1, 3] = float("inf")
    rep = ins.inspect_model(LoraModel(layers={KEYS["q"]: a, KEYS["k2"]: b, KEYS["te"]: c}))
    per = {p["key"]: p for p in rep["per_layer"]}
    assert per[KEYS["q"]]["fro"] > 0 and per[KEYS["q"]]["finite"]
    assert per[KEYS["k2"]]["fro"] is None and not per[KEYS["k2"]]["finite"]
    assert not per[KEYS["te"]]["finite"]
    assert any("NaN/Inf" in w and "2 layer" in w for w in rep["warnings"])


def test_lowrank_gram_routines():
    g = torch.Generator().manual_seed(3)
    u, d = torch.randn(50, 6, generator=g), torch.randn(6, 30, generator=g)
    ref = torch.linalg.svdvals((u @ d).double() * 0.5)
    s = lowrank.gram_singular_values(u, d, 0.5)
    assert torch.allclose(s, ref[:6], rtol=1e-5)
    # rank-deficient and zero factors: no failure, zeros where they belong
    u2 = u.clone()
    u2[:, 5] = u2[:, 0]
    s2 = lowrank.gram_singular_values(u2, d)
    ref2 = torch.linalg.svdvals((u2 @ d).double())
    assert torch.allclose(s2[:5], ref2[:5], rtol=1e-5) and float(s2[5]) < 1e-3 * float(s2[0])
    assert float(lowrank.gram_singular_values(torch.zeros(50, 6), d).max()) == 0.0
    # inner product and cosine of factored matrices, different ranks
    u3, d3 = torch.randn(50, 3, generator=g), torch.randn(3, 30, generator=g)
    A, B = 2.0 * (u.double() @ d.double()), -0.5 * (u3.double() @ d3.double())
    assert lowrank.inner_product(u, d, u3, d3, 2.0, -0.5) == pytest.approx(float((A * B).sum()), rel=1e-9)
    cos = float((A * B).sum() / (A.norm() * B.norm()))
    assert lowrank.cosine_similarity(u, d, u3, d3, 2.0, -0.5) == pytest.approx(cos, rel=1e-9)
    assert lowrank.cosine_similarity(u, d, torch.zeros(50, 2), d3[:2]) is None
    with pytest.raises(ValueError):
        lowrank.inner_product(u, d, u3[:40], d3)
    q = torch.linalg.qr(torch.randn(20, 4, generator=g)).Q
    assert lowrank.subspace_overlap(q, q[:, :2]) == pytest.approx(1.0)
    e = torch.eye(20, dtype=torch.float64)
    assert lowrank.subspace_overlap(e[:, :3], e[:, 3:6]) == 0.0


def test_embeddings_reported_with_vector_norms():
    g = torch.Generator().manual_seed(5)
    e1, e2 = torch.randn(3, 32, generator=g), torch.randn(3, 64, generator=g)
    m = LoraModel(embeddings={"<tok>": {"clip_l": e1, "clip_g": e2}}, base="sdxl")
    rep = ins.inspect_model(m)
    assert rep["kind"] == "textual-inversion" and rep["layers"] == 0 and rep["per_layer"] == []
    assert rep["parameters"] == e1.numel() + e2.numel()
    got = rep["embeddings"]["<tok>"]
    assert got["clip_l"]["shape"] == [3, 32]
    assert got["clip_g"]["norms"] == pytest.approx(e2.double().norm(dim=1).tolist(), rel=1e-9)
