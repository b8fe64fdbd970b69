"""The local catalogue: a SQLite database (WAL, FTS5) plus a content-addressed file store.

Layout of a home (``--home``, ``$LORAHUB_HOME``, else ``~/.lorahub``)::

    lorahub.db                     the catalogue (schema: registry/migrations/NNNN_*.sql)
    objects/<sha[:2]>/<sha256>     read-only blobs (LoRA files and preview images), deduplicated

``lorahub.db`` is a plain SQLite file: ``sqlite3``, ``sqlite-utils`` and Datasette open it as is
(``lorahub sql`` runs read-only queries on it).

Every add is one short write transaction; blobs are written as ``.lorahub-tmp-*`` files, fsynced and
renamed into place while the write lock is held, so a crash leaves at most an unreferenced blob or
temp file (``gc`` removes both) and never a half entry.

:class:`Registry` is a facade over one module per job:

* :mod:`~lorahub.registry.schema` — the home, connecting, the write transaction, migrations;
* :mod:`~lorahub.registry.store` — blobs: temp + fsync + rename, sweep (gc), check (verify);
* :mod:`~lorahub.registry.ingest` — adding files: ``prepare`` → typed ``Prepared`` → ``commit``;
* :mod:`~lorahub.registry.edits` — changing entries (fields, tags, lineage, previews, remotes);
* :mod:`~lorahub.registry.queries` — reading (get, resolve, search, lineage, previews, dupes);
* :mod:`~lorahub.registry.workflows` — the catalogue workflows: scan a folder, export, verify/repair,
  an entry's full record for ``show``; :mod:`~lorahub.registry.sql` — read-only SQL for users.

The read and write paths import only the standard library (``list``, ``search`` and ``show`` must
start fast; detection, metadata and hashing are imported when adding). sqlite-utils serves the
read-only SQL of :mod:`~lorahub.registry.sql`.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from lorahub.errors import LorahubError, NotFound
from lorahub.registry import edits, queries
from lorahub.registry.schema import DB_NAME, connect, default_home, migrate, transaction
from lorahub.registry.store import OBJECTS, Store

if TYPE_CHECKING:  # pragma: no cover
    from lorahub.registry.workflows import ExportResult, ScanReport, VerifyReport

__all__ = ["Registry", "default_home", "DB_NAME"]


class Registry:
    """A lorahub home: catalogue + store. Open with :meth:`Registry.open`.

    Entries are plain dicts (the ``entries`` row, JSON columns decoded); every method that takes an
    entry accepts its id, name, any hash or hash prefix, or the entry dict.
    """

    def __init__(self, home: Path, conn: sqlite3.Connection):
        self.home = home
        self.conn = conn
        self.store = Store(home / OBJECTS)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, home: Path | str | None = None, *, migrate_to: int | None = None) -> "Registry":
        """Open (creating and migrating as needed) the registry at ``home`` (default: :func:`default_home`)."""
        home = Path(home).expanduser() if home else default_home()
        try:
            (home / OBJECTS).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LorahubError(f"{home}: cannot create the registry home ({exc.strerror or exc})") from None
        conn = connect(home / DB_NAME)
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
        return self.store.root

    def object_path(self, sha256: str) -> Path:
        return self.store.path(sha256)

    def _write(self):
        """The one write transaction helper: ``with reg._write(): ...`` (BEGIN IMMEDIATE ... COMMIT)."""
        return transaction(self.conn)

    def _id_of(self, entry_or_id: dict | str) -> str:
        if isinstance(entry_or_id, dict):
            entry_or_id = entry_or_id["id"]
        if queries.exists(self.conn, entry_or_id):
            return entry_or_id
        return self.resolve(entry_or_id)["id"]

    # ------------------------------------------------------------------ reading
    def get(self, entry_id: str) -> dict:
        return queries.get(self.conn, entry_id)

    def find_sha256(self, sha256: str) -> dict | None:
        return queries.find_sha256(self.conn, sha256)

    def resolve(self, ref: str | dict) -> dict:
        """An entry by id, exact name, or any hash (SHA256, AutoV1/2/3, CRC32, BLAKE3) or hash prefix (>= 6 hex)."""
        if isinstance(ref, dict):
            return self.get(ref["id"])
        return queries.resolve(self.conn, ref)

    def entries(self, *, order: str = "name") -> list[dict]:
        return queries.entries(self.conn, order=order)

    def count(self) -> int:
        return queries.count(self.conn)

    def blob_path(self, entry_or_id: dict | str) -> Path:
        """The read-only stored file of an entry (``objects/<sha[:2]>/<sha256>``)."""
        entry = entry_or_id if isinstance(entry_or_id, dict) and "sha256" in entry_or_id else self.resolve(entry_or_id)
        p = self.store.path(entry["sha256"])
        if not p.is_file():
            raise NotFound(f"the stored file of {entry['name']} ({entry['id']}) is missing from {self.objects}; "
                           "run `lorahub verify`")
        return p

    def search(self, query: str | None = None, *, type: str | None = None, base: str | None = None,
               tags: Iterable[str] = (), kind: str | None = None, rank_min: int | None = None,
               rank_max: int | None = None, format: str | None = None, limit: int | None = None,
               offset: int = 0, order: str | None = None, base_model: str | None = None) -> list[dict]:
        """Entries matching a full-text ``query`` (name, triggers, tags, description) and filters, best
        match first (by name without a query) or in one of ``queries.SEARCH_ORDERS`` (name, added, size,
        rank); ``limit`` entries from the ``offset``-th on."""
        return queries.search(self.conn, query, type=type, base=base, tags=tags, kind=kind, rank_min=rank_min,
                              rank_max=rank_max, format=format, limit=limit, offset=offset, order=order,
                              base_model=base_model)

    def search_count(self, query: str | None = None, **filters: Any) -> int:
        """How many entries :meth:`search` finds with the same query and filters."""
        return queries.search_count(self.conn, query, **filters)

    def dupes(self) -> list[list[dict]]:
        """Groups of entries with the same tensors (same AutoV3) under other names or metadata."""
        return queries.dupes(self.conn)

    def lineage(self, entry_id: str) -> list[dict]:
        """Parents of an entry: relation, parent (as given), parent_id/parent_name when registered, detail."""
        return queries.lineage(self.conn, entry_id)

    def ancestry(self, entry_id: str) -> list[dict]:
        """The lineage tree: :meth:`lineage` items, each with ``parents`` (the parent's own ancestry)."""
        return queries.ancestry(self.conn, entry_id)

    def record(self, ref: str | dict) -> dict:
        """Everything known about one entry (what ``lorahub show --json`` prints): the entry, ``blob``,
        ``lineage`` (the ancestry tree), ``children``, ``previews``, ``remotes``."""
        from lorahub.registry import workflows

        return workflows.record(self, ref)

    def children(self, entry_id: str) -> list[dict]:
        """Entries made from this one: relation, entry_id, name."""
        return queries.children(self.conn, entry_id)

    def previews(self, entry_id: str) -> list[dict]:
        return queries.previews(self.conn, self.store, entry_id)

    def remotes(self, entry_id: str) -> list[dict]:
        return queries.remotes(self.conn, entry_id)

    # ------------------------------------------------------------------ adding
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
        from lorahub.registry import ingest

        prep = ingest.prepare(self.store, path, name=name, type=type, triggers=triggers, tags=tags, base=base,
                              description=description, source=source, lineage=lineage, extra=extra, copy=copy,
                              sidecars=sidecars)
        existing = self.find_sha256(prep.sha256)
        if existing is not None:
            prep.discard()
            return existing, False
        return ingest.commit(self, prep)

    def add_many(self, paths: Iterable[str | os.PathLike], *, tags: list[str] | None = None,
                 batch_files: int = 64, batch_bytes: int = 256 * 1024 * 1024, workers: int = 2,
                 copy: bool = True, callback=None) -> dict:
        """Add many files, batching their fsyncs (see :func:`lorahub.registry.ingest.add_many`).
        ``callback(path, entry | None, created, error | None)`` is called per file."""
        from lorahub.registry import ingest

        return ingest.add_many(self, paths, tags=tags, batch_files=batch_files, batch_bytes=batch_bytes,
                               workers=workers, copy=copy, callback=callback)

    def scan(self, folder: str | os.PathLike, *, exts: Iterable[str] | None = None, tags: list[str] | None = None,
             link: bool = False, progress=None) -> "ScanReport":
        """Add every LoRA file under ``folder`` (see :func:`lorahub.registry.workflows.scan`)."""
        from lorahub.registry import workflows

        return workflows.scan(self, folder, exts=exts, tags=tags, link=link, progress=progress)

    # ------------------------------------------------------------------ changing
    def add_lineage(self, entry_id: str, items: list[dict]) -> None:
        """Record parents of an entry (``[{"relation", "parent", "detail"}]``, see :func:`edits.insert_lineage`)."""
        entry_id = self._id_of(entry_id)
        with self._write():
            for item in items:
                edits.insert_lineage(self.conn, entry_id, item)

    def add_preview(self, entry_id: str, image_path: str | os.PathLike, *, kind: str = "grid",
                    params: dict | None = None) -> dict:
        """Store an image (PNG/JPEG/WebP) as a preview of an entry; ``params`` records how it was made."""
        from lorahub.registry.ingest import image_blob

        entry_id = self._id_of(entry_id)
        p = Path(image_path)
        if not p.is_file():
            raise NotFound(f"{image_path}: no such file")
        try:
            blob = image_blob(self.store, p, kind)
        except LorahubError:
            raise LorahubError(f"{image_path}: not a readable image") from None
        try:
            with self._write():
                self.store.place(blob.tmp, blob.sha256)
                edits.set_preview(self.conn, entry_id, blob, params)
        finally:
            blob.tmp.unlink(missing_ok=True)
        return next(d for d in self.previews(entry_id) if d["sha256"] == blob.sha256 and d["kind"] == kind)

    def set_remote(self, entry_id: str, *, repo: str, revision: str | None = None, commit: str | None = None,
                   endpoint: str | None = None) -> dict:
        """Record that an entry lives at ``repo@revision`` (commit) on a hub ``endpoint``."""
        entry_id = self._id_of(entry_id)
        with self._write():
            edits.set_remote(self.conn, entry_id, repo=repo, revision=revision, commit=commit, endpoint=endpoint)
        return next(r for r in self.remotes(entry_id) if r["repo"] == repo and r["endpoint"] == endpoint)

    def update(self, entry_id: str, **fields: Any) -> dict:
        """Change editable fields: name, type, triggers, tags, description, base, source, created_at, extra."""
        entry_id = self._id_of(entry_id)
        with self._write():
            edits.update(self.conn, entry_id, fields)
        return self.get(entry_id)

    def change_tags(self, entry_id: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> dict:
        """Add and remove tags in one write transaction (read-modify-write under the write lock, so
        concurrent taggers never lose each other's changes). Matching is case-insensitive."""
        entry_id = self._id_of(entry_id)
        with self._write():
            edits.change_tags(self.conn, entry_id, add, remove)
        return self.get(entry_id)

    def remove(self, entry_id: str) -> dict:
        """Delete an entry (its blob stays in the store until :meth:`gc`)."""
        entry = self.get(self._id_of(entry_id))
        with self._write():
            edits.remove(self.conn, entry["id"])
        return entry

    # ------------------------------------------------------------------ the store
    def gc(self, *, dry_run: bool = False, tmp_age_s: float = 300.0) -> dict:
        """Remove unreferenced blobs and ``.lorahub-tmp-*`` leftovers older than ``tmp_age_s``.
        Returns ``{"blobs": [sha256...], "temp_files": [path...], "bytes": n, "dry_run": bool}``."""
        with self._write():
            refs = {r[0] for r in self.conn.execute("SELECT sha256 FROM entries UNION SELECT sha256 FROM previews")}
            res = self.store.sweep(refs, self.home, dry_run=dry_run, tmp_age_s=tmp_age_s)
            if not dry_run:
                self.conn.execute("DELETE FROM scan_cache WHERE sha256 NOT IN (SELECT sha256 FROM entries)")
        return {**res, "dry_run": dry_run}

    def verify(self, *, progress=None) -> list[dict]:
        """Re-hash every stored blob; return problems: {id, name, sha256, what, problem: missing|corrupt}.
        ``progress(row)`` is called after each blob."""
        problems = []
        rows = list(self.conn.execute("SELECT id, name, sha256, size, 'entry' AS what FROM entries "
                                      "UNION ALL SELECT entry_id, kind, sha256, NULL, 'preview' FROM previews"))
        for r in rows:
            problem = self.store.check(r["sha256"], r["size"])
            if problem:
                problems.append({"id": r["id"], "name": r["name"], "sha256": r["sha256"], "what": r["what"],
                                 "problem": problem})
            if progress:
                progress(r)
        return problems

    def check(self, *, repair: bool = False, progress=None) -> "VerifyReport":
        """Verify every blob and, with ``repair``, restore what can be (see :func:`lorahub.registry.workflows.check`)."""
        from lorahub.registry import workflows

        return workflows.check(self, repair=repair, progress=progress)

    def restore_blob(self, sha256: str, src: str | os.PathLike) -> bool:
        """Put the bytes of ``src`` back into the store as blob ``sha256`` if they hash to it.

        Used by ``verify --repair``: the copy is fsynced, hashed and renamed over the missing or
        corrupt blob under the write lock. Returns False (nothing changed) on a mismatch.
        """
        from lorahub.hashing import sha256_file

        tmp = self.store.copy_temp(src)
        try:
            if sha256_file(tmp) != sha256:
                return False
            with self._write():
                self.store.place(tmp, sha256)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def export(self, ref: str | dict, dest: str | os.PathLike, *, force: bool = False) -> "ExportResult":
        """Copy an entry out under a readable name (see :func:`lorahub.registry.workflows.export`)."""
        from lorahub.registry import workflows

        return workflows.export(self, ref, dest, force=force)

    # ------------------------------------------------------------------ scan cache
    def scan_cache_get(self, path: Path, st: os.stat_result) -> str | None:
        """The SHA-256 ``path`` had when a scan last saw it with this size and mtime, else None."""
        return queries.scanned_sha256(self.conn, str(path), st.st_size, st.st_mtime_ns)

    def scan_cache_put(self, items: Iterable[tuple[Path, os.stat_result, str]]) -> None:
        """Remember ``(resolved path, stat, sha256)`` of scanned files (one transaction)."""
        from lorahub.registry import ingest

        ingest.remember_scanned(self, items)
