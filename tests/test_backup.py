"""`lorahub backup` / `restore`: consistent copies, verified before anything is written."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest

from lorahub.backup import backup, restore, verify_backup
from lorahub.errors import LorahubError
from lorahub.tiny_loras import kohya_file


@pytest.fixture
def populated(tmp_path):
    from lorahub.registry import Registry

    home = tmp_path / "home"
    reg = Registry.open(home)
    ids = []
    for i in range(3):
        entry, created = reg.add_file(kohya_file(tmp_path / f"l{i}.safetensors", seed=i), tags=[f"t{i}"])
        assert created
        ids.append(entry["id"])
    return home, ids


def test_backup_restore_round_trip(tmp_path, populated, cli):
    home, ids = populated
    dest = tmp_path / "bk"
    r = cli("backup", dest, home=home)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((dest / "manifest.json").read_text())
    assert len(manifest["files"]) == 3  # three blobs
    verify_backup(dest)

    target = tmp_path / "restored"
    r = cli("restore", dest, "--home", target)
    assert r.returncode == 0, r.stderr
    r = cli("list", "--json", home=target)
    assert r.returncode == 0, r.stderr
    assert sorted(e["id"] for e in json.loads(r.stdout)) == sorted(ids)
    r = cli("verify", home=target)
    assert r.returncode == 0, r.stdout + r.stderr
    conn = sqlite3.connect(target / "lorahub.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_restore_refuses_corrupt_backup_and_writes_nothing(tmp_path, populated):
    home, _ = populated
    dest = tmp_path / "bk"
    backup(home, dest)
    blob = next(p for p in (dest / "objects").rglob("*") if p.is_file())
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    target = tmp_path / "t"
    with pytest.raises(LorahubError, match="corrupt"):
        restore(dest, target)
    assert not (target / "lorahub.db").exists()


def test_restore_refuses_unsafe_manifest_paths(tmp_path, populated):
    home, _ = populated
    dest = tmp_path / "bk"
    backup(home, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m["files"][0]["path"] = "../../escape"
    (dest / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LorahubError, match="unsafe path"):
        restore(dest, tmp_path / "t")
    assert not (tmp_path / "escape").exists()


def test_restore_will_not_clobber_without_force(tmp_path, populated, cli):
    home, _ = populated
    dest = tmp_path / "bk"
    backup(home, dest)
    r = cli("restore", dest, "--home", home)
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
    r = cli("restore", dest, "--home", home, "--force")
    assert r.returncode == 0, r.stderr


def test_backup_errors_are_one_line(tmp_path, populated, cli):
    home, _ = populated
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    r = cli("backup", tmp_path / "full", home=home)
    assert r.returncode == 2 and "not empty" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("restore", tmp_path / "nothing-here", "--home", tmp_path / "h2")
    assert r.returncode == 2 and "not a lorahub backup" in r.stderr
