"""`lorahub merge` end to end in child processes: files written and re-read, registry lineage, --from,
bake from a recipe, one-line refusals."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch

from lorahub.formats.io import load_lora
from lorahub.tiny_loras import lora_file as _lora_file

SD1_LAYERS = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32),
    "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": (512, 64),
    "unet.up_blocks.0.resnets.1.conv1": (64, 96, 3, 3),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (32, 32),
}


def lora_file(path, seed, rank, alpha, layers=SD1_LAYERS, dialect="kohya", base="sd1"):
    return _lora_file(path, layers, seed, rank, alpha, dialect=dialect, base=base)


def weighted_sum(paths_weights, key):
    acc = None
    for p, w in paths_weights:
        layer = load_lora(p).layers.get(key)
        if layer is None:
            continue
        d = layer.delta(torch.float64) * w
        acc = d if acc is None else acc + d
    return acc


@pytest.fixture
def two_loras(tmp_path):
    a = lora_file(tmp_path / "a.safetensors", 1, 4, 2.0)
    b = lora_file(tmp_path / "b.safetensors", 2, 6, None, dialect="diffusers",
                  layers={k: v for k, v in SD1_LAYERS.items() if "resnets" not in k})
    return a, b


def test_inline_svd_merge_register_lineage_and_rerun(cli, home, tmp_path, two_loras):
    a, b = two_loras
    from lorahub.registry import Registry

    with Registry.open(home) as reg:
        ea, _ = reg.add_file(a, name="miku")
    out = tmp_path / "m.safetensors"
    r = cli("merge", "miku:0.8", f"{b}:-0.6", "--rank", "3", "--method", "svd", "--out", out,
            "--register", "--name", "miku-minus-b", "--json", home=home)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["method"] == "svd" and rep["rank_max"] == 3 and 0 < rep["retained"] < 1
    assert rep["created"] is True and rep["entry_name"] == "miku-minus-b"
    merged = load_lora(out)
    assert len(tomllib.loads(merged.metadata["lorahub.recipe"])["lora"]) == 2
    for key in SD1_LAYERS:
        ref = weighted_sum([(a, 0.8), (b, -0.6)], key)
        ref2 = ref.reshape(ref.shape[0], -1)
        u, s, vh = torch.linalg.svd(ref2, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        got = merged.layers[key].delta(torch.float64).reshape(ref2.shape)
        torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-5 * s[0].item())
        per = next(x for x in rep["per_layer"] if x["key"] == key)
        assert per["retained"] == pytest.approx(float((s[:3] ** 2).sum().sqrt() / (s ** 2).sum().sqrt()), rel=1e-6)

    with Registry.open(home) as reg:
        lin = reg.lineage(rep["entry"])
        assert sorted(x["relation"] for x in lin) == ["merged-from", "merged-from"]
        parents = {x["parent_id"] or x["parent_sha256"]: x["detail"]["weight"] for x in lin}
        assert parents[ea["id"]] == 0.8
        assert -0.6 in parents.values()
        assert all(len(tomllib.loads(x["detail"]["recipe"])["lora"]) == 2 for x in lin)

    # no local path is stored (lineage details reach model cards): b is not registered and not in the
    # current folder, so a re-run cannot find it and says so
    assert str(tmp_path) not in json.dumps(lin) and str(tmp_path) not in json.dumps(merged.metadata)
    r2 = cli("merge", "--from", rep["entry"], "--out", tmp_path / "again.safetensors", "--json", home=home)
    assert r2.returncode == 2 and "b.safetensors" in r2.stderr and "register" in r2.stderr
    # once registered, b is found by the sha256 the lineage recorded
    with Registry.open(home) as reg:
        reg.add_file(b, name="bee")
    # re-running the stored recipe reproduces the same bytes
    r2 = cli("merge", "--from", rep["entry"], "--out", tmp_path / "again.safetensors", "--json", home=home)
    assert r2.returncode == 0, r2.stderr
    assert json.loads(r2.stdout)["rerun_of"]["identical"] is True
    assert (tmp_path / "again.safetensors").read_bytes() == out.read_bytes()
    # and `lorahub show` prints the tree through the registry's lineage contract
    r3 = cli("show", rep["entry"], home=home)
    assert r3.returncode == 0 and "miku" in r3.stdout


def test_recipe_concat_and_bake_checkpoint(cli, home, tmp_path, two_loras, tiny_sd1):
    a, b = two_loras
    rec = tmp_path / "r.toml"
    rec.write_text(f'name = "ab"\nbase = "sd1"\nmethod = "concat"\n'
                   f'[[lora]]\nref = "{a.name}"\nweight = 0.5\n[[lora]]\nref = "{b}"\nweight = 1.25\n'
                   f'parts = ["unet"]\n')
    out = tmp_path / "ab.safetensors"
    r = cli("merge", rec, "--out", out, "--json", home=home)
    assert r.returncode == 0, r.stderr
    merged = load_lora(out)
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    for key in SD1_LAYERS:
        ref = weighted_sum([(a, 0.5)] + ([(b, 1.25)] if key.startswith("unet.") else []), key)
        torch.testing.assert_close(merged.layers[key].delta(torch.float64).reshape(ref.shape), ref,
                                   rtol=1e-5, atol=1e-6)
    assert merged.layers[te].rank == 4  # b's text encoder layer was filtered out by parts

    rec.write_text(f'output = "checkpoint"\nbase = "tiny-sd1"\n[[lora]]\nref = "{a}"\nweight = 0.7\n')
    baked = tmp_path / "baked"
    r = cli("merge", rec, "--out", baked, home=home)
    assert r.returncode == 0, r.stderr
    from lorahub.ops.checkpoints import open_checkpoint

    key = "unet.up_blocks.0.resnets.1.conv1"
    with open_checkpoint(baked) as o, open_checkpoint(tiny_sd1) as b0:
        w0 = b0.get(key + ".weight")
        ref = w0 + weighted_sum([(a, 0.7)], key).float().reshape(w0.shape)
        torch.testing.assert_close(o.get(key + ".weight"), ref, rtol=1e-5, atol=1e-6)
    stored = (baked / "lorahub_recipe.toml").read_text()
    assert tomllib.loads(stored)["lora"] == [{"ref": "a.safetensors", "weight": 0.7}]  # a name, not the path
    assert str(tmp_path) not in stored


@pytest.mark.parametrize("args, message", [
    (["{a}:abc", "--out", "x.safetensors"], "weight 'abc' is not a number"),
    (["nosuchlora:1", "--out", "x.safetensors"], "does not resolve"),
    (["{recipe}"], "unknown key 'wieght'"),
    (["{a}:1", "{sdxl}:1", "--out", "x.safetensors"], "different base families"),
    (["{a}:1", "{b}:1", "--method", "sum", "--out", "x.safetensors"], "same rank"),
    (["{a}:1"], "give --out"),
])
def test_refusals_are_one_line(cli, home, tmp_path, two_loras, args, message):
    a, b = two_loras
    recipe = tmp_path / "bad.toml"
    recipe.write_text(f'[[lora]]\nref = "{a}"\nwieght = 0.5\n')
    from lorahub.formats.names import get_arch

    q = next(k for k in get_arch("tiny-sdxl").modules if k.startswith("unet.") and k.endswith("attn1.to_q"))
    shape = get_arch("tiny-sdxl").modules[q]
    sdxl = tmp_path / "x.safetensors"
    if "{sdxl}" in " ".join(args):
        lora_file(sdxl, 3, 4, None, layers={q: shape}, base="sdxl")
    argv = [x.format(a=a, b=b, recipe=recipe, sdxl=sdxl) for x in args]
    r = cli("merge", *argv, home=home)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
