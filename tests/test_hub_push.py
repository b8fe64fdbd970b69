"""What a push uploads and where (issue #14 items 3, 4, 5, 7's --create-pr) and the test hub's
fidelity (per-repo LFS objects, 403 on other namespaces, 401 on invalid tokens, gated repos, tree
pagination), with the real huggingface_hub client against tests/hubserver.py.
"""

from __future__ import annotations

import hashlib
import json

import pytest

import lorahub
from lorahub import tiny_loras


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def entry(home, tmp_path):
    """A registered kohya LoRA (its push: the original, a diffusers copy and the card)."""
    src = tiny_loras.kohya_file(tmp_path / "inkwash.safetensors", seed=5)
    with lorahub.open_registry(home) as reg:
        e, _ = reg.add_file(src, triggers=["inkwash"], type="style", base="sd1")
    return e


def push(hub_online, entry, repo, **kw):
    return lorahub.push([entry["id"]], repo=repo, endpoint=hub_online.endpoint, token_env=hub_online.token_env,
                        **kw)


# ---------------------------------------------------------------------------------------- item 3
def test_push_compares_the_remote_tree_not_the_readme(home, hub, hub_online, entry):
    first = push(hub_online, entry, "tester/ink")
    assert first.uploaded and first.created
    assert set(first.sent) == {"inkwash.safetensors", "pytorch_lora_weights.safetensors", "README.md"}
    again = push(hub_online, entry, "tester/ink")
    assert not again.uploaded and again.sent == [] and again.commit == first.commit
    # a file deleted on the Hub (the card unchanged): the push sees it is missing and sends only it
    hub.seed("tester/ink", {}, delete=["pytorch_lora_weights.safetensors"])
    n_commits = len(hub.commits)
    fixed = push(hub_online, entry, "tester/ink")
    assert fixed.uploaded and fixed.sent == ["pytorch_lora_weights.safetensors"]
    assert len(hub.commits) == n_commits + 1 and fixed.commit == hub.head("tester/ink")
    assert "pytorch_lora_weights.safetensors" in hub.files("tester/ink")
    with lorahub.open_registry(home) as reg:
        assert reg.remotes(entry["id"])[0]["commit"] == fixed.commit
    # a file changed on the Hub (same path, other bytes): sent again
    hub.seed("tester/ink", {"inkwash.safetensors": b"\0" * 64})
    fixed = push(hub_online, entry, "tester/ink")
    assert fixed.sent == ["inkwash.safetensors"]
    with lorahub.open_registry(home) as reg:
        assert hub.file_bytes("tester/ink", "inkwash.safetensors") == reg.blob_path(entry).read_bytes()


def test_push_to_a_new_branch_made_from_main_uploads_what_main_lacks(hub, hub_online, entry):
    push(hub_online, entry, "tester/br")
    hub.seed("tester/br", {}, delete=["inkwash.safetensors"])   # main keeps the card, loses the weights
    main = hub.head("tester/br")
    res = push(hub_online, entry, "tester/br", revision="dev")
    assert res.uploaded and res.sent == ["inkwash.safetensors"] and res.revision == "dev"
    assert hub.head("tester/br", "main") == main and hub.head("tester/br", "dev") == res.commit
    assert "inkwash.safetensors" in hub.files("tester/br", "dev")
    assert "inkwash.safetensors" not in hub.files("tester/br", "main")


def test_a_push_with_other_entries_removes_what_the_previous_push_left(home, hub, hub_online, entry, tmp_path):
    push(hub_online, entry, "tester/swap")
    hub.seed("tester/swap", {"notes.txt": b"the author's own file"})
    with lorahub.open_registry(home) as reg:
        other, _ = reg.add_file(tiny_loras.kohya_file(tmp_path / "other.safetensors", seed=9), base="sd1")
    res = push(hub_online, other, "tester/swap")
    files = hub.files("tester/swap")
    assert "other.safetensors" in files and "inkwash.safetensors" not in files
    assert res.removed == ["inkwash.safetensors"]
    assert "notes.txt" in files   # not lorahub's: left alone


# ---------------------------------------------------------------------------------------- item 4
def test_private_on_an_existing_public_repo_makes_it_private(cli, hub, henv, hub_online, entry, tmp_path, fail):
    push(hub_online, entry, "tester/vis")
    assert hub.state.repos["tester/vis"]["private"] is False
    res = push(hub_online, entry, "tester/vis", private=True)
    assert res.private is True and not res.uploaded
    assert hub.state.repos["tester/vis"]["private"] is True
    assert any("private now" in n for n in res.notes)
    assert hub.settings == [("tester/vis", {"visibility": "private"})]
    # now only its owner sees it
    fail(cli("pull", "tester/vis", home=tmp_path / "h", env=henv() | {"LORAHUB_TEST_TOKEN": ""}), "not found")
    # pushing without --private leaves a private repo private
    assert push(hub_online, entry, "tester/vis").private is True
    assert hub.state.repos["tester/vis"]["private"] is True


# ---------------------------------------------------------------------------------------- item 5: Xet
def test_default_upload_path_through_xet_falls_back_to_lfs(cli, home, hub, henv, hub_online, entry, ok):
    """Real users have hf_xet installed: the client asks the hub for a Xet token first. This hub has
    no Xet storage (404): the push says so and uploads through Git LFS."""
    env = henv()
    del env["HF_HUB_DISABLE_XET"]
    rep = json.loads(ok(cli("push", entry["id"], "--repo", "tester/xet", "--token-env", "LORAHUB_TEST_TOKEN",
                            "--json", home=home, env=env)).stdout)
    assert hub.xet_requests == ["tester/xet"]   # the client did take the Xet path first
    assert rep["uploaded"] and rep["transfer"] == "lfs"
    assert any("no Xet storage" in n and "answered 404" in n and "Git LFS" in n for n in rep["notes"])
    assert len(hub.lfs_uploads) == 2   # the original and its diffusers copy
    with lorahub.open_registry(home) as reg:
        assert hub.file_bytes("tester/xet", "inkwash.safetensors") == reg.blob_path(entry).read_bytes()
    # with Xet switched off (HF_HUB_DISABLE_XET=1) the client goes straight to LFS
    res = push(hub_online, entry, "tester/lfs")
    assert res.uploaded and res.transfer is None and hub.xet_requests == ["tester/xet"]


def test_a_failed_first_push_says_what_happened_and_leaves_no_repo(cli, home, hub, henv, hub_online, entry,
                                                                    monkeypatch, fail):
    hub.lfs = False   # this hub can store no large file at all: neither Xet nor LFS
    env = henv()
    del env["HF_HUB_DISABLE_XET"]
    err = fail(cli("push", entry["id"], "--repo", "tester/nowhere", "--token-env", "LORAHUB_TEST_TOKEN",
                   home=home, env=env), "no Xet storage", "answered 404", "Git LFS", "501",
               "deleted again")
    assert "cannot reach" not in err
    assert "tester/nowhere" not in hub.state.repos and hub.deleted == ["tester/nowhere"]
    with lorahub.open_registry(home) as reg:
        assert reg.remotes(entry["id"]) == []
    # Xet off: the LFS refusal alone, same clean-up
    with pytest.raises(lorahub.LorahubError, match="501.*Git LFS uploads are disabled.*deleted again"):
        push(hub_online, entry, "tester/nowhere")
    assert "tester/nowhere" not in hub.state.repos and hub.deleted == ["tester/nowhere"] * 2
    # an existing repo is never deleted by a failed push
    hub.lfs = True
    push(hub_online, entry, "tester/kept")
    hub.lfs = False
    hub.seed("tester/kept", {}, delete=["inkwash.safetensors"])
    hub.state.repos["tester/kept"]["lfs"].clear()
    with pytest.raises(lorahub.LorahubError, match="501") as exc:
        push(hub_online, entry, "tester/kept")
    assert "deleted" not in str(exc.value) and "tester/kept" in hub.state.repos


# ---------------------------------------------------------------------------------------- --create-pr
def test_create_pr_on_someone_elses_repo(cli, home, hub, henv, hub_online, entry, ok):
    alice = hub.add_user("alice")
    hub.seed("alice/ink", {"README.md": b"# alice's repo\n"})
    head = hub.head("alice/ink")
    # a direct push into another user's namespace is refused, and nothing is created
    with pytest.raises(lorahub.LorahubError, match="403.*rights to write to alice/ink"):
        push(hub_online, entry, "alice/ink")
    with pytest.raises(lorahub.LorahubError, match="403.*namespace"):
        push(hub_online, entry, "alice/new")
    assert "alice/new" not in hub.state.repos and hub.head("alice/ink") == head
    res = push(hub_online, entry, "alice/ink", create_pr=True)
    assert res.uploaded and res.revision == "refs/pr/1" and res.pr_url.endswith("/alice/ink/discussions/1")
    assert hub.head("alice/ink") == head   # main untouched
    assert hub.head("alice/ink", "refs/pr/1") == res.commit
    assert "inkwash.safetensors" in hub.files("alice/ink", "refs/pr/1")
    with lorahub.open_registry(home) as reg:
        assert reg.remotes(entry["id"])[0]["revision"] == "refs/pr/1"
    # the pull request is readable as a revision
    res2 = lorahub.pull("alice/ink@refs/pr/1", registry=home.parent / "h2", endpoint=hub_online.endpoint)
    assert [e["file"] for e in res2.entries] == ["inkwash.safetensors"]
    # the command line: a second pull request (main still lacks the files)
    rep = json.loads(ok(cli("push", entry["id"], "--repo", "alice/ink", "--create-pr", "--token-env",
                            "LORAHUB_TEST_TOKEN", "--json", home=home, env=henv())).stdout)
    assert rep["revision"] == "refs/pr/2" and rep["pr_url"].endswith("/discussions/2") and rep["uploaded"]
    assert hub.head("alice/ink") == head
    with pytest.raises(lorahub.NotFound, match="needs an existing repo"):
        push(hub_online, entry, "alice/missing", create_pr=True)
    assert alice   # alice's own token is never used here


# ---------------------------------------------------------------------------------------- fidelity
def test_lfs_objects_belong_to_their_repo(hub, hub_online, entry):
    push(hub_online, entry, "tester/one")
    n = len(hub.lfs_uploads)
    push(hub_online, entry, "tester/two")   # the same bytes: uploaded again, into this repo
    assert len(hub.lfs_uploads) == 2 * n
    assert set(hub.state.repos["tester/one"]["lfs"]) == set(hub.state.repos["tester/two"]["lfs"])


def test_invalid_token_is_refused_even_for_public_reads(cli, hub, henv, hub_online, entry, tmp_path, fail, ok):
    push(hub_online, entry, "tester/pub")
    env = henv() | {"BAD": "hf_notAValidToken1234567890"}
    err = fail(cli("pull", "tester/pub", "--token-env", "BAD", home=tmp_path / "h", env=env), "401",
               "refused the token")
    assert "hf_notAValidToken" not in err
    fail(cli("pull", "tester/pub", "--list", "--token-env", "BAD", env=env), "401")
    ok(cli("pull", "tester/pub", home=tmp_path / "h", env=henv()))   # anonymous: a public repo is readable


def test_gated_repo_needs_granted_access(hub, hub_online, entry, tmp_path, monkeypatch):
    push(hub_online, entry, "tester/gated")
    bob = hub.add_user("bob")
    carol = hub.add_user("carol")
    hub.gate("tester/gated", grant=["carol"])
    listing = lorahub.list_hub_repo("tester/gated", endpoint=hub_online.endpoint,
                                    token_env=hub_online.token_env)
    assert listing.gated   # its owner sees everything
    monkeypatch.setenv("BOB", bob)
    monkeypatch.setenv("CAROL", carol)
    for env in (None, "BOB"):   # anonymous (401 GatedRepo), a user not granted access (403 GatedRepo)
        with pytest.raises(lorahub.LorahubError, match="gated.*accept its terms") as exc:
            lorahub.pull("tester/gated", registry=tmp_path / "h", endpoint=hub_online.endpoint, token_env=env)
        assert bob not in str(exc.value)
    res = lorahub.pull("tester/gated", registry=tmp_path / "h", endpoint=hub_online.endpoint, token_env="CAROL")
    assert [e["file"] for e in res.entries] == ["inkwash.safetensors"]


def test_tree_listings_are_paginated(hub, hub_online, entry, tmp_path):
    hub.tree_page_size = 1
    first = push(hub_online, entry, "tester/pages")
    again = push(hub_online, entry, "tester/pages")   # every file seen across the pages: nothing to send
    assert first.uploaded and not again.uploaded
    assert len([p for p in hub.tree_pages if p[0] == "tester/pages" and p[1] > 0]) >= 2
    hub.seed("tester/pages", {f"zz/extra-{i}.txt": b"x" for i in range(5)})
    res = lorahub.pull("tester/pages", registry=tmp_path / "h", endpoint=hub_online.endpoint)
    assert [e["file"] for e in res.entries] == ["inkwash.safetensors"]
    listing = lorahub.list_hub_repo("tester/pages", endpoint=hub_online.endpoint)
    assert {f"zz/extra-{i}.txt" for i in range(5)} <= {f["path"] for f in listing.files}
