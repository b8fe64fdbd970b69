"""The local catalogue: a SQLite database (WAL, FTS5) plus a content-addressed file store.

Layout of a home (``--home``, ``$LORAHUB_HOME``, else ``~/.lorahub``)::

    lorahub.db                     the catalogue (schema: registry/migrations/NNNN_*.sql)
    objects/<sha[:2]>/<sha256>     read-only blobs (LoRA files and preview images), deduplicated

Every add is one short write transaction; blobs are written as ``.lorahub-tmp-*`` files, fsynced and
renamed into place while the write lock is held, so a crash leaves at most an unreferenced blob or
temp file (``gc`` removes both) and never a half entry.

This module imports only the standard library: the catalogue's read paths (``list``, ``search``,
``show``) must start fast. Detection, metadata and hashing are imported inside :meth:`add_file`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import sqlite3
from pathlib import Path
from typing import Any, Iterable

from lorahub.errors import Ambiguous, LorahubError, NotFound

DB_NAME = "lorahub.db"
OBJECTS = "objects"
TMP_PREFIX = ".lorahub-tmp-"
TYPES = ("character", "style", "pose", "clothing", "object", "concept")
BASES = ("sd1", "sd2", "sdxl", "unknown")
KINDS = ("lora", "locon", "loha", "lokr", "dora", "textual-inversion", "checkpoint")
RELATIONS = ("converted-from", "extracted-from", "merged-from", "trained-from", "resized-from")
HASH_COLUMNS = ("sha256", "autov3", "blake3", "autov2", "autov1", "crc32")
JSON_COLUMNS = {"parts": list, "tokens": list, "triggers": list, "tags": list, "metadata": dict, "extra": dict}
UPDATABLE = ("name", "type", "triggers", "tags", "description", "base", "source", "created_at", "extra")
_HEX = re.compile(r"^[0-9a-fA-F]+$")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_home() -> Path:
    env = os.environ.get("LORAHUB_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".lorahub"


def _migrations() -> list[tuple[int, Path]]:
    from lorahub.resources import migrations_dir

    out = []
    for p in sorted(migrations_dir().glob("*.sql")):
        m = re.match(r"^(\d+)_", p.name)
        if m:
            out.append((int(m.group(1)), p))
    nums = [n for n, _ in out]
    if nums != list(range(1, len(nums) + 1)):
        raise LorahubError(f"registry migrations are not numbered 1..N: {nums}")
    return out


def _statements(sql: str) -> Iterable[str]:
    buf = ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                yield buf
            buf = ""
    if buf.strip() and not all(l.strip().startswith("--") or not l.strip() for l in buf.splitlines()):
        raise LorahubError("registry migration ends with an incomplete SQL statement")


def schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(conn: sqlite3.Connection, *, target: int | None = None) -> int:
    """Apply the numbered migrations above the database's ``user_version`` (up to ``target``)."""
    migs = _migrations()
    latest = migs[-1][0] if migs else 0
    target = latest if target is None else target
    version = schema_version(conn)
    if version > latest:
        raise LorahubError(
            f"the registry database has schema version {version}, newer than this lorahub supports "
            f"({latest}); upgrade lorahub to open it")
    if version >= target:
        return version
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = schema_version(conn)  # another process may have migrated meanwhile
        for num, path in migs:
            if version < num <= target:
                for stmt in _statements(path.read_text(encoding="utf-8")):
                    conn.execute(stmt)
                conn.execute(f"PRAGMA user_version = {num}")
                version = num
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return version


def _connect(db: Path, *, readonly_ok: bool = True) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(str(db), timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 30000")
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if mode.lower() != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.DatabaseError as exc:
        raise LorahubError(f"{db}: cannot open the registry database ({exc})") from None
    return conn


class Registry:
    """A lorahub home: catalogue + store. Open with :meth:`Registry.open`."""

    def __init__(self, home: Path, conn: sqlite3.Connection):
        self.home = home
        self.conn = conn

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, home: Path | str | None = None, *, migrate_to: int | None = None) -> "Registry":
        home = Path(home).expanduser() if home else default_home()
        try:
            (home / OBJECTS).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LorahubError(f"{home}: cannot create the registry home ({exc.strerror or exc})") from None
        conn = _connect(home / DB_NAME)
        try:
            migrate(conn, target=migrate_to)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise LorahubError(f"{home / DB_NAME}: not a lorahub registry database ({exc})") from None
        except BaseException:
            conn.close()
            raise
        return cls(home, conn)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def objects(self) -> Path:
        return self.home / OBJECTS

    def object_path(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / sha256

    # ------------------------------------------------------------------ rows
    def _row(self, row: sqlite3.Row | None) -> dict | None:
        if row is None:
            return None
        d = dict(row)
        for col, typ in JSON_COLUMNS.items():
            if col in d:
                try:
                    d[col] = json.loads(d[col]) if d[col] else typ()
                except ValueError:
                    d[col] = typ()
        d.pop("blob_mode", None)
        return d

    def get(self, entry_id: str) -> dict:
        row = self.conn.execute("SELECT * FROM entries WHERE id = ?", (entry_id,)).fetchone()
        if row is None:
            raise NotFound(f"no registry entry with id {entry_id}")
        return self._row(row)

    def _id_of(self, entry_or_id: dict | str) -> str:
        if isinstance(entry_or_id, dict):
            entry_or_id = entry_or_id["id"]
        if self.conn.execute("SELECT 1 FROM entries WHERE id = ?", (entry_or_id,)).fetchone() is not None:
            return entry_or_id
        return self.resolve(entry_or_id)["id"]

    def find_sha256(self, sha256: str) -> dict | None:
        return self._row(self.conn.execute("SELECT * FROM entries WHERE sha256 = ?", (sha256.lower(),)).fetchone())

    def resolve(self, ref: str) -> dict:
        """An entry by id, exact name, or any hash (SHA256, AutoV1/2/3, CRC32, BLAKE3) or hash prefix (>= 6 hex)."""
        if isinstance(ref, dict):
            return self.get(ref["id"])
        ref = str(ref).strip()
        if not ref:
            raise NotFound("empty registry reference")
        row = self.conn.execute("SELECT * FROM entries WHERE id = ?", (ref.lower(),)).fetchone()
        if row is not None:
            return self._row(row)
        row = self.conn.execute("SELECT * FROM entries WHERE name = ?", (ref,)).fetchone()
        if row is not None:
            return self._row(row)
        if len(ref) >= 6 and _HEX.match(ref):
            h = ref.lower()
            ids: dict[str, sqlite3.Row] = {}
            for col in ("id",) + HASH_COLUMNS:
                for r in self.conn.execute(
                        f"SELECT * FROM entries WHERE {col} >= ? AND {col} < ?", (h, h + "g")):
                    ids.setdefault(r["id"], r)
            if len(ids) == 1:
                return self._row(next(iter(ids.values())))
            if len(ids) > 1:
                names = ", ".join(f"{r['id']} ({r['name']})" for r in list(ids.values())[:5])
                raise Ambiguous(f"{ref!r} matches {len(ids)} entries: {names}; give more characters")
        row = self.conn.execute("SELECT * FROM entries WHERE name = ? COLLATE NOCASE", (ref,)).fetchall()
        if len(row) == 1:
            return self._row(row[0])
        raise NotFound(f"no registry entry matches {ref!r} (id, name or hash prefix of 6+ hex)")

    def entries(self, *, order: str = "name") -> list[dict]:
        order_sql = {"name": "name COLLATE NOCASE", "added": "added_at DESC, name"}.get(order, "name COLLATE NOCASE")
        return [self._row(r) for r in self.conn.execute(f"SELECT * FROM entries ORDER BY {order_sql}")]

    def count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM entries").fetchone()[0]

    def blob_path(self, entry_or_id: dict | str) -> Path:
        """The read-only stored file of an entry (``objects/<sha[:2]>/<sha256>``)."""
        entry = entry_or_id if isinstance(entry_or_id, dict) and "sha256" in entry_or_id else self.resolve(
            entry_or_id if isinstance(entry_or_id, str) else entry_or_id["id"])
        p = self.object_path(entry["sha256"])
        if not p.is_file():
            raise NotFound(f"the stored file of {entry['name']} ({entry['id']}) is missing from {self.objects}; "
                           "run `lorahub verify`")
        return p

    # ------------------------------------------------------------------ search
    def search(self, query: str | None = None, *, type: str | None = None, base: str | None = None,
               tags: Iterable[str] = (), kind: str | None = None, rank_min: int | None = None,
               rank_max: int | None = None, format: str | None = None, limit: int | None = None) -> list[dict]:
        """Entries matching a full-text ``query`` (name, triggers, tags, description) and filters."""
        where, args = [], []
        join = ""
        order = "e.name COLLATE NOCASE"
        fts = fts_query(query) if query else None
        if query and fts is None:
            return []
        if fts:
            join = ("LEFT JOIN (SELECT entry_id, bm25(entries_fts, 0, 10.0, 5.0, 5.0, 1.0) AS score FROM entries_fts "
                    "WHERE entries_fts MATCH ?) f ON f.entry_id = e.id")
            args.append(fts)
            q = query.strip()
            if len(q) >= 6 and _HEX.match(q):  # a hash prefix finds its entry too
                h = q.lower()
                conds = " OR ".join(f"(e.{c} >= ? AND e.{c} < ?)" for c in ("id",) + HASH_COLUMNS)
                where.append(f"(f.entry_id IS NOT NULL OR {conds})")
                for _c in ("id",) + HASH_COLUMNS:
                    args += [h, h + "g"]
            else:
                where.append("f.entry_id IS NOT NULL")
            order = "f.score NULLS LAST, e.name COLLATE NOCASE"
        if type:
            where.append("e.type = ?"); args.append(type)
        if base:
            where.append("e.base = ?"); args.append(base)
        if kind:
            where.append("e.kind = ?"); args.append(kind)
        if format:
            where.append("e.format = ?"); args.append(format)
        for t in tags:
            where.append("EXISTS (SELECT 1 FROM json_each(e.tags) WHERE value = ? COLLATE NOCASE)"); args.append(t)
        # rank filters: an entry matches when its rank range overlaps [rank_min, rank_max]
        if rank_min is not None:
            where.append("coalesce(e.rank_max, e.rank) >= ?"); args.append(rank_min)
        if rank_max is not None:
            where.append("coalesce(e.rank_min, e.rank) <= ?"); args.append(rank_max)
        sql = f"SELECT e.* FROM entries e {join}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {order}"
        if limit:
            sql += f" LIMIT {int(limit)}"
        try:
            return [self._row(r) for r in self.conn.execute(sql, args)]
        except sqlite3.OperationalError as exc:
            raise LorahubError(f"bad search query {query!r} ({exc})") from None

    def dupes(self) -> list[list[dict]]:
        """Groups of entries with the same tensors (same AutoV3) under other names or metadata."""
        groups = []
        for (v3,) in self.conn.execute(
                "SELECT autov3 FROM entries WHERE autov3 IS NOT NULL GROUP BY autov3 HAVING count(*) > 1 ORDER BY autov3"):
            groups.append([self._row(r) for r in self.conn.execute(
                "SELECT * FROM entries WHERE autov3 = ? ORDER BY added_at, name", (v3,))])
        return groups

    # ------------------------------------------------------------------ related rows
    def lineage(self, entry_id: str) -> list[dict]:
        """Parents of an entry: relation, parent (as given), parent_id/parent_name when registered, detail."""
        out = []
        for r in self.conn.execute(
                "SELECT l.*, p.name AS parent_name FROM lineage l LEFT JOIN entries p ON p.id = l.parent_id "
                "WHERE l.entry_id = ? ORDER BY l.seq", (entry_id,)):
            d = dict(r)
            d["detail"] = json.loads(d["detail"] or "{}")
            d.pop("seq", None)
            out.append(d)
        return out

    def children(self, entry_id: str) -> list[dict]:
        """Entries made from this one: relation, entry_id, name."""
        return [dict(r) for r in self.conn.execute(
            "SELECT l.relation, l.entry_id, e.name FROM lineage l JOIN entries e ON e.id = l.entry_id "
            "WHERE l.parent_id = ? ORDER BY l.seq", (entry_id,))]

    def previews(self, entry_id: str) -> list[dict]:
        out = []
        for r in self.conn.execute("SELECT * FROM previews WHERE entry_id = ? ORDER BY seq", (entry_id,)):
            d = dict(r)
            d["id"] = d.pop("seq")
            d["params"] = json.loads(d["params"] or "{}")
            d["path"] = str(self.object_path(d["sha256"]))
            out.append(d)
        return out

    def remotes(self, entry_id: str) -> list[dict]:
        out = []
        for r in self.conn.execute("SELECT * FROM remotes WHERE entry_id = ? ORDER BY seq", (entry_id,)):
            d = dict(r)
            d.pop("seq", None)
            out.append(d)
        return out

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def _write(self):
        """One short write transaction: BEGIN IMMEDIATE, COMMIT on success, ROLLBACK on any error."""
        self._begin()
        try:
            yield
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def _begin(self) -> None:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise LorahubError(f"the registry database is busy or read-only ({exc})") from None

    def _fts_sync(self, entry_id: str) -> None:
        self.conn.execute("DELETE FROM entries_fts WHERE entry_id = ?", (entry_id,))
        r = self.conn.execute("SELECT id, name, triggers, tags, description FROM entries WHERE id = ?",
                              (entry_id,)).fetchone()
        if r is not None:
            self.conn.execute(
                "INSERT INTO entries_fts(entry_id, name, triggers, tags, description) VALUES (?, ?, ?, ?, ?)",
                (r["id"], _fts_text(r["name"]), " ; ".join(json.loads(r["triggers"])),
                 " ; ".join(json.loads(r["tags"])), r["description"] or ""))

    def _unique_name(self, name: str, exclude_id: str | None = None) -> str:
        base = name
        n = 1
        while True:
            r = self.conn.execute("SELECT id FROM entries WHERE name = ?", (name,)).fetchone()
            if r is None or r["id"] == exclude_id:
                return name
            n += 1
            name = f"{base}-{n}"

    def _new_id(self, sha256: str) -> str:
        for length in (12, 16, 20, 64):
            cand = sha256[:length]
            if self.conn.execute("SELECT 1 FROM entries WHERE id = ?", (cand,)).fetchone() is None:
                return cand
        raise LorahubError("cannot derive an entry id")  # pragma: no cover

    def _store_tmp(self) -> Path:
        import tempfile

        folder = self.objects
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=folder)
        os.close(fd)
        return Path(tmp)

    def _place_blob(self, tmp: Path, sha256: str, *, chmod: bool = True, durable: bool = True) -> Path:
        """Rename a finished temp file into the store (call while holding the write lock).

        An existing file of that name is replaced, not trusted: after a crash it may be an unreferenced
        blob whose data never reached the disk.
        """
        dest = self.object_path(sha256)
        if not dest.parent.is_dir():
            dest.parent.mkdir(exist_ok=True)
        if chmod:
            os.chmod(tmp, 0o444)
        os.replace(tmp, dest)
        if durable:
            _fsync_dir(dest.parent)
        return dest

    def add_file(self, path: str | os.PathLike, *, name: str | None = None, type: str | None = None,
                 triggers: list[str] | None = None, tags: list[str] | None = None, base: str | None = None,
                 description: str | None = None, source: str | None = None,
                 lineage: list[dict] | None = None, copy: bool = True, sidecars: bool = True,
                 extra: dict | None = None) -> tuple[dict, bool]:
        """Register a LoRA / embedding / checkpoint file. Returns ``(entry, created)``.

        ``created`` is False when a file with the same SHA-256 is already registered (nothing changes).
        Hashes, detection (header only), header metadata and sidecars are read; the file is copied into
        the store while it is hashed (``copy=False``: hard-linked when the store is on the same file
        system, else copied). One transaction; bad input raises ``LorahubError`` with nothing written.
        """
        prep = self._prepare(path, name=name, type=type, triggers=triggers, tags=tags, base=base,
                             description=description, source=source, lineage=lineage, copy=copy,
                             sidecars=sidecars, extra=extra, durable=True)
        if "hashes" not in prep:
            return prep, False
        return self._commit(prep, durable=True)

    def add_many(self, paths: Iterable[str | os.PathLike], *, tags: list[str] | None = None,
                 batch_files: int = 64, batch_bytes: int = 256 * 1024 * 1024, workers: int = 2,
                 copy: bool = True, callback=None) -> dict:
        """Add many files (``scan``): one transaction per file, with the fsyncs of a batch issued
        together (parallel fsyncs share the file system's journal commits). Blobs stay temp files until
        their data is synced; each entry is then committed (and its blob renamed into place) in its own
        transaction; the store folders are synced at the end of the batch.
        ``callback(path, entry|None, created, error|None)`` is called per file.
        """
        from lorahub.errors import LorahubError as _LE

        from concurrent.futures import ThreadPoolExecutor

        counts = {"added": 0, "already": 0, "failed": 0}
        pending: list[dict] = []

        def prep_one(p):
            try:
                return p, self._prepare(p, tags=tags, copy=copy, durable=False, check_existing=False), None
            except _LE as exc:
                return p, None, exc
            except OSError as exc:
                return p, None, _LE(f"{p}: {exc.strerror or exc}")

        size = 0

        def report(p, entry, created, err):
            counts["failed" if err else "added" if created else "already"] += 1
            if callback:
                callback(p, entry, created, err)

        def flush():
            nonlocal pending, size
            if not pending:
                return
            files = [x["tmp"] for x in pending if not x["linked"]]
            files += [t for x in pending for _k, t, *_ in x["previews"]]
            _fsync_many(files, _fsync_file)  # parallel fsyncs share journal commits
            dirs = set()
            try:
                for prep in pending:
                    try:
                        entry, created = self._commit(prep, durable=False)
                    except _LE as exc:
                        report(prep["path"], None, False, exc)
                        continue
                    if created:
                        dirs.add(self.object_path(entry["sha256"]).parent)
                        dirs.update(self.object_path(x[2]).parent for x in prep["previews"])
                    report(prep["path"], entry, created, None)
            finally:
                for prep in pending:
                    prep["tmp"].unlink(missing_ok=True)
                _fsync_many(sorted(dirs), _fsync_dir)
                pending, size = [], 0

        try:
            for window in _windows(paths, batch_files, batch_bytes):
                # detection + hashing + copying of a window run on worker threads (hashlib and file
                # I/O release the GIL); database work stays on this thread
                if workers > 1 and len(window) > 1:
                    with ThreadPoolExecutor(min(workers, len(window))) as ex:
                        results = list(ex.map(prep_one, window))
                else:
                    results = [prep_one(p) for p in window]
                for p, prep, err in results:
                    if err is not None:
                        report(p, None, False, err)
                        continue
                    existing = self.find_sha256(prep["hashes"].sha256)
                    if existing is not None or any(x["hashes"].sha256 == prep["hashes"].sha256 for x in pending):
                        prep["tmp"].unlink(missing_ok=True)
                        for _k, t, *_ in prep["previews"]:
                            t.unlink(missing_ok=True)
                        report(p, existing, False, None)
                        continue
                    pending.append(prep)
                    size += prep["hashes"].size
                    if len(pending) >= batch_files or size >= batch_bytes:
                        flush()
        finally:
            flush()
        return counts

    def _prepare(self, path, *, name=None, type=None, triggers=None, tags=None, base=None, description=None,
                 source=None, lineage=None, copy=True, sidecars=True, extra=None, durable=True,
                 check_existing=True):
        """Detect, read metadata and sidecars, hash + copy into a temp blob. No database write.

        Returns the existing entry (a dict with "id") when the sha256 is already registered, else a
        prepared record for :meth:`_commit`.
        """
        from lorahub.errors import FormatError
        from lorahub.formats.detect import detect
        from lorahub.formats.header import read_header
        from lorahub.hashing import hash_file
        from lorahub import metadata as md

        p = Path(path)
        if not p.exists():
            raise NotFound(f"{path}: no such file")
        if not p.is_file():
            raise LorahubError(f"{path}: not a regular file")
        _check_choice("type", type, TYPES)
        _check_choice("base", base, BASES)
        det = detect(p)
        header_meta = getattr(det, "metadata", None)
        if header_meta is None:
            try:
                header_meta = read_header(p).metadata
            except FormatError:
                header_meta = {}
        header_meta = dict(header_meta)
        imported = md.collect(p, header_meta, sidecars=sidecars)
        tmp = self._store_tmp()
        linked = False
        try:
            if copy:
                with open(tmp, "wb") as out:
                    try:
                        hashes = hash_file(p, copy_to=out)
                    except OSError as exc:
                        raise LorahubError(f"{path}: cannot read ({exc.strerror or exc})") from None
                    out.flush()
                    if durable:
                        os.fsync(out.fileno())
            else:
                hashes = hash_file(p)
                tmp.unlink()
                try:
                    os.link(p, tmp)
                    linked = True
                except OSError:
                    import shutil

                    shutil.copyfile(p, tmp)
                    if durable:
                        with open(tmp, "rb+") as out:
                            os.fsync(out.fileno())
            if hashes.size != p.stat().st_size:
                raise FormatError(f"{path}: file changed while it was added")
            existing = self.find_sha256(hashes.sha256) if check_existing else None
            if existing is not None:
                tmp.unlink(missing_ok=True)
                return existing
            previews = self._prepare_previews(imported, durable=durable)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return {"path": p, "det": det, "meta": header_meta, "imported": imported, "tmp": tmp, "linked": linked,
                "hashes": hashes, "previews": previews, "name": name, "type": type, "triggers": triggers,
                "tags": tags, "base": base, "description": description, "source": source,
                "lineage": lineage, "extra": extra}

    def _commit(self, prep: dict, *, durable: bool) -> tuple[dict, bool]:
        """One transaction: insert the entry, its lineage, previews and FTS row; rename the blobs in."""
        from lorahub import metadata as md

        p, det, imported, hashes, tmp = prep["path"], prep["det"], prep["imported"], prep["hashes"], prep["tmp"]
        preview_blobs = prep["previews"]
        try:
            self._begin()
            try:
                existing = self.find_sha256(hashes.sha256)
                if existing is not None:
                    self.conn.execute("ROLLBACK")
                    return existing, False
                entry_id = self._new_id(hashes.sha256)
                stem = p.name[: -len(p.suffix)] if p.suffix else p.name
                final_name = self._unique_name(_clean_name(prep["name"] or imported.name or stem))
                det_base = getattr(det, "base", None) or "unknown"
                if prep["base"]:
                    final_base = prep["base"]
                elif det_base != "unknown":
                    final_base = det_base
                else:
                    final_base = imported.base or "unknown"
                ex = dict(imported.extra)
                notes = list(getattr(det, "notes", None) or []) + imported.notes
                if notes:
                    ex["notes_detect"] = notes
                if imported.sidecars:
                    ex["sidecars"] = imported.sidecars
                if imported.base and det_base != "unknown" and imported.base != det_base:
                    ex["base_conflict"] = f"tensors say {det_base}, metadata says {imported.base}"
                if prep["extra"]:
                    ex.update(prep["extra"])
                triggers = prep["triggers"]
                row = {
                    "id": entry_id, "sha256": hashes.sha256, "name": final_name, "file_name": p.name,
                    "autov1": hashes.autov1, "autov2": hashes.autov2, "autov3": hashes.autov3,
                    "crc32": hashes.crc32, "blake3": hashes.blake3, "size": hashes.size,
                    "format": det.format, "base": final_base, "kind": det.kind,
                    "rank": getattr(det, "rank", None), "rank_min": getattr(det, "rank_min", None),
                    "rank_max": getattr(det, "rank_max", None),
                    "alpha": getattr(det, "alpha", None), "n_layers": getattr(det, "n_layers", None),
                    "parts": json.dumps(list(getattr(det, "parts", None) or [])),
                    "tokens": json.dumps(list(getattr(det, "tokens", None) or [])),
                    "type": prep["type"],
                    # explicit triggers, else those from metadata/sidecars, else the file's embedding tokens
                    "triggers": json.dumps(md.dedupe(triggers) if triggers else
                                           (imported.triggers or list(getattr(det, "tokens", None) or [])),
                                           ensure_ascii=False),
                    "tags": json.dumps(md.dedupe(list(imported.tags) + list(prep["tags"] or [])), ensure_ascii=False),
                    "description": prep["description"] or imported.description,
                    "source": prep["source"] or imported.source or str(p.resolve()),
                    "created_at": imported.created_at or _mtime_iso(p),
                    "added_at": now_iso(),
                    "metadata": json.dumps(_slim_meta(prep["meta"]), ensure_ascii=False),
                    "extra": json.dumps(ex, ensure_ascii=False, default=str),
                    "blob_mode": "link" if prep["linked"] else "copy",
                }
                cols = ", ".join(f'"{c}"' for c in row)
                self.conn.execute(f"INSERT INTO entries ({cols}) VALUES ({', '.join('?' * len(row))})",
                                  list(row.values()))
                for item in prep["lineage"] or []:
                    self._insert_lineage(entry_id, item)
                for kind, ptmp, psha, ext, w, h in preview_blobs:
                    self._place_blob(ptmp, psha, durable=durable)
                    self.conn.execute(
                        "INSERT OR IGNORE INTO previews(entry_id, sha256, kind, ext, width, height, params, added_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, '{}', ?)", (entry_id, psha, kind, ext, w, h, now_iso()))
                self._fts_sync(entry_id)
                self._place_blob(tmp, hashes.sha256, chmod=not prep["linked"], durable=durable)
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        finally:
            tmp.unlink(missing_ok=True)
            for _k, t, *_ in preview_blobs:
                t.unlink(missing_ok=True)
        return self.get(entry_id), True

    def _insert_lineage(self, entry_id: str, item: dict) -> None:
        if not isinstance(item, dict) or "relation" not in item or "parent" not in item:
            raise LorahubError("a lineage item needs 'relation' and 'parent'")
        relation = str(item["relation"])
        parent = item["parent"]
        parent_id = parent_sha = None
        if isinstance(parent, dict):
            parent_id, parent_sha = parent.get("id"), parent.get("sha256")
            parent = parent.get("name") or parent_id
        else:
            parent = str(parent)
            try:
                pe = self.resolve(parent)
                parent_id, parent_sha = pe["id"], pe["sha256"]
            except LorahubError:
                if re.fullmatch(r"[0-9a-fA-F]{64}", parent):
                    parent_sha = parent.lower()
        self.conn.execute(
            "INSERT INTO lineage(entry_id, relation, parent, parent_id, parent_sha256, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (entry_id, relation, parent, parent_id, parent_sha,
             json.dumps(item.get("detail") or {}, ensure_ascii=False, default=str)))

    def add_lineage(self, entry_id: str, items: list[dict]) -> None:
        entry_id = self._id_of(entry_id)
        with self._write():
            for item in items:
                self._insert_lineage(entry_id, item)

    def _image_blob(self, data_or_path: bytes | Path, *, durable: bool = True) -> tuple[Path, str, str, int, int]:
        """Check an image with PIL and write it as a temp blob: (tmp, sha256, ext, width, height)."""
        import hashlib
        import io

        from PIL import Image, UnidentifiedImageError

        data = data_or_path if isinstance(data_or_path, bytes) else Path(data_or_path).read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = (im.format or "").lower()
                w, h = im.size
                im.verify()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise LorahubError("not a readable image") from None
        ext = {"jpeg": "jpg"}.get(fmt, fmt) or "img"
        sha = hashlib.sha256(data).hexdigest()
        tmp = self._store_tmp()
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        return tmp, sha, ext, w, h

    def _prepare_previews(self, imported, *, durable: bool = True) -> list:
        out = []
        for kind, src in imported.previews:
            try:
                tmp, sha, ext, w, h = self._image_blob(src, durable=durable)
            except (LorahubError, OSError):
                imported.notes.append(f"{kind} preview is not a readable image, ignored")
                continue
            out.append((kind, tmp, sha, ext, w, h))
        return out

    def add_preview(self, entry_id: str, image_path: str | os.PathLike, *, kind: str = "grid",
                    params: dict | None = None) -> dict:
        """Store an image (PNG/JPEG/WebP) as a preview of an entry; ``params`` records how it was made."""
        entry_id = self._id_of(entry_id)
        p = Path(image_path)
        if not p.is_file():
            raise NotFound(f"{image_path}: no such file")
        try:
            tmp, sha, ext, w, h = self._image_blob(p)
        except LorahubError:
            raise LorahubError(f"{image_path}: not a readable image") from None
        try:
            with self._write():
                self._place_blob(tmp, sha)
                self.conn.execute(
                    "INSERT INTO previews(entry_id, sha256, kind, ext, width, height, params, added_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(entry_id, sha256, kind) DO UPDATE SET "
                    "params = excluded.params", (entry_id, sha, kind, ext, w, h,
                                                 json.dumps(params or {}, default=str), now_iso()))
        finally:
            tmp.unlink(missing_ok=True)
        return next(d for d in self.previews(entry_id) if d["sha256"] == sha and d["kind"] == kind)

    def set_remote(self, entry_id: str, *, repo: str, revision: str | None = None, commit: str | None = None,
                   endpoint: str | None = None) -> dict:
        """Record that an entry lives at ``repo@revision`` (commit) on a hub ``endpoint``."""
        entry_id = self._id_of(entry_id)
        with self._write():
            self.conn.execute("DELETE FROM remotes WHERE entry_id = ? AND repo = ? AND endpoint IS ?",
                              (entry_id, repo, endpoint))
            self.conn.execute(
                'INSERT INTO remotes(entry_id, repo, revision, "commit", endpoint, updated_at) VALUES (?, ?, ?, ?, ?, ?)',
                (entry_id, repo, revision, commit, endpoint, now_iso()))
        return next(r for r in self.remotes(entry_id) if r["repo"] == repo and r["endpoint"] == endpoint)

    def update(self, entry_id: str, **fields: Any) -> dict:
        """Change editable fields: name, type, triggers, tags, description, base, source, created_at, extra."""
        entry_id = self._id_of(entry_id)
        bad = [k for k in fields if k not in UPDATABLE]
        if bad:
            raise LorahubError(f"cannot edit field(s) {', '.join(bad)}; editable: {', '.join(UPDATABLE)}")
        if "type" in fields:
            _check_choice("type", fields["type"], TYPES)
        if "base" in fields:
            if fields["base"] is None:
                fields["base"] = "unknown"
            _check_choice("base", fields["base"], BASES)
        sets, args = [], []
        with self._write():
            for k, v in fields.items():
                if k == "name":
                    v = _clean_name(v)
                    other = self.conn.execute("SELECT id FROM entries WHERE name = ?", (v,)).fetchone()
                    if other is not None and other["id"] != entry_id:
                        raise LorahubError(f"the name {v!r} is taken by entry {other['id']}")
                if k in ("triggers", "tags"):
                    from lorahub.metadata import dedupe

                    v = json.dumps(dedupe([str(x).strip() for x in (v or []) if str(x).strip()]), ensure_ascii=False)
                elif k == "extra":
                    v = json.dumps(v or {}, ensure_ascii=False, default=str)
                sets.append(f'"{k}" = ?')
                args.append(v)
            if sets:
                self.conn.execute(f"UPDATE entries SET {', '.join(sets)} WHERE id = ?", args + [entry_id])
                self._fts_sync(entry_id)
        return self.get(entry_id)

    def change_tags(self, entry_id: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> dict:
        """Add and remove tags in one write transaction (read-modify-write under the write lock, so
        concurrent taggers never lose each other's changes). Matching is case-insensitive."""
        from lorahub.metadata import dedupe

        entry_id = self._id_of(entry_id)
        drop = {t.casefold() for t in remove}
        with self._write():
            row = self.conn.execute("SELECT tags FROM entries WHERE id = ?", (entry_id,)).fetchone()
            if row is None:
                raise NotFound(f"no registry entry matches {entry_id!r} (it was just removed)")
            tags = [t for t in json.loads(row["tags"]) if t.casefold() not in drop]
            tags = dedupe(tags + [t for t in add if t.casefold() not in drop])
            self.conn.execute("UPDATE entries SET tags = ? WHERE id = ?",
                              (json.dumps(tags, ensure_ascii=False), entry_id))
            self._fts_sync(entry_id)
        return self.get(entry_id)

    def remove(self, entry_id: str) -> dict:
        """Delete an entry (its blob stays in the store until :meth:`gc`)."""
        entry = self.get(self._id_of(entry_id))
        with self._write():
            self.conn.execute("UPDATE lineage SET parent_id = NULL WHERE parent_id = ?", (entry["id"],))
            self.conn.execute("DELETE FROM entries WHERE id = ?", (entry["id"],))
            self.conn.execute("DELETE FROM entries_fts WHERE entry_id = ?", (entry["id"],))
        return entry

    def gc(self, *, dry_run: bool = False, tmp_age_s: float = 300.0) -> dict:
        """Remove unreferenced blobs and ``.lorahub-tmp-*`` leftovers older than ``tmp_age_s``."""
        import time

        removed, freed, tmps = [], 0, []
        with self._write():
            refs = {r[0] for r in self.conn.execute("SELECT sha256 FROM entries UNION SELECT sha256 FROM previews")}
            limit = time.time() - tmp_age_s
            for sub in sorted(self.objects.iterdir()) if self.objects.is_dir() else []:
                files = [sub] if sub.is_file() else sorted(sub.iterdir()) if sub.is_dir() else []
                for f in files:
                    try:
                        st = f.lstat()
                    except OSError:
                        continue
                    if f.name.startswith(TMP_PREFIX):
                        if st.st_mtime <= limit:
                            tmps.append(str(f))
                            freed += st.st_size
                            if not dry_run:
                                f.unlink(missing_ok=True)
                    elif f.name not in refs and sub != f and f.parent.parent == self.objects:
                        removed.append(f.name)
                        freed += st.st_size
                        if not dry_run:
                            f.unlink(missing_ok=True)
            for f in sorted(self.home.glob(TMP_PREFIX + "*")):  # interrupted writes beside the database
                try:
                    st = f.lstat()
                except OSError:
                    continue
                if f.is_file() and st.st_mtime <= limit:
                    tmps.append(str(f))
                    freed += st.st_size
                    if not dry_run:
                        f.unlink(missing_ok=True)
            if not dry_run:
                self.conn.execute("DELETE FROM scan_cache WHERE sha256 NOT IN (SELECT sha256 FROM entries)")
        return {"blobs": removed, "temp_files": tmps, "bytes": freed, "dry_run": dry_run}

    def verify(self, *, progress=None) -> list[dict]:
        """Re-hash every stored blob; return problems: {id, name, sha256, problem: missing|corrupt}."""
        from lorahub.hashing import sha256_file

        problems = []
        rows = list(self.conn.execute("SELECT id, name, sha256, size, 'entry' AS what FROM entries "
                                      "UNION ALL SELECT entry_id, kind, sha256, NULL, 'preview' FROM previews"))
        for r in rows:
            p = self.object_path(r["sha256"])
            item = {"id": r["id"], "name": r["name"], "sha256": r["sha256"], "what": r["what"]}
            if not p.is_file():
                problems.append({**item, "problem": "missing"})
            elif (r["size"] is not None and p.stat().st_size != r["size"]) or sha256_file(p) != r["sha256"]:
                problems.append({**item, "problem": "corrupt"})
            if progress:
                progress(r)
        return problems

    def restore_blob(self, sha256: str, src: str | os.PathLike) -> bool:
        """Put the bytes of ``src`` back into the store as blob ``sha256`` if they hash to it.

        Used by ``verify --repair``: the copy is hashed while it is written, fsynced and renamed over
        the missing or corrupt blob under the write lock. Returns False (nothing changed) on a mismatch.
        """
        from lorahub.hashing import sha256_file

        tmp = self._store_tmp()
        try:
            import shutil

            shutil.copyfile(src, tmp)
            _fsync_file(tmp)
            if sha256_file(tmp) != sha256:
                tmp.unlink()
                return False
            with self._write():
                self._place_blob(tmp, sha256)
            return True
        finally:
            if tmp.exists():
                tmp.unlink()

    # ------------------------------------------------------------------ scan cache
    def scan_cache_get(self, path: Path, st: os.stat_result) -> str | None:
        r = self.conn.execute("SELECT sha256, size, mtime_ns FROM scan_cache WHERE path = ?", (str(path),)).fetchone()
        if r is not None and r["size"] == st.st_size and r["mtime_ns"] == st.st_mtime_ns:
            return r["sha256"]
        return None

    def scan_cache_put(self, path: Path, st: os.stat_result, sha256: str) -> None:
        self.conn.execute(
            "INSERT INTO scan_cache(path, size, mtime_ns, sha256, seen_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
            "sha256 = excluded.sha256, seen_at = excluded.seen_at",
            (str(path), st.st_size, st.st_mtime_ns, sha256, now_iso()))


def _slim_meta(meta: dict) -> dict:
    """Header metadata as stored in the catalogue: base64 cover images (kept as previews) are elided."""
    v = meta.get("ssmd_cover_images")
    if isinstance(v, str) and len(v) > 2:
        meta = dict(meta)
        meta["ssmd_cover_images"] = f"<{len(v)} characters of base64 images, stored as previews>"
    return meta


def _mtime_iso(p: Path) -> str:
    ts = p.stat().st_mtime
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_choice(what: str, value, choices) -> None:
    if value is not None and value not in choices:
        raise LorahubError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def _clean_name(name: str) -> str:
    name = re.sub(r"[\x00-\x1f\x7f]", "", str(name)).strip()
    if not name:
        raise LorahubError("a name cannot be empty")
    return name[:200]


def _fts_text(name: str) -> str:
    # index "my_lora-v2" also as "my lora v2" so word searches find it
    spaced = re.sub(r"[_\-.]+", " ", name)
    return name if spaced == name else f"{name} {spaced}"


def fts_query(query: str) -> str | None:
    """Turn free text into a safe FTS5 query: every word must match (as a prefix)."""
    words = re.findall(r"[\w]+", query, flags=re.UNICODE)
    if not words:
        return None
    return " AND ".join(f'"{w}"*' for w in words)


def _windows(items, n: int, max_bytes: int):
    """Groups of at most ``n`` paths and (roughly) ``max_bytes`` of file data."""
    buf, size = [], 0
    for it in items:
        try:
            sz = os.stat(it).st_size
        except OSError:
            sz = 0
        if buf and size + sz > max_bytes:
            yield buf
            buf, size = [], 0
        buf.append(it)
        size += sz
        if len(buf) >= n:
            yield buf
            buf, size = [], 0
    if buf:
        yield buf


def _fsync_file(path: Path) -> None:
    from lorahub.fsutil import fsync_path

    fsync_path(path, strict=True)


def _fsync_many(paths, fn) -> None:
    if not paths:
        return
    if len(paths) == 1:
        fn(paths[0])
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(32, len(paths))) as ex:
        list(ex.map(fn, paths))


def _fsync_dir(folder: Path) -> None:
    from lorahub.fsutil import fsync_path

    fsync_path(folder)
