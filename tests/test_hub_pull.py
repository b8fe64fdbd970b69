"""Which files a pull registers, from evidence (issue #14 items 1, 6, 7), with the real huggingface_hub
client against tests/hubserver.py.

Most tests call the library in-process (``hub_online``: the client switched online, Xet off, a fresh HF
cache); the command line runs in child processes where its output is what is tested.
"""

from __future__ import annotations

import hashlib
import json

import pytest

import lorahub
from lorahub import tiny_loras


def attn(n: int | None = None) -> dict:
    """Attention projections of the tiny SD1 UNet and text encoder (canonical name -> shape)."""
    from lorahub.formats.names import get_arch

    mods = {k: s for k, s in get_arch("tiny-sd1").modules.items()
            if k.endswith(("to_q", "to_k", "to_v", "q_proj", "v_proj"))}
    return dict(list(mods.items())[:n]) if n else mods


def lora_bytes(tmp_path, seed: int, dialect: str = "diffusers", **kw) -> bytes:
    p = tiny_loras.lora_file(tmp_path / f"gen-{seed}-{dialect}.safetensors", attn(), seed=seed, dialect=dialect,
                             **kw)
    return p.read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gets(hub, *paths) -> list:
    """Full downloads (GET) of these repo paths (header range reads are not downloads)."""
    return [d for d in hub.downloads if d[0] == "GET" and d[2] in paths]


TRAINING_CARD = b"""---
base_model: runwayml/stable-diffusion-v1-5
library_name: diffusers
license: creativeml-openrail-m
instance_prompt: a photo of sks dog
tags:
- text-to-image
- diffusers
- lora
- diffusers-training
- stable-diffusion
- stable-diffusion-diffusers
---
# LoRA DreamBooth - someone/sks-dog
"""


# ---------------------------------------------------------------------------------------- item 1: shapes
def test_training_output_repo_pulls_the_final_weights(hub, hub_online, tmp_path):
    """diffusers' training scripts upload the whole output folder: the final weights at the top level and
    intermediate checkpoints in checkpoint-500/ and checkpoint-1000/ (with optimizer pickles). A pull
    registers the final weights; the checkpoints only when asked for by file or pattern."""
    final, c500, c1000 = (lora_bytes(tmp_path, s) for s in (30, 31, 32))
    hub.seed("someone/sks-dog", {
        "README.md": TRAINING_CARD, "pytorch_lora_weights.safetensors": final,
        "checkpoint-500/pytorch_lora_weights.safetensors": c500, "checkpoint-500/optimizer.bin": b"\x80\x02pickle",
        "checkpoint-500/random_states_0.pkl": b"\x80\x02pickle",
        "checkpoint-1000/pytorch_lora_weights.safetensors": c1000, "checkpoint-1000/optimizer.bin": b"\x80\x02p",
        "logs/dreambooth-lora/events.out.tfevents.1": b"log", "image_0.png": b"not an image"})
    home = tmp_path / "home"
    kw = dict(registry=home, endpoint=hub_online.endpoint, token_env=hub_online.token_env)
    res = lorahub.pull("someone/sks-dog", **kw)
    assert [(e["file"], e["name"], e["created"]) for e in res.entries] == \
        [("pytorch_lora_weights.safetensors", "sks-dog", True)]
    with lorahub.open_registry(home) as reg:
        e = reg.get(res.entries[0]["id"])
        assert e["sha256"] == sha(final) and e["format"] == "diffusers" and e["base"] == "sd1"
        assert e["triggers"] == ["a photo of sks dog"] and e["tags"] == []   # the Hub's filter tags are not entry tags
        assert e["extra"]["base_model"] == "runwayml/stable-diffusion-v1-5"
    why = {s["file"]: s["why"] for s in res.skipped}
    assert "intermediate training checkpoint" in why["checkpoint-500/pytorch_lora_weights.safetensors"]
    assert "intermediate training checkpoint" in why["checkpoint-1000/pytorch_lora_weights.safetensors"]
    # the checkpoints were neither downloaded nor even read
    ck = [d for d in hub.downloads if d[2].startswith("checkpoint-")]
    assert ck == []
    assert "image_0.png" in why  # not an image: reported, not imported

    # intermediate checkpoints on request: by pattern (several files) and by file name
    res = lorahub.pull("someone/sks-dog", include=["checkpoint-*/*.safetensors"], **kw)
    got = {e["file"]: e for e in res.entries}
    assert set(got) == {"checkpoint-500/pytorch_lora_weights.safetensors",
                        "checkpoint-1000/pytorch_lora_weights.safetensors"}
    assert got["checkpoint-500/pytorch_lora_weights.safetensors"]["name"] == "sks-dog-checkpoint-500"
    with lorahub.open_registry(home) as reg:
        assert reg.get(got["checkpoint-1000/pytorch_lora_weights.safetensors"]["id"])["sha256"] == sha(c1000)
        assert reg.count() == 3
    res = lorahub.pull("someone/sks-dog", file="checkpoint-500/pytorch_lora_weights.safetensors", **kw)
    assert [e["created"] for e in res.entries] == [False]


def test_unrelated_loras_side_by_side_are_both_registered(hub, hub_online, tmp_path):
    """A diffusers LoRA next to a kohya file is not "the diffusers form of another file" unless its
    weights say so: different ΔW -> both registered; the same ΔW in two dialects -> one, the other skipped."""
    kohya = lora_bytes(tmp_path, 40, "kohya")
    other = lora_bytes(tmp_path, 41, "diffusers")
    hub.seed("mixed/two", {"style.safetensors": kohya, "pytorch_lora_weights.safetensors": other})
    home = tmp_path / "home"
    kw = dict(registry=home, endpoint=hub_online.endpoint, token_env=hub_online.token_env)
    res = lorahub.pull("mixed/two", **kw)
    assert sorted(e["file"] for e in res.entries) == ["pytorch_lora_weights.safetensors", "style.safetensors"]
    assert res.skipped == []

    # the same LoRA in both dialects (converted by some other tool, no lorahub card): one entry
    same = lora_bytes(tmp_path, 40, "diffusers")
    assert sha(same) != sha(kohya)
    hub.seed("mixed/same", {"style.safetensors": kohya, "pytorch_lora_weights.safetensors": same})
    res = lorahub.pull("mixed/same", registry=tmp_path / "home2", endpoint=hub_online.endpoint,
                       token_env=hub_online.token_env)
    assert [e["file"] for e in res.entries] == ["style.safetensors"]
    assert len(res.skipped) == 1 and res.skipped[0]["file"] == "pytorch_lora_weights.safetensors"
    assert "same LoRA as style.safetensors" in res.skipped[0]["why"]


def test_push_of_a_diffusers_entry_then_pull_registers_the_original(home, hub, hub_online, tmp_path):
    """lorahub pushes a diffusers-form entry as pytorch_lora_weights.safetensors (the original) plus a
    kohya copy for the webui; the card's lorahub section says which is which, so a pull registers the
    original -- the same SHA-256 -- and never the converted copy."""
    src = tiny_loras.lora_file(tmp_path / "d" / "pytorch_lora_weights.safetensors", attn(), seed=50,
                               dialect="diffusers")
    with lorahub.open_registry(home) as reg:
        entry, _ = reg.add_file(src, name="dogstyle", type="style", triggers=["dgs"], base="sd1")
    kw = dict(endpoint=hub_online.endpoint, token_env=hub_online.token_env)
    pushed = lorahub.push([entry["id"]], repo="tester/dogstyle", registry=home, **kw)
    assert set(pushed.files) == {"pytorch_lora_weights.safetensors", "dogstyle.safetensors", "README.md"}
    text = hub.file_bytes("tester/dogstyle", "README.md").decode()
    fm, _ = hub.front_matter(text)
    roles = {f["path"]: f for f in fm["lorahub"]["files"]}
    assert roles["pytorch_lora_weights.safetensors"]["role"] == "original"
    assert roles["pytorch_lora_weights.safetensors"]["sha256"] == entry["sha256"]
    copy = roles["dogstyle.safetensors"]
    assert copy["role"] == "converted" and copy["from_sha256"] == entry["sha256"] and copy["dialect"] == "kohya"
    assert copy["sha256"] == sha(hub.file_bytes("tester/dogstyle", "dogstyle.safetensors"))

    listing = lorahub.list_hub_repo("tester/dogstyle", **kw)
    acts = {f["path"]: f for f in listing.files}
    assert acts["pytorch_lora_weights.safetensors"]["action"] == "register"
    assert acts["pytorch_lora_weights.safetensors"]["name"] == "dogstyle"
    assert acts["dogstyle.safetensors"]["action"] == "skip" and acts["dogstyle.safetensors"]["card_role"] == "converted"

    res = lorahub.pull("tester/dogstyle", registry=tmp_path / "home2", **kw)
    assert [(e["file"], e["name"]) for e in res.entries] == [("pytorch_lora_weights.safetensors", "dogstyle")]
    assert "converted by lorahub" in res.skipped[0]["why"] and res.skipped[0]["file"] == "dogstyle.safetensors"
    with lorahub.open_registry(tmp_path / "home2") as reg2:
        e2 = reg2.get(res.entries[0]["id"])
        assert e2["sha256"] == entry["sha256"] and e2["format"] == "diffusers"
        assert (e2["type"], e2["triggers"]) == ("style", ["dgs"])

    # a copy changed on the Hub after the push holds other bytes than the card records: no longer
    # evidence; its weights differ too, so both files are registered
    hub.seed("tester/dogstyle", {"dogstyle.safetensors": lora_bytes(tmp_path, 51, "kohya")})
    res = lorahub.pull("tester/dogstyle", registry=tmp_path / "home3", **kw)
    assert sorted(e["file"] for e in res.entries) == ["dogstyle.safetensors", "pytorch_lora_weights.safetensors"]


def test_subfolders_only_when_the_top_level_has_no_lora(hub, hub_online, tmp_path):
    a, b = lora_bytes(tmp_path, 60, "kohya"), lora_bytes(tmp_path, 61, "kohya")
    kw = dict(endpoint=hub_online.endpoint, token_env=hub_online.token_env)
    hub.seed("u/nested", {"loras/v2/style.safetensors": a, "README.md": b"# only a subfolder\n"})
    res = lorahub.pull("u/nested", registry=tmp_path / "h1", **kw)
    assert [e["file"] for e in res.entries] == ["loras/v2/style.safetensors"]
    hub.seed("u/both", {"style.safetensors": a, "extra/other.safetensors": b})
    res = lorahub.pull("u/both", registry=tmp_path / "h2", **kw)
    assert [e["file"] for e in res.entries] == ["style.safetensors"]
    assert res.skipped == [{"file": "extra/other.safetensors",
                            "why": "in a subfolder; the repo's top level holds its LoRA"}]
    # a repo of nothing but checkpoints says so, and how to take one
    hub.seed("u/ckpts", {"checkpoint-200/pytorch_lora_weights.safetensors": a})
    with pytest.raises(lorahub.NotFound, match="only intermediate training checkpoints .checkpoint-200"):
        lorahub.pull("u/ckpts", registry=tmp_path / "h3", **kw)


def test_pickle_only_repo_names_the_file_it_will_not_load(cli, hub, henv, tmp_path, fail):
    hub.seed("old/bin", {"pytorch_lora_weights.bin": b"\x80\x02}q\x00." * 50, "README.md": b"# old\n"})
    err = fail(cli("pull", "old/bin", home=tmp_path / "h", env=henv()), "pytorch_lora_weights.bin", "pickle")
    assert "never unpickles" in err
    assert not [d for d in hub.downloads if d[2].endswith(".bin")]   # not even downloaded
    fail(cli("pull", "old/bin", "--file", "pytorch_lora_weights.bin", home=tmp_path / "h", env=henv()),
         "pytorch_lora_weights.bin")


def test_textual_inversion_named_after_the_repo_and_images_become_previews(hub, hub_online, tmp_path, png_bytes):
    """diffusers' textual_inversion script uploads learned_embeds.safetensors and the card's images."""
    emb = tiny_loras.save_tensors(tmp_path / "le.safetensors", {"<cat-toy>": tiny_loras.embedding_tensors(
        vectors=1, seed=3)["emb_params"][0]}).read_bytes()
    red, blue, green = png_bytes((255, 0, 0)), png_bytes((0, 0, 255)), png_bytes((0, 255, 0))
    card = (b"---\nbase_model: runwayml/stable-diffusion-v1-5\nlicense: creativeml-openrail-m\ntags:\n"
            b"- textual_inversion\n- diffusers\nwidget:\n- text: a <cat-toy> on a beach\n  output:\n"
            b"    url: images/beach.png\n---\n# Textual inversion\n")
    hub.seed("alice/cat-toy", {"README.md": card, "learned_embeds.safetensors": emb, "images/beach.png": red,
                               "images/other.png": blue, "docs/diagram.png": green})
    home = tmp_path / "home"
    res = lorahub.pull("alice/cat-toy", registry=home, endpoint=hub_online.endpoint, token_env=hub_online.token_env)
    assert [(e["name"], e["kind"]) for e in res.entries] == [("cat-toy", "textual-inversion")]
    with lorahub.open_registry(home) as reg:
        e = reg.get(res.entries[0]["id"])
        assert e["base"] == "sd1" and e["triggers"] == ["<cat-toy>"]
        pv = reg.previews(e["id"])
        assert [p["sha256"] for p in pv] == [sha(red)]   # the widget's image
        assert pv[0]["params"]["prompt"] == "a <cat-toy> on a beach"
        assert open(pv[0]["path"], "rb").read() == red
    # without a widget: the top level's and images/'s pictures
    lora = lora_bytes(tmp_path, 70, "kohya")
    hub.seed("bob/pics", {"style.safetensors": lora, "cover.png": red, "images/b.png": blue, "docs/d.png": green})
    res = lorahub.pull("bob/pics", registry=home, endpoint=hub_online.endpoint, token_env=hub_online.token_env)
    with lorahub.open_registry(home) as reg:
        got = sorted(p["sha256"] for p in reg.previews(res.entries[0]["id"]))
    assert got == sorted([sha(red), sha(blue)])
    res = lorahub.pull("bob/pics", registry=tmp_path / "h2", previews=False, endpoint=hub_online.endpoint,
                       token_env=hub_online.token_env)
    assert res.previews == []


def test_pull_list_shows_the_plan_before_downloading(cli, hub, henv, tmp_path, fail, ok):
    final, c500 = lora_bytes(tmp_path, 80), lora_bytes(tmp_path, 81)
    hub.seed("someone/run", {"README.md": TRAINING_CARD, "pytorch_lora_weights.safetensors": final,
                             "checkpoint-500/pytorch_lora_weights.safetensors": c500,
                             "unet/diffusion_pytorch_model.safetensors": b"x" * 10})
    rep = json.loads(ok(cli("pull", "someone/run", "--list", "--json", env=henv())).stdout)
    assert rep["register"] == ["pytorch_lora_weights.safetensors"]
    rows = {f["path"]: f for f in rep["files"]}
    assert rows["pytorch_lora_weights.safetensors"].items() >= {
        "action": "register", "name": "run", "kind": "lora", "format": "diffusers", "size": len(final),
        "sha256": sha(final)}.items()
    assert rows["checkpoint-500/pytorch_lora_weights.safetensors"]["action"] == "skip"
    assert rows["unet/diffusion_pytorch_model.safetensors"]["action"] == "other"
    assert rep["card"]["base_model"] == "runwayml/stable-diffusion-v1-5"
    assert gets(hub, "pytorch_lora_weights.safetensors") == []   # only its header was read
    rep = json.loads(ok(cli("pull", "someone/run", "--list", "--include", "checkpoint-*/*", "--json",
                            env=henv())).stdout)
    assert rep["register"] == ["checkpoint-500/pytorch_lora_weights.safetensors"]
    text = ok(cli("pull", "someone/run", "--list", env=henv())).stdout
    assert "pytorch_lora_weights.safetensors" in text and "register as run" in text
    assert "intermediate training checkpoint" in text
    fail(cli("pull", "someone/run", "--include", "*.ckpt", home=tmp_path / "h", env=henv()), "matches *.ckpt")


# ---------------------------------------------------------------------------------------- item 6: offline
def test_offline_pull_from_the_hf_cache(cli, hub, henv, tmp_path, fail, ok):
    """With HF_HUB_OFFLINE=1 a pull works from the user's Hugging Face cache for a full commit sha or a
    cached ref, as hf_hub_download does; only what truly needs the network is refused."""
    lora = lora_bytes(tmp_path, 90, "kohya")
    card = b"---\nbase_model: stabilityai/stable-diffusion-xl-base-1.0\ninstance_prompt: zq\ntags: [style]\n---\n"
    commit = hub.seed("carol/zq", {"README.md": card, "zq.safetensors": lora})
    env = henv("hf")
    online = json.loads(ok(cli("pull", "carol/zq", "--json", home=tmp_path / "h0", env=env)).stdout)
    assert online["commit"] == commit and not online["offline"]
    n_requests = len(hub.requests)
    off = env | {"HF_HUB_OFFLINE": "1"}
    for spec in (f"carol/zq@{commit}", "carol/zq", "carol/zq@main"):
        home = tmp_path / f"h-{len(spec)}"
        rep = json.loads(ok(cli("pull", spec, "--json", home=home, env=off)).stdout)
        assert rep["offline"] and rep["commit"] == commit
        assert [e["file"] for e in rep["entries"]] == ["zq.safetensors"]
        with lorahub.open_registry(home) as reg:
            e = reg.get(rep["entries"][0]["id"])
            assert e["sha256"] == sha(lora) and e["triggers"] == ["zq"] and e["type"] == "style"
            assert e["extra"]["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    rep = json.loads(ok(cli("pull", "carol/zq", "--list", "--json", env=off)).stdout)
    assert rep["offline"] and rep["register"] == ["zq.safetensors"]
    assert len(hub.requests) == n_requests   # nothing went to the network
    # what the cache cannot answer is refused clearly
    fail(cli("pull", "carol/zq@dev", home=tmp_path / "hx", env=off), "HF_HUB_OFFLINE", "carol/zq@dev",
         "not in the Hugging Face cache")
    fail(cli("pull", "carol/other", home=tmp_path / "hx", env=off), "not in the Hugging Face cache")
    fail(cli("pull", "--search", "zq", env=off), "HF_HUB_OFFLINE", "search")
    assert len(hub.requests) == n_requests


# ---------------------------------------------------------------------------------------- item 7: search
def test_search_finds_kohya_only_repos_and_textual_inversions(hub, hub_online, tmp_path):
    lora = lora_bytes(tmp_path, 95, "kohya")
    hub.seed("k/kohya-only", {"README.md": b"---\ntags: [lora, stable-diffusion, anime]\n---\n", "a.safetensors": lora})
    hub.seed("t/ti-embed", {"README.md": b"---\ntags: [textual_inversion, stable-diffusion]\n---\n",
                            "learned_embeds.safetensors": lora})
    hub.seed("d/diff-lora", {"README.md": b"---\ntags: [lora, diffusers]\nlibrary_name: diffusers\n---\n",
                             "pytorch_lora_weights.safetensors": lora})
    hub.seed("c/checkpoint", {"README.md": b"---\ntags: [stable-diffusion, diffusers]\n---\n"})
    rows = lorahub.search_hub(None, endpoint=hub_online.endpoint)
    kinds = {r.repo: r.kind for r in rows}
    assert kinds == {"k/kohya-only": "lora", "t/ti-embed": "textual-inversion", "d/diff-lora": "lora"}
    assert {r.repo: r.tags for r in rows}["k/kohya-only"] == ["anime"]
    assert len(lorahub.search_hub(None, endpoint=hub_online.endpoint, limit=2)) == 2
