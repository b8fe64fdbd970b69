"""The local catalogue: a SQLite database (WAL, FTS5) plus a content-addressed file store.

Layout of a home (``--home``, ``$LORAHUB_HOME``, else ``~/.lorahub``)::

    lorahub.db                     the catalogue (schema: registry/migrations/NNNN_*.sql)
    lorahub.db-reserve             1 MiB kept free for ``rm`` and ``gc`` on a full disk
    objects/<sha[:2]>/<sha256>     read-only blobs (LoRA files and preview images), deduplicated

``lorahub.db`` is a plain SQLite file: ``sqlite3``, ``sqlite-utils`` and Datasette open it as is
(``lorahub sql`` runs read-only queries on it). Commands that only read open it read-only and never
create a home; a store whose database is missing or empty is refused (:class:`OrphanedStore`) rather
than taken for a new registry.

Every add is one short write transaction (a scan: one per batch of files); blobs are written as
``.lorahub-tmp-*`` files named after their writer, fsynced and renamed into place while the write
lock is held, so a crash leaves at most an unreferenced blob or temp file (``gc`` removes both, never
one whose writer still runs) and never a half entry. A full disk is one error, ``no space left on
<home>``, with nothing left behind.

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

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from lorahub.errors import LorahubError, NotFound
from lorahub.fsutil import NoSpace, os_error
from lorahub.registry import edits, queries
from lorahub.registry.schema import (DB_NAME, connect, connect_readonly, default_home, ensure_reserve, is_disk_full,
                                     migrate, migrations, release_reserve, schema_version, transaction)
from lorahub.registry.store import OBJECTS, Store

if TYPE_CHECKING:  # pragma: no cover
    from lorahub.registry.workflows import ExportResult, ScanReport, VerifyReport

__all__ = ["Registry", "default_home", "DB_NAME", "OrphanedStore", "EmptyCatalogue", "NoRegistry"]


class OrphanedStore(LorahubError):
    """The store of a home holds blobs but its catalogue database is missing or empty: taking it for a
    new registry would make ``gc`` delete every blob. ``path``: the home."""

    def __init__(self, home: Path, blobs: int, state: str):
        super().__init__(
            f"{home}: the store holds {blobs} blob(s) but the catalogue database ({DB_NAME}) is {state}; "
            "refusing to take it for a new registry. Restore the database from a backup (restore), or "
            "re-register the stored files (verify with repair)")
        self.path, self.blobs, self.state = home, blobs, state


class NoRegistry(NotFound):
    """A home without a registry, opened where nothing may be created (read-only, or ``create=False``)."""

    def __init__(self, home: Path):
        super().__init__(f"{home}: no lorahub registry here yet (nothing has been added)")
        self.path = home


class EmptyCatalogue(LorahubError):
    """``gc`` on a catalogue without entries: every stored blob would look unreferenced."""

    def __init__(self, home: Path, blobs: int):
        super().__init__(f"{home}: the catalogue has no entries, so all {blobs} stored blob(s) look unreferenced; "
                         "refusing to delete them (gc with force deletes them)")
        self.path, self.blobs = home, blobs


def _db_state(db: Path) -> str | None:
    """``"missing"`` or ``"empty"`` (a zero-byte file) when ``db`` holds no catalogue, else None."""
    if not db.exists():
        return "missing"
    if db.is_file() and db.stat().st_size == 0:
        return "empty"
    return None


def _has_blobs(home: Path) -> bool:
    return Store(home / OBJECTS).has_blobs()


def _refuse_orphaned(home: Path, state: str) -> None:
    store = Store(home / OBJECTS)
    if store.has_blobs():
        raise OrphanedStore(home, sum(1 for _ in store.blobs()), state)


class Registry:
    """A lorahub home: catalogue + store. Open with :meth:`Registry.open`.

    Entries are plain dicts (the ``entries`` row, JSON columns decoded); every method that takes an
    entry accepts its id, name, file name or stem, any hash or hash prefix, or the entry dict.
    """

    def __init__(self, home: Path, conn: sqlite3.Connection, *, readonly: bool = False,
                 frees_space: bool = False, recovering: bool = False):
        self.home = home
        self.conn = conn
        self.store = Store(home / OBJECTS)
        self.readonly = readonly
        self.frees_space = frees_space
        self.recovering = recovering    # opened a store without a catalogue, to re-register its blobs
        # whether this registry has held entries (when opened, or added since): gc deletes no blob otherwise
        self.had_entries = queries.count(conn) > 0
        self._released = False          # the space reserve was given up in this session

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, home: Path | str | None = None, *, readonly: bool = False, create: bool = True,
             recover: bool = False, frees_space: bool = False, migrate_to: int | None = None) -> "Registry":
        """Open the registry at ``home`` (default: :func:`default_home`), creating and migrating it as needed.

        ``readonly``: a read-only connection; nothing is created or changed, and a home without a
        registry raises :class:`NoRegistry` (a :class:`~lorahub.errors.NotFound`; ``list``, ``search``,
        ``show``, ``export``, ``verify``, ``sql``, ``gc`` in dry-run). ``create=False``: the same for a
        writable registry.
        A home whose store holds blobs while its database is missing or empty raises
        :class:`OrphanedStore`, unless ``recover`` (then :meth:`check` with ``repair`` re-registers
        the stored files). ``frees_space``: the caller frees space (``rm``, ``gc``): on a full disk the
        home's space reserve is given up so that the catalogue can still be changed. A full disk
        otherwise raises :class:`~lorahub.fsutil.NoSpace`.
        """
        home = Path(home).expanduser() if home else default_home()
        db = home / DB_NAME
        state = _db_state(db)
        orphans = bool(state) and _has_blobs(home)
        if orphans and not recover:
            _refuse_orphaned(home, state)
        if state and (readonly or not create) and not (recover and orphans):
            raise NoRegistry(home)
        if readonly:
            conn = connect_readonly(db, rows=True)
            try:
                version = schema_version(conn)
                if version == 0:
                    _refuse_orphaned(home, "empty")
                if version < migrations()[-1][0]:  # an older schema: migrate once, then read
                    conn.close()
                    cls.open(home, recover=recover).close()
                    conn = connect_readonly(db, rows=True)
            except BaseException:
                conn.close()
                raise
            return cls(home, conn, readonly=True)
        try:
            (home / OBJECTS).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            err = os_error(exc, home)
            if isinstance(err, NoSpace):
                raise err from None
            raise LorahubError(f"{home}: cannot create the registry home ({exc.strerror or exc})") from None

        def attempt() -> tuple[sqlite3.Connection, bool]:
            conn = connect(db)
            try:
                empty = schema_version(conn) == 0
                if empty and not recover:
                    _refuse_orphaned(home, "empty")
                migrate(conn, target=migrate_to)
            except sqlite3.DatabaseError as exc:
                conn.close()
                if is_disk_full(exc):
                    raise NoSpace(home) from None
                raise LorahubError(f"{db}: not a lorahub registry database ({exc})") from None
            except BaseException:
                conn.close()
                raise
            return conn, empty

        released = False
        try:
            conn, empty = attempt()
        except NoSpace:
            if not (frees_space and release_reserve(home)):
                raise
            released = True
            conn, empty = attempt()
        reg = cls(home, conn, frees_space=frees_space,
                  recovering=recover and (bool(state) or empty) and _has_blobs(home))
        reg._released = released
        if not released:
            ensure_reserve(home)
        return reg

    def close(self) -> None:
        self.conn.close()
        if self._released:  # space was freed meanwhile, perhaps: put the reserve back if it fits
            ensure_reserve(self.home)
            self._released = False

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
        if self.readonly:
            raise LorahubError(f"{self.home}: the registry was opened read-only")
        return transaction(self.conn)

    @contextlib.contextmanager
    def _read(self):
        """A read transaction: one consistent snapshot for several queries."""
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            if self.conn.in_transaction:
                self.conn.execute("COMMIT")

    def _freeing(self, fn):
        """Run the write ``fn()``; on a full disk, when this registry frees space, give up the
        space reserve and run it once more."""
        try:
            return fn()
        except NoSpace:
            if not (self.frees_space and release_reserve(self.home)):
                raise
            self._released = True
            return fn()

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
        """An entry by id, exact name, any hash (SHA256, AutoV1/2/3, CRC32, BLAKE3) or hash prefix
        (>= 6 hex), the original file name or its stem (see :func:`lorahub.registry.queries.resolve`),
        or the path of a file whose bytes are registered."""
        if isinstance(ref, dict):
            return self.get(ref["id"])
        try:
            return queries.resolve(self.conn, ref)
        except NotFound:
            from lorahub.vocab import looks_like_path

            p = Path(str(ref)).expanduser()
            if not (looks_like_path(str(ref)) and p.is_file()):
                raise
        from lorahub.hashing import sha256_file

        entry = self.find_sha256(sha256_file(p))
        if entry is None:
            raise NotFound(f"{ref}: this file is not in the registry")
        return entry

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
        ``lineage`` (the ancestry tree), ``children``, ``previews``, ``remotes``, ``sidecar_files``."""
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
                 extra: dict | None = None, detection=None) -> tuple[dict, bool]:
        """Register a LoRA / embedding / checkpoint file. Returns ``(entry, created)``.

        ``created`` is False when a file with the same SHA-256 is already registered (nothing changes).
        Hashes, detection (header only), header metadata and sidecars are read (the sidecar files'
        bytes are kept, for :meth:`export`); the file is copied into the store while it is hashed
        (``copy=False``: hard-linked when the store is on the same file system, else copied). One
        transaction; bad input raises ``LorahubError`` with nothing written. ``name``: refused when
        it holds path separators or control characters (a name taken from the file's metadata or
        sidecars is made safe instead, the original kept as ``extra["display_name"]``).
        ``detection``: the file's :func:`lorahub.detect` result when the caller has it already.
        """
        from lorahub.registry import ingest

        prep = ingest.prepare(self.store, path, name=name, type=type, triggers=triggers, tags=tags, base=base,
                              description=description, source=source, lineage=lineage, extra=extra, copy=copy,
                              sidecars=sidecars, detection=detection)
        existing = self.find_sha256(prep.sha256)
        if existing is not None:
            prep.discard()
            return existing, False
        return ingest.commit(self, prep)

    def add_many(self, paths: Iterable[str | os.PathLike], *, tags: list[str] | None = None,
                 batch_files: int = 256, batch_bytes: int = 256 * 1024 * 1024, workers: int | None = None,
                 copy: bool = True, remember: bool = False, callback=None, sidecars=True) -> dict:
        """Add many files with group commit (see :func:`lorahub.registry.ingest.add_many`).
        ``callback(path, entry | None, created, error | None)`` is called per file."""
        from lorahub.registry import ingest

        return ingest.add_many(self, paths, tags=tags, batch_files=batch_files, batch_bytes=batch_bytes,
                               workers=workers, copy=copy, remember=remember, callback=callback, sidecars=sidecars)

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
        """Delete an entry (its blob stays in the store until :meth:`gc`). Works on a full disk when
        the registry was opened with ``frees_space``."""
        entry = self.get(self._id_of(entry_id))

        def run():
            with self._write():
                edits.remove(self.conn, entry["id"])

        self._freeing(run)
        return entry

    # ------------------------------------------------------------------ the store
    def gc(self, *, dry_run: bool = False, tmp_age_s: float = 300.0, force: bool = False) -> dict:
        """Remove unreferenced blobs and leftover ``.lorahub-tmp-*`` files (a temp file whose writer
        is still running is kept; see :meth:`Store.sweep`).

        A catalogue that has no entries, or had none when it was opened and none added since, deletes
        no blob: it raises :class:`EmptyCatalogue` instead, unless ``force`` (a lost or emptied
        database would otherwise cost every stored file). ``dry_run`` only reports (and works on a read-only registry).
        Returns ``{"blobs": [sha256...], "temp_files": [path...], "bytes": n, "dry_run": bool}``."""

        def sweep(dry: bool) -> dict:
            refs = {r[0] for r in self.conn.execute("SELECT sha256 FROM entries UNION SELECT sha256 FROM previews")}
            if not force and (not self.had_entries or queries.count(self.conn) == 0):
                orphans = sum(1 for f in self.store.blobs() if f.name not in refs)
                if orphans:
                    raise EmptyCatalogue(self.home, orphans)
            return self.store.sweep(refs, self.home, dry_run=dry, tmp_age_s=tmp_age_s)

        if dry_run:
            with self._read():
                res = sweep(True)
            return {**res, "dry_run": True}
        res = self._freeing(lambda: self._locked(lambda: sweep(False)))
        try:  # forget scanned paths of removed files; on a full disk this waits for the next gc
            with self._write():
                self.conn.execute("DELETE FROM scan_cache WHERE sha256 NOT IN (SELECT sha256 FROM entries)")
        except NoSpace:
            pass
        return {**res, "dry_run": False}

    def _locked(self, fn):
        """``fn()`` while holding the write lock (nothing else may add a blob meanwhile)."""
        with self._write():
            return fn()

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

    def export(self, ref: str | dict, dest: str | os.PathLike, *, force: bool = False,
               stem: str | None = None) -> "ExportResult":
        """Copy an entry out with its webui sidecars (see :func:`lorahub.registry.workflows.export`)."""
        from lorahub.registry import workflows

        return workflows.export(self, ref, dest, force=force, stem=stem)

    def sidecars(self, ref: str | dict) -> list[dict]:
        """The sidecar files an entry was imported with (kind, file_name, data, sha256, view)."""
        return queries.sidecars(self.conn, self.resolve(ref)["id"])

    # ------------------------------------------------------------------ scan cache
    def scan_cache_get(self, path: Path, st: os.stat_result) -> str | None:
        """The SHA-256 ``path`` had when a scan last saw it with this size and mtime, else None."""
        return queries.scanned_sha256(self.conn, str(path), st.st_size, st.st_mtime_ns)

    def scan_cache_put(self, items: Iterable[tuple[Path, os.stat_result, str]]) -> None:
        """Remember ``(resolved path, stat, sha256)`` of scanned files (one transaction)."""
        from lorahub.registry import ingest

        ingest.remember_scanned(self, items)
