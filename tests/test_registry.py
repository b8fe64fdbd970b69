"""Registry: catalogue + content-addressed store, through the Python API (lorahub.registry.Registry)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import blake3
import numpy as np
import pytest
from safetensors.numpy import save_file

from lorahub.errors import Ambiguous, LorahubError, NotFound
from lorahub.registry import Registry, ingest
from lorahub.tiny_loras import kohya_file

CONTRACT_KEYS = {"id", "name", "file_name", "sha256", "autov1", "autov2", "autov3", "crc32", "blake3", "size",
                 "format", "base", "kind", "rank", "rank_min", "rank_max", "alpha", "parts", "type", "triggers",
                 "tags", "description", "source", "created_at", "added_at", "metadata"}


def test_add_file_entry_hashes_and_blob(reg, tmp_path):
    f = kohya_file(tmp_path / "my_lora.safetensors", meta={"ss_network_dim": "4"})
    data = f.read_bytes()
    entry, created = reg.add_file(f, type="style", tags=["a", "b"])
    assert created
    assert CONTRACT_KEYS <= set(entry)
    sha = hashlib.sha256(data).hexdigest()
    n = struct.unpack("<Q", data[:8])[0]
    assert entry["sha256"] == sha and entry["id"] == sha[:12]
    assert entry["autov2"] == sha[:10]
    assert entry["autov3"] == hashlib.sha256(data[8 + n:]).hexdigest()
    assert entry["blake3"] == blake3.blake3(data).hexdigest()
    assert entry["crc32"] == zlib.crc32(data).to_bytes(4, "little").hex()
    assert entry["autov1"] is None and entry["size"] == len(data)
    assert (entry["format"], entry["kind"], entry["base"]) == ("kohya", "lora", "sd1")
    assert entry["rank"] == 4 and entry["alpha"] == 2.0 and entry["parts"] == ["unet"]
    assert entry["name"] == "my_lora" and entry["file_name"] == "my_lora.safetensors"
    assert entry["type"] == "style" and entry["tags"] == ["a", "b"]
    assert entry["metadata"] == {"ss_network_dim": "4"}
    blob = reg.blob_path(entry["id"])
    assert blob == reg.home / "objects" / sha[:2] / sha
    assert blob.read_bytes() == data
    assert not os.access(blob, os.W_OK) or os.geteuid() == 0
    assert blob.stat().st_mode & 0o222 == 0
    assert reg.get(entry["id"]) == entry


def test_duplicate_add_changes_nothing(reg, tmp_path, store_files):
    f = kohya_file(tmp_path / "a.safetensors")
    e1, c1 = reg.add_file(f)
    copy = tmp_path / "other_name.safetensors"
    copy.write_bytes(f.read_bytes())
    e2, c2 = reg.add_file(copy, name="whatever", tags=["x"])
    assert c1 and not c2
    assert e2 == e1 and reg.count() == 1
    assert len(store_files(reg.home)) == 1


def test_wal_mode_and_schema_version(reg):
    assert reg.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    from lorahub.registry.schema import migrations

    assert reg.conn.execute("PRAGMA user_version").fetchone()[0] == migrations()[-1][0] >= 2


def test_resolve_by_every_handle(reg, tmp_path):
    e, _ = reg.add_file(kohya_file(tmp_path / "one.safetensors", seed=1))
    reg.add_file(kohya_file(tmp_path / "two.safetensors", seed=2))
    for ref in (e["id"], "one", e["sha256"], e["sha256"][:8].upper(), e["autov2"].upper(), e["autov3"][:12],
                e["blake3"][:10], e["crc32"].upper(), e["id"][:6]):
        assert reg.resolve(ref)["id"] == e["id"], ref
    with pytest.raises(NotFound):
        reg.resolve("nope")
    with pytest.raises(NotFound):
        reg.resolve("abc")  # too short to be a hash prefix


def test_same_tensors_other_metadata_share_autov3_and_are_ambiguous(reg, tmp_path):
    a, _ = reg.add_file(kohya_file(tmp_path / "a.safetensors", seed=5, meta={"v": "1"}))
    b, created = reg.add_file(kohya_file(tmp_path / "b.safetensors", seed=5, meta={"v": "2", "w": "x"}))
    assert created and a["sha256"] != b["sha256"] and a["autov3"] == b["autov3"]
    groups = reg.dupes()
    assert [sorted(x["id"] for x in g) for g in groups] == [sorted([a["id"], b["id"]])]
    with pytest.raises(Ambiguous):
        reg.resolve(a["autov3"][:12])


def test_names_stay_unique(reg, tmp_path):
    e1, _ = reg.add_file(kohya_file(tmp_path / "x" / "style.safetensors", seed=1))
    e2, _ = reg.add_file(kohya_file(tmp_path / "y" / "style.safetensors", seed=2))
    assert (e1["name"], e2["name"]) == ("style", "style-2")
    with pytest.raises(LorahubError, match="taken"):
        reg.update(e2["id"], name="style")
    assert reg.resolve("style-2")["id"] == e2["id"]


def test_lineage_previews_remotes(reg, tmp_path, png_bytes):
    parent, _ = reg.add_file(kohya_file(tmp_path / "parent.safetensors", seed=1))
    child, _ = reg.add_file(kohya_file(tmp_path / "child.safetensors", seed=2), lineage=[
        {"relation": "converted-from", "parent": parent["id"], "detail": {"to": "diffusers"}},
        {"relation": "trained-from", "parent": "tiny-sd1"},
    ])
    lin = reg.lineage(child["id"])
    assert [(x["relation"], x["parent_id"], x["parent_sha256"]) for x in lin] == [
        ("converted-from", parent["id"], parent["sha256"]), ("trained-from", None, None)]
    assert lin[0]["detail"] == {"to": "diffusers"} and lin[0]["parent_name"] == "parent"
    assert lin[1]["parent"] == "tiny-sd1"
    assert reg.children(parent["id"]) == [{"relation": "converted-from", "entry_id": child["id"], "name": "child"}]

    img = tmp_path / "grid.png"
    img.write_bytes(png_bytes(size=(16, 12)))
    pv = reg.add_preview(child["id"], img, kind="grid", params={"seed": 3, "scale": 0.8})
    assert (pv["width"], pv["height"], pv["ext"], pv["params"]) == (16, 12, "png", {"seed": 3, "scale": 0.8})
    assert Path(pv["path"]).read_bytes() == img.read_bytes()
    assert reg.previews(child["id"]) == [pv]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(LorahubError, match="image"):
        reg.add_preview(child["id"], bad)

    reg.set_remote(child["id"], repo="me/lora", revision="main", commit="c1")
    r = reg.set_remote(child["id"], repo="me/lora", revision="main", commit="c2")
    reg.set_remote(child["id"], repo="me/lora", revision="main", commit="c3", endpoint="http://127.0.0.1:9")
    rem = reg.remotes(child["id"])
    assert [(x["repo"], x["commit"], x["endpoint"]) for x in rem] == [
        ("me/lora", "c2", None), ("me/lora", "c3", "http://127.0.0.1:9")]
    assert r["commit"] == "c2"

    # removing the parent keeps the child's lineage as text
    reg.remove(parent["id"])
    lin = reg.lineage(child["id"])
    assert lin[0]["parent_id"] is None and lin[0]["parent"] == parent["id"]


def test_update_and_search_filters(reg, tmp_path):
    a, _ = reg.add_file(kohya_file(tmp_path / "anime_girl.safetensors", seed=1, rank=8), type="character",
                        triggers=["sks girl"], tags=["anime"], description="A cheerful character")
    b, _ = reg.add_file(kohya_file(tmp_path / "watercolor.safetensors", seed=2, rank=4, width=1024),
                        type="style", tags=["paint"])
    c, _ = reg.add_file(kohya_file(tmp_path / "mixed.safetensors", seed=3, rank=2, extra_rank=16))
    assert b["base"] == "sd2" and (c["rank_min"], c["rank_max"]) == (2, 16)
    ids = lambda rows: sorted(r["id"] for r in rows)  # noqa: E731
    assert ids(reg.search("sks")) == [a["id"]]
    assert ids(reg.search("cheer")) == [a["id"]]          # prefix match in the description
    assert ids(reg.search("anime")) == [a["id"]]          # name and tag
    assert ids(reg.search("girl anime")) == [a["id"]]
    assert ids(reg.search("water")) == [b["id"]]
    assert reg.search("nothing-like-this") == []
    assert ids(reg.search(None, type="style")) == [b["id"]]
    assert ids(reg.search(None, base="sd1")) == sorted([a["id"], c["id"]])
    assert ids(reg.search(None, tags=["PAINT"])) == [b["id"]]
    assert ids(reg.search(None, rank_min=8)) == sorted([a["id"], c["id"]])
    assert ids(reg.search(None, rank_max=4)) == sorted([b["id"], c["id"]])
    assert ids(reg.search(None, rank_min=5, rank_max=8)) == sorted([a["id"], c["id"]])
    assert ids(reg.search(None, kind="loha")) == []
    assert ids(reg.search(b["autov2"].upper())) == [b["id"]]             # a hash prefix is found too
    assert ids(reg.search(b["autov3"][:8], type="character")) == []
    assert ids(reg.search('"quoted" AND OR NOT (')) == []  # hostile FTS syntax is quoted, not an error
    reg.update(b["id"], tags=["paint", "soft"], triggers=["wcstyle"], description="washes")
    assert ids(reg.search("wcstyle")) == [b["id"]]
    assert ids(reg.search("soft")) == [b["id"]]
    with pytest.raises(LorahubError):
        reg.update(b["id"], type="landscape")
    with pytest.raises(LorahubError):
        reg.update(b["id"], sha256="00")


def test_remove_keeps_blob_until_gc(reg, tmp_path):
    e, _ = reg.add_file(kohya_file(tmp_path / "a.safetensors"))
    keep, _ = reg.add_file(kohya_file(tmp_path / "b.safetensors", seed=9))
    blob = reg.object_path(e["sha256"])
    reg.remove(e["id"])
    assert blob.is_file() and reg.count() == 1
    old_tmp = reg.home / "objects" / ".lorahub-tmp-old"
    old_tmp.write_bytes(b"x" * 10)
    os.utime(old_tmp, (time.time() - 3600, time.time() - 3600))
    new_tmp = reg.home / "objects" / ".lorahub-tmp-inflight"
    new_tmp.write_bytes(b"y")
    home_tmp = reg.home / ".lorahub-tmp-abc.db"
    home_tmp.write_bytes(b"z")
    os.utime(home_tmp, (time.time() - 3600, time.time() - 3600))
    dry = reg.gc(dry_run=True)
    assert dry["blobs"] == [e["sha256"]] and blob.is_file()
    res = reg.gc()
    assert res["blobs"] == [e["sha256"]] and sorted(res["temp_files"]) == sorted([str(old_tmp), str(home_tmp)])
    assert not home_tmp.exists()
    assert not blob.exists() and not old_tmp.exists() and new_tmp.exists()
    assert reg.blob_path(keep["id"]).is_file()
    # re-adding after gc stores the blob again
    e2, created = reg.add_file(tmp_path / "a.safetensors")
    assert created and reg.blob_path(e2).read_bytes() == (tmp_path / "a.safetensors").read_bytes()


def test_bad_input_writes_nothing(reg, bad_files, store_files):
    for label, path in bad_files.items():
        with pytest.raises(LorahubError) as ei:
            reg.add_file(path)
        assert "\n" not in str(ei.value), label
    assert reg.count() == 0
    assert store_files(reg.home) == []


def test_crash_mid_add_leaves_no_half_entry(reg, tmp_path, monkeypatch, store_files):
    f = kohya_file(tmp_path / "a.safetensors")

    def boom(*args):
        raise RuntimeError("power cut")

    monkeypatch.setattr("lorahub.registry.edits.insert_lineage", boom)  # after the entry and full-text rows
    with pytest.raises(RuntimeError):
        reg.add_file(f, lineage=[{"relation": "converted-from", "parent": "x"}])
    assert reg.count() == 0
    assert reg.conn.execute("SELECT count(*) FROM lineage").fetchone()[0] == 0
    assert store_files(reg.home) == []
    monkeypatch.undo()
    e, created = reg.add_file(f)
    assert created and reg.search("a")[0]["id"] == e["id"]


def test_migrations_upgrade_older_and_refuse_newer(home, tmp_path):
    # a version-1 catalogue holding one entry, written with version 1's columns only
    with Registry.open(tmp_path / "scratch") as scratch:
        e, _ = scratch.add_file(kohya_file(tmp_path / "old.safetensors"))
    r = Registry.open(home, migrate_to=1)
    v1 = [c[1] for c in r.conn.execute("PRAGMA table_info(entries)")]
    row = {c: e[c] if c not in ("parts", "tokens", "triggers", "tags", "metadata", "extra") else json.dumps(e[c])
           for c in v1 if c in e}
    r.conn.execute(f"INSERT INTO entries ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
    r.conn.commit()
    tables = {x[0] for x in r.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "scan_cache" not in tables and r.conn.execute("PRAGMA user_version").fetchone()[0] == 1
    r.close()
    from lorahub.registry.schema import migrations

    r = Registry.open(home)
    assert r.conn.execute("PRAGMA user_version").fetchone()[0] == migrations()[-1][0] >= 3
    assert r.resolve("old")["sha256"] == e["sha256"]
    r.conn.execute("SELECT count(*) FROM scan_cache").fetchone()
    r.conn.execute("PRAGMA user_version = 99")
    r.close()
    with pytest.raises(LorahubError, match="newer"):
        Registry.open(home)


def test_not_a_database(home):
    home.mkdir(parents=True)
    (home / "lorahub.db").write_bytes(b"garbage" * 1000)
    with pytest.raises(LorahubError):
        Registry.open(home)


def test_concurrent_writers(home, tmp_path, store_files):
    files = [kohya_file(tmp_path / f"c{i}.safetensors", seed=100 + i) for i in range(8)]
    Registry.open(home).close()
    errors = []

    def worker(chunk):
        try:
            r = Registry.open(home)
            for f in chunk:
                r.add_file(f)
            r.close()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(files[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    r = Registry.open(home)
    assert r.count() == 8 and len(store_files(home)) == 8


def test_metadata_and_sidecars_imported(reg, tmp_path, png_bytes):
    cover = png_bytes((0, 255, 0), (10, 10))
    meta = {
        "ssmd_display_name": "Nice Display Name",
        "ssmd_author": "someone",
        "ssmd_keywords": "kw1, kw2",
        "ssmd_tags": "t1,t2",
        "ssmd_description": "from the header",
        "ssmd_cover_images": json.dumps([base64.b64encode(cover).decode()]),
        "ss_tag_frequency": json.dumps({"10_x": {"shouldnotwin": 10}}),
    }
    f = kohya_file(tmp_path / "side.safetensors", meta=meta)
    (tmp_path / "side.json").write_text(json.dumps({
        "description": "from the webui sidecar", "sd version": "SD1", "activation text": "act1, act2",
        "preferred weight": 0.7, "negative text": "blurry", "notes": ""}))
    (tmp_path / "side.civitai.info").write_text(json.dumps({
        "id": 22, "modelId": 11, "trainedWords": ["tw1", "act1"], "baseModel": "SD 1.5",
        "model": {"name": "Civitai Name", "type": "LORA", "tags": ["ct"]}}))
    sidecar_png = png_bytes((0, 0, 255), (4, 4))
    (tmp_path / "side.preview.png").write_bytes(sidecar_png)
    (tmp_path / "side.txt").write_text("text description")
    e, _ = reg.add_file(f)
    assert e["triggers"] == ["act1", "act2", "tw1", "kw1", "kw2"]
    assert e["name"] == "Civitai Name"
    assert e["description"] == "from the webui sidecar"
    assert e["tags"] == ["ct", "t1", "t2"]
    assert e["source"] == "https://civitai.com/models/11?modelVersionId=22"
    assert e["extra"]["author"] == "someone" and e["extra"]["preferred_weight"] == 0.7
    assert e["extra"]["negative_text"] == "blurry"
    pv = {p["kind"]: Path(p["path"]).read_bytes() for p in reg.previews(e["id"])}
    assert pv == {"sidecar": sidecar_png, "cover": cover}
    assert "stored as previews" in e["metadata"]["ssmd_cover_images"]  # not duplicated in the database
    assert e["metadata"]["ssmd_author"] == "someone"


def test_trigger_sources_header_only(reg, tmp_path):
    f1 = kohya_file(tmp_path / "a.safetensors", seed=1, meta={"ss_tag_frequency": json.dumps(
        {"10_sks dog": {"sks dog": 20, "dog": 21, "grass": 3}, "5_reg": {"sks dog": 5, "sky": 1}})})
    f2 = kohya_file(tmp_path / "b.safetensors", seed=2, meta={"modelspec.trigger_phrase": "zkz style",
                                                                "modelspec.title": "Title Name",
                                                                "ss_tag_frequency": json.dumps({"d": {"x": 3}})})
    e1, _ = reg.add_file(f1)
    e2, _ = reg.add_file(f2)
    assert e1["triggers"] == ["sks dog", "dog"]
    assert e2["triggers"] == ["zkz style"] and e2["name"] == "Title Name"
    e3, _ = reg.add_file(kohya_file(tmp_path / "c.safetensors", seed=3), triggers=["mine"])
    assert e3["triggers"] == ["mine"]


def test_base_from_metadata_when_shapes_are_not_full_size(reg, tmp_path):
    f = kohya_file(tmp_path / "tiny.safetensors", width=32, meta={"ss_base_model_version": "sdxl_base_v1-0"})
    e, _ = reg.add_file(f)
    assert e["base"] == "sdxl"
    g = kohya_file(tmp_path / "tiny2.safetensors", width=32, seed=4)
    (tmp_path / "tiny2.civitai.info").write_text(json.dumps({"baseModel": "SD 2.1"}))
    assert reg.add_file(g)[0]["base"] == "sd2"
    h = kohya_file(tmp_path / "tiny3.safetensors", width=32, seed=5)
    assert reg.add_file(h, base="sd1")[0]["base"] == "sd1"


def test_checkpoint_can_be_registered(reg, tmp_path):
    t = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": np.zeros((320, 768), np.float16),
         "first_stage_model.decoder.conv_in.weight": np.zeros((4, 4, 3, 3), np.float16),
         "cond_stage_model.transformer.text_model.final_layer_norm.weight": np.zeros((768,), np.float16)}
    p = tmp_path / "ckpt.safetensors"
    save_file(t, str(p))
    e, _ = reg.add_file(p)
    assert (e["format"], e["kind"], e["base"]) == ("checkpoint", "checkpoint", "sd1")
    assert reg.resolve("ckpt")["id"] == e["id"] and reg.blob_path(e).read_bytes() == p.read_bytes()


def test_copy_false_links_without_touching_the_source_mode(reg, tmp_path):
    f = kohya_file(tmp_path / "linked.safetensors")
    mode = f.stat().st_mode
    e, _ = reg.add_file(f, copy=False)
    assert reg.blob_path(e).read_bytes() == f.read_bytes()
    assert f.stat().st_mode == mode


def test_registry_module_is_light():
    import subprocess
    import sys

    code = ("import sys; import lorahub.registry; "
            "bad = [m for m in ('torch', 'numpy', 'sqlite_utils', 'diffusers', 'PIL', 'safetensors') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_add_many_batches_dedupes_and_reports(reg, tmp_path, store_files):
    files = [kohya_file(tmp_path / f"m{i}.safetensors", seed=200 + i) for i in range(5)]
    twin = tmp_path / "twin.safetensors"
    twin.write_bytes(files[0].read_bytes())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x03\0\0\0\0\0\0\0{x}")
    seen = []
    counts = reg.add_many(files[:3] + [twin, bad] + files[3:], batch_files=2,
                          callback=lambda p, e, c, err: seen.append((Path(p).name, c, err is not None)))
    assert counts == {"added": 5, "already": 1, "failed": 1}
    assert sorted(seen) == sorted([(f.name, True, False) for f in files] + [("twin.safetensors", False, False),
                                                                             ("bad.safetensors", False, True)])
    assert reg.count() == 5
    blobs = store_files(reg.home)
    assert len(blobs) == 5 and not any(b.name.startswith(".lorahub-tmp-") for b in blobs)
    for f in files:
        e = reg.resolve(f.stem)
        assert reg.blob_path(e).read_bytes() == f.read_bytes()
        assert reg.blob_path(e).stat().st_mode & 0o222 == 0
    # again: everything is already there
    assert reg.add_many(files) == {"added": 0, "already": 5, "failed": 0}


def test_process_killed_after_blob_rename_before_commit(home, tmp_path, store_files):
    import subprocess
    import sys

    f = kohya_file(tmp_path / "k.safetensors")
    code = f"""
import os
from lorahub.registry import Registry
from lorahub.registry.store import Store
orig = Store.place
def place_then_die(self, tmp, sha, **kw):
    orig(self, tmp, sha, **kw)
    os._exit(9)
Store.place = place_then_die
Registry.open({str(home)!r}).add_file({str(f)!r})
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    reg = Registry.open(home)
    assert reg.count() == 0 and reg.conn.execute("SELECT count(*) FROM entries_fts").fetchone()[0] == 0
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    assert [p.name for p in store_files(home)] == [sha]  # an unreferenced blob, no entry
    with pytest.raises(LorahubError, match="no entries"):  # a catalogue without entries deletes no blob ...
        reg.gc()
    assert reg.gc(force=True)["blobs"] == [sha]  # ... unless forced
    e, created = reg.add_file(f)
    assert created and reg.blob_path(e).read_bytes() == f.read_bytes()


def test_stale_blob_under_the_final_name_is_replaced(reg, tmp_path):
    f = kohya_file(tmp_path / "s.safetensors")
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    stale = reg.object_path(sha)
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"\0" * f.stat().st_size)  # e.g. data lost in a crash before it reached the disk
    e, _ = reg.add_file(f)
    assert reg.blob_path(e).read_bytes() == f.read_bytes()
    assert reg.verify() == []


@pytest.mark.parametrize("text,base", [
    ("SD 1.5", "sd1"), ("SDXL 1.0", "sdxl"), ("Pony", "sdxl"), ("Illustrious", "sdxl"), ("SD 2.1", "sd2"),
    ("Flux.1 D", "flux"), ("sd_v1", "sd1"), ("sdxl_base_v1-0", "sdxl"), ("sd_v2_v", "sd2"),
    ("stable-diffusion-xl-v1-base/lora", "sdxl"), ("stable-diffusion-v1/lora", "sd1"), ("pixel art", None),
    ("SD3", "sd3"), ("SD 3.5 Large", "sd3"), ("stable-diffusion-v3-medium", "sd3"), ("flux1", "flux"),
    ("Qwen-Image", "other:qwen-image"), ("Unknown", None), ("SD1", "sd1"), ("SD2", "sd2"), (None, None), (3, None)])
def test_base_hints(text, base):
    from lorahub.metadata import base_hint

    assert base_hint(text) == base


# --------------------------------------------------------------------------- the library workflows
def test_prepare_returns_a_typed_record_and_writes_nothing(reg, tmp_path, png_bytes, store_files):
    from lorahub.registry.ingest import Prepared, prepare

    f = kohya_file(tmp_path / "p.safetensors", meta={"ss_tag_frequency": json.dumps({"1_x": {"zkz": 3}})})
    (tmp_path / "p.preview.png").write_bytes(png_bytes())
    prep = prepare(reg.store, f, tags=["t"])
    assert isinstance(prep, Prepared)
    assert prep.sha256 == hashlib.sha256(f.read_bytes()).hexdigest() and prep.hashes.size == f.stat().st_size
    assert (prep.detection.format, prep.detection.kind, prep.detection.rank) == ("kohya", "lora", 4)
    assert prep.imported.triggers == ["zkz"] and [p.kind for p in prep.previews] == ["sidecar"]
    assert prep.blob.read_bytes() == f.read_bytes() and prep.blob.parent == reg.store.path(prep.sha256).parent  # in its own folder
    assert reg.count() == 0  # no database write before commit
    row = prep.entry_row("abc", "p")
    assert json.loads(row["tags"]) == ["t"] and json.loads(row["triggers"]) == ["zkz"] and row["base"] == "sd1"
    temps = prep.temp_files()
    prep.discard()
    assert not any(t.exists() for t in temps) and store_files(reg.home) == []


def test_scan_reports_added_already_skipped_and_caches_hashes(reg, tmp_path, monkeypatch, store_files):
    root = tmp_path / "loras"
    for i in range(3):
        kohya_file(root / f"d{i % 2}" / f"s{i}.safetensors", seed=40 + i)
    (root / "d0" / "twin.safetensors").write_bytes((root / "d0" / "s0.safetensors").read_bytes())
    (root / "d1" / "broken.safetensors").write_bytes(b"\x05\0\0\0\0\0\0\0{bad}")
    kohya_file(root / ".hidden" / "h.safetensors", seed=49)
    (root / "notes.txt").write_text("not a LoRA")
    calls = []
    rep = reg.scan(root, tags=["scanned"], progress=lambda done, total: calls.append((done, total)))
    assert rep.files == 5 and sorted(e["name"] for e in rep.added) == ["s0", "s1", "s2"]
    assert rep.already == 1  # the twin: same bytes as s0
    assert [Path(s["path"]).name for s in rep.skipped] == ["broken.safetensors"] and rep.skipped[0]["error"]
    assert calls[-1] == (5, 5) and [d for d, _ in calls] == list(range(1, 6))
    assert all("scanned" in e["tags"] for e in rep.added)
    for e in rep.added:
        assert reg.blob_path(e).read_bytes() == (root / f"d{int(e['name'][1]) % 2}" / f"{e['name']}.safetensors").read_bytes()
    cached = {Path(r["path"]).name: r["sha256"] for r in reg.conn.execute("SELECT path, sha256 FROM scan_cache")}
    assert cached == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in root.rglob("*.safetensors") if p.name not in ("broken.safetensors", "h.safetensors")}

    import lorahub.hashing as hashing

    hashed = []
    real = hashing.hash_file
    monkeypatch.setattr(hashing, "hash_file", lambda *a, **k: hashed.append(a) or real(*a, **k))
    again = reg.scan(root)
    assert (again.added, again.already, hashed) == ([], 4, [])  # nothing re-hashed
    assert [Path(s["path"]).name for s in again.skipped] == ["broken.safetensors"]
    only_pt = reg.scan(root, exts=["pt"])
    assert (only_pt.files, only_pt.added, only_pt.skipped) == (0, [], [])
    with pytest.raises(LorahubError, match="not a folder"):
        reg.scan(root / "notes.txt")


def test_export_writes_webui_files_inside_dest_and_refuses_to_clobber(reg, tmp_path, png_bytes):
    from lorahub.fsutil import WouldOverwrite
    from lorahub.metadata import webui_sidecar

    f = kohya_file(tmp_path / "e.safetensors")
    (tmp_path / "e.preview.png").write_bytes(png_bytes((9, 9, 9)))
    e, _ = reg.add_file(f, triggers=["zkz", "blue hair"], base="sd1", description="d")
    with pytest.raises(LorahubError, match="path separators"):
        reg.update(e["id"], name="../../up/Name: v1")
    e = reg.update(e["id"], name="Name: v1")
    dest = tmp_path / "out"
    res = reg.export(e["name"], dest)
    assert res.id == e["id"] and [p.parent for p in res.written] == [dest] * 3
    lora, side, preview = res.written
    assert lora.name == "e.safetensors" and lora.read_bytes() == f.read_bytes()  # the original file's name
    other = reg.export(e["id"], tmp_path / "out2", stem="../../up/Name: v1")  # a chosen stem is made safe
    assert other.written[0].name == "up_Name_ v1.safetensors" and other.written[0].parent == tmp_path / "out2"
    assert json.loads(side.read_text()) == webui_sidecar(e) and json.loads(side.read_text())["activation text"] == "zkz, blue hair"
    assert preview.read_bytes() == (tmp_path / "e.preview.png").read_bytes()
    assert not (tmp_path / "up").exists()
    assert reg.export(e["id"], dest).written == res.written  # the same again is fine
    side.write_text('{"edited": true}')
    with pytest.raises(WouldOverwrite) as ei:
        reg.export(e["id"], dest)
    assert ei.value.path == side and "--" not in str(ei.value)  # API words, no CLI flag
    assert json.loads(side.read_text()) == {"edited": True}  # refused before anything was written
    reg.export(e["id"], dest, force=True)
    assert json.loads(side.read_text()) == webui_sidecar(e)


def test_check_verifies_and_repairs_from_the_source_file(reg, tmp_path):
    a, _ = reg.add_file(kohya_file(tmp_path / "a.safetensors", seed=61))
    b, _ = reg.add_file(kohya_file(tmp_path / "b.safetensors", seed=62))
    calls = []
    ok = reg.check(progress=lambda done, total: calls.append((done, total)))
    assert (ok.checked, ok.problems, ok.remaining, calls[-1]) == (2, [], [], (2, 2))
    reg.object_path(a["sha256"]).unlink()
    blob_b = reg.object_path(b["sha256"])
    os.chmod(blob_b, 0o644)
    blob_b.write_bytes(b"\0" * b["size"])
    found = reg.check()
    assert sorted((p["name"], p["problem"]) for p in found.problems) == [("a", "missing"), ("b", "corrupt")]
    assert len(found.remaining) == 2
    fixed = reg.check(repair=True)
    assert {p["name"]: (p["repaired"], p["from"]) for p in fixed.problems} == {
        "a": (True, str(tmp_path / "a.safetensors")), "b": (True, str(tmp_path / "b.safetensors"))}
    assert fixed.remaining == [] and reg.check().problems == []
    assert reg.blob_path(b).read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_record_has_the_ancestry_tree_and_survives_a_lineage_loop(reg, tmp_path):
    from lorahub.registry.workflows import record

    g, _ = reg.add_file(kohya_file(tmp_path / "g.safetensors", seed=71))
    p, _ = reg.add_file(kohya_file(tmp_path / "p.safetensors", seed=72),
                        lineage=[{"relation": "resized-from", "parent": g["id"], "detail": {"rank": 2}}])
    c, _ = reg.add_file(kohya_file(tmp_path / "c.safetensors", seed=73),
                        lineage=[{"relation": "converted-from", "parent": p["sha256"]}])
    reg.add_lineage(g["id"], [{"relation": "merged-from", "parent": c["id"]}])  # a loop: g <- c <- p <- g
    rec = record(reg, "c")
    assert rec["id"] == c["id"] and rec["blob"] == str(reg.object_path(c["sha256"]))
    top = rec["lineage"][0]
    assert (top["relation"], top["parent_id"]) == ("converted-from", p["id"])
    mid = top["parents"][0]
    assert (mid["relation"], mid["parent_id"], mid["detail"]) == ("resized-from", g["id"], {"rank": 2})
    loop = mid["parents"][0]
    assert (loop["parent_id"], loop["parents"]) == (c["id"], [])  # c is not visited twice
    assert record(reg, "g")["children"] == [{"relation": "resized-from", "entry_id": p["id"], "name": "p"}]


def test_sql_queries_read_only(reg, tmp_path):
    from lorahub.registry.sql import ReadOnly, database, query

    a, _ = reg.add_file(kohya_file(tmp_path / "q1.safetensors", seed=81), tags=["x", "y"])
    reg.add_file(kohya_file(tmp_path / "q2.safetensors", seed=82, width=1024))
    res = query("SELECT name, base, rank FROM entries ORDER BY name", home=reg.home)
    assert res.columns == ["name", "base", "rank"]
    assert res.rows == [{"name": "q1", "base": "sd1", "rank": 4}, {"name": "q2", "base": "sd2", "rank": 4}]
    tagged = query("SELECT e.name FROM entries e, json_each(e.tags) t WHERE t.value = :tag", {"tag": "y"},
                   home=reg.home)
    assert tagged.rows == [{"name": "q1"}]
    before = reg.home.joinpath("lorahub.db").read_bytes()
    for bad in ("DELETE FROM entries", "UPDATE entries SET name = 'z'", "DROP TABLE entries",
                "INSERT INTO scan_cache VALUES ('p', 1, 1, 's', 't') RETURNING *", "PRAGMA user_version = 7",
                f"ATTACH DATABASE '{tmp_path / 'other.db'}' AS o", "CREATE TEMP TABLE t(a)", "BEGIN"):
        with pytest.raises(ReadOnly, match="read-only"):
            query(bad, home=reg.home)
    with pytest.raises(LorahubError, match="no such table"):
        query("SELECT * FROM nope", home=reg.home)
    assert reg.home.joinpath("lorahub.db").read_bytes() == before and reg.count() == 2
    assert not (tmp_path / "other.db").exists()
    db = database(reg.home)
    try:
        assert [r["id"] for r in db["entries"].rows_where("base = ?", ["sd1"])] == [a["id"]]
        assert {"entries", "lineage", "previews", "remotes", "scan_cache"} <= set(db.table_names())
    finally:
        db.close()
    with pytest.raises(LorahubError, match="no lorahub registry"):
        query("SELECT 1", home=tmp_path / "empty")


def test_check_files_before_a_batch(tmp_path, bad_files):
    from lorahub.registry.workflows import check_files

    good = kohya_file(tmp_path / "ok.safetensors")
    checked = check_files([good])
    assert [c.path for c in checked] == [good] and checked[0].detection.format == "kohya"
    for label, path in bad_files.items():
        with pytest.raises(LorahubError):
            check_files([good, path])
    with pytest.raises(LorahubError, match="not a regular file"):
        check_files([tmp_path])


def test_scan_group_commits_and_reads_each_header_once(reg, tmp_path, monkeypatch):
    import lorahub.formats.detect as det

    lib = tmp_path / "lib"
    for i in range(40):
        kohya_file(lib / f"d{i % 3}" / f"s{i:02d}.safetensors", seed=300 + i)
    stmts, fsyncs = [], []
    log = tmp_path / "headers.log"  # the files are prepared in worker processes: they append here

    def logged(fn):
        def read(p, *a):
            with open(log, "a") as f:
                f.write(f"{p}\n")
            return fn(p, *a)
        return read

    real_fsync = os.fsync
    monkeypatch.setattr(det, "detect", logged(det.detect))
    monkeypatch.setattr(det, "detect_bytes", lambda data, p, real=det.detect_bytes: logged(lambda q: real(data, q))(p))
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))
    reg.conn.set_trace_callback(stmts.append)
    res = reg.scan(lib)
    reg.conn.set_trace_callback(None)
    headers = log.read_text().splitlines()
    assert len(res.added) == 40 and sorted(headers) == sorted(str(p) for p in lib.rglob("*.safetensors"))
    # group commit: the first MIN_BATCH_FILES files start a batch (nothing is being committed yet), the
    # rest make the last: two transactions (entries, FTS rows and scan cache) for the 40 files, one fsync
    # per blob and one per store folder a batch touched
    batches = [res.added[:ingest.MIN_BATCH_FILES], res.added[ingest.MIN_BATCH_FILES:]]
    assert sum(s.startswith("BEGIN IMMEDIATE") for s in stmts) == 2
    folders = [{reg.object_path(e["sha256"]).parent for e in b} for b in batches]
    assert len(fsyncs) == 40 + sum(map(len, folders))
    assert reg.check().problems == [] and reg.scan(lib).already == 40


def test_add_command_reads_each_header_once(run, home, tmp_path, monkeypatch):
    import lorahub.formats.detect as det

    files = [kohya_file(tmp_path / f"h{i}.safetensors", seed=400 + i) for i in range(3)]
    headers = []
    real = det.detect
    monkeypatch.setattr(det, "detect", lambda p: headers.append(p) or real(p))
    assert run("add", *files)[0] == 0
    assert sorted(headers) == sorted(files)  # checked all before adding any, without reading them twice
