"""Issue 9: concurrency, crashes, write failures, hostile pickles and paths (small counts; see tests/stress)."""

from __future__ import annotations

import os
import pickle
import resource
import signal
import sqlite3
import subprocess
import sys

import pytest

from lorahub.tiny_loras import kohya_file


def test_concurrent_add_scan_link_tag_rm_gc(stress):
    report = stress("concurrency", "--procs", 4, "--files", 24)
    assert report["files"] == 24 and report["gc_runs"] >= 3, report  # gc really ran alongside
    assert report["problems"] == []


def test_sigkill_during_add_and_scan_loses_nothing(stress):
    report = stress("crash", "--trials", 10, "--ops", "add,scan", "--seed", 1)
    assert report["killed"] >= 3, report  # the trials really interrupted something
    assert report["reruns"] == 10  # every killed command was run again, and its leftovers checked
    assert report["problems"] == []


def _available(cmd: str) -> bool:
    from lorahub.cli.app import _load_commands, app

    _load_commands()
    import typer.main

    return cmd in typer.main.get_command(app).commands  # type: ignore[attr-defined]


@pytest.mark.parametrize("op", ["convert", "merge", "extract"])
def test_sigkill_during_register_ops(stress, op):
    if not _available(op):
        pytest.skip(f"`lorahub {op}` not available")
    report = stress("crash", "--trials", 3, "--ops", op, "--seed", 2)  # each trial runs the command twice
    assert report["trials"] == 3 and report["reruns"] == 3 and report["problems"] == []


def _limited(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def test_write_failure_is_one_line_and_leaves_registry_unchanged(tmp_path, cli):
    home = tmp_path / "home"
    small = kohya_file(tmp_path / "small.safetensors", seed=1)
    assert cli("add", small, home=home).returncode == 0
    before = sorted(p.name for p in (home / "objects").rglob("*") if p.is_file())
    big = kohya_file(tmp_path / "big.safetensors", seed=2, rank=128, width=1280)  # ~570 KB
    env = dict(os.environ, LORAHUB_HOME=str(home))
    r = subprocess.run([sys.executable, "-m", "lorahub", "add", str(big)], env=env, capture_output=True,
                       text=True, preexec_fn=_limited(400_000))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    after = sorted(p.name for p in (home / "objects").rglob("*") if p.is_file() and not p.name.startswith("."))
    assert after == before
    conn = sqlite3.connect(home / "lorahub.db")
    assert conn.execute("SELECT count(*) FROM entries").fetchone()[0] == 1
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_home_that_is_a_file(tmp_path, cli):
    f = tmp_path / "not-a-dir"
    f.write_text("x")
    r = cli("add", kohya_file(tmp_path / "a.safetensors", seed=1), home=f)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error:")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_home(tmp_path, cli):
    home = tmp_path / "home"
    assert cli("add", kohya_file(tmp_path / "a.safetensors", seed=1), home=home).returncode == 0
    for p in [home, *home.rglob("*")]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    try:
        r = cli("add", kohya_file(tmp_path / "b.safetensors", seed=2), home=home)
        assert r.returncode == 2 and "Traceback" not in r.stderr
    finally:
        for p in [home, *home.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".bin"])
def test_malicious_pickle_is_never_executed(tmp_path, cli, suffix):
    import torch

    marker = tmp_path / "PWNED"
    zipped = tmp_path / f"evil_zip{suffix}"
    torch.save({"string_to_param": {"*": _Evil(str(marker))}}, zipped)
    raw = tmp_path / f"evil_raw{suffix}"
    raw.write_bytes(pickle.dumps({"state_dict": _Evil(str(marker))}))
    home = tmp_path / "home"
    for f in (zipped, raw):
        for args in (["add", f], ["inspect", f], ["convert", f, "--to", "kohya", "--out", tmp_path / "o.safetensors"]):
            r = cli(*args, home=home)
            assert not marker.exists(), f"{args} executed pickled code"
            assert "Traceback" not in r.stderr
            if r.returncode != 0:
                assert r.returncode == 2 and r.stderr.startswith("error:"), (args, r.stderr)


def test_store_blobs_are_read_only_and_export_stays_inside(tmp_path, cli):
    import json

    home = tmp_path / "home"
    r = cli("add", kohya_file(tmp_path / "a.safetensors", seed=3), "--name", "../../escape", home=home)
    assert r.returncode == 2 and "path separators" in r.stderr  # a name is never a path
    # a name that comes from the file's own metadata is made safe instead, the original kept for display
    f = kohya_file(tmp_path / "b.safetensors", seed=4, meta={"ssmd_display_name": "../../escape\x1b[31m"})
    r = cli("add", f, "--json", home=home)
    assert r.returncode == 0, r.stderr
    eid = json.loads(r.stdout)[0]["id"]
    entry = json.loads(cli("show", eid, "--json", home=home).stdout)
    assert entry["name"] == ".._.._escape [31m" and entry["extra"]["display_name"] == "../../escape\x1b[31m"
    blobs = [p for p in (home / "objects").rglob("*") if p.is_file()]
    assert blobs and all((p.stat().st_mode & 0o222) == 0 for p in blobs)
    dest = tmp_path / "out" / "deep"
    r = cli("export", eid, dest, "--stem", entry["extra"]["display_name"], home=home)
    assert r.returncode == 0, r.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and home not in p.parents]
    outside = [p for p in written if dest not in p.parents and p.parent != tmp_path]
    assert outside == [], outside
    assert any(p.suffix == ".safetensors" for p in dest.rglob("*"))


def test_opening_a_new_catalogue_waits_for_a_writer_instead_of_failing(tmp_path):
    """Switching a new database to WAL while another connection writes gets "database is locked" at once,
    whatever the busy timeout (two `lorahub scan` processes on a new home hit this): connect waits."""
    import threading
    import time

    from lorahub.registry.schema import connect

    db = tmp_path / "lorahub.db"
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE t(x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t VALUES (1)")
    threading.Timer(0.3, lambda: other.execute("COMMIT")).start()
    t0 = time.monotonic()
    conn = connect(db)
    assert time.monotonic() - t0 >= 0.25  # it waited for the writer
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT x FROM t").fetchall()[0][0] == 1
    conn.close()
    other.close()
