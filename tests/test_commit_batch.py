"""commit_batch writes a batch's rows a table at a time: the same catalogue as committing file by file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorahub.fsutil import TMP_PREFIX
from lorahub.registry import Registry, ingest
from lorahub.tiny_loras import kohya_file


def _library(root: Path, png_bytes) -> list[Path]:
    """Files whose names collide (with each other and with an entry registered before), twins,
    webui/Civitai sidecars and preview images (one image shared by two files)."""
    files = []
    for i in range(9):
        f = kohya_file(root / f"d{i}" / ("style.safetensors" if i < 5 else f"f{i}.safetensors"), seed=i,
                       meta={"ss_tag_frequency": json.dumps({"5_x": {f"tok{i}": 3}})})
        files.append(f)
    (root / "d1" / "style.civitai.info").write_text(json.dumps(
        {"trainedWords": ["zkz"], "baseModel": "SD 1.5", "model": {"name": "Civitai Style", "tags": ["style"]}}))
    (root / "d1" / "style.preview.png").write_bytes(png_bytes())
    (root / "d2" / "style.preview.png").write_bytes(png_bytes())  # the same image: one blob, two entries
    (root / "d6" / "f6.json").write_text(json.dumps({"activation text": "abc", "description": "a pose LoRA"}))
    (root / "d6" / "f6.txt").write_text("notes\n")
    twin = root / "twin.safetensors"
    twin.write_bytes(files[7].read_bytes())
    return files + [twin]


def _catalogue(reg: Registry) -> dict:
    def rows(sql):
        return sorted(tuple(r) for r in reg.conn.execute(sql))

    return {
        "entries": {r["sha256"]: {k: r[k] for k in r.keys() if k not in ("added_at", "fts_rowid")}
                    for r in reg.conn.execute("SELECT * FROM entries")},
        "fts": rows("SELECT f.entry_id, f.name, f.triggers, f.tags, f.description FROM entries e "
                    "JOIN entries_fts f ON f.rowid = e.fts_rowid"),
        "fts_rows": reg.conn.execute("SELECT count(*) FROM entries_fts").fetchone()[0],
        "previews": rows("SELECT entry_id, sha256, kind, ext, width, height, params FROM previews"),
        "sidecars": rows("SELECT entry_id, kind, file_name, data, sha256, view FROM sidecars"),
        "lineage": rows("SELECT entry_id, relation, parent, parent_id, parent_sha256, detail FROM lineage"),
        "blobs": sorted(p.relative_to(reg.home).as_posix() for p in (reg.home / "objects").rglob("*") if p.is_file()),
    }


def _commit_ones(monkeypatch) -> list:
    calls = []
    real = ingest._commit_one
    monkeypatch.setattr(ingest, "_commit_one", lambda reg, prep, *a: calls.append(prep.path) or real(reg, prep, *a))
    return calls


@pytest.mark.parametrize("in_query", [500, 2])
def test_a_batch_gives_the_catalogue_of_one_file_at_a_time(tmp_path, png_bytes, monkeypatch, in_query):
    monkeypatch.setattr(ingest, "IN_QUERY_VALUES", in_query)  # 2: the lookups of taken hashes, names, ids in parts
    files = _library(tmp_path / "lib", png_bytes)
    first = kohya_file(tmp_path / "style.safetensors", seed=99)
    parent = kohya_file(tmp_path / "parent.safetensors", seed=98)
    lineage = [{"relation": "resized-from", "parent": "parent"}, {"relation": "trained-on", "parent": "a" * 64}]
    results = {}
    real_commit_one = ingest._commit_one
    for mode in ("one", "batch"):
        with Registry.open(tmp_path / mode) as reg:
            reg.add_file(first)  # "style" is taken before the batch
            reg.add_file(parent)
            preps = [ingest.prepare(reg.store, f, lineage=lineage if f.name == "f5.safetensors" else None)
                     for f in files]
            calls = _commit_ones(monkeypatch)
            if mode == "one":
                outcomes = [ingest.commit_batch(reg, [prep], remember=True)[0] for prep in preps]
                assert calls == [p.path for p in preps]
            else:
                outcomes = ingest.commit_batch(reg, preps, remember=True)
                assert calls == []  # the batch took the path of a few statements per table
            monkeypatch.setattr(ingest, "_commit_one", real_commit_one)
            results[mode] = (_catalogue(reg), [(e["id"], e["name"], created, err) for e, created, err in outcomes],
                             sorted(tuple(r)[:2] for r in reg.conn.execute("SELECT path, sha256 FROM scan_cache")))
            assert reg.check().problems == [] and not list(reg.home.rglob(TMP_PREFIX + "*"))
            assert [e["name"] for e in reg.search("style")][:1] and [e["id"] for e in reg.search("abc")] == [outcomes[6][0]["id"]]
    one, batch = results["one"], results["batch"]
    assert batch == one
    cat, outcomes, cached = batch
    names = [name for _, name, _, _ in outcomes]
    assert names[:5] == ["style-2", "Civitai Style", "style-3", "style-4", "style-5"]
    assert outcomes[-1][1:] == (names[7], False, None) and outcomes[-1][0] == outcomes[7][0]  # the twin
    assert len(cat["previews"]) == 2 and len({p[1] for p in cat["previews"]}) == 1
    assert {s[1] for s in cat["sidecars"]} == {"civitai", "json", "txt"} and len(cat["lineage"]) == 2
    assert cat["fts_rows"] == len(cat["entries"]) and len(cached) == len(files)


@pytest.mark.parametrize("fails", ["statement", "row"])
def test_a_row_that_fails_sends_the_batch_file_by_file(tmp_path, reg, monkeypatch, fails):
    from lorahub.errors import LorahubError

    files = [kohya_file(tmp_path / f"f{i}.safetensors", seed=i) for i in range(4)]
    preps = [ingest.prepare(reg.store, f, lineage=[{"relation": "x"}] if i == 2 and fails == "statement" else None)
             for i, f in enumerate(files)]
    if fails == "row":  # a row that cannot be made at all (before any statement of the batch)
        def bad_row(*a):
            raise LorahubError(f"{files[2]}: no row")
        preps[2].entry_row = bad_row
    calls = _commit_ones(monkeypatch)
    outcomes = ingest.commit_batch(reg, preps)
    assert calls == files  # the batch failed: nothing of it stayed, then file by file
    assert [created for _, created, _ in outcomes] == [True, True, False, True]
    assert ("lineage item needs 'relation' and 'parent'" if fails == "statement" else "no row") in str(outcomes[2][2])
    assert reg.count() == 3 and reg.check().problems == [] and not list(reg.home.rglob(TMP_PREFIX + "*"))
    assert not reg.store.path(preps[2].sha256).exists()
    assert reg.conn.execute("SELECT count(*) FROM entries_fts").fetchone()[0] == 3


@pytest.mark.parametrize("taken", ["name", "id"])
def test_names_and_ids_taken_meanwhile_are_not_reused(tmp_path, reg, taken):
    files = [kohya_file(tmp_path / f"d{i}" / "same.safetensors", seed=i) for i in range(3)]
    preps = [ingest.prepare(reg.store, f) for f in files]
    if taken == "id":  # an entry whose id is the 12-character prefix the first file would get
        other, _ = reg.add_file(kohya_file(tmp_path / "other.safetensors", seed=50), name="other")
        reg.conn.execute("UPDATE entries SET id = ? WHERE id = ?", (preps[0].sha256[:12], other["id"]))
        reg.conn.commit()
    else:
        reg.add_file(kohya_file(tmp_path / "same.safetensors", seed=60))
    outcomes = ingest.commit_batch(reg, preps)
    ids, names = [e["id"] for e, _, _ in outcomes], [e["name"] for e, _, _ in outcomes]
    if taken == "id":
        assert ids[0] == preps[0].sha256[:16] and names == ["same", "same-2", "same-3"]
    else:
        assert names == ["same-2", "same-3", "same-4"]
    assert len(set(ids)) == 3 and reg.check().problems == []
