"""Issue 13 (registry side): names that are not paths, gc against writes in progress, a store without its
database, a full disk, restore of exactly what was verified, read-only commands that create nothing."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorahub.errors import LorahubError
from lorahub.fsutil import TMP_PREFIX, NoSpace, host_id, process_start, temp_in_progress
from lorahub.registry import EmptyCatalogue, OrphanedStore, Registry, ingest
from lorahub.tiny_loras import kohya_file


def _temps(root: Path) -> list[Path]:
    return sorted(root.rglob(TMP_PREFIX + "*"))


# ----------------------------------------------------------------------------------------- names
def test_names_are_never_paths(reg, tmp_path, store_files):
    f = kohya_file(tmp_path / "a.safetensors", seed=1)
    for bad in ("../x", "a/b", "/abs", "a\\b", "x\ny", "\x1b[31mred", "\u202eevil", ".."):
        with pytest.raises(LorahubError, match="cannot contain|not a name"):
            reg.add_file(f, name=bad)
    assert reg.count() == 0 and store_files(reg.home) == []
    e, _ = reg.add_file(f, name="  fine name ")
    assert e["name"] == "fine name"
    with pytest.raises(LorahubError, match="path separators"):
        reg.update(e["id"], name="../../evil")
    # names a file brings along (metadata, Civitai sidecar) are made safe; the raw text is kept for display
    g = kohya_file(tmp_path / "b.safetensors", seed=2, meta={"ssmd_display_name": "/etc/passwd"})
    e2, _ = reg.add_file(g)
    assert e2["name"] == "_etc_passwd" and e2["extra"]["display_name"] == "/etc/passwd"
    h = kohya_file(tmp_path / "c.safetensors", seed=3)
    (tmp_path / "c.civitai.info").write_text(json.dumps({"model": {"name": "..\\..\\x\ty"}}))
    e3, _ = reg.add_file(h)
    assert e3["name"] == ".._.._x y" and e3["extra"]["display_name"] == "..\\..\\x\ty"


# ----------------------------------------------------------------------------------------- gc vs writers
def test_gc_keeps_a_linked_temp_of_a_running_writer_whatever_its_mtime(reg, tmp_path):
    keep, _ = reg.add_file(kohya_file(tmp_path / "keep.safetensors", seed=9))
    f = kohya_file(tmp_path / "old.safetensors", seed=1)
    hour_ago = time.time() - 3600
    os.utime(f, (hour_ago, hour_ago))
    prep = ingest.prepare(reg.store, f, copy=False)  # what `scan --link` holds between hashing and commit
    assert prep.linked and prep.blob.stat().st_mtime < time.time() - 3000
    res = reg.gc()  # the five-minute rule would take this hour-old file for a leftover
    assert str(prep.blob) not in res["temp_files"] and prep.blob.exists()
    entry, created = ingest.commit(reg, prep)
    assert created and reg.blob_path(entry).read_bytes() == f.read_bytes()

    # a temp file whose writer is gone is a leftover once the time in its NAME is old, whatever its mtime
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    old = reg.store.root / f"{TMP_PREFIX}{host_id()}.{pid}.1.{int(time.time()) - 3600:x}.abcd1234"
    young = reg.store.root / f"{TMP_PREFIX}{host_id()}.{pid}.1.{int(time.time()):x}.abcd1234"
    mine = reg.store.root / f"{TMP_PREFIX}{host_id()}.{os.getpid()}.{process_start(os.getpid()) or 0}.1.abcd1234"
    for p in (old, young, mine):
        p.write_bytes(b"x")
        os.utime(p, (hour_ago, hour_ago))
    assert not temp_in_progress(old, min_age_s=300) and temp_in_progress(young, min_age_s=300)
    assert temp_in_progress(mine, min_age_s=0)  # a live writer: kept even with min_age 0
    res = reg.gc()
    assert res["temp_files"] == [str(old)] and young.exists() and mine.exists()
    assert reg.blob_path(keep).is_file()


def test_gc_treats_temp_blobs_in_blob_folders_as_those_in_objects(reg, tmp_path):
    f = kohya_file(tmp_path / "small.safetensors", seed=3)
    prep = ingest.prepare(reg.store, f)  # a small file: its temp blob is written in its own blob folder
    assert prep.blob.parent == reg.store.path(prep.sha256).parent
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old = prep.blob.parent / f"{TMP_PREFIX}{host_id()}.{int(dead.stdout)}.1.{int(time.time()) - 3600:x}.abcd1234"
    old.write_bytes(b"x")  # left there by a killed writer an hour ago
    res = reg.gc()
    assert res["temp_files"] == [str(old)] and not old.exists() and prep.blob.exists()  # ours: its writer runs
    entry, created = ingest.commit(reg, prep)
    assert created and reg.blob_path(entry).read_bytes() == f.read_bytes() and reg.check().problems == []


def test_gc_running_against_a_real_scan_link(home, tmp_path):
    src = tmp_path / "lib"
    files = [kohya_file(src / f"d{i % 4}" / f"l{i:03d}.safetensors", seed=i) for i in range(120)]
    hour_ago = time.time() - 3600
    for f in files:
        os.utime(f, (hour_ago, hour_ago))
    reg = Registry.open(home)
    reg.add_file(kohya_file(tmp_path / "seed.safetensors", seed=999))  # gc only works on a catalogue with entries
    env = dict(os.environ, LORAHUB_HOME=str(home))
    # the child's output goes to files: a pipe nobody reads while gc runs would fill and block it
    with open(tmp_path / "out.json", "w+") as fout, open(tmp_path / "err.txt", "w+") as ferr:
        proc = subprocess.Popen([sys.executable, "-m", "lorahub", "scan", str(src), "--link", "--json"], env=env,
                                stdout=fout, stderr=ferr, text=True)
        sweeps = 0
        while proc.poll() is None:
            reg.gc()
            sweeps += 1
            time.sleep(0.005)
        fout.seek(0)
        ferr.seek(0)
        out, err = fout.read(), ferr.read()
    assert proc.returncode == 0, err
    res = json.loads(out)
    assert len(res["added"]) == 120 and res["skipped"] == [], res["skipped"][:3]
    assert sweeps > 3 and reg.count() == 121
    assert reg.check().problems == []
    assert _temps(home) == []
    reg.close()


# ----------------------------------------------------------------------------------------- lost database
def _populated(tmp_path, n=2) -> tuple[Path, list[dict]]:
    home = tmp_path / "home"
    with Registry.open(home) as reg:
        entries = [reg.add_file(kohya_file(tmp_path / f"p{i}.safetensors", seed=40 + i))[0] for i in range(n)]
    return home, entries


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_a_store_without_its_database_is_refused_not_taken_for_new(tmp_path, cli, store_files, state):
    home, entries = _populated(tmp_path)
    blobs = store_files(home)
    for p in home.glob("lorahub.db*"):
        if p.name != "lorahub.db-reserve":
            p.unlink()
    if state == "empty":
        (home / "lorahub.db").write_bytes(b"")
    with pytest.raises(OrphanedStore, match=f"holds 2 blob.*{state}"):
        Registry.open(home)
    for args in (["list"], ["gc"], ["gc", "--dry-run"], ["gc", "--force"], ["search", "x"],
                 ["add", tmp_path / "p0.safetensors"], ["scan", tmp_path], ["verify"], ["serve", "--port", "0"],
                 ["extract", "p0", "p1"]):  # catalogue commands and others that open the registry
        r = cli(*args, home=home)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (args, r.stderr)
        assert "lorahub restore" in r.stderr and "lorahub verify --repair" in r.stderr, r.stderr
    assert store_files(home) == blobs  # nothing deleted
    assert (home / "lorahub.db").exists() == (state == "empty")  # nothing created
    # verify --repair re-registers the stored files
    r = cli("verify", "--repair", "--json", home=home)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)["recovered"]
    assert sorted(e["sha256"] for e in rec) == sorted(e["sha256"] for e in entries)
    with Registry.open(home) as reg:
        assert reg.count() == 2 and reg.check().problems == []
        assert all(e["name"].startswith("recovered-") for e in reg.entries())
    assert store_files(home) == blobs


def test_gc_deletes_no_blob_of_a_catalogue_without_entries(tmp_path, cli, store_files):
    home, entries = _populated(tmp_path, 1)
    blob = store_files(home)[0]
    assert cli("rm", entries[0]["id"], home=home).returncode == 0
    r = cli("gc", home=home)
    assert r.returncode == 2 and "no entries" in r.stderr and "--force" in r.stderr and blob.exists()
    with Registry.open(home) as reg, pytest.raises(EmptyCatalogue):
        reg.gc()
    r = cli("gc", "--force", "--json", home=home)
    assert r.returncode == 0 and json.loads(r.stdout)["blobs"] == [blob.name] and not blob.exists()


# ----------------------------------------------------------------------------------------- disk full
class _FillsUp:
    """A file object whose writes fail with ENOSPC once ``room`` bytes went through."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_disk_full_while_copying_is_one_line_and_leaves_nothing(reg, tmp_path, monkeypatch, run, store_files):
    from lorahub.registry.store import Store

    first, _ = reg.add_file(kohya_file(tmp_path / "first.safetensors", seed=1))
    real = Store.open_temp
    monkeypatch.setattr(Store, "open_temp", lambda self, **kw: (lambda p, f: (p, _FillsUp(f, 1000)))(*real(self, **kw)))
    big = kohya_file(tmp_path / "big.safetensors", seed=2, rank=32)
    with pytest.raises(NoSpace, match=f"^no space left on {reg.home}$"):
        reg.add_file(big)
    code, out, err = run("add", big)
    assert code == 2 and err == f"error: no space left on {reg.home}\n"
    lib = tmp_path / "lib"
    for i in range(5):
        kohya_file(lib / f"x{i}.safetensors", seed=10 + i)
    code, out, err = run("scan", lib)
    assert code == 2 and err == f"error: no space left on {reg.home}\n"  # not "cannot read" the input
    assert _temps(reg.home) == [] and [p.name for p in store_files(reg.home)] == [first["sha256"]]
    assert reg.count() == 1


def test_sqlite_full_is_no_space_and_leaves_nothing(reg, tmp_path, store_files):
    reg.add_file(kohya_file(tmp_path / "a.safetensors", seed=1))
    pages = reg.conn.execute("PRAGMA page_count").fetchone()[0]
    reg.conn.execute(f"PRAGMA max_page_count = {pages}")  # the database file cannot grow: SQLITE_FULL
    before = store_files(reg.home)
    lib = tmp_path / "lib"
    for i in range(3):
        kohya_file(lib / f"y{i}.safetensors", seed=20 + i, meta={"modelspec.description": "x" * 20000})
    with pytest.raises(NoSpace, match=f"no space left on {reg.home}"):
        reg.add_file(lib / "y0.safetensors")
    with pytest.raises(NoSpace):
        reg.scan(lib)
    assert store_files(reg.home) == before and _temps(reg.home) == [] and reg.count() == 1
    reg.remove("a")  # removing still works: it needs no new page
    assert reg.count() == 0


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d"
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", probe], capture_output=True)
    return r.returncode == 0


FULL_DISK = r'''
import json, os, subprocess, sys
from pathlib import Path
from lorahub.tiny_loras import kohya_file
work, mnt = Path(sys.argv[1]), Path(sys.argv[2])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
home, src = mnt / "home", work / "src"
files = [kohya_file(src / f"f{i}.safetensors", seed=i, rank=64, width=1280) for i in range(5)]
def cli(*a):
    r = subprocess.run([sys.executable, "-m", "lorahub", *map(str, a), "--home", str(home)], capture_output=True,
                       text=True)
    return [r.returncode, r.stdout, r.stderr]
out = {"add": cli("add", *files[:3]), "reserve": (home / "lorahub.db-reserve").exists()}
fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
for size in (1 << 16, 512):
    try:
        while True:
            os.write(fd, b"\0" * size)
    except OSError:
        pass
os.close(fd)
out["free"] = os.statvfs(mnt).f_bavail
out["list"] = cli("list", "--json")
out["add_full"] = cli("add", files[3])
out["scan_full"] = cli("scan", src)
out["temps"] = [str(p) for p in mnt.rglob(".lorahub-tmp-*")]
out["rm"] = cli("rm", "f0")
out["gc"] = cli("gc", "--json")
(mnt / "filler").unlink()
out["add_after"] = cli("add", files[3])
out["verify"] = cli("verify")
print(json.dumps(out))
'''


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare and a tmpfs mount in a user namespace")
def test_a_really_full_disk(tmp_path):
    (tmp_path / "mnt").mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-c", FULL_DISK,
                        str(tmp_path), str(tmp_path / "mnt")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    home = str(tmp_path / "mnt" / "home")
    assert out["add"][0] == 0 and out["reserve"] and out["free"] == 0
    assert out["list"][0] == 0 and len(json.loads(out["list"][1])) == 3  # the catalogue stays readable
    for key in ("add_full", "scan_full"):
        assert out[key][0] == 2 and out[key][2] == f"error: no space left on {home}\n", out[key]
    assert out["temps"] == []  # nothing left behind
    assert out["rm"][0] == 0, out["rm"]  # space can be freed: rm and gc work on the full disk
    assert out["gc"][0] == 0 and len(json.loads(out["gc"][1])["blobs"]) == 1, out["gc"]
    assert out["add_after"][0] == 0 and out["verify"][0] == 0, (out["add_after"], out["verify"])


# ----------------------------------------------------------------------------------------- restore
def test_restore_copies_exactly_the_verified_database(tmp_path, cli):
    from lorahub.backup import MANIFEST, backup

    home, entries = _populated(tmp_path)
    bk = tmp_path / "bk"
    backup(home, bk)
    manifest = json.loads((bk / MANIFEST).read_text())
    # the manifest names another file as the database: that file, not bk/lorahub.db, is what restore uses
    (bk / "db").mkdir()
    os.replace(bk / "lorahub.db", bk / "db" / "catalogue.db")
    manifest["database"]["path"] = "db/catalogue.db"
    (bk / MANIFEST).write_text(json.dumps(manifest))
    (bk / "lorahub.db").write_bytes(b"SQLite format 3\0" + os.urandom(4096))  # garbage under the usual name
    target = tmp_path / "restored"
    r = cli("restore", bk, "--home", target)
    assert r.returncode == 0, r.stderr
    r = cli("list", "--json", home=target)
    assert sorted(e["id"] for e in json.loads(r.stdout)) == sorted(e["id"] for e in entries)
    assert hashlib.sha256((target / "lorahub.db").read_bytes()).hexdigest() == manifest["database"]["sha256"]


def test_restore_of_a_corrupt_database_exits_2_and_changes_nothing(tmp_path, cli):
    from lorahub.backup import MANIFEST, backup

    home, entries = _populated(tmp_path, 3)
    bk = tmp_path / "bk"
    backup(home, bk)
    db = bk / "lorahub.db"
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    for i in range(page, len(data), page):  # break the b-tree page header of every page but the first
        data[i:i + 8] = b"\x07" * 8
    db.write_bytes(bytes(data))
    manifest = json.loads((bk / MANIFEST).read_text())
    manifest["database"].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())  # the manifest agrees
    (bk / MANIFEST).write_text(json.dumps(manifest))
    target = tmp_path / "t"
    r = cli("restore", bk, "--home", target)
    assert r.returncode == 2 and r.stderr.startswith("error:") and ("corrupt" in r.stderr or "integrity" in r.stderr)
    assert not target.exists()
    other = tmp_path / "other"
    shutil.copytree(home, other)
    before = {p.relative_to(other): p.read_bytes() for p in other.rglob("*") if p.is_file()}
    r = cli("restore", bk, "--home", other, "--force")
    assert r.returncode == 2
    assert {p.relative_to(other): p.read_bytes() for p in other.rglob("*") if p.is_file()} == before
    r = cli("restore", tmp_path / "p0.safetensors", "--home", target)  # not a backup folder at all
    assert r.returncode == 2 and "not a lorahub backup" in r.stderr


# ----------------------------------------------------------------------------------------- read-only
def test_read_only_commands_create_no_home(tmp_path, cli):
    missing = tmp_path / "nonexistent" / "x"
    for args in (["list", "--json"], ["search", "x", "--json"], ["dupes", "--json"]):  # nothing there: no entries
        r = cli(*args, "--home", missing)
        assert r.returncode == 0 and json.loads(r.stdout) == [], (args, r.stderr)
    for args in (["gc", "--dry-run"], ["show", "x"], ["verify"], ["sql", "SELECT 1"], ["export", "x", tmp_path / "out"],
                 ["tag", "x", "+t"], ["rm", "x"], ["edit", "x", "--name", "y"], ["gc"], ["verify", "--repair"]):
        r = cli(*args, "--home", missing)
        assert r.returncode == 2 and r.stderr.startswith("error:") and "no lorahub registry" in r.stderr, (args, r.stderr)
    assert not missing.exists() and not missing.parent.exists()
    assert not (tmp_path / "out").exists()


def test_read_only_commands_open_read_only(tmp_path, cli):
    home, entries = _populated(tmp_path)
    db = home / "lorahub.db"
    before = db.read_bytes()
    os.chmod(db, 0o444)
    try:
        for args in (["list", "--json"], ["search", "p0"], ["show", entries[0]["id"]], ["dupes"],
                     ["gc", "--dry-run"], ["export", entries[0]["id"], tmp_path / "out"]):
            r = cli(*args, home=home)
            assert r.returncode == 0, (args, r.stderr)
    finally:
        os.chmod(db, 0o644)
    assert db.read_bytes() == before
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# ----------------------------------------------------------------------------------------- one bad file
def test_a_reader_bug_on_one_file_never_aborts_a_scan(reg, tmp_path, monkeypatch, store_files):
    """Whatever a reader raises on one file (here a RuntimeError injected into metadata collection for
    one file), scan reports that file with the reason, registers the others and leaves no temp file."""
    import lorahub.metadata as md

    root = tmp_path / "lib"
    for i in range(4):
        kohya_file(root / f"f{i}.safetensors", seed=300 + i)
    real = md.collect

    def collect(path, *a, **k):
        if Path(path).name == "f2.safetensors":
            raise RuntimeError("reader bug")
        return real(path, *a, **k)

    monkeypatch.setattr(md, "collect", collect)
    rep = reg.scan(root)
    assert sorted(e["name"] for e in rep.added) == ["f0", "f1", "f3"]
    assert [Path(s["path"]).name for s in rep.skipped] == ["f2.safetensors"]
    assert "RuntimeError" in rep.skipped[0]["error"] and "reader bug" in rep.skipped[0]["error"]
    assert len(store_files(reg.home)) == 3 and _temps(reg.home) == []


# ----------------------------------------------------------------------------------------- full-text rows
def _vm_steps(conn, fn) -> int:
    """How many SQLite virtual-machine instructions ``fn()`` runs on ``conn`` (a measure of work, not time)."""
    steps = [0]

    def count():
        steps[0] += 1
        return 0

    conn.set_progress_handler(count, 1)
    try:
        fn()
    finally:
        conn.set_progress_handler(None, 0)
    return steps[0]


def test_retagging_does_not_scan_the_full_text_index(reg, tmp_path):
    """Tagging, editing or removing one entry touches its own full-text row only: the work does not
    grow with the catalogue: 5,000 more full-text rows leave the instruction count under twice what it
    was (a scan of the index's unindexed entry_id column made it ~140 times larger)."""
    ids = [reg.add_file(kohya_file(tmp_path / f"e{i}.safetensors", seed=400 + i), name=f"e{i}")[0]["id"]
           for i in range(3)]

    def work():
        reg.change_tags(ids[0], add=["blue"])
        reg.change_tags(ids[0], remove=["blue"])
        reg.update(ids[1], description="a new description")

    small = _vm_steps(reg.conn, work)
    with reg.conn:  # the rows a large catalogue's index holds (other entries' rows)
        reg.conn.executemany("INSERT INTO entries_fts(entry_id, name, triggers, tags, description) "
                             "VALUES (?, ?, '', 'x ; y', 'filler text')", [(f"f{i:06d}", f"n{i}") for i in range(5000)])
    large = _vm_steps(reg.conn, work)
    assert large < small * 2, (small, large)
    # and the index says what the entries say
    assert [e["id"] for e in reg.search("new description")] == [ids[1]]
    reg.change_tags(ids[2], add=["crimson"])
    assert [e["id"] for e in reg.search("crimson")] == [ids[2]]
    reg.remove(ids[2])
    assert reg.search("crimson") == []
    rows = reg.conn.execute("SELECT entry_id, count(*) FROM entries_fts WHERE entry_id LIKE 'e%' OR entry_id IN "
                            f"({','.join('?' * len(ids))}) GROUP BY entry_id", ids).fetchall()
    assert sorted(tuple(r) for r in rows) == sorted((i, 1) for i in ids[:2])


def test_migration_links_existing_full_text_rows(home, tmp_path):
    """A catalogue written before schema 8 gets each entry's full-text rowid; tagging it afterwards
    replaces the old row (no duplicate, no stale words)."""
    with Registry.open(tmp_path / "scratch") as scratch:
        src, _ = scratch.add_file(kohya_file(tmp_path / "old.safetensors"), name="old", tags=["stale"])
    r = Registry.open(home, migrate_to=4)  # rows as version-4 code wrote them: no fts_rowid column
    cols = [c[1] for c in r.conn.execute("PRAGMA table_info(entries)")]
    assert "fts_rowid" not in cols
    row = {c: json.dumps(src[c]) if isinstance(src[c], (list, dict)) else src[c] for c in cols if c in src}
    with r.conn:
        r.conn.execute(f"INSERT INTO entries ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                       list(row.values()))
        r.conn.execute("INSERT INTO entries_fts(entry_id, name, triggers, tags, description) VALUES (?, 'old', '', "
                       "'stale', '')", (src["id"],))
    r.close()
    r = Registry.open(home)
    try:
        assert r.conn.execute("SELECT fts_rowid FROM entries").fetchone()[0] is not None
        assert [x["id"] for x in r.search("stale")] == [src["id"]]
        r.change_tags(src["id"], add=["fresh"], remove=["stale"])
        assert r.search("stale") == [] and [x["id"] for x in r.search("fresh")] == [src["id"]]
        assert r.conn.execute("SELECT count(*) FROM entries_fts").fetchone()[0] == 1
        assert "fts_rowid" not in r.get(src["id"])
    finally:
        r.close()


def test_each_batch_commits_only_after_its_blobs_are_fsynced(reg, tmp_path, monkeypatch):
    """add_many fsyncs a batch's blobs on a background thread while it prepares the next batch; a batch
    commits only when every one of its blobs was fsynced (the crash guarantee of one file at a time)."""
    files = [kohya_file(tmp_path / "lib" / f"b{i:02d}.safetensors", seed=600 + i) for i in range(20)]
    synced: set[str] = set()
    real_fsync_many = ingest.fsync_many

    def fsync_many(paths, *a, **k):  # records the blobs once their fsyncs have returned (slowly: a
        paths = list(paths)           # commit that did not wait for them would come first)
        real_fsync_many(paths, *a, **k)
        time.sleep(0.05)
        synced.update(Path(p).name for p in paths)

    monkeypatch.setattr(ingest, "fsync_many", fsync_many)
    committed = []
    real_commit = ingest.commit_batch

    def commit_batch(r, preps, **kw):
        assert all(p.blob.name in synced for p in preps), "a batch committed before its blobs were fsynced"
        committed.append(len(preps))
        return real_commit(r, preps, **kw)

    monkeypatch.setattr(ingest, "commit_batch", commit_batch)
    seen = []
    counts = reg.add_many(files, batch_files=8, callback=lambda p, e, created, err: seen.append(Path(p).name))
    assert counts == {"added": 20, "already": 0, "failed": 0} and committed == [8, 8, 4]
    assert seen == [f.name for f in files]  # reported in order, every one
    assert reg.check().problems == [] and _temps(reg.home) == []
