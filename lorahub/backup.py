"""``lorahub backup`` / ``lorahub restore``: a consistent copy of a registry home.

The database is copied with SQLite's online backup API (consistent even while other processes
write); every other file of the home (the content-addressed store, previews) is copied and listed in
``manifest.json`` with its size and SHA-256. ``restore`` checks every file against the manifest and
the database with ``PRAGMA integrity_check`` before anything is written to the target, copies the
files, and puts the database in place last, atomically: exactly the file the manifest verified,
checked again (hash and integrity) as copied. An interrupted restore leaves no registry that points
at missing blobs.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Callable

from lorahub.errors import LorahubError
from lorahub.fsutil import TMP_PREFIX, WouldOverwrite, atomic_path, atomic_write_text, os_error
from lorahub.hashing import sha256_file
from lorahub.registry.schema import DB_NAME

MANIFEST = "manifest.json"
FORMAT = "lorahub-backup/1"


def _home_files(home: Path):
    for p in sorted(home.rglob("*")):
        if not p.is_file() or p.is_symlink():
            continue
        rel = p.relative_to(home)
        name = rel.name
        if rel.parts[0].startswith(DB_NAME) or name.startswith(TMP_PREFIX) or name.endswith(".lock"):
            continue
        yield p, rel


def backup(home: Path, dest: Path, progress: Callable[[int, int], None] | None = None) -> dict:
    """Write a backup of ``home`` into the new folder ``dest``; return the manifest.
    ``progress(done, total)`` is called after each file."""
    home = Path(home)
    dest = Path(dest)
    db = home / DB_NAME
    if not db.is_file():
        raise LorahubError(f"{home}: no lorahub registry here (no {DB_NAME})")
    if dest.exists() and any(dest.iterdir()):
        raise LorahubError(f"{dest}: backup destination exists and is not empty")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        files = []
        todo = list(_home_files(home))
        total = len(todo) + 1
        for src, rel in todo:
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(out) as tmp:
                shutil.copyfile(src, tmp)
            files.append({"path": rel.as_posix(), "size": out.stat().st_size, "sha256": sha256_file(out)})
            if progress:
                progress(len(files), total)
        with atomic_path(dest / DB_NAME) as tmp:
            src_conn = sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True, timeout=30)
            dst_conn = sqlite3.connect(tmp)
            try:
                src_conn.backup(dst_conn)
            finally:
                dst_conn.close()
                src_conn.close()
        _integrity(dest / DB_NAME, f"{home} (backup)")
        if progress:
            progress(total, total)
        manifest = {
            "format": FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": str(home.resolve()),
            "database": {"path": DB_NAME, "size": (dest / DB_NAME).stat().st_size,
                         "sha256": sha256_file(dest / DB_NAME)},
            "files": files,
        }
        atomic_write_text(dest / MANIFEST, json.dumps(manifest, indent=2))
        return manifest
    except OSError as exc:
        raise os_error(exc, dest) from None


def _integrity(db: Path, what: str) -> None:
    """Raise unless the SQLite file ``db`` passes ``PRAGMA integrity_check`` (opened read-only,
    immutable: nothing is created beside it)."""
    try:
        conn = sqlite3.connect(db.resolve().as_uri() + "?mode=ro&immutable=1", uri=True)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA integrity_check")]
            conn.execute("SELECT count(*) FROM entries").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise LorahubError(f"{what}: the database is corrupt ({exc})") from None
    if rows != ["ok"]:
        raise LorahubError(f"{what}: the database failed its integrity check ({'; '.join(rows[:3])})")


def _load_manifest(src: Path) -> dict:
    if not src.is_dir():
        if src.is_file():
            raise LorahubError(f"{src}: not a lorahub backup: a file, and a backup is a folder with {MANIFEST} "
                               "(unpack an archive of one first, then restore the folder)")
        raise LorahubError(f"{src}: not a lorahub backup (no such folder)")
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except FileNotFoundError:
        raise LorahubError(f"{src}: not a lorahub backup (no {MANIFEST})") from None
    except ValueError:
        raise LorahubError(f"{src}: {MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LorahubError(f"{src}: unknown backup format {manifest.get('format') if isinstance(manifest, dict) else None!r}")
    return manifest


def _safe_rel(rel: str, src: Path) -> Path:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise LorahubError(f"{src}: manifest names an unsafe path {rel!r}")
    return p


def verify_backup(src: Path) -> dict:
    """Check every file of a backup against its manifest; raise on the first problem."""
    src = Path(src)
    manifest = _load_manifest(src)
    entries = [manifest.get("database")] + list(manifest.get("files") or [])
    for item in entries:
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise LorahubError(f"{src}: malformed manifest entry")
        rel = _safe_rel(item["path"], src)
        f = src / rel
        if not f.is_file():
            raise LorahubError(f"{src}: backup is missing {rel}")
        if f.stat().st_size != item.get("size") or sha256_file(f) != item.get("sha256"):
            raise LorahubError(f"{src}: {rel} does not match the manifest (corrupt backup)")
    return manifest


def restore(src: Path, home: Path, *, force: bool = False, progress: Callable[[int, int], None] | None = None) -> dict:
    """Restore the backup ``src`` into ``home`` (empty, or replaced with ``force``); return its manifest.

    Every file is checked against the manifest, and the manifest's database with ``PRAGMA
    integrity_check``, before anything is written; a corrupt backup raises with the target untouched.
    The store's files are copied first; the database last: the very file the manifest names, copied
    to a temp file that must hash as the manifest says and pass the integrity check again before it
    is renamed over the target's database. ``progress(done, total)`` is called after each file."""
    src, home = Path(src), Path(home)
    manifest = verify_backup(src)
    db_item = manifest["database"]
    db_src = src / _safe_rel(db_item["path"], src)
    _integrity(db_src, str(src))
    if (home / DB_NAME).exists() and not force:
        raise WouldOverwrite(f"{home}: a registry already exists here (restore with force=True to replace it)", home)
    try:
        home.mkdir(parents=True, exist_ok=True)
        files = manifest["files"]
        total = len(files) + 1
        for done, item in enumerate(files, 1):
            rel = _safe_rel(item["path"], src)
            out = home / rel
            read_only = rel.parts[0] == "objects"
            if out.exists() and out.is_file() and out.stat().st_size == item["size"] and sha256_file(out) == item["sha256"]:
                pass
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                if out.exists():
                    os.chmod(out, 0o644)
                with atomic_path(out, mode=0o444 if read_only else None) as tmp:
                    shutil.copyfile(src / rel, tmp)
            if progress:
                progress(done, total)
        with atomic_path(home / DB_NAME) as tmp:
            shutil.copyfile(db_src, tmp)
            if sha256_file(tmp) != db_item["sha256"]:
                raise LorahubError(f"{src}: {db_item['path']} changed while it was restored; nothing was replaced")
            _integrity(tmp, str(src))
            for suffix in ("-wal", "-shm"):  # the old database's log must not be replayed onto the new one
                stale = home / (DB_NAME + suffix)
                if stale.exists():
                    stale.unlink()
        if progress:
            progress(total, total)
    except OSError as exc:
        raise os_error(exc, home) from None
    return manifest
