"""`lorahub convert` end to end: files re-read, registry lineage, refusals.

Most calls run the command function in-process (a child process costs seconds of imports on this shared
machine); one real child process checks the exit code and the one-line error of a refusal.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorahub.errors import LorahubError


@pytest.fixture(scope="module")
def files():
    from lorahub import tiny_loras

    return tiny_loras.ensure()


def _convert(ref, to, **kw):
    from lorahub.cli.formats import convert

    args = dict(dtype=None, out=None, register=False, arch=None, drop_embeddings=False, force=False, home=None,
                json_out=True)
    args.update(kw)
    return convert(ref=str(ref), to=to, **args)


def test_convert_register_and_back(home, files, tmp_path, capsys):
    from lorahub.registry import Registry

    src = files["sdxl-kohya"]
    reg = Registry.open(home)
    parent, _ = reg.add_file(src)
    out = tmp_path / "x.diffusers.safetensors"
    _convert(parent["id"], "diffusers", out=out, register=True, home=home)
    res = json.loads(capsys.readouterr().out)
    assert res["from"] == "kohya" and res["to"] == "diffusers" and res["arch"] == "tiny-sdxl"
    new_id = res["registered"]["id"]
    reg = Registry.open(home)
    lineage = reg.lineage(new_id)
    assert lineage and lineage[0]["relation"] == "converted-from"
    assert parent["id"] in json.dumps(lineage)
    assert reg.get(new_id)["format"] == "diffusers"
    assert reg.get(new_id)["triggers"] == reg.get(parent["id"])["triggers"]

    # by registry reference, back to kohya in fp16: the original tensors, cast
    back = tmp_path / "back.safetensors"
    _convert(new_id, "kohya", dtype="fp16", out=back, home=home)
    orig, got = load_file(str(src)), load_file(str(back))
    assert set(orig) == set(got)
    for k in orig:
        assert got[k].dtype == torch.float16
        assert torch.equal(got[k], orig[k].half()), k
    with pytest.raises(LorahubError, match="already exists"):
        _convert(new_id, "kohya", out=back, home=home)
    # default output name: beside the input file
    import shutil

    copy = shutil.copy(src, tmp_path / "mine.safetensors")
    _convert(copy, "diffusers", home=home)
    assert (tmp_path / "mine.diffusers.safetensors").exists()


def test_convert_refusals(home, files, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    with pytest.raises(LorahubError, match="loha"):
        _convert(files["sd1-loha"], "diffusers", out=out, home=home)
    with pytest.raises(LorahubError, match="embedding"):
        _convert(files["sd1-cloneofsimo"], "diffusers", out=out, home=home)
    with pytest.raises(LorahubError, match="one model"):
        _convert(files["sd1-kohya"], "peft", out=out, home=home)
    assert not out.exists()
    _convert(files["sd1-cloneofsimo"], "diffusers", out=out, drop_embeddings=True, home=home)
    assert json.loads(capsys.readouterr().out)["dropped_embeddings"] == ["<s1>"]
    assert all(k.startswith(("unet.", "text_encoder.")) for k in load_file(str(out)))


def test_nan_refused_by_the_command(cli, home, files, tmp_path):
    t = load_file(str(files["sd1-kohya"]))
    k = next(k for k in t if k.endswith("lora_up.weight"))
    t[k][0, 0] = float("nan")
    nan = tmp_path / "nan.safetensors"
    save_file(t, str(nan), metadata={"ss_base_model_version": "sd_v1"})
    out = tmp_path / "o.safetensors"
    r = cli("convert", str(nan), "--to", "diffusers", "--out", str(out), home=home)
    assert r.returncode == 2, r.stderr
    assert "NaN" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
