"""`lorahub push` / `lorahub pull` with the real, unpatched huggingface_hub client against tests/hubserver.py.

Every test talks to a server bound to 127.0.0.1 only. The CLI runs in a child process with
HF_HUB_OFFLINE=0 and HF_HUB_DISABLE_XET=1 (conftest sets HF_HUB_OFFLINE=1 for everything else) and a
fresh HF_HOME, so a push followed by a pull is a real round trip through the client and its cache.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
import yaml

from lorahub import tiny_loras


# ---------------------------------------------------------------------------------------- helpers
UNET_MODULES = {  # kohya name -> path in the tiny SD1 UNet (32-wide attention)
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        ("down_blocks", 0, "attentions", 0, "transformer_blocks", 0, "attn1", "to_q"),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k":
        ("down_blocks", 0, "attentions", 0, "transformer_blocks", 0, "attn2", "to_k"),
}


def kohya_lora(path: Path, seed: int = 0, rank: int = 4, te: bool = True) -> Path:
    """A float32 kohya LoRA whose modules exist in the tiny SD1 pipeline (32-wide), small ΔW."""
    mods = {k: s for k, s in tiny_loras.TINY_SD1_KOHYA.items() if te or k in UNET_MODULES}
    t = tiny_loras.kohya_tensors(mods, rank=rank, alpha=rank / 2, seed=seed, dtype="float32", up_scale=0.01)
    return tiny_loras.save_tensors(path, t, {"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2)})


def loha(path: Path, seed: int = 2, rank: int = 4) -> Path:
    """A LyCORIS LoHa (kohya-style keys): diffusers cannot load it, so push converts nothing."""
    mods = {k: tiny_loras.TINY_SD1_KOHYA[k] for k in UNET_MODULES}
    return tiny_loras.save_tensors(path, tiny_loras.kohya_tensors(mods, rank=rank, seed=seed, dtype="float32",
                                                                  scale=0.1, algo="loha"))


def embedding(path: Path, seed: int = 1) -> Path:
    return tiny_loras.save_tensors(path, tiny_loras.embedding_tensors(seed=seed))


def png(path: Path, color=(200, 30, 30)) -> Path:
    from PIL import Image

    Image.new("RGB", (16, 8), color).save(path)
    return path


def open_reg(home: Path):
    from lorahub.registry import Registry

    return Registry.open(home)


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.fixture
def style_entry(home, tmp_path):
    """A registered kohya LoRA with triggers, tags, a sweep preview and a lineage record."""
    src = kohya_lora(tmp_path / "arcane_style.safetensors")
    reg = open_reg(home)
    entry, created = reg.add_file(src, triggers=["arcane style", "painterly"], tags=["anime"], type="style",
                                  base="sd1", lineage=[{"relation": "trained-from", "parent": "tiny-sd1",
                                                        "detail": {"steps": 200}}])
    assert created
    reg.add_preview(entry["id"], png(tmp_path / "grid.png"),
                    params={"prompt": "arcane style, a castle", "alphas": [0.0, 0.5, 1.0], "recommended_alpha": 0.8})
    e = reg.get(entry["id"])
    reg.close()
    return e


# ---------------------------------------------------------------------------------------- push + pull
def test_push_card_and_pull_round_trip(cli, home, hub, henv, style_entry, tmp_path, ok):
    env = henv("hf-push")
    res = ok(cli("push", style_entry["id"], "--repo", "tester/arcane", "--token-env", "LORAHUB_TEST_TOKEN",
                 "--json", home=home, env=env))
    rep = json.loads(res.stdout)
    assert rep["uploaded"] and rep["commit"] == hub.head("tester/arcane")
    remote = hub.files("tester/arcane")
    # the original file under its own name, README, the preview image, all in one commit
    assert "arcane_style.safetensors" in remote and "README.md" in remote
    imgs = [p for p in remote if p.startswith("images/")]
    assert len(imgs) == 1
    assert len(hub.commits) == 1
    assert hub.file_bytes("tester/arcane", "arcane_style.safetensors") == \
        open_reg(home).blob_path(style_entry).read_bytes()
    assert set(rep["files"]) <= set(remote)

    # the card: YAML front matter as diffusers' scripts write it + a body with usage and hashes
    text = hub.file_bytes("tester/arcane", "README.md").decode()
    fm, err = hub.front_matter(text)
    assert err is None
    assert fm["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    for t in ("lora", "text-to-image", "stable-diffusion", "diffusers", "template:sd-lora", "lora", "style", "anime"):
        assert t in fm["tags"]
    assert fm["instance_prompt"] == "arcane style, painterly"
    assert fm["license"] == "creativeml-openrail-m"
    assert fm["library_name"] == "diffusers"
    assert fm["widget"][0]["text"] == "arcane style, a castle"
    assert fm["widget"][0]["output"]["url"] in remote
    assert style_entry["sha256"].upper() in text and style_entry["autov2"].upper() in text
    assert "**0.8**" in text and "<lora:arcane_style:0.8>" in text
    assert "trained-from **tiny-sd1**" in text
    if "pytorch_lora_weights.safetensors" in remote:  # diffusers form, when the formats converter exists
        assert 'weight_name="pytorch_lora_weights.safetensors"' in text

    # a re-push of the same entry uploads nothing and makes no commit
    n_lfs = len(hub.lfs_uploads)
    again = json.loads(ok(cli("push", style_entry["name"], "--repo", "tester/arcane", "--token-env",
                              "LORAHUB_TEST_TOKEN", "--json", home=home, env=env)).stdout)
    assert not again["uploaded"] and again["commit"] == rep["commit"]
    assert len(hub.commits) == 1 and len(hub.lfs_uploads) == n_lfs
    assert len([r for r in hub.requests if r[0] == "PUT"]) == n_lfs

    # the remote is recorded on the entry
    reg = open_reg(home)
    remotes = reg.remotes(style_entry["id"])
    assert [(r["repo"], r["revision"], r["commit"], r["endpoint"]) for r in remotes] == \
        [("tester/arcane", "main", rep["commit"], hub.url)]
    reg.close()

    # the token went to the server and nowhere else
    assert hub.auth_headers and all(h == f"Bearer {hub.token}" for h in hub.auth_headers)
    assert hub.token not in res.stdout + res.stderr
    assert all(hub.token.encode() not in p.read_bytes() for p in files_under(home) if p.is_file())

    # pull into a fresh registry through a fresh HF cache
    home2, env2 = tmp_path / "home2", henv("hf-pull")
    res = ok(cli("pull", "tester/arcane", "--tag", "pulled", "--json", home=home2, env=env2))
    rep2 = json.loads(res.stdout)
    assert rep2["commit"] == rep["commit"]
    got = {e["file"]: e for e in rep2["entries"]}
    assert "arcane_style.safetensors" in got and got["arcane_style.safetensors"]["created"]
    assert "pytorch_lora_weights.safetensors" not in got  # alternate form of the same LoRA: skipped
    reg2 = open_reg(home2)
    e2 = reg2.get(got["arcane_style.safetensors"]["id"])
    assert e2["sha256"] == style_entry["sha256"]
    assert reg2.blob_path(e2).read_bytes() == open_reg(home).blob_path(style_entry).read_bytes()
    assert e2["triggers"] == ["arcane style", "painterly"]
    assert e2["tags"] == ["anime", "pulled"]   # the entry's tags, not the Hub's filter tags
    assert e2["source"] == f"tester/arcane@{rep['commit']}"
    assert e2["type"] == "style" and e2["base"] == "sd1"   # from the card's lorahub section
    assert "license" not in e2["extra"]   # the family's default licence on the card is not an entry field
    assert [(r["repo"], r["commit"]) for r in reg2.remotes(e2["id"])] == [("tester/arcane", rep["commit"])]
    # downloads went into HF_HOME's hub cache
    cached = list((tmp_path / "hf-pull" / "hub").rglob("arcane_style.safetensors"))
    assert cached and cached[0].read_bytes() == reg2.blob_path(e2).read_bytes()
    reg2.close()

    # pulling again is a no-op: nothing registered, no weights downloaded again
    gets = [d for d in hub.downloads if d[0] == "GET" and d[2].endswith(".safetensors")]
    res = ok(cli("pull", f"tester/arcane@{rep['commit']}", "--json", home=home2, env=env2))
    again = json.loads(res.stdout)
    assert all(not e["created"] for e in again["entries"])
    assert [d for d in hub.downloads if d[0] == "GET" and d[2].endswith(".safetensors")] == gets
    assert open_reg(home2).count() == 1

    # changed metadata: one new commit with only the card; weights and converted copies stay as they are
    reg = open_reg(home)
    reg.update(style_entry["id"], triggers=["arcane style"])
    reg.close()
    before = dict(hub.files("tester/arcane"))
    third = json.loads(ok(cli("push", style_entry["id"], "--repo", "tester/arcane", "--token-env",
                              "LORAHUB_TEST_TOKEN", "--json", home=home, env=env)).stdout)
    assert third["uploaded"] and third["commit"] == hub.head("tester/arcane") != rep["commit"]
    assert len(hub.commits) == 2 and len(hub.lfs_uploads) == n_lfs
    after = hub.files("tester/arcane")
    assert set(after) == set(before)
    assert [p for p in after if after[p] != before[p]] == ["README.md"]
    fm, _ = hub.front_matter(hub.file_bytes("tester/arcane", "README.md").decode())
    assert fm["instance_prompt"] == "arcane style"
    assert open_reg(home).remotes(style_entry["id"])[0]["commit"] == third["commit"]


def test_push_branch_private_and_embedding(cli, home, hub, henv, tmp_path, fail, ok):
    reg = open_reg(home)
    lh, _ = reg.add_file(loha(tmp_path / "arcane_style.safetensors"), triggers=["arcane"])
    emb, _ = reg.add_file(embedding(tmp_path / "arcane_emb.safetensors"))
    reg.close()
    assert emb["kind"] == "textual-inversion" and lh["kind"] == "loha"
    env = henv()
    # no --token-env: huggingface_hub's own lookup (HF_TOKEN) provides the token
    rep = json.loads(ok(cli("push", lh["id"], emb["id"], "--repo", "tester/priv", "--private",
                            "--revision", "dev", "-m", "first drop", "--json",
                            home=home, env=env | {"HF_TOKEN": hub.token})).stdout)
    assert hub.auth_headers and all(h == f"Bearer {hub.token}" for h in hub.auth_headers)
    assert rep["revision"] == "dev" and rep["commit"] == hub.head("tester/priv", "dev")
    assert hub.head("tester/priv", "main") != rep["commit"]  # main untouched
    assert hub.state.repos["tester/priv"]["private"] is True
    assert hub.commits[-1][3] == "first drop"
    files = hub.files("tester/priv", "dev")
    assert "arcane_emb.safetensors" in files and "arcane_style.safetensors" in files
    assert "pytorch_lora_weights.safetensors" not in files  # diffusers cannot load a LoHa
    text = hub.file_bytes("tester/priv", "README.md", "dev").decode()
    assert "load_textual_inversion" in text and "embeddings/" in text
    assert "diffusers cannot load this loha adapter" in text and "<lora:arcane_style:1>" in text
    fm, _ = hub.front_matter(text)
    assert "loha" in fm["tags"] and fm["instance_prompt"] == "arcane, arcane_emb"
    reg = open_reg(home)
    for eid in (lh["id"], emb["id"]):
        assert reg.remotes(eid)[0]["revision"] == "dev"
    reg.close()
    # a private repo is not visible without the token
    home2 = tmp_path / "h2"
    fail(cli("pull", "tester/priv@dev", home=home2, env=henv("hf2") | {"LORAHUB_TEST_TOKEN": ""}), "not found")
    pulled = json.loads(ok(cli("pull", "tester/priv@dev", "--token-env", "LORAHUB_TEST_TOKEN", "--json",
                               home=home2, env=henv("hf2"))).stdout)
    kinds = sorted(e["kind"] for e in pulled["entries"])
    assert kinds == ["loha", "textual-inversion"]


def test_pull_file_option_and_card_metadata(cli, hub, henv, tmp_path, fail, ok):
    a = kohya_lora(tmp_path / "a.safetensors", seed=3).read_bytes()
    b = kohya_lora(tmp_path / "b.safetensors", seed=4).read_bytes()
    card = ("---\nbase_model: stabilityai/stable-diffusion-xl-base-1.0\ninstance_prompt: zyx person, red coat\n"
            "tags:\n- lora\n- character\nlicense: openrail++\n---\n# hi\n")
    sha = hub.seed("someone/two", {"README.md": card.encode(), "a.safetensors": a, "b.safetensors": b})
    home = tmp_path / "home"
    rep = json.loads(ok(cli("pull", "someone/two", "--file", "b.safetensors", "--json", home=home,
                            env=henv())).stdout)
    assert [e["file"] for e in rep["entries"]] == ["b.safetensors"]
    reg = open_reg(home)
    e = reg.get(rep["entries"][0]["id"])
    assert e["triggers"] == ["zyx person", "red coat"]
    assert e["base"] == "sdxl"  # tensors say unknown; the card's base_model decides
    assert e["extra"]["license"] == "openrail++" and e["extra"]["base_model"].endswith("xl-base-1.0")
    assert e["source"] == f"someone/two@{sha}" and "character" in e["tags"]
    assert reg.count() == 1
    reg.close()
    fail(cli("pull", "someone/two", "--file", "nope.safetensors", home=home, env=henv()), "no file")


# ---------------------------------------------------------------------------------------- hostile repos
def _hostile_cases(tmp_path):
    good = kohya_lora(tmp_path / "good.safetensors").read_bytes()
    return {
        "dotdot": ({"../evil.safetensors": good, "ok.safetensors": good}, {}, "unsafe file name"),
        "absolute": ({"/tmp/evil.safetensors": good}, {}, "unsafe file name"),
        "nested-dotdot": ({"a/../../evil.safetensors": good}, {}, "unsafe file name"),
        "huge-announced-small": ({"big.safetensors": good + b"\0" * 200_000}, {"big.safetensors": 1000},
                                 "announced"),
        "bad-yaml": ({"README.md": b"---\ntags: [lora\nbase_model: a: b\n---\nbody\n", "ok.safetensors": good}, {},
                     "not valid yaml"),
        "not-safetensors": ({"lora.safetensors": b"\x80\x02garbage pickle" * 10}, {}, "nothing registered"),
    }


@pytest.mark.parametrize("case", ["dotdot", "absolute", "nested-dotdot", "huge-announced-small", "bad-yaml",
                                  "not-safetensors"])
def test_pull_hostile_repo(cli, hub, henv, tmp_path, case, fail):
    files, announce, needle = _hostile_cases(tmp_path)[case]
    hub.seed("evil/repo", files, announce=announce)
    home = tmp_path / "home"
    before = files_under(tmp_path)
    err = fail(cli("pull", "evil/repo", home=home, env=henv()), needle)
    assert hub.token not in err
    # nothing registered
    if home.exists():
        assert open_reg(home).count() == 0
    # nothing written outside the HF cache, the registry home and the server's own folder
    new = files_under(tmp_path) - before
    allowed = (tmp_path / "hf", home, tmp_path / "hubsrv")
    outside = [p for p in new if not any(str(p).startswith(str(a) + os.sep) for a in allowed)]
    assert outside == []
    assert not any(p.name == "evil.safetensors" for p in files_under(tmp_path) - before
                   if not str(p).startswith(str(tmp_path / "hubsrv")))
    assert not Path("/tmp/evil.safetensors").exists()


def test_pull_refuses_files_over_max_size(cli, hub, henv, tmp_path, fail):
    hub.seed("big/one", {"x.safetensors": kohya_lora(tmp_path / "x.safetensors").read_bytes()})
    fail(cli("pull", "big/one", "--max-size", "0.001", home=tmp_path / "h", env=henv()), "over the size limit")
    # refused before downloading (only its header was read, with a range request)
    assert [d[0] for d in hub.downloads if d[2] == "x.safetensors"] == ["RANGE"]


# ---------------------------------------------------------------------------------------- search, errors
def test_pull_search_lists_hub_loras(cli, hub, henv, tmp_path, ok):
    lora = kohya_lora(tmp_path / "s.safetensors").read_bytes()
    card = "---\nbase_model: {bm}\ntags: [lora, diffusers, {t}]\nlibrary_name: diffusers\n---\n"
    hub.seed("alice/arcane-style", {"README.md": card.format(bm="stabilityai/stable-diffusion-xl-base-1.0",
                                                             t="style").encode(), "a.safetensors": lora})
    hub.seed("bob/arcane-character", {"README.md": card.format(bm="stable-diffusion-v1-5/stable-diffusion-v1-5",
                                                               t="character").encode(), "b.safetensors": lora})
    hub.seed("carol/arcane-checkpoint", {"README.md": b"---\ntags: [diffusers]\n---\n"})
    rows = json.loads(ok(cli("pull", "--search", "arcane", "--json", env=henv())).stdout)
    assert sorted(r["repo"] for r in rows) == ["alice/arcane-style", "bob/arcane-character"]
    fam = {r["repo"]: r["family"] for r in rows}
    assert fam == {"alice/arcane-style": "sdxl", "bob/arcane-character": "sd1"}
    rows = json.loads(ok(cli("pull", "--search", "arcane", "--base-model",
                             "stabilityai/stable-diffusion-xl-base-1.0", "--json", env=henv())).stdout)
    assert [r["repo"] for r in rows] == ["alice/arcane-style"]
    table = ok(cli("pull", "--search", "arcane", env=henv())).stdout
    assert "alice/arcane-style" in table and "bob/arcane-character" in table and "carol" not in table
    assert any(r[1] == "/api/models" for r in hub.requests)


def test_push_errors_are_one_line(cli, home, hub, henv, style_entry, fail):
    env = henv()
    err = fail(cli("push", style_entry["id"], "--repo", "tester/x", "--token-env", "WRONG_TOKEN", home=home,
                   env=env | {"WRONG_TOKEN": "hf_wrongWrongWrong123"}), "refused")
    assert "hf_wrongWrongWrong123" not in err
    fail(cli("push", style_entry["id"], "--repo", "tester/x", "--token-env", "UNSET_VAR_X", home=home, env=env),
         "not set")
    fail(cli("push", style_entry["id"], "--repo", "not a repo", home=home, env=env), "not a hub repo id")
    fail(cli("push", "nosuchentry", "--repo", "tester/x", home=home, env=env), "no registry entry")
    fail(cli("push", style_entry["id"], "--repo", "tester/x", "--endpoint", "http://127.0.0.1:9",
             "--token-env", "LORAHUB_TEST_TOKEN", home=home, env=env), "cannot reach")
    fail(cli("pull", "tester/x", home=home, env=env | {"HF_HUB_OFFLINE": "1"}), "HF_HUB_OFFLINE")
    fail(cli("pull", "nobody/nothing", home=home, env=env), "not found")
    fail(cli("pull", "tester/x", "--type", "weird", home=home, env=env), "type 'weird'")
    fail(cli("pull", "tester/x@../../etc", home=home, env=env), "bad revision")
    assert "tester/x" not in hub.state.repos


# ---------------------------------------------------------------------------------------- cards (no network)
def test_card_parse_rejects_bad_front_matter():
    from lorahub.errors import LorahubError
    from lorahub.hub.card import card_fields, parse_card

    meta = parse_card(b"---\nbase_model: [stabilityai/stable-diffusion-2-1]\ninstance_prompt: sks dog\n"
                      b"tags: lora\nlicense: openrail++\n---\n# body\n")
    f = card_fields(meta)
    assert f == {"base_model": "stabilityai/stable-diffusion-2-1", "family": "sd2", "base_model_name": None,
                 "triggers": ["sks dog"],
                 "tags": [], "type": None, "license": "openrail++", "license_name": None, "license_link": None,
                 "widget": []}
    f = card_fields(parse_card(b"---\ntags: [lora, style, anime, base_model:x/y]\nlicense: other\n"
                               b"license_name: my-licence\nwidget:\n- text: a cat\n  output:\n    url: images/a.png\n---\n"))
    assert f["tags"] == ["style", "anime"] and f["type"] == "style" and f["license_name"] == "my-licence"
    assert f["widget"] == [("a cat", "images/a.png")]
    assert parse_card(b"# no front matter\n") == {}
    bomb = "---\na: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8)) + "---\n"
    for bad, msg in [(b"---\ntags: [a\n---\n", "not valid YAML"), (b"---\n- a\n- b\n---\n", "not a mapping"),
                     (b"---\ntags: [a]\n", "closing"), (b"\xff\xfe---", "UTF-8"), (bomb.encode(), "too large")]:
        with pytest.raises(LorahubError, match=msg):
            parse_card(bad)


def test_card_render_is_deterministic_yaml(home, style_entry, tmp_path):
    from lorahub.hub.card import parse_card
    from lorahub.errors import LorahubError
    from lorahub.hub.push import convert, plan_push

    reg = open_reg(home)
    entry = reg.get(style_entry["id"])
    p1 = plan_push(reg, [entry], repo="u/r", workdir=tmp_path / "w1")
    p2 = plan_push(reg, [entry], repo="u/r", workdir=tmp_path / "w2")
    assert p1["readme"] == p2["readme"]
    meta = parse_card(p1["readme"].encode())
    assert yaml.safe_load(yaml.safe_dump(meta)) == meta
    assert meta["widget"][0]["output"]["url"].startswith("images/")
    assert sqlite3.connect(home / "lorahub.db").execute("select count(*) from remotes").fetchone()[0] == 0
    # a conversion that fails is left out of the card, with a note
    def no_diffusers(reg, e, dialect, dest):
        if dialect == "diffusers":
            raise LorahubError("cannot convert")
        return convert(reg, e, dialect, dest)

    p3 = plan_push(reg, [entry], repo="u/r", workdir=tmp_path, converter=no_diffusers)
    assert "no diffusers copy: cannot convert" in p3["notes"]
    assert "pytorch_lora_weights.safetensors" not in [f["path"] for f in p3["files"]]
    assert 'weight_name="arcane_style.safetensors"' in p3["readme"]  # diffusers reads kohya files itself
    reg.close()


def test_canonical_safetensors_bytes_do_not_depend_on_metadata_order(tmp_path):
    """safetensors writes metadata in hash-map order (varies per process); converted files are rewritten
    with a sorted header so the same weights always have the same bytes (and LFS oid)."""
    import torch
    from safetensors.torch import load_file, safe_open, save_file

    from lorahub.hub.push import canonical_safetensors

    t = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.weight": torch.ones(3, dtype=torch.float16)}
    meta = {f"k{i}": f"v{i}" for i in range(12)}
    save_file(t, str(tmp_path / "x.safetensors"), metadata=meta)
    save_file(dict(reversed(t.items())), str(tmp_path / "y.safetensors"), metadata=dict(reversed(meta.items())))
    x = canonical_safetensors(tmp_path / "x.safetensors").read_bytes()
    y = canonical_safetensors(tmp_path / "y.safetensors").read_bytes()
    assert x == y
    assert int.from_bytes(x[:8], "little") % 8 == 0
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(t) and all(torch.equal(back[k], t[k]) for k in t)
    with safe_open(str(tmp_path / "y.safetensors"), "pt") as f:
        assert f.metadata() == meta


def test_card_diffusers_instructions_load_the_pushed_file(cli, home, hub, henv, tmp_path, tiny_sd1, ok):
    """Follow the card: load_lora_weights(weight_name=...) on the file as stored on the hub, fuse at the
    card's α, and compare every touched UNet weight with W0 + α·(alpha/rank)·up·down."""
    import re

    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    src = kohya_lora(tmp_path / "unet_only.safetensors", seed=7, te=False)
    reg = open_reg(home)
    entry, _ = reg.add_file(src, triggers=["zq style"], base="sd1")
    reg.add_preview(entry["id"], png(tmp_path / "g.png"), params={"recommended_alpha": 0.6})
    reg.close()
    ok(cli("push", entry["id"], "--repo", "tester/unet", "--token-env", "LORAHUB_TEST_TOKEN", home=home, env=henv()))
    card = hub.file_bytes("tester/unet", "README.md").decode()
    m = re.search(r'pipe\.load_lora_weights\("tester/unet", weight_name="([^"]+)"\)', card)
    assert m, card
    weight_name = m.group(1)
    scale = float(re.search(r'cross_attention_kwargs=\{"scale": ([0-9.]+)\}', card).group(1))
    assert scale == 0.6
    local = tmp_path / "fromhub"
    local.mkdir()
    (local / weight_name).write_bytes(hub.file_bytes("tester/unet", weight_name))

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1), local_files_only=True)

    def module(p, path):
        obj = p.unet
        for a in path:
            obj = obj[a] if isinstance(a, int) else getattr(obj, a)
        return getattr(obj, "base_layer", obj)

    w0 = {k: module(pipe, v).weight.detach().clone() for k, v in UNET_MODULES.items()}
    pipe.load_lora_weights(str(local), weight_name=weight_name)
    pipe.fuse_lora(lora_scale=scale)
    sd = load_file(str(src))
    for k, path in UNET_MODULES.items():
        rank = sd[f"{k}.lora_down.weight"].shape[0]
        delta = scale * (sd[f"{k}.alpha"] / rank) * sd[f"{k}.lora_up.weight"] @ sd[f"{k}.lora_down.weight"]
        got = module(pipe, path).weight.detach() - w0[k]
        assert delta.abs().max() > 1e-3
        torch.testing.assert_close(got, delta, atol=1e-6, rtol=1e-4)


def test_card_uses_sweep_params_and_alpha_override(home, tmp_path):
    """A sweep of two LoRAs stores prompts, alphas and alphas2: the card reads the list of each entry."""
    from lorahub.hub.push import plan_push

    reg = open_reg(home)
    a, _ = reg.add_file(kohya_lora(tmp_path / "first.safetensors", seed=11), triggers=["tok a"])
    b, _ = reg.add_file(kohya_lora(tmp_path / "second.safetensors", seed=12), triggers=["tok b"])
    params = {"loras": [{"name": "first", "id": a["id"]}, {"name": "second", "id": b["id"]}],
              "prompts": ["tok a, a red house", "tok a, a dog"], "alphas": [0.0, 0.25, 1.0],
              "alphas2": [0.5, 0.75]}
    grid = png(tmp_path / "grid.png")
    for e in (a, b):
        reg.add_preview(e["id"], grid, params=params)
    known = {("pytorch_lora_weights.safetensors", e["sha256"], "diffusers"): "0" * 64 for e in (a, b)}
    pa = plan_push(reg, [reg.get(a["id"])], repo="u/a", workdir=tmp_path, known=known)
    pb = plan_push(reg, [reg.get(b["id"])], repo="u/b", workdir=tmp_path, known=known)
    assert (pa["alpha"], pa["alphas"]) == (None, [0.0, 0.25, 1.0])
    assert (pb["alpha"], pb["alphas"]) == (None, [0.5, 0.75])
    assert pa["widget"][0]["text"] == "tok a, a red house"
    assert "rendered α = 0, 0.25, 1" in pa["readme"] and "<lora:first:1>" in pa["readme"]
    po = plan_push(reg, [reg.get(a["id"])], repo="u/a", workdir=tmp_path, known=known, alpha=0.7)
    assert "**0.7**" in po["readme"] and "<lora:first:0.7>" in po["readme"]
    assert '{"scale": 0.7}' in po["readme"]
    # a diffusers copy known to be on the Hub already is kept, not converted again
    assert not list(tmp_path.glob("*-diffusers.safetensors"))
    assert 'weight_name="pytorch_lora_weights.safetensors"' in po["readme"]
    copy = next(f for f in po["files"] if f["role"] == "converted" and f["dialect"] == "diffusers")
    assert copy["src"] is None and copy["sha256"] == "0" * 64
    reg.close()


def test_pull_real_cloneofsimo_file_with_diffusers_card(cli, hub, henv, tmp_path, ok):
    """A real published pivotal-tuning LoRA (cloneofsimo dialect, with two token embeddings inside)."""
    real = Path(__file__).resolve().parents[2] / "shared" / "real-loras" / "lora_disney.safetensors"
    if not real.exists():
        pytest.skip("real-loras not available")
    card = ("---\nbase_model: runwayml/stable-diffusion-v1-5\ninstance_prompt: <s1><s2> style\nlicense: "
            "creativeml-openrail-m\ntags:\n- text-to-image\n- lora\n- disney\nwidget:\n- text: <s1><s2> style\n---\n")
    sha = hub.seed("cloneofsimo/disney", {"README.md": card.encode(), "lora_disney.safetensors": real.read_bytes(),
                                          "unet/diffusion_pytorch_model.safetensors": b"not pulled"})
    home = tmp_path / "home"
    rep = json.loads(ok(cli("pull", "cloneofsimo/disney", "--json", home=home, env=henv())).stdout)
    assert [e["file"] for e in rep["entries"]] == ["lora_disney.safetensors"]
    assert not [d for d in hub.downloads if "unet/" in d[2]]  # pipeline folders are never downloaded
    reg = open_reg(home)
    e = reg.get(rep["entries"][0]["id"])
    assert e["format"] == "cloneofsimo" and e["base"] == "sd1"
    assert e["triggers"] == ["<s1><s2> style"] and "disney" in e["tags"]
    assert e["source"] == f"cloneofsimo/disney@{sha}"
    import hashlib

    assert e["sha256"] == hashlib.sha256(real.read_bytes()).hexdigest()
    reg.close()


def test_plan_for_diffusers_original_and_name_collisions(home, tmp_path):
    """A diffusers-form original is uploaded as pytorch_lora_weights.safetensors with a kohya copy for the
    webui; a second LoRA with a clashing file name gets a unique one; checkpoints are refused."""
    from safetensors.torch import save_file

    import torch

    from lorahub.errors import LorahubError
    from lorahub.hub.push import plan_push

    g = torch.Generator().manual_seed(5)
    t = {}
    for mod in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"):
        t[f"unet.{mod}.lora_A.weight"] = torch.randn(4, 32, generator=g)
        t[f"unet.{mod}.lora_B.weight"] = torch.randn(32, 4, generator=g)
    d = tmp_path / "d"
    d.mkdir()
    save_file(t, str(d / "pytorch_lora_weights.safetensors"))
    reg = open_reg(home)
    dif, _ = reg.add_file(d / "pytorch_lora_weights.safetensors", name="my_diff")
    assert dif["format"] in ("diffusers", "peft")
    other, _ = reg.add_file(kohya_lora(tmp_path / "my_diff.safetensors", seed=9))
    plan = plan_push(reg, [reg.get(dif["id"]), reg.get(other["id"])], repo="u/r", workdir=tmp_path)
    paths = {f["path"]: f for f in plan["files"]}
    assert paths["pytorch_lora_weights.safetensors"]["role"] == "original"
    assert Path(paths["pytorch_lora_weights.safetensors"]["src"]) == reg.blob_path(dif)
    assert paths["my_diff.safetensors"]["role"] == "converted"      # kohya copy of the diffusers original
    assert paths["my_diff-2.safetensors"]["role"] == "original"     # the second LoRA, renamed
    assert plan["diffusers_file"] == "pytorch_lora_weights.safetensors"
    assert plan["webui_file"] == "my_diff.safetensors"
    with pytest.raises(LorahubError, match="at least one"):
        plan_push(reg, [], repo="u/r", workdir=tmp_path)
    reg.close()


# ---------------------------------------------------------------------------------------- families
@pytest.mark.parametrize("base, base_model, repo, pipe, family_tags", [
    ("flux", "flux-1-schnell", "black-forest-labs/FLUX.1-schnell", "FluxPipeline", ["flux", "flux-diffusers"]),
    ("flux", None, "black-forest-labs/FLUX.1-dev", "FluxPipeline", ["flux", "flux-diffusers"]),
    ("sd3", "sd3.5-large", "stabilityai/stable-diffusion-3.5-large", "StableDiffusion3Pipeline",
     ["sd3", "sd3-diffusers"]),
    ("sd3", None, "stabilityai/stable-diffusion-3-medium-diffusers", "StableDiffusion3Pipeline",
     ["sd3", "sd3-diffusers"]),
    ("sdxl", "pony", "stabilityai/stable-diffusion-xl-base-1.0", "StableDiffusionXLPipeline",
     ["stable-diffusion", "stable-diffusion-xl", "stable-diffusion-xl-diffusers"]),
    ("sd1", "flux-1-dev", "stable-diffusion-v1-5/stable-diffusion-v1-5", "StableDiffusionPipeline",
     ["stable-diffusion", "stable-diffusion-diffusers"]),  # a base model of another family is not named
    ("other:qwen-image", None, None, "DiffusionPipeline", []),
])
def test_card_names_the_base_model_of_every_family(home, tmp_path, base, base_model, repo, pipe, family_tags):
    from lorahub.errors import LorahubError
    from lorahub.hub.card import card_fields, parse_card
    from lorahub.hub.push import plan_push

    def no_copies(*_a):
        raise LorahubError("not converted in this test")

    reg = open_reg(home)
    e, _ = reg.add_file(kohya_lora(tmp_path / "fam.safetensors"), triggers=["zq"])
    e = reg.update(e["id"], base=base, base_model=base_model)
    plan = plan_push(reg, [e], repo="u/fam", workdir=tmp_path / "w", converter=no_copies)
    meta = parse_card(plan["readme"].encode())
    assert meta.get("base_model") == repo
    assert meta["tags"][: 1 + len(family_tags)] == ["text-to-image", *family_tags]
    assert (meta["library_name"], meta["pipeline_tag"]) == ("diffusers", "text-to-image")
    assert f"from diffusers import {pipe}" in plan["readme"]
    assert ("joint_attention_kwargs" in plan["readme"]) == (base in ("sd3", "flux"))
    assert "license" not in meta or base in ("sd1", "sdxl")
    if base_model:
        assert base_model in plan["readme"].split("## Trigger words")[0]
    if base.startswith("other:"):
        assert "LoRA adapter for qwen-image." in plan["readme"]
    # the marker carries the base model as the entry's own field, and a pull reads the family back
    rec = meta["lorahub"]["files"][0]["entry"]
    assert rec.get("base_model") == base_model and "base_model_name" not in rec.get("extra", {})
    if repo:
        assert card_fields(meta)["family"] == base
    reg.close()


def test_cards_before_the_base_model_field_still_read():
    """A card written before the base_model column kept the name in extra.base_model_name: it is read
    as the entry's base model; another card's base_model repo id gives the family and base model."""
    from lorahub.hub.card import base_family, card_fields, read_marker

    sha = "a" * 64
    marker = read_marker({"lorahub": {"files": [{"path": "x.safetensors", "role": "original", "sha256": sha,
                                                 "entry": {"name": "x", "base": "sdxl",
                                                           "extra": {"base_model_name": "Pony"}}}]}})
    entry = marker["x.safetensors"].entry
    assert entry["base_model"] == "pony" and "base_model_name" not in entry["extra"] and entry["base"] == "sdxl"
    assert (card_fields({"base_model": "black-forest-labs/FLUX.1-dev"})["family"],
            card_fields({"base_model": "black-forest-labs/FLUX.1-dev"})["base_model_name"]) == ("flux", "flux-1-dev")
    assert [base_family(b) for b in ("stabilityai/stable-diffusion-3.5-large", "runwayml/stable-diffusion-v1-5",
                                     "stabilityai/stable-diffusion-2-1", "Qwen/Qwen-Image", "someone/thing")] == \
        ["sd3", "sd1", "sd2", "other:qwen-image", None]
    assert card_fields({"tags": ["flux", "sd3-diffusers", "style"]})["tags"] == ["style"]


def test_push_of_a_home_without_a_registry_creates_nothing(cli, tmp_path, fail):
    nowhere = tmp_path / "no-home"
    res = cli("push", "some-entry", "--repo", "u/r", "--home", nowhere)
    fail(res, "no lorahub registry")
    assert not nowhere.exists()


def test_tiny_lora_files_are_deterministic(tmp_path):
    """The test LoRAs are written byte for byte the same every time (and in every process): their
    SHA-256s, AutoV2s and the cards and repos made from them do not change from run to run."""
    cached = tiny_loras.ensure()   # written once per machine, maybe by another process
    again = tiny_loras.write_all(tmp_path / "again")
    assert sorted(again) == sorted(cached)
    assert [k for k in again if again[k].read_bytes() != cached[k].read_bytes()] == []
    meta = {f"key{i}": str(i) for i in range(20)}
    one = tiny_loras.kohya_file(tmp_path / "one.safetensors", meta=meta).read_bytes()
    assert tiny_loras.kohya_file(tmp_path / "two.safetensors", meta=dict(reversed(meta.items()))).read_bytes() == one


@pytest.mark.parametrize("base, version, arch, impl, reso", [
    ("flux", "flux1", "flux-1/lora", "https://github.com/black-forest-labs/flux", "1024x1024"),
    ("sd3", "sd3", "stable-diffusion-3/lora", "diffusers", "1024x1024"),
    ("sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models",
     "1024x1024"),
    ("sd1", "sd_v1", "stable-diffusion-v1/lora", "diffusers", "512x512"),
])
def test_derived_kohya_metadata_names_every_family_as_kohya_does(base, version, arch, impl, reso):
    """What an extract/resize/merge writes (kohya.derived_metadata) names DiT families the way kohya
    sd-scripts does (flux_utils.MODEL_VERSION_FLUX_V1, sai_model_spec's architectures and defaults), and
    lorahub reads its own words back as the family."""
    from lorahub.formats.families import from_text
    from lorahub.formats.kohya import derived_metadata

    model = tiny_loras.random_lora({"some.module": (16, 8)}, base=base)
    meta = derived_metadata(model, title="t")
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"], meta["modelspec.implementation"],
            meta["modelspec.resolution"]) == (version, arch, impl, reso)
    assert from_text(meta["modelspec.architecture"], "x").base == base
    assert from_text(meta["ss_base_model_version"], "x").base == base
    # an input's own architecture (its variant) is kept when it names the same family
    if base in ("flux", "sd3"):
        own = {"flux": "flux-1-schnell", "sd3": "stable-diffusion-3-5-large"}[base]
        kept = derived_metadata(model, title="t", inherited={"modelspec.architecture": f"{own}/lora"})
        assert kept["modelspec.architecture"] == f"{own}/lora"
