"""Merge math on canonical LoraModel objects, against materialised references."""

from __future__ import annotations

import math

import pytest
import torch

from lorahub.errors import LorahubError
from lorahub.formats.canonical import LoraLayer, LoraModel
from lorahub.tiny_loras import random_lora
from lorahub.ops.merge import MergeInput, exact_delta, merge

# Real module names and shapes of the tiny SD1 UNet / text encoder (see lorahub/tiny.py configs).
LINEAR = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj": (256, 32),
    "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k": (64, 32),
    "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2": (64, 256),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (32, 32),
}
CONV = {
    "unet.down_blocks.0.attentions.0.proj_in": (32, 32, 1, 1),
    "unet.up_blocks.0.resnets.0.conv1": (64, 128, 3, 3),
}


def rand_layer(shape, r, alpha, gen, tucker=False):
    out, inn = shape[0], shape[1]
    if len(shape) == 4:
        kh, kw = shape[2:]
        if tucker:
            w = {"down": torch.randn(r, inn, 1, 1, generator=gen), "up": torch.randn(out, r, 1, 1, generator=gen),
                 "mid": torch.randn(r, r, kh, kw, generator=gen)}
            w["down"] = w["down"].reshape(r, inn, 1, 1)
        else:
            w = {"down": torch.randn(r, inn, kh, kw, generator=gen), "up": torch.randn(out, r, 1, 1, generator=gen)}
    else:
        w = {"down": torch.randn(r, inn, generator=gen), "up": torch.randn(out, r, generator=gen)}
    return LoraLayer(kind="lora", weights=w, alpha=alpha)


def rand_model(seed, rank, keys=None, alpha=None, base="sd1"):
    layers = {k: s for k, s in {**LINEAR, **CONV}.items() if keys is None or k in keys}
    return random_lora(layers, seed, rank, alpha, scale=1.0, base=base)


def inputs_mixed():
    a = rand_model(1, 4, alpha=2.0)
    b = rand_model(2, 8, alpha=None, keys=list(LINEAR)[:3] + list(CONV)[:1])  # layers in only some inputs
    c = rand_model(3, 2, alpha=1.0, keys=list(LINEAR)[1:])
    return [MergeInput(a, 0.8, label="a"), MergeInput(b, -0.6, label="b"), MergeInput(c, 1.3, label="c")]


@pytest.mark.parametrize("method", ["concat", "svd"])
def test_full_rank_equals_weighted_sum(method):
    inputs = inputs_mixed()
    res = merge(inputs, method=method, rank=1000)
    keys = set(LINEAR) | set(CONV)
    assert set(res.model.layers) == keys
    for key in keys:
        ref = exact_delta(inputs, key)
        got = res.model.layers[key].delta(dtype=torch.float64)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())
    if method == "concat":
        # ranks add up over the inputs that adapt the layer
        key = list(LINEAR)[1]
        assert res.model.layers[key].rank == 4 + 8 + 2
    assert res.retained == pytest.approx(1.0, abs=1e-6)


def test_svd_is_best_rank_r_approximation():
    inputs = inputs_mixed()
    r = 5
    res = merge(inputs, method="svd", rank=r)
    tot_ref, kept_ref = 0.0, 0.0
    for key, layer in res.model.layers.items():
        ref = exact_delta(inputs, key).reshape(layer.shape[0], -1)
        u, s, vh = torch.linalg.svd(ref, full_matrices=False)
        best = (u[:, :r] * s[:r]) @ vh[:r]
        got = layer.delta(dtype=torch.float64).reshape(ref.shape)
        assert layer.rank == min(r, (s > 1e-9 * s[0]).sum().item())
        torch.testing.assert_close(got, best, rtol=1e-6, atol=1e-8 * s[0].item())
        # Eckart–Young error and the reported retained fraction
        rep = next(x for x in res.layers if x.key == key)
        err = torch.linalg.norm(ref - got).item() / torch.linalg.norm(ref).item()
        assert rep.rel_error == pytest.approx(err, rel=1e-5, abs=1e-6)  # output factors are fp32
        assert rep.retained == pytest.approx(math.sqrt((s[:r] ** 2).sum().item() / (s ** 2).sum().item()), rel=1e-9)
        tot_ref += (s ** 2).sum().item()
        kept_ref += (s[:r] ** 2).sum().item()
    assert res.retained == pytest.approx(math.sqrt(kept_ref / tot_ref), rel=1e-9)
    assert 0.0 < res.retained < 1.0


def test_conv_layers_keep_conv_shape_and_tucker_folds_exactly():
    gen = torch.Generator().manual_seed(7)
    key = "unet.up_blocks.0.resnets.0.conv1"
    a = LoraModel(base="sd1", layers={key: rand_layer(CONV[key], 3, 1.5, gen, tucker=True)})
    b = LoraModel(base="sd1", layers={key: rand_layer(CONV[key], 4, None, gen)})
    inputs = [MergeInput(a, 0.5), MergeInput(b, 0.7)]
    for method in ("concat", "svd"):
        res = merge(inputs, method=method, rank=7)
        layer = res.model.layers[key]
        assert layer.down.shape == (7, 128, 3, 3) and layer.up.shape == (64, 7, 1, 1)
        torch.testing.assert_close(layer.delta(torch.float64), exact_delta(inputs, key), rtol=1e-6, atol=1e-6)


def test_negative_weight_subtracts_a_concept():
    a = rand_model(1, 4)
    res = merge([MergeInput(a, 1.0), MergeInput(a, -1.0)], method="svd", rank=4)
    for rep in res.layers:
        assert rep.norm == pytest.approx(0.0, abs=1e-8)
    for layer in res.model.layers.values():
        assert layer.delta(torch.float64).abs().max().item() < 1e-6


def test_sum_method_same_rank_only_and_reports_its_error():
    a, b = rand_model(1, 4, alpha=4.0), rand_model(2, 4, alpha=2.0)
    inputs = [MergeInput(a, 0.7), MergeInput(b, 0.4)]
    res = merge(inputs, method="sum")
    for rep in res.layers:
        layer = res.model.layers[rep.key]
        assert layer.rank == 4
        ref = exact_delta(inputs, rep.key)
        got = layer.delta(torch.float64).reshape(ref.shape)
        err = (torch.linalg.norm(got - ref) / torch.linalg.norm(ref)).item()
        assert rep.rel_error == pytest.approx(err, rel=1e-6)
        assert err > 1e-3  # factor mixing is not the exact sum: the report must say so
    # a single input is exact
    res1 = merge([MergeInput(a, -0.7)], method="sum")
    assert res1.rel_error < 1e-6  # factored norm of a difference: ~sqrt(eps) floor
    with pytest.raises(LorahubError, match="same rank"):
        merge([MergeInput(a, 1), MergeInput(rand_model(3, 8), 1)], method="sum")
    with pytest.raises(LorahubError, match="missing"):
        merge([MergeInput(a, 1), MergeInput(rand_model(3, 4, keys=list(LINEAR)), 1)], method="sum")


def test_parts_filter_and_family_check():
    a, b = rand_model(1, 4), rand_model(2, 4)
    res = merge([MergeInput(a, 1.0, parts=["unet"]), MergeInput(b, 1.0, parts=["unet.*attn*"])], method="concat")
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert te not in res.model.layers
    ff = "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"
    assert res.model.layers[ff].rank == 4  # only a contributes
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert res.model.layers[q].rank == 8
    with pytest.raises(LorahubError, match="different base families"):
        merge([MergeInput(a, 1, label="a"), MergeInput(rand_model(3, 4, base="sdxl"), 1, label="x")], method="concat")
    with pytest.raises(LorahubError, match="recipe's base"):
        merge([MergeInput(a, 1)], method="concat", base="sdxl")
    with pytest.raises(LorahubError, match="needs a rank"):
        merge([MergeInput(a, 1)], method="svd")


def test_loha_layer_is_materialised_exactly():
    gen = torch.Generator().manual_seed(5)
    key = list(LINEAR)[0]
    loha = LoraLayer(kind="loha", alpha=2.0, extra={"shape": (32, 32)},
                     weights={"w1a": torch.randn(32, 2, generator=gen), "w1b": torch.randn(2, 32, generator=gen),
                              "w2a": torch.randn(32, 2, generator=gen), "w2b": torch.randn(2, 32, generator=gen)})
    inputs = [MergeInput(LoraModel(layers={key: loha}), 0.5), MergeInput(rand_model(1, 4, keys=[key]), 1.0)]
    res = merge(inputs, method="concat")
    assert res.layers[0].materialised
    torch.testing.assert_close(res.model.layers[key].delta(torch.float64), exact_delta(inputs, key),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rank", [float("nan"), float("inf"), 0, 2.5])
def test_merge_refuses_a_rank_that_is_not_a_whole_number(rank):
    model = random_lora({"unet.down_blocks.0.attentions.0.proj_in": (8, 8)}, rank=2)
    with pytest.raises(LorahubError, match="rank"):
        merge([MergeInput(model, 1.0)], method="svd", rank=rank)
