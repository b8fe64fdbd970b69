"""References the way webui users write them (issue 19): file names and stems, pasted <lora:NAME:α>
tokens, and path-like references that name no file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lorahub.errors import Ambiguous, LorahubError, NotFound
from lorahub.refs import WeightedRef, parse_weighted, resolve_lora
from lorahub.registry import Registry
from lorahub.tiny_loras import kohya_file


@pytest.fixture
def webui(tmp_path, png_bytes) -> Path:
    """A webui models/Lora folder: chars/aqua_v2.safetensors with its .civitai.info, .json and .preview.png."""
    d = tmp_path / "models" / "Lora" / "chars"
    kohya_file(d / "aqua_v2.safetensors", seed=7)
    civitai = {"id": 12345, "modelId": 678, "name": "v2.0", "baseModel": "SD 1.5", "trainedWords": ["aqua (konosuba)"],
               "description": "<p>Version 2</p>", "model": {"name": "Aqua - KonoSuba", "type": "LORA",
                                                             "tags": ["character", "anime"]},
               "files": [{"name": "aqua_v2.safetensors", "type": "Model"}], "images": [], "extra": {"k": [1, 2]}}
    # written the way Civitai Helper writes it (indent 4, non-ASCII kept), plus a key lorahub does not know
    (d / "aqua_v2.civitai.info").write_text(json.dumps(civitai, indent=4, ensure_ascii=False), encoding="utf-8")
    (d / "aqua_v2.json").write_text('{\n    "description": "Aqua, the goddess \u2014 KonoSuba",\n'
                                    '    "sd version": "SD1",\n    "activation text": "aqua (konosuba), blue hair",\n'
                                    '    "preferred weight": 0.7,\n    "negative text": "lowres",\n'
                                    '    "notes": "my notes",\n    "custom key": [1, 2, 3]\n}', encoding="utf-8")
    (d / "aqua_v2.preview.png").write_bytes(png_bytes((10, 120, 200)))
    return d


@pytest.mark.parametrize("spec,want", [
    ("aqua_v2", WeightedRef("aqua_v2", 1.0)),
    ("aqua_v2:0.6", WeightedRef("aqua_v2", 0.6)),
    ("<lora:aqua_v2:0.6>", WeightedRef("aqua_v2", 0.6)),
    ("<lyco:my_loha:-0.25>", WeightedRef("my_loha", -0.25)),
    ("<lora:aqua_v2>", WeightedRef("aqua_v2", 1.0)),
    ("  <LORA: Aqua - KonoSuba : 1.2 >  ", WeightedRef("Aqua - KonoSuba", 1.2)),
    ("sub/dir/x.safetensors:0.5", WeightedRef("sub/dir/x.safetensors", 0.5)),
])
def test_parse_weighted_takes_ids_and_pasted_prompt_tokens(spec, want):
    assert parse_weighted(spec) == want


@pytest.mark.parametrize("spec,msg", [
    ("<lora:x:0.5:0.8>", "one strength"), ("<lyco:x:te=1:unet=0.5>", "one strength"), ("<lora::0.5>", "names no"),
    ("<lora:x:abc>", "not a number"), ("x:nan", "finite"), (":0.5", "REF:WEIGHT"),
])
def test_parse_weighted_refuses_what_it_cannot_apply(spec, msg):
    with pytest.raises(LorahubError, match=msg):
        parse_weighted(spec)


def test_file_name_and_stem_resolve_like_hash_prefixes(reg, tmp_path):
    a, _ = reg.add_file(kohya_file(tmp_path / "x" / "aqua_v2.safetensors", seed=1), name="Aqua")
    b, _ = reg.add_file(kohya_file(tmp_path / "y" / "style.v1.safetensors", seed=2))
    for ref in ("aqua_v2", "aqua_v2.safetensors", "Aqua", a["id"]):
        assert reg.resolve(ref)["id"] == a["id"], ref
    assert reg.resolve("style.v1")["id"] == b["id"]  # the stem keeps inner dots, as the webui's does
    c, _ = reg.add_file(kohya_file(tmp_path / "z" / "aqua_v2.safetensors", seed=3), name="Aqua 2")
    with pytest.raises(Ambiguous, match=f"{a['id']}.*{c['id']}|{c['id']}.*{a['id']}"):
        reg.resolve("aqua_v2")
    assert reg.resolve("Aqua 2")["id"] == c["id"]  # a name still wins


def test_path_like_reference_that_names_nothing_says_the_file_does_not_exist(reg, tmp_path, monkeypatch, run):
    reg.add_file(kohya_file(tmp_path / "a.safetensors", seed=1))
    monkeypatch.chdir(tmp_path)
    for ref in ("data/x.safetensors", "x.safetensors", "data\\x"):
        with pytest.raises(NotFound, match="no such file"):
            reg.resolve(ref)
        code, _, err = run("show", ref)
        assert code == 2 and "no such file" in err and "no registry entry matches" not in err, err
        with pytest.raises(NotFound, match="no such file"):
            resolve_lora(ref, reg)
    # an existing file is found by its bytes
    assert reg.resolve(str(tmp_path / "a.safetensors"))["name"] == "a"


def test_resolve_lora_takes_a_stem_without_creating_a_home(tmp_path):
    home = tmp_path / "nohome"
    with pytest.raises(NotFound, match="no registry"):
        resolve_lora("aqua_v2", home)
    with pytest.raises(NotFound, match="no such file"):
        resolve_lora("aqua_v2.safetensors", home)
    assert not home.exists()
    reg = Registry.open(home)
    e, _ = reg.add_file(kohya_file(tmp_path / "aqua_v2.safetensors", seed=4))
    ref = resolve_lora(parse_weighted("<lora:aqua_v2:0.6>").ref, reg)
    assert ref.entry["id"] == e["id"] and ref.path.read_bytes() == (tmp_path / "aqua_v2.safetensors").read_bytes()


def test_webui_folder_scan_show_stem_and_export_round_trip(reg, webui, tmp_path, run):
    res = reg.scan(webui.parent.parent)
    assert len(res.added) == 1 and res.skipped == []
    code, out, err = run("show", "aqua_v2", "--json")  # the webui handle of the file
    assert code == 0, err
    e = json.loads(out)
    assert e["name"] == "Aqua - KonoSuba" and e["file_name"] == "aqua_v2.safetensors"
    assert e["triggers"][:2] == ["aqua (konosuba)", "blue hair"] and e["extra"]["preferred_weight"] == 0.7
    assert run("show", "aqua_v2.safetensors")[0] == 0
    kept = {s["kind"]: s for s in reg.sidecars("aqua_v2")}
    assert sorted(kept) == ["civitai", "json"]
    assert kept["civitai"]["sha256"] == hashlib.sha256((webui / "aqua_v2.civitai.info").read_bytes()).hexdigest()

    dest = tmp_path / "webui2" / "models" / "Lora"
    code, out, err = run("export", "aqua_v2", dest, "--json")
    assert code == 0, err
    names = sorted(Path(p).name for p in json.loads(out)["written"])
    assert names == ["aqua_v2.civitai.info", "aqua_v2.json", "aqua_v2.preview.png", "aqua_v2.safetensors"]
    for n in names:  # every file the webui and Civitai Helper read comes back byte for byte
        assert (dest / n).read_bytes() == (webui / n).read_bytes(), n

    # an edit changes only the field edited; the keys lorahub does not know are kept
    assert run("edit", "aqua_v2", "--trigger", "aqua", "--trigger", "goddess")[0] == 0
    assert run("export", "aqua_v2", dest)[0] == 2  # the .json would change: refused without --force
    assert run("export", "aqua_v2", dest, "--force")[0] == 0
    side = json.loads((dest / "aqua_v2.json").read_text(encoding="utf-8"))
    orig = json.loads((webui / "aqua_v2.json").read_text(encoding="utf-8"))
    assert side == {**orig, "activation text": "aqua, goddess"}
    assert (dest / "aqua_v2.civitai.info").read_bytes() == (webui / "aqua_v2.civitai.info").read_bytes()
