"""An architecture lorahub has never seen: the tiny ``odd`` pipeline's UNet (three blocks of widths
32/32/64, two layers per block, no mid block) is in no built-in table. Its module list comes from its own
config; extract, convert --base, inspect --base, bake, sweep, render and train (both dialects) work on
it, and what they write loads in diffusers."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore")
RANK = 3


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """The odd base folder, a tuned copy with a planted rank-3 ΔW on every 2-D attention weight of the
    UNet, the planted ΔW by canonical module, and a rank-3 kohya LoRA extracted from the pair."""
    from lorahub import tiny
    from lorahub.ops import checkpoints
    from lorahub.ops.extract import extract_lora

    base = tiny.ensure("odd")
    tmp = tmp_path_factory.mktemp("odd")
    g = torch.Generator().manual_seed(0)
    planted = {}

    def plant(name, w):
        if name.startswith("unet.") and ".attentions." in name and name.endswith(".weight") and w.dim() == 2:
            d = (torch.randn(w.shape[0], RANK, generator=g) @ torch.randn(RANK, w.shape[1], generator=g)) * 0.02
            planted[name[: -len(".weight")]] = d
            return w + d
        return w

    with checkpoints.open_checkpoint(base) as ck:
        checkpoints.write_like(ck, tmp / "tuned", transform=plant)
    ex = extract_lora(base, tmp / "tuned", out=tmp / "odd-kohya.safetensors", rank=RANK, dtype="fp32")
    return {"base": base, "tuned": tmp / "tuned", "planted": planted, "kohya": ex.out, "tmp": tmp}


def arch(odd):
    from lorahub.formats.names import arch_of_folder

    return arch_of_folder(odd["base"])


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def fresh_pipe(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_in_diffusers(folder, lora: Path) -> tuple[object, list[str]]:
    """A fresh pipeline of ``folder`` with ``lora`` loaded by diffusers; the warnings diffusers logged."""
    pipe = fresh_pipe(folder)
    said: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    h = Catch(logging.WARNING)
    logging.getLogger("diffusers").addHandler(h)
    try:
        pipe.load_lora_weights(str(lora), adapter_name="x")
    finally:
        logging.getLogger("diffusers").removeHandler(h)
    return pipe, said


def injected(module) -> set[str]:
    return {n.rsplit(".lora_A", 1)[0] for n, _ in module.named_parameters() if ".lora_A." in n}


# ------------------------------------------------------------------------------------------------
def test_module_list_comes_from_the_folders_own_config(odd):
    from lorahub.errors import FormatError
    from lorahub.formats import names
    from lorahub.ops.checkpoints import open_checkpoint

    a = arch(odd)
    assert a.name.startswith("cfg-") and a.family == "unknown" and a.kohya_unet_layout == "diffusers"
    assert not any(k.startswith("unet.mid_block.") for k in a.modules)
    with open_checkpoint(odd["base"]) as ck:  # every Linear/Conv of the derivation is a weight of the folder
        weights = {k[: -len(".weight")]: tuple(ck.shape(k)) for k in ck.keys()
                   if k.startswith("unet.") and k.endswith(".weight") and len(ck.shape(k)) in (2, 4)}
    assert {k: v for k, v in a.modules.items() if k.startswith("unet.")} == weights
    with pytest.raises(FormatError, match="match no known model"):  # in no built-in table
        names.infer_arch({k: v for k, v in a.modules.items() if k.startswith("unet.")})
    names._ARCHS.pop(a.name)  # another process finds it again by name, in the disk cache
    assert names.get_arch(a.name).modules == a.modules


def test_extract_recovers_the_planted_delta_and_loads_in_diffusers(odd, run, tmp_path):
    from lorahub.formats.io import load_lora

    out = tmp_path / "r3.safetensors"
    rc, stdout, err = run("extract", odd["base"], odd["tuned"], "--rank", str(RANK), "--out", out)
    assert rc == 0, err
    m = load_lora(out, arch=arch(odd))
    assert set(m.layers) == set(odd["planted"]) and not m.notes
    assert max(rel(m.layers[k].delta(), d) for k, d in odd["planted"].items()) < 1e-2
    rc, stdout, err = run("extract", odd["base"], odd["tuned"], "--energy", "0.999", "--rank", "16",
                          "--out", tmp_path / "e.safetensors", "--json")
    assert rc == 0, err
    assert {r["rank"] for r in json.loads(stdout)["per_layer"]} == {RANK}  # the planted rank, every layer
    pipe = fresh_pipe(odd["base"])
    w0 = {k: pipe.unet.get_submodule(k[len("unet."):]).weight.detach().clone() for k in odd["planted"]}
    pipe, said = load_in_diffusers(odd["base"], out)
    assert not [s for s in said if "unexpected keys" in s], said
    assert injected(pipe.unet) == {k[len("unet."):] for k in odd["planted"]}
    pipe.fuse_lora()
    for k, d in odd["planted"].items():
        assert rel(pipe.unet.get_submodule(k[len("unet."):]).weight.detach() - w0[k], d) < 1e-2


def test_kohya_names_of_an_unseen_unet_convert_with_its_base(odd, run, tmp_path):
    from safetensors.torch import load_file

    src = odd["kohya"]
    rc, out, err = run("convert", src, "--to", "diffusers", "--out", tmp_path / "no.safetensors")
    assert rc == 2 and "have no known module path" in err and "give the base model" in err
    rc, out, err = run("convert", src, "--to", "diffusers", "--base", odd["base"], "--out", tmp_path / "d.safetensors",
                       "--json")
    assert rc == 0, err
    assert json.loads(out)["unmapped"] == 0
    keys = load_file(str(tmp_path / "d.safetensors"))
    assert {k.rsplit(".lora_", 1)[0] for k in keys} == set(odd["planted"])
    # and back to kohya without any table: kohya's rule is the module path with dots -> underscores
    rc, out, err = run("convert", tmp_path / "d.safetensors", "--to", "kohya", "--out", tmp_path / "k.safetensors")
    assert rc == 0, err
    a, b = load_file(str(src)), load_file(str(tmp_path / "k.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_inspect_against_the_base_maps_the_names(odd, run):
    rc, out, err = run("inspect", odd["kohya"], "--base", odd["base"], "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["unmapped_layers"] == 0 and rep["warnings"] == []
    assert all(s["rel_strength"] is not None for s in rep["per_layer"])
    blocks = {b["block"] for b in rep["blocks"]}
    assert {"down.0", "down.2", "up.0", "up.2"} <= blocks and "mid" not in blocks
    # without the base every layer is still inspected, under its kohya name
    rc, out, err = run("inspect", odd["kohya"], "--json")
    rep2 = json.loads(out)
    assert rep2["unmapped_layers"] == len(odd["planted"]) and {b["block"] for b in rep2["blocks"]} == blocks
    assert sorted(s["fro"] for s in rep2["per_layer"]) == pytest.approx(sorted(s["fro"] for s in rep["per_layer"]))


def test_bake_sweep_and_render_on_an_unseen_unet(odd, run, tmp_path):
    import numpy as np

    from lorahub.ops.checkpoints import open_checkpoint
    from lorahub.ops.sweep import render, sweep

    baked = tmp_path / "baked"
    rc, out, err = run("merge", f"{odd['kohya']}:1", "--checkpoint", "--base", odd["base"], "--out", baked)
    assert rc == 0, err
    with open_checkpoint(baked) as b, open_checkpoint(odd["tuned"]) as t, open_checkpoint(odd["base"]) as w:
        for k in odd["planted"]:
            assert rel(b.get(k + ".weight") - w.get(k + ".weight"), odd["planted"][k]) < 1e-3
        assert torch.equal(b.get("unet.conv_in.weight"), t.get("unet.conv_in.weight"))
    kw = dict(steps=2, size=64, seeds=(1,), guidance=1.0, add_triggers=False)
    sw = sweep([odd["kohya"]], str(odd["base"]), ["a red cube"], alphas=(0, 1), out=tmp_path / "grid.png",
               store_preview=False, **kw)
    assert sw.layers_applied == [len(odd["planted"])] and sw.layers_skipped == [0] and not sw.warnings
    ref = render([], str(baked), ["a red cube"], out=tmp_path / "baked.png", **kw).images[0]
    plain = render([], str(odd["base"]), ["a red cube"], out=tmp_path / "plain.png", **kw).images[0]
    a0, a1 = (np.asarray(im, dtype=np.int16) for im in sw.images)
    assert np.abs(a1 - np.asarray(ref, dtype=np.int16)).max() <= 2  # α = 1 is the baked model
    assert np.abs(a0 - np.asarray(plain, dtype=np.int16)).max() <= 2  # α = 0 is the base
    assert np.abs(a1 - a0).mean() > 0.5  # and the LoRA does something


@pytest.mark.parametrize("dialect", ["kohya", "diffusers"])
def test_train_on_an_unseen_unet_writes_files_diffusers_loads(odd, tmp_path, dialect):
    import numpy as np
    from PIL import Image

    from lorahub.formats.header import read_header
    from lorahub.formats.io import load_lora
    from lorahub.train.config import build_config
    from lorahub.train.trainer import Trainer

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        a = np.zeros((32, 32, 3), np.uint8)
        a[..., i] = 200
        Image.fromarray(a).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"sks toy {i}")
    cfg = build_config(None, data_dir=str(data), base=str(odd["base"]), method="dreambooth", type="object",
                       trigger="sks", steps=2, resolution=32, lr=1e-2, rank=2, output_dir=str(tmp_path / "out"),
                       register=False, save_precision="fp32", dialect=dialect)
    res = Trainer(cfg).run()
    keys = list(read_header(res.lora_path).tensors)
    if dialect == "kohya":
        assert all(k.startswith("lora_unet_") for k in keys)
    else:
        assert all(k.startswith("unet.") for k in keys)
    mine = load_lora(res.lora_path, arch=arch(odd))
    assert mine.layers and not [k for k in mine.layers if re.match(r"^unet\.lora_", k)]
    pipe = fresh_pipe(odd["base"])
    w0 = {k: pipe.unet.get_submodule(k[len("unet."):]).weight.detach().clone() for k in mine.layers}
    pipe, said = load_in_diffusers(odd["base"], res.lora_path)
    assert not [s for s in said if "unexpected keys" in s], said
    assert injected(pipe.unet) == {k[len("unet."):] for k in mine.layers}
    pipe.fuse_lora()
    for k, layer in mine.layers.items():
        d = layer.delta()
        got = pipe.unet.get_submodule(k[len("unet."):]).weight.detach() - w0[k]
        assert float((got - d.reshape(got.shape)).abs().max()) <= 1e-5 + 1e-3 * float(d.abs().max())
