"""Entries round-trip whole through the Hub (issue #14 item 2) and cards hold valid metadata for every
entry (item 8): push -> pull into a fresh home through a fresh HF cache gives the same entry, and a
re-push of the pulled entry finds the repo up to date (the card is reproduced byte for byte).
"""

from __future__ import annotations

import hashlib

import pytest

import lorahub
from lorahub import tiny_loras

EVERY_KIND = ["sd1-kohya", "sd1-diffusers", "sd1-peft", "sd1-cloneofsimo", "sd1-locon", "sd1-loha", "sd1-lokr",
              "sd1-dora", "sd1-ti-webui", "sd1-ti-diffusers", "sdxl-kohya", "sdxl-diffusers", "sdxl-ti"]
CARRIED = ("sha256", "name", "kind", "format", "base", "type", "triggers", "tags", "description", "rank", "alpha")


def fresh_cache(monkeypatch, path):
    """A second, empty Hugging Face cache for the pulling side."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(path))


@pytest.mark.parametrize("kind", EVERY_KIND)
def test_push_then_pull_gives_the_same_entry(kind, home, hub, hub_online, tmp_path, monkeypatch, png_bytes):
    src = tiny_loras.ensure()[kind]
    image = tmp_path / "grid.png"
    image.write_bytes(png_bytes((10, 200, 90)))
    with lorahub.open_registry(home) as reg:
        e, _ = reg.add_file(src, name=f"my-{kind}", type="character", triggers=["zx person", "red coat"],
                            tags=["portrait", "v2"], description="A test entry.\n\nSecond paragraph: *markdown*.",
                            extra={"preferred_weight": 0.7, "negative_text": "blurry"})
        reg.update(e["id"], base_model="pony")
        reg.add_preview(e["id"], image, params={"prompt": "zx person, a castle", "alphas": [0.5, 1.0],
                                                "recommended_alpha": 0.8, "loras": [{"id": e["id"]}]})
        e = reg.get(e["id"])
    kw = dict(endpoint=hub_online.endpoint, token_env=hub_online.token_env)
    repo = f"tester/rt-{kind}"
    pushed = lorahub.push([e["id"]], repo=repo, registry=home, **kw)
    fm, err = hub.front_matter(hub.file_bytes(repo, "README.md").decode())
    assert err is None and hub.metadata_errors(fm) == []

    fresh_cache(monkeypatch, tmp_path / "hf-pull")
    home2 = tmp_path / "home2"
    res = lorahub.pull(repo, registry=home2, **kw)
    assert [x["created"] for x in res.entries] == [True]
    with lorahub.open_registry(home2) as reg2:
        got = reg2.get(res.entries[0]["id"])
        assert {k: got[k] for k in CARRIED} == {k: e[k] for k in CARRIED}
        assert {k: got["extra"][k] for k in ("preferred_weight", "negative_text")} == \
            {"preferred_weight": 0.7, "negative_text": "blurry"}
        assert got["base_model"] == "pony" and "base_model_name" not in got["extra"]
        assert reg2.blob_path(got).read_bytes() == src.read_bytes()
        pv = reg2.previews(got["id"])
        assert [p["sha256"] for p in pv] == [hashlib.sha256(image.read_bytes()).hexdigest()]
        assert pv[0]["params"]["recommended_alpha"] == 0.8 and pv[0]["params"]["prompt"] == "zx person, a castle"
        assert [(r["repo"], r["commit"]) for r in reg2.remotes(got["id"])] == [(repo, pushed.commit)]

    # pulling what lorahub pushed gave the same entry: pushing it back changes nothing on the Hub
    back = lorahub.push([got["id"]], repo=repo, registry=home2, **kw)
    assert not back.uploaded and back.commit == pushed.commit, back.sent


def test_cards_hold_valid_metadata_for_every_entry(home, hub, hub_online, tmp_path):
    """Unknown base, no triggers: no base_model, no instance_prompt: null, no licence; a free-text licence
    becomes `other` with its `license_name`. The test hub validates front matter as the Hub does."""
    kw = dict(endpoint=hub_online.endpoint, token_env=hub_online.token_env)
    with lorahub.open_registry(home) as reg:
        bare, _ = reg.add_file(tiny_loras.kohya_file(tmp_path / "bare.safetensors", seed=3, width=100))
        lic, _ = reg.add_file(tiny_loras.kohya_file(tmp_path / "lic.safetensors", seed=4), base="sd1",
                              extra={"license": "My Custom Licence v2", "license_link": "https://example.com/l"})
    assert bare["base"] == "unknown" and bare["triggers"] == []
    lorahub.push([bare["id"]], repo="tester/bare", registry=home, **kw)
    fm, _ = hub.front_matter(hub.file_bytes("tester/bare", "README.md").decode())
    assert hub.metadata_errors(fm) == []
    assert not {"base_model", "instance_prompt", "license"} & set(fm)
    assert None not in fm.values()
    lorahub.push([lic["id"]], repo="tester/lic", registry=home, **kw)
    fm, _ = hub.front_matter(hub.file_bytes("tester/lic", "README.md").decode())
    assert (fm["license"], fm["license_name"], fm["license_link"]) == \
        ("other", "my-custom-licence-v2", "https://example.com/l")
    assert fm["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_repush_of_a_pulled_entry_keeps_its_base_model_and_licence(hub, hub_online, tmp_path):
    card = (b"---\nbase_model: runwayml/stable-diffusion-v1-5\nlicense: other\nlicense_name: flux-like-nc\n"
            b"license_link: https://example.com/licence\ninstance_prompt: mystyle\ntags: [lora, style]\n---\n")
    lora = tiny_loras.kohya_file(tmp_path / "mystyle.safetensors", seed=12).read_bytes()
    hub.seed("someone/mystyle", {"README.md": card, "mystyle.safetensors": lora})
    home = tmp_path / "home"
    kw = dict(endpoint=hub_online.endpoint, token_env=hub_online.token_env)
    res = lorahub.pull("someone/mystyle", registry=home, **kw)
    with lorahub.open_registry(home) as reg:
        e = reg.get(res.entries[0]["id"])
    assert (e["type"], e["tags"], e["triggers"]) == ("style", ["style"], ["mystyle"])
    lorahub.push([e["id"]], repo="tester/mystyle", registry=home, **kw)
    fm, _ = hub.front_matter(hub.file_bytes("tester/mystyle", "README.md").decode())
    assert fm["base_model"] == "runwayml/stable-diffusion-v1-5"   # not the family's default
    assert (fm["license"], fm["license_name"], fm["license_link"]) == \
        ("other", "flux-like-nc", "https://example.com/licence")
    assert hub.metadata_errors(fm) == []
