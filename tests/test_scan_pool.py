"""Scans of many small files: prepared in forked worker processes, read once (detected, hashed and
copied from memory), committed in groups. The results must be exactly those of adding the files one by
one on one thread, in the same order, with the same guarantees when something fails."""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import pytest

from lorahub.fsutil import TMP_PREFIX, NoSpace
from lorahub.hashing import hash_bytes, hash_stream
from lorahub.registry import ingest
from lorahub.tiny_loras import kohya_file

N = ingest.PROCESS_MIN_FILES + 8  # enough files for the worker processes


def _library(root: Path, n: int = N) -> list[Path]:
    return [kohya_file(root / f"d{i % 3}" / f"l{i:03d}.safetensors", seed=i, rank=(2, 4, 8)[i % 3],
                       meta={"ss_output_name": f"out{i}", "ss_tag_frequency": '{"5_x": {"tok%d": 3}}' % i})
            for i in range(n)]


def _rows(reg) -> dict[str, dict]:
    skip = {"id", "added_at", "fts_rowid", "source"}
    return {r["sha256"]: {k: r[k] for k in r.keys() if k not in skip}
            for r in reg.conn.execute("SELECT * FROM entries")}


def _temps(home: Path) -> list[Path]:
    return sorted(home.rglob(TMP_PREFIX + "*"))


@pytest.mark.parametrize("size", [0, 7, 8, 300, 3 * 1024 * 1024])
def test_hash_bytes_equals_the_streaming_hashes(size):
    data = os.urandom(size)
    if size >= 8:  # a safetensors-shaped prefix: AutoV3 skips the header
        n = min(100, size - 8)
        data = n.to_bytes(8, "little") + b"{" + b" " * (n - 1) + data[8 + n:] if n >= 2 else data
    assert hash_bytes(data) == hash_stream(io.BytesIO(data), len(data))


def test_worker_processes_give_the_entries_of_one_file_at_a_time(tmp_path, reg, monkeypatch):
    from lorahub.registry import Registry

    files = _library(tmp_path / "lib")
    pids = set()
    real = ingest.prepare
    monkeypatch.setattr(ingest, "prepare", lambda *a, **k: pids.add(os.getpid()) or real(*a, **k))
    order = []
    counts = reg.add_many(files, callback=lambda p, e, created, err: order.append((Path(p), created, err)))
    assert counts == {"added": N, "already": 0, "failed": 0}
    assert [p for p, _, _ in order] == files and all(c and e is None for _, c, e in order)
    assert pids == set()  # this process prepared nothing: the workers did (their calls are not seen here)
    with Registry.open(tmp_path / "one") as one:
        assert one.add_many(files, workers=1)["added"] == N
        assert _rows(one) == _rows(reg)
    for sha, source in reg.conn.execute("SELECT sha256, source FROM entries"):
        assert reg.object_path(sha).read_bytes() == Path(source).read_bytes()
    assert reg.check().problems == [] and _temps(reg.home) == []


def test_bad_files_among_many_are_reported_in_order(tmp_path, reg):
    files = _library(tmp_path / "lib")
    bad = tmp_path / "lib" / "d0" / "l005x.safetensors"
    bad.write_bytes(b"\x10\0\0\0\0\0\0\0{not json at all")
    twin = tmp_path / "lib" / "twin.safetensors"
    twin.write_bytes(files[3].read_bytes())
    paths = files[:6] + [bad, twin] + files[6:]
    seen = []
    counts = reg.add_many(paths, batch_files=7, callback=lambda p, e, created, err: seen.append((Path(p), created, err)))
    assert counts == {"added": N, "already": 1, "failed": 1}
    assert [p for p, _, _ in seen] == paths
    (_, _, err), (_, created, _) = seen[6], seen[7]
    assert "not valid JSON" in str(err) and created is False
    assert reg.count() == N and reg.check().problems == [] and _temps(reg.home) == []


def test_full_disk_in_a_worker_is_one_error_and_leaves_nothing(tmp_path, reg, store_files, run):
    from lorahub.registry.store import Store

    first, _ = reg.add_file(kohya_file(tmp_path / "first.safetensors", seed=999))
    files = _library(tmp_path / "lib")
    real = Store.open_temp
    made = []

    def full_after_20(self, **kw):  # the workers are forked from here: they run this too
        tmp, f = real(self, **kw)
        made.append(tmp)
        if len(list(self.root.rglob(TMP_PREFIX + "*"))) > 20:
            f.close()
            tmp.unlink()
            raise OSError(28, "No space left on device")
        return tmp, f

    Store.open_temp, saved = full_after_20, Store.open_temp
    try:
        with pytest.raises(NoSpace, match=f"^no space left on {reg.home}$"):
            reg.add_many(files, batch_files=1000)
        code, out, err = run("scan", tmp_path / "lib")
    finally:
        Store.open_temp = saved
    assert code == 2 and err == f"error: no space left on {reg.home}\n"
    assert reg.count() == 1 and [p.name for p in store_files(reg.home)] == [first["sha256"]]
    assert _temps(reg.home) == []


def test_interrupted_scan_commits_whole_batches_and_leaves_no_temp_files(tmp_path, reg):
    files = _library(tmp_path / "lib")
    seen = []

    def stop(p, e, created, err):
        seen.append(p)
        if len(seen) == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reg.add_many(files, batch_files=8, callback=stop)
    # whole batches were committed (the one being reported included), and no temp file is left
    done = reg.count()
    assert done in (8, 16) and reg.check().problems == [] and _temps(reg.home) == []
    assert reg.add_many(files) == {"added": N - done, "already": done, "failed": 0}


def test_workers_leave_ctrl_c_to_the_committing_process(tmp_path, reg, monkeypatch):
    handlers = []
    real = ingest._worker_init

    def init(store):
        real(store)
        handlers.append(signal.getsignal(signal.SIGINT))
        with open(tmp_path / "sigint", "a") as f:
            f.write(f"{signal.getsignal(signal.SIGINT) == signal.SIG_IGN}\n")

    monkeypatch.setattr(ingest, "_worker_init", init)
    reg.add_many(_library(tmp_path / "lib"))
    assert (tmp_path / "sigint").read_text().split() == ["True", "True"]
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # this process's own is untouched


def test_workers_do_not_inherit_a_cache_lock_held_by_another_thread(tmp_path):
    """A process that scans may run other threads (the gallery's server); one of them may hold a
    detection cache's lock when the workers are forked: they must not wait for it forever."""
    import subprocess
    import sys

    lib = tmp_path / "lib"
    _library(lib)
    code = f"""
import threading
from pathlib import Path
from lorahub.formats import detect, header
from lorahub.registry import Registry

held = threading.Event()
def hold():
    with header._SECTIONS._lock, detect._PLANS._lock:  # another thread, mid-change, when the workers fork
        held.set()
        threading.Event().wait(30)
threading.Thread(target=hold, daemon=True).start()
held.wait()
with Registry.open(Path({str(tmp_path / 'home')!r})) as reg:
    files = sorted(Path({str(lib)!r}).rglob("*.safetensors"))
    print(reg.add_many(files)["added"])
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the process and its stuck workers
        proc.communicate()
        pytest.fail("the scan's workers waited for a lock held by a thread of the parent")
    assert proc.returncode == 0, err[-2000:]
    assert out.split() == [str(N)]


def test_a_worker_that_dies_is_one_error_and_leaves_no_temp_files(tmp_path, reg, monkeypatch):
    from lorahub.errors import LorahubError

    files = _library(tmp_path / "lib")
    real = ingest.prepare

    def dies(store, p, **k):  # a worker killed (out of memory) while it prepares this file
        if Path(p) == files[-5]:
            os._exit(3)
        return real(store, p, **k)

    monkeypatch.setattr(ingest, "prepare", dies)
    with pytest.raises(LorahubError, match="^a worker process of this scan stopped unexpectedly"):
        reg.add_many(files, batch_files=8)
    done = reg.count()
    assert done < N and reg.check().problems == [] and _temps(reg.home) == []
    monkeypatch.setattr(ingest, "prepare", real)
    assert reg.add_many(files) == {"added": N - done, "already": done, "failed": 0}


def test_a_blob_folder_removed_by_hand_is_made_again(tmp_path, reg):
    import hashlib

    f = kohya_file(tmp_path / "a.safetensors", seed=5)
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    reg.store.make_folder(sha)  # the store remembers the folders it made...
    os.rmdir(reg.store.path(sha).parent)  # ...and one is removed behind its back
    entry, created = reg.add_file(f)
    assert created and entry["sha256"] == sha and reg.store.path(sha).read_bytes() == f.read_bytes()
    assert _temps(reg.home) == [] and reg.check().problems == []



def test_fsync_threads_are_made_once_and_made_again_in_a_forked_child(tmp_path):
    """fsync_many reuses one pool of threads across waves (not up to 32 new threads a wave); a process
    forked after the pool was made (a scan's workers, a second scan's) gets a pool of its own: the
    parent's threads do not exist there, and a wave given to them would never end."""
    import multiprocessing as mp

    from lorahub.registry import store

    files = []
    for i in range(40):
        f = tmp_path / f"f{i}"
        f.write_bytes(b"x" * i)
        files.append(f)
    store.fsync_many(files[:20])
    pool = store._fsync_threads()
    threads = set(pool._threads)
    assert 1 < len(threads) <= store.FSYNC_THREADS
    store.fsync_many(files[20:])
    assert store._fsync_threads() is pool
    assert len(pool._threads) <= store.FSYNC_THREADS and threads <= set(pool._threads)

    def child():
        store.fsync_many(files)
        store.fsync_many([tmp_path], store.fsync_dir)  # one path: no thread
        os._exit(0 if store._fsync_threads() is not pool else 3)

    proc = mp.get_context("fork").Process(target=child)
    proc.start()
    proc.join(60)
    if proc.exitcode is None:
        proc.kill()
        pytest.fail("a forked child's fsync wave waited for its parent's threads")
    assert proc.exitcode == 0

    def fails(path):
        if path == files[3]:
            raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output"):  # an fsync's error reaches the caller
        store.fsync_many(files, fails)


def test_the_garbage_collector_is_as_it_was_after_a_scan(tmp_path, reg):
    """add_many freezes the objects made before it forks its workers, for the call only: afterwards (and
    after a failure) nothing is left frozen, and a caller's own freeze is left as it was."""
    import gc

    files = _library(tmp_path / "lib", 3 * N)
    seen_frozen = []
    reg.add_many(files[:N], callback=lambda *a: seen_frozen.append(gc.get_freeze_count()))
    assert seen_frozen and min(seen_frozen) > 0  # frozen during the call
    assert gc.get_freeze_count() == 0

    def stop(*a):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        reg.add_many(files[N:2 * N], callback=stop)
    assert gc.get_freeze_count() == 0 and _temps(reg.home) == []

    gc.freeze()
    try:
        before = gc.get_freeze_count()
        reg.add_many(files[2 * N:])
        assert gc.get_freeze_count() == before
    finally:
        gc.unfreeze()
