"""lorahub resize: factor-only rank reduction, checked against SVDs of the materialised ΔW."""

from __future__ import annotations

import json

import pytest
import torch

from lorahub.errors import LorahubError
from lorahub.formats.canonical import LoraLayer, LoraModel
from lorahub.linalg import lowrank
from lorahub.ops.resize import ResizeOptions, resize, resize_layer


def _delta(layer: LoraLayer) -> torch.Tensor:
    up = layer.up.double().reshape(layer.up.shape[0], -1)
    down = layer.down.double().reshape(layer.rank, -1)
    return up @ down * layer.scale


def _random_model(seed=0) -> LoraModel:
    g = torch.Generator().manual_seed(seed)
    m = LoraModel(base="sd1")
    m.layers["unet.a.to_q"] = LoraLayer("lora", {"down": torch.randn(8, 40, generator=g),
                                                 "up": torch.randn(30, 8, generator=g)}, alpha=4.0)
    m.layers["unet.b.conv1"] = LoraLayer("lora", {"down": torch.randn(6, 5, 3, 3, generator=g),
                                                  "up": torch.randn(7, 6, 1, 1, generator=g)}, alpha=3.0)
    # rank larger than the layer's own size (out = 3): only 3 singular values exist
    m.layers["unet.c.small"] = LoraLayer("lora", {"down": torch.randn(5, 16, generator=g),
                                                  "up": torch.randn(3, 5, generator=g)}, alpha=None)
    return m


def _with_singular_values(S: list[float], out=12, inn=10, alpha=None, seed=1) -> LoraLayer:
    g = torch.Generator().manual_seed(seed)
    r = len(S)
    U = torch.linalg.qr(torch.randn(out, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(inn, r, generator=g, dtype=torch.float64))[0]
    s = torch.tensor(S, dtype=torch.float64)
    # put everything in up so that the factors are not already balanced
    return LoraLayer("lora", {"down": V.T.contiguous(), "up": (U * s).contiguous()}, alpha=alpha)


def test_full_rank_resize_is_lossless():
    m = _random_model()
    res = resize(m, ResizeOptions(rank=1000))
    for name, old in m.layers.items():
        new = res.model.layers[name]
        assert new.rank == min(old.rank, old.up.shape[0], old.down[0].numel())
        ref = _delta(old)
        assert torch.allclose(_delta(new), ref, atol=1e-5 * float(ref.abs().max()))
        assert new.up.dim() == old.up.dim() and new.down.shape[1:] == old.down.shape[1:]
    assert res.retained == pytest.approx(1.0, abs=1e-12)
    assert any("fewer than 1000" in n for n in res.notes)


def test_fixed_rank_matches_truncated_svd_and_keeps_strength():
    m = _random_model(3)
    res = resize(m, ResizeOptions(rank=2))
    for name, old in m.layers.items():
        new = res.model.layers[name]
        ref = _delta(old)
        U, S, Vh = torch.linalg.svd(ref, full_matrices=False)
        trunc = (U[:, :2] * S[:2]) @ Vh[:2]
        assert torch.allclose(_delta(new), trunc, atol=1e-4 * float(S[0]))
        # strength kept: alpha / rank is the old scale
        assert new.scale == pytest.approx(old.scale)
        rep = next(r for r in res.layers if r.name == name)
        assert rep.retained == pytest.approx(lowrank.retained(S, 2), rel=1e-6)
        # √S split: both factors have the same singular values
        sv_up = torch.linalg.svdvals(new.up.double().reshape(new.up.shape[0], -1))
        sv_down = torch.linalg.svdvals(new.down.double().reshape(2, -1))
        assert torch.allclose(sv_up, sv_down, rtol=1e-5)


S4 = [4.0, 2.0, 1.0, 0.5]          # energies: 16, 4, 1, 0.25 (total 21.25)


@pytest.mark.parametrize("crit,expected", [
    ({"energy": 16 / 21.25}, 1),               # exactly met by k=1: smallest k, not k+1
    ({"energy": 16 / 21.25 + 1e-6}, 2),
    ({"energy": 20 / 21.25}, 2),
    ({"energy": 20 / 21.25 + 1e-6}, 3),
    ({"energy": 1.0}, 4),
    ({"sv_fro": (20 / 21.25) ** 0.5}, 2),
    ({"sv_fro": (21 / 21.25) ** 0.5 + 1e-6}, 4),
    ({"sv_ratio": 4.0}, 3),                    # keeps σ ≥ σ₀/4 = 1.0 (inclusive)
    ({"sv_ratio": 3.99}, 2),
    ({"sv_ratio": 1000.0}, 4),                 # capped by the layer's own singular values
])
def test_dynamic_rank_is_exactly_the_smallest_k(crit, expected):
    layer = _with_singular_values(S4, alpha=8.0)
    new, rep = resize_layer(layer, ResizeOptions(**crit))
    assert new.rank == rep.new_rank == expected
    full = _delta(layer)
    S = torch.linalg.svdvals(full)
    assert rep.retained == pytest.approx(lowrank.retained(S, expected), rel=1e-9)


def test_dynamic_rank_with_cap():
    layer = _with_singular_values(S4)
    new, _ = resize_layer(layer, ResizeOptions(energy=1.0, rank=2))
    assert new.rank == 2


def test_lycoris_layer_is_materialised():
    g = torch.Generator().manual_seed(5)
    loha = LoraLayer("loha", {"w1a": torch.randn(10, 2, generator=g), "w1b": torch.randn(2, 12, generator=g),
                              "w2a": torch.randn(10, 2, generator=g), "w2b": torch.randn(2, 12, generator=g)},
                     alpha=2.0, extra={"shape": (10, 12)})
    ref = loha.delta(torch.float64)
    new, rep = resize_layer(loha, ResizeOptions(rank=4))   # Hadamard product of two rank-2: rank ≤ 4
    assert rep.how == "materialised" and new.kind == "lora"
    assert torch.allclose(_delta(new), ref, atol=1e-4 * float(ref.abs().max()))


def test_bad_options():
    m = _random_model()
    with pytest.raises(LorahubError):
        resize(m, ResizeOptions())
    with pytest.raises(LorahubError):
        resize(m, ResizeOptions(energy=0.9, sv_ratio=2))
    with pytest.raises(LorahubError):
        resize(m, ResizeOptions(energy=1.5))
    with pytest.raises(LorahubError):
        resize(LoraModel(), ResizeOptions(rank=2))


def test_cli_resize_file_and_registry(tmp_path, home, cli):
    from lorahub.formats.io import load_lora, save_lora
    from lorahub.registry import Registry

    # a real tiny-sd1 LoRA: attention layers at rank 6 with alpha 3
    from lorahub.formats.names import get_arch

    from lorahub.tiny_loras import random_lora

    arch = get_arch("tiny-sd1")
    m = random_lora({name: shape for name, shape in arch.modules.items()
                     if name.startswith("unet.") and ".attn" in name and len(shape) == 2}, 0, 6, 3.0)
    src = save_lora(m, tmp_path / "src.safetensors", dialect="kohya")
    reg = Registry.open(home)
    entry, _ = reg.add_file(src, name="srclora", type="style")
    out = tmp_path / "small.safetensors"
    r = cli("resize", "srclora", "--rank", "2", "--out", str(out), "--register", "--json", home=home)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    back = load_lora(out)
    assert set(back.layers) == set(m.layers)
    for name, layer in back.layers.items():
        assert layer.rank == 2 and layer.scale == pytest.approx(0.5)
        ref = _delta(m.layers[name])
        U, S, Vh = torch.linalg.svd(ref, full_matrices=False)
        assert torch.allclose(_delta(layer), (U[:, :2] * S[:2]) @ Vh[:2], atol=1e-4 * float(S[0]))
    reg = Registry.open(home)
    lin = reg.lineage(rep["registered"]["id"])
    assert [x["relation"] for x in lin] == ["resized-from"] and lin[0]["parent"] == entry["id"]
    assert reg.get(rep["registered"]["id"])["type"] == "style"
    # per-layer + overall report; energies add up
    tot = sum(float((_delta(l) ** 2).sum()) for l in m.layers.values())
    kept = sum(float((_delta(l) ** 2).sum()) for l in back.layers.values())
    assert rep["frobenius_retained"] == pytest.approx((kept / tot) ** 0.5, rel=1e-4)
    # a bad rank: one-line error, exit 2
    r = cli("resize", str(src), "--rank", "0", home=home)
    assert r.returncode == 2 and "Traceback" not in r.stderr
