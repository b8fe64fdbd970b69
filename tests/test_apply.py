"""LoraBranch side branches: per-sample α against materialised W0 + α·ΔW, every layer kind."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorahub.errors import LorahubError
from lorahub.formats.canonical import LoraLayer, LoraModel
from lorahub.ops.apply import LoraBranch, apply_loras


class Holder:
    """A stand-in pipeline: any object with a ``unet`` (and text encoder) attribute."""

    def __init__(self, unet, text_encoder=None):
        self.unet = unet
        self.text_encoder = text_encoder


def _net():
    torch.manual_seed(0)
    return nn.ModuleDict({
        "lin": nn.Linear(12, 10),
        "conv": nn.Conv2d(6, 8, 3, padding=1, stride=2),
        "pw": nn.Conv2d(6, 5, 1),
        "seq": nn.Sequential(nn.Linear(10, 7)),
    })


def _reference(module: nn.Module, delta: torch.Tensor, x: torch.Tensor, alphas: list[float]) -> torch.Tensor:
    outs = []
    for i, a in enumerate(alphas):
        w = module.weight + a * delta.reshape(module.weight.shape)
        xi = x[i:i + 1]
        if isinstance(module, nn.Linear):
            outs.append(F.linear(xi, w, module.bias))
        else:
            outs.append(F.conv2d(xi, w, module.bias, module.stride, module.padding, module.dilation))
    return torch.cat(outs)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def test_plain_lora_linear_and_conv_per_sample():
    net = _net()
    g = _g(1)
    layers = {
        "unet.lin": LoraLayer("lora", {"down": torch.randn(3, 12, generator=g), "up": torch.randn(10, 3, generator=g)},
                              alpha=1.5),
        "unet.conv": LoraLayer("lora", {"down": torch.randn(2, 6, 3, 3, generator=g),
                                        "up": torch.randn(8, 2, 1, 1, generator=g)}, alpha=4.0),
        "unet.pw": LoraLayer("lora", {"down": torch.randn(4, 6, 1, 1, generator=g),
                                      "up": torch.randn(5, 4, 1, 1, generator=g)}),
        "unet.seq.0": LoraLayer("lora", {"down": torch.randn(2, 10, generator=g), "up": torch.randn(7, 2, generator=g)}),
    }
    model = LoraModel(layers=dict(layers))
    originals = {k: net[k] for k in ("lin", "conv", "pw")}
    x_lin, x_conv = torch.randn(4, 12, generator=g), torch.randn(4, 6, 9, 9, generator=g)
    alphas = [0.0, 0.3, 1.0, -0.7]
    handle = apply_loras(Holder(net), [model])
    assert handle.applied == [4]
    assert isinstance(net["lin"], LoraBranch) and isinstance(net["seq"][0], LoraBranch)
    assert net["lin"].weight is originals["lin"].weight and net["conv"].stride == (2, 2)  # attributes delegate
    handle.set_scale(0, alphas)
    with torch.no_grad():
        for key, x in (("lin", x_lin), ("conv", x_conv), ("pw", x_conv)):
            got = net[key](x)
            want = _reference(originals[key], layers[f"unet.{key}"].delta(), x, alphas)
            assert torch.allclose(got, want, atol=1e-5), key
        # classifier-free guidance: a batch of 2·N samples tiles the α vector
        x2 = torch.cat([x_lin, x_lin * 2])
        want2 = _reference(originals["lin"], layers["unet.lin"].delta(), x2, alphas + alphas)
        assert torch.allclose(net["lin"](x2), want2, atol=1e-5)
        with pytest.raises(LorahubError, match="does not fit a batch"):
            net["lin"](torch.randn(3, 12))
        # a scalar strength applies to any batch
        handle.set_scale(0, 0.5)
        want = _reference(originals["lin"], layers["unet.lin"].delta(), x_lin[:3], [0.5] * 3)
        assert torch.allclose(net["lin"](x_lin[:3]), want, atol=1e-5)
        # the branch tensors follow the module when it moves or changes dtype after installation
        net.to(torch.float64)
        handle.set_scale(0, alphas)
        want = _reference(originals["lin"], layers["unet.lin"].delta(torch.float64), x_lin.double(), alphas)
        assert net["lin"](x_lin.double()).dtype == torch.float64
        assert torch.allclose(net["lin"](x_lin.double()), want, atol=1e-10)
    handle.remove()
    assert all(net[k] is originals[k] for k in originals) and type(net["seq"][0]) is nn.Linear
    assert not any("lora" in k for k in net.state_dict())


def test_lycoris_kinds_use_materialised_delta():
    net = _net()
    g = _g(2)
    loha = LoraLayer("loha", {"w1a": torch.randn(10, 2, generator=g), "w1b": torch.randn(2, 12, generator=g),
                              "w2a": torch.randn(10, 2, generator=g), "w2b": torch.randn(2, 12, generator=g)},
                     alpha=1.0, extra={"shape": (10, 12)})
    lokr = LoraLayer("lokr", {"w1": torch.randn(2, 2, generator=g), "w2": torch.randn(4, 27, generator=g)},
                     extra={"shape": (8, 6, 3, 3)})
    tucker = LoraLayer("lora", {"down": torch.randn(2, 6, 1, 1, generator=g), "mid": torch.randn(2, 2, 1, 1, generator=g),
                                "up": torch.randn(5, 2, 1, 1, generator=g)})
    full = LoraLayer("full", {"diff": torch.randn(7, 10, generator=g), "diff_b": torch.randn(7, generator=g)})
    model = LoraModel(layers={"unet.lin": loha, "unet.conv": lokr, "unet.pw": tucker, "unet.seq.0": full})
    originals = {"lin": net["lin"], "conv": net["conv"], "pw": net["pw"], "seq": net["seq"][0]}
    alphas = [1.0, 0.25, 0.0]
    with apply_loras(Holder(net), [model]) as handle:
        handle.set_scale(0, alphas)
        with torch.no_grad():
            x = torch.randn(3, 12, generator=g)
            assert torch.allclose(net["lin"](x), _reference(originals["lin"], loha.delta(), x, alphas), atol=1e-4)
            xc = torch.randn(3, 6, 7, 7, generator=g)
            assert torch.allclose(net["conv"](xc), _reference(originals["conv"], lokr.delta(), xc, alphas), atol=1e-4)
            assert torch.allclose(net["pw"](xc), _reference(originals["pw"], tucker.delta(), xc, alphas), atol=1e-4)
            xs = torch.randn(3, 10, generator=g)
            want = _reference(originals["seq"], full.delta(), xs, alphas)
            want = want + torch.tensor(alphas)[:, None] * full.weights["diff_b"]
            assert torch.allclose(net["seq"][0](xs), want, atol=1e-4)
    assert net["lin"] is originals["lin"]


def test_dora_interpolates_base_and_decomposed_weight():
    net = _net()
    lin = net["lin"]
    g = _g(3)
    down, up = torch.randn(2, 12, generator=g), torch.randn(10, 2, generator=g)
    m = torch.rand(1, 12, generator=g) + 0.5  # LyCORIS: magnitude per input column
    layer = LoraLayer("lora", {"down": down, "up": up}, alpha=2.0, dora_scale=m)
    w = lin.weight.detach() + layer.delta()
    w_dora = w * (m / w.norm(dim=0, keepdim=True))
    x = torch.randn(3, 12, generator=g)
    with apply_loras(Holder(net), [LoraModel(layers={"unet.lin": layer})]) as handle:
        handle.set_scale(0, [0.0, 1.0, 0.5])
        with torch.no_grad():
            y = net["lin"](x)
    w0 = lin.weight.detach()
    for i, a in enumerate([0.0, 1.0, 0.5]):
        want = F.linear(x[i], w0 + a * (w_dora - w0), lin.bias)
        assert torch.allclose(y[i], want, atol=1e-4)


def test_two_adapters_on_one_module_and_errors():
    net = _net()
    g = _g(4)
    a = LoraLayer("lora", {"down": torch.randn(2, 12, generator=g), "up": torch.randn(10, 2, generator=g)})
    b = LoraLayer("lora", {"down": torch.randn(3, 12, generator=g), "up": torch.randn(10, 3, generator=g)})
    orig = net["lin"]
    with apply_loras(Holder(net), [LoraModel(layers={"unet.lin": a}), LoraModel(layers={"unet.lin": b})]) as h:
        h.set_scale(0, [1.0, 0.0])
        h.set_scale(1, [0.5, 2.0])
        x = torch.randn(2, 12, generator=g)
        with torch.no_grad():
            y = net["lin"](x)
        want0 = F.linear(x[0], orig.weight + a.delta() + 0.5 * b.delta(), orig.bias)
        want1 = F.linear(x[1], orig.weight + 2.0 * b.delta(), orig.bias)
        assert torch.allclose(y[0], want0, atol=1e-5) and torch.allclose(y[1], want1, atol=1e-5)
    assert net["lin"] is orig
    # wrong shapes: a clear error, and nothing stays installed
    bad = LoraLayer("lora", {"down": torch.randn(2, 11), "up": torch.randn(10, 2)})
    with pytest.raises(LorahubError, match="does not fit"):
        apply_loras(Holder(net), [LoraModel(layers={"unet.pw": a, "unet.lin": bad})])
    assert net["lin"] is orig and not any(isinstance(m, LoraBranch) for m in net.modules())
    # no layer matches: another base model
    with pytest.raises(LorahubError, match="match no module"):
        apply_loras(Holder(net), [LoraModel(layers={"unet.nothing.here": a})])
    # some layers unmatched: listed, the rest applied
    h = apply_loras(Holder(net), [LoraModel(layers={"unet.lin": a, "unet.gone": a})])
    assert h.applied == [1] and h.unmatched == [["unet.gone"]]
    h.remove()


def test_textual_inversion_tokens_load_and_unload(tiny_sd1):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1), local_files_only=True)
    n_vocab = len(pipe.tokenizer)
    emb = torch.randn(2, 32, generator=_g(5))
    model = LoraModel(embeddings={"<tok>": {"clip_l": emb}})
    ids = lambda text: pipe.tokenizer(text, return_tensors="pt").input_ids  # noqa: E731
    with torch.no_grad():
        base = pipe.encode_prompt("<tok> x", "cpu", 1, False)[0]
    with apply_loras(pipe, [model]) as h:
        assert h.tokens == [["<tok>"]]
        assert len(pipe.tokenizer) == n_vocab + 2  # multi-vector: <tok>, <tok>_1
        table = pipe.text_encoder.get_input_embeddings().weight
        tok_ids = pipe.tokenizer.convert_tokens_to_ids(["<tok>", "<tok>_1"])
        assert torch.allclose(table[tok_ids], emb)
        with torch.no_grad():
            with_tok = pipe.encode_prompt("<tok> x", "cpu", 1, False)[0]
        assert not torch.allclose(with_tok, base)
    assert len(pipe.tokenizer) == n_vocab
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == n_vocab
    assert ids("<tok>").shape[1] > 3  # spelled out again, character by character


def test_sdxl_embedding_loads_into_both_text_encoders(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl), local_files_only=True)
    sizes = (len(pipe.tokenizer), len(pipe.tokenizer_2))
    e_l, e_g = torch.randn(1, 32, generator=_g(6)), torch.randn(1, 32, generator=_g(7))
    with apply_loras(pipe, [LoraModel(embeddings={"<xl>": {"clip_l": e_l, "clip_g": e_g}})]) as h:
        assert h.tokens == [["<xl>"]]
        for tok, te, e in ((pipe.tokenizer, pipe.text_encoder, e_l), (pipe.tokenizer_2, pipe.text_encoder_2, e_g)):
            i = tok.convert_tokens_to_ids("<xl>")
            assert torch.allclose(te.get_input_embeddings().weight[i], e[0])
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == sizes
    with pytest.raises(LorahubError, match="width"):
        apply_loras(pipe, [LoraModel(embeddings={"<bad>": {"clip_l": torch.randn(1, 7)}})])
    assert len(pipe.tokenizer) == sizes[0]
