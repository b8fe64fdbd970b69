"""Adding files to the catalogue: prepare (read, hash, copy; no database) then commit (one transaction).

:func:`prepare` detects the file's format from its header, collects header metadata and sidecars
(keeping the sidecar files' bytes), hashes the file in one pass while copying it into a temp blob of
the store, and checks any preview images; it returns a typed :class:`Prepared`. :func:`commit_batch`
then inserts the entries, their lineage, previews, sidecars and full-text rows and renames the blobs
into place in one write transaction. :func:`add_many` (``lorahub scan``) overlaps the two: worker
threads prepare the next files while the main thread commits a batch (group commit: one transaction,
one fsync per blob and one per store folder for many files).

Crash guarantees (the same for one file and for a batch): a blob's data is fsynced before it is
renamed to its final name, the renames happen under the write lock, the store folders are fsynced
before the transaction commits. A crash leaves at most unreferenced blobs and temp files (``gc``
removes them), never an entry without its blob and never a half entry.

Rows are written with the standard library's sqlite3 (``executemany``, a table at a time):
sqlite-utils on this path measured ~0.1 s of import (it imports numpy) plus ~0.25 ms per row,
12 % of ``lorahub scan``'s time on small files.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import hashlib
import json
import os
import sqlite3
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from lorahub.errors import LorahubError, NotFound
from lorahub.fsutil import NoSpace, os_error
from lorahub.registry import edits, queries
from lorahub.formats.families import check_base
from lorahub.registry.schema import is_disk_full, no_space, now_iso, transaction
from lorahub.registry.store import Store, fsync_dir, fsync_many
from lorahub.vocab import LORA_TYPES, PICKLE_SUFFIXES

if TYPE_CHECKING:  # pragma: no cover
    from lorahub.formats.detect import Detection
    from lorahub.hashing import Hashes
    from lorahub.metadata import Imported
    from lorahub.registry import Registry

# the sidecar files whose bytes are kept (``export`` writes them back): kind -> file-name suffix
KEPT_SIDECARS = {"json": ".json", "civitai": ".civitai.info", "txt": ".txt"}
MAX_SIDECAR_BYTES = 16 * 1024 * 1024
# safetensors files smaller than this are read into memory once, then detected, hashed and copied from there
SMALL_FILE_BYTES = 4 * 1024 * 1024


@dataclass
class ImageBlob:
    """A checked image (PNG/JPEG/WebP/...) written as a temp file of the store, not yet placed."""

    kind: str           # sidecar | cover | grid | ...
    tmp: Path
    sha256: str
    ext: str
    width: int
    height: int


@dataclass
class SidecarFile:
    """A sidecar file imported with an entry, byte for byte (``kind``: json | civitai | txt)."""

    kind: str
    file_name: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class Prepared:
    """A file read, detected, hashed and copied into a temp blob: everything :func:`commit` needs.

    The first group is what was found; the second is what the caller asked for (None: take what
    the file and its sidecars say). Holding a ``Prepared`` holds temp files: commit it or call
    :meth:`discard`.
    """

    path: Path
    detection: "Detection"
    header: dict[str, str]          # the safetensors header metadata ({} for pickles), cover images elided
    imported: "Imported"            # metadata and sidecars (lorahub.metadata.collect)
    hashes: "Hashes"
    blob: Path                      # temp file in the store (a hard link to ``path`` when ``linked``)
    linked: bool
    stat: os.stat_result | None = None          # the source file as it was hashed
    previews: list[ImageBlob] = field(default_factory=list)
    sidecar_files: list[SidecarFile] = field(default_factory=list)

    name: str | None = None
    type: str | None = None
    triggers: list[str] | None = None
    tags: list[str] | None = None
    base: str | None = None
    description: str | None = None
    source: str | None = None
    lineage: list[dict] | None = None
    extra: dict | None = None
    base_model: str | None = None
    file_name: str | None = None    # the entry's file name (default: the source file's)
    fields: dict | None = None      # row_fields(), when computed ahead (nothing above changes after that)

    @property
    def sha256(self) -> str:
        return self.hashes.sha256

    def temp_files(self) -> list[Path]:
        return [self.blob] + [p.tmp for p in self.previews]

    def discard(self) -> None:
        """Remove the temp files (after a commit they are gone already)."""
        for t in self.temp_files():
            t.unlink(missing_ok=True)

    def default_name(self) -> tuple[str, str | None]:
        """(the entry name, the raw name it was made from when that had to be changed): the name
        asked for, else the one the metadata or sidecars give, else the file's stem; names taken
        from files lose path separators and control characters (:func:`edits.sanitize_name`)."""
        if self.name:
            return edits.check_name(self.name), None
        fname = self.file_name or self.path.name
        stem = os.path.splitext(fname)[0] or fname
        for raw in (self.imported.name, stem):
            clean = edits.sanitize_name(raw)
            if clean:
                return clean, (str(raw) if clean != str(raw).strip() else None)
        return "lora", None

    def entry_row(self, entry_id: str, name: str, raw_name: str | None = None) -> dict:
        """The ``entries`` row this file becomes (JSON columns as JSON text)."""
        row = dict(self.fields) if self.fields is not None else self.row_fields()
        row["id"], row["name"] = entry_id, name
        if raw_name is not None and "display_name" not in (self.extra or {}):
            # the name as the file gave it, before it was made safe
            row["extra"] = edits.dumps({**json.loads(row["extra"]), "display_name": raw_name})
        return row

    def row_fields(self) -> dict:
        """The ``entries`` row this file becomes, but its ``id`` and ``name`` (which depend on the
        catalogue): what a worker of :func:`add_many` computes ahead of the commit (``fields``)."""
        det, imp, h = self.detection, self.imported, self.hashes
        from lorahub.formats.families import from_text

        settled = det.settle([from_text(imp.extra.get("civitai_base_model"), "civitai baseModel")])
        if self.base:
            base = self.base
        elif settled.base != "unknown":
            base = settled.base
        else:
            base = imp.base or "unknown"
        extra = dict(imp.extra)
        notes = list(det.notes) + imp.notes
        if notes:
            extra["notes_detect"] = notes
        if imp.sidecars:
            extra["sidecars"] = imp.sidecars
        if imp.base and det.base != "unknown" and imp.base != det.base:
            extra["base_conflict"] = f"tensors say {det.base}, metadata says {imp.base}"
        if imp.type and not self.type:
            extra["type_source"] = {"type": imp.type, "from": imp.type_source}
        if settled.notes:
            extra["base_conflict"] = "; ".join(settled.notes)
        if settled.evidence:
            extra["base_evidence"] = settled.evidence
        base_model = self.base_model or (settled.base_model if base == settled.base else None)
        if self.extra:
            extra.update(self.extra)
        from lorahub.metadata import dedupe

        # explicit triggers, else those from metadata/sidecars, else the file's embedding tokens
        triggers = dedupe(self.triggers) if self.triggers else (imp.triggers or list(det.tokens))
        mtime = self.stat.st_mtime if self.stat is not None else self.path.stat().st_mtime
        return {
            "id": None, "sha256": h.sha256, "name": None, "file_name": self.file_name or self.path.name,
            "autov1": h.autov1, "autov2": h.autov2, "autov3": h.autov3, "crc32": h.crc32, "blake3": h.blake3,
            "size": h.size, "format": det.format, "base": base, "kind": det.kind,
            "rank": det.rank, "rank_min": det.rank_min, "rank_max": det.rank_max, "alpha": det.alpha,
            "n_layers": det.n_layers, "parts": edits.dumps(list(det.parts)), "tokens": edits.dumps(list(det.tokens)),
            "type": self.type or imp.type, "triggers": edits.dumps(triggers),
            "tags": edits.dumps(dedupe(list(imp.tags) + list(self.tags or []))),
            "description": self.description or imp.description,
            "source": self.source or imp.source or os.path.abspath(self.path),
            "created_at": imp.created_at or _iso(mtime),
            "added_at": now_iso(),
            "metadata": edits.dumps(self.header),
            "extra": edits.dumps(extra),
            "blob_mode": "link" if self.linked else "copy",
            "base_model": base_model,
        }


def _slim_meta(meta: dict) -> dict:
    """Header metadata as stored in the catalogue: base64 cover images (kept as previews) are elided."""
    v = meta.get("ssmd_cover_images")
    if isinstance(v, str) and len(v) > 2:
        meta = dict(meta)
        meta["ssmd_cover_images"] = f"<{len(v)} characters of base64 images, stored as previews>"
    return meta


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def image_blob(store: Store, data_or_path: bytes | Path, kind: str, *, durable: bool = True) -> ImageBlob:
    """Check an image (:func:`lorahub.metadata.read_image`) and write it as a temp file of the store (a
    full disk raises :class:`~lorahub.fsutil.NoSpace`)."""

    from lorahub.metadata import read_image

    img = read_image(data_or_path)
    try:
        tmp = store.write_temp(img.data, durable=durable)
    except OSError as exc:
        raise os_error(exc, store.root.parent) from None
    return ImageBlob(kind, tmp, hashlib.sha256(img.data).hexdigest(), img.ext, img.width, img.height)


class _Sink:
    """The temp blob a file is copied into while it is hashed: a failed write (a full disk) raises
    the one-line error naming the registry, not "cannot read" the input."""

    def __init__(self, f, where: Path):
        self.f, self.where = f, where

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            raise os_error(exc, self.where) from None


def _copy_and_hash(store: Store, p: Path, *, copy: bool, durable: bool) -> tuple["Hashes", Path, bool, os.stat_result]:
    """Hash ``p`` in one pass while copying it to a temp blob (created read-only, as blobs are;
    ``copy=False``: hard-link it when the store is on the same file system, else copy). Returns
    (hashes, temp blob, linked, stat of the source as hashed)."""
    from lorahub.fsutil import temp_name
    from lorahub.hashing import hash_stream

    home = store.root.parent
    try:
        src = open(p, "rb")
    except OSError as exc:
        raise LorahubError(f"{p}: cannot read ({exc.strerror or exc})") from None
    tmp = None
    linked = False
    try:
        with src:
            st = os.fstat(src.fileno())
            if not copy:
                tmp = store.root / temp_name()
                try:
                    os.link(p, tmp)
                    linked = True
                except OSError:
                    tmp = None
            if linked:
                sink = None
            else:
                try:
                    tmp, out = store.open_temp(read_only=True)
                except OSError as exc:
                    raise os_error(exc, home) from None
                sink = _Sink(out, home)
            try:
                try:
                    hashes = hash_stream(src, st.st_size, copy_to=sink)
                except OSError as exc:
                    raise LorahubError(f"{p}: cannot read ({exc.strerror or exc})") from None
                if sink is not None:
                    try:
                        out.flush()
                        if durable:
                            os.fsync(out.fileno())
                    except OSError as exc:
                        raise os_error(exc, home) from None
            finally:
                if sink is not None:
                    out.close()
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return hashes, tmp, linked, st


def _read_small(p: Path) -> tuple[bytes, os.stat_result]:
    """The whole content of a small file and its stat, in one read."""
    try:
        with open(p, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            data = f.read(st.st_size + 1)
    except OSError as exc:
        raise LorahubError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if len(data) != st.st_size:
        from lorahub.errors import FormatError

        raise FormatError(f"{p}: file changed while it was read ({len(data)} bytes read, {st.st_size} expected)")
    return data, st


def _sidecar_files(path: Path, imported: "Imported") -> list[SidecarFile]:
    """The bytes of the sidecar files :func:`lorahub.metadata.collect` read (json, civitai, txt)."""
    out = []
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    for kind, suffix in KEPT_SIDECARS.items():
        name = stem + suffix
        if name not in imported.sidecars:
            continue
        try:
            with open(path.parent / name, "rb") as f:
                data = f.read(MAX_SIDECAR_BYTES + 1)
        except OSError:
            continue
        if len(data) <= MAX_SIDECAR_BYTES:
            out.append(SidecarFile(kind, name, data))
    return out


def prepare(store: Store, path: str | os.PathLike, *, name: str | None = None, type: str | None = None,
            triggers: list[str] | None = None, tags: list[str] | None = None, base: str | None = None,
            description: str | None = None, source: str | None = None, lineage: list[dict] | None = None,
            extra: dict | None = None, copy: bool = True, sidecars: bool = True, durable: bool = True,
            detection: "Detection | None" = None) -> Prepared:
    """Read, detect, hash and copy ``path`` into the store's temp files. No database access.

    Bad input (missing file, unknown format, hostile header, bad ``name``/``type``/``base``) raises
    :class:`~lorahub.errors.LorahubError` and leaves nothing behind; a full disk raises
    :class:`~lorahub.fsutil.NoSpace`. Unreadable preview images are skipped with a note giving the reason.
    ``detection``: the file's :func:`~lorahub.formats.detect.detect` result when the caller has it
    already (its header is not read again).
    """
    from lorahub import metadata as md
    from lorahub.formats.detect import detect, detect_bytes
    from lorahub.hashing import hash_bytes

    import stat as _stat

    p = Path(path)
    try:
        st = os.stat(p)
        mode, st_size = st.st_mode, st.st_size
    except FileNotFoundError:
        raise NotFound(f"{path}: no such file") from None
    except OSError as exc:
        raise LorahubError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not _stat.S_ISREG(mode):
        raise LorahubError(f"{path}: not a regular file")
    if name is not None:
        name = edits.check_name(name)
    edits.check_choice("type", type, LORA_TYPES)
    check_base(base)
    data = None
    if detection is not None:
        det = detection
    elif copy and st_size < SMALL_FILE_BYTES and p.suffix.lower() not in PICKLE_SUFFIXES:
        data, st = _read_small(p)  # read once: detected, hashed and copied from memory
        det = detect_bytes(data, p)
    else:
        det = detect(p)
    imported = md.collect(p, dict(det.metadata), sidecars=sidecars)
    header = _slim_meta(dict(det.metadata))
    det = dataclasses.replace(det, metadata={})  # held until commit: without the (maybe large) header copy
    kept = _sidecar_files(p, imported) if sidecars and imported.sidecars else []
    if data is not None:
        hashes, linked = hash_bytes(data), False
        try:
            # created read-only, as blobs are, in the blob's own folder
            tmp = store.write_temp(data, durable=durable, read_only=True, sha256=hashes.sha256)
        except OSError as exc:
            raise os_error(exc, store.root.parent) from None
        del data
    else:
        hashes, tmp, linked, st = _copy_and_hash(store, p, copy=copy, durable=durable)
    prep = Prepared(p, det, header, imported, hashes, tmp, linked, st, sidecar_files=kept, name=name, type=type,
                    triggers=triggers, tags=tags, base=base, description=description, source=source,
                    lineage=lineage, extra=extra)
    try:
        for kind, src in imported.previews:
            try:
                prep.previews.append(image_blob(store, src, kind, durable=durable))
            except NoSpace:
                raise
            except (LorahubError, OSError) as exc:
                reason = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
                imported.notes.append(f"{kind} preview ignored: {reason}")
        imported.previews = []  # written to temp files: the image bytes need not stay in memory
    except BaseException:
        prep.discard()
        raise
    return prep


def _new_id(conn, sha256: str, taken: set[str]) -> str:
    """The shortest free prefix of ``sha256`` (12, 16, 20 or 64 characters) as an entry id; ``taken``:
    ids given to other files of the same transaction."""
    for length in (12, 16, 20, 64):
        cand = sha256[:length]
        if cand not in taken and not queries.exists(conn, cand):
            return cand
    raise LorahubError("cannot derive an entry id")  # pragma: no cover


def _unique_name(conn, name: str, taken: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``, ... the first that no entry (nor ``taken``) has."""
    base, n = name, 1
    while name in taken or conn.execute("SELECT 1 FROM entries WHERE name = ?", (name,)).fetchone() is not None:
        n += 1
        name = f"{base}-{n}"
    return name


# values per ``IN (...)`` query of a batch commit (SQLite allows 32,766 parameters; older builds 999)
IN_QUERY_VALUES = 500


def _where_in(conn, what: str, column: str, values) -> list:
    """``SELECT <what> FROM entries WHERE <column> IN values`` (one query per :data:`IN_QUERY_VALUES` values)."""
    values, rows = list(values), []
    for i in range(0, len(values), IN_QUERY_VALUES):
        part = values[i:i + IN_QUERY_VALUES]
        rows += conn.execute(f"SELECT {what} FROM entries WHERE {column} IN ({', '.join('?' * len(part))})", part)
    return rows


def _present(conn, column: str, values) -> set:
    """The ``values`` that ``entries.<column>`` holds."""
    return {r[0] for r in _where_in(conn, column, column, values)}


Outcome = tuple["dict | None", bool, "LorahubError | None"]


def commit_batch(reg: "Registry", preps: list[Prepared], *, durable: bool = True,
                 remember: bool = False) -> list[Outcome]:
    """Commit prepared files in ONE write transaction; returns ``(entry, created, error)`` per file.

    A file already registered (by another process meanwhile, or earlier in this batch) gives its
    entry with ``created`` False and changes nothing; a file whose rows cannot be written gives its
    error and the others are committed. The rows are written a table at a time for the whole batch
    (:func:`_commit_files`); if a row fails, the batch is redone file by file (:func:`_commit_one`),
    which isolates the file at fault. The blobs' data must be
    on disk already (``prepare(durable=True)``, or fsynced by the caller); the store folders are
    fsynced before the transaction commits when ``durable``. ``remember``: also record each file's
    absolute path, size and mtime in the scan cache. A full disk raises :class:`~lorahub.fsutil.NoSpace`
    with nothing committed. The temp files are gone afterwards either way.
    """
    conn = reg.conn
    out: list[Outcome] = []
    dirs: set[Path] = set()
    placed: list[Path] = []  # blobs this transaction created: removed again if it does not commit
    def unplace() -> None:  # called under the write lock: nothing can refer to these blobs yet
        for f in placed:
            f.unlink(missing_ok=True)

    try:
        with transaction(conn, on_abort=unplace):
            if len(preps) == 1:
                out.append(_commit_one(reg, preps[0], dirs, placed))
            else:
                try:
                    out += _commit_files(reg, preps, dirs, placed)
                except _Refused:  # nothing of the batch was written: file by file, which isolates the file at fault
                    out += [_commit_one(reg, prep, dirs, placed) for prep in preps]
            if remember:
                _remember(conn, [(Path(os.path.abspath(prep.path)), prep.stat, prep.sha256)
                                 for prep, (_, _, err) in zip(preps, out) if err is None and prep.stat is not None])
            if durable and dirs:
                fsync_many(sorted(dirs), fsync_dir)  # the renames are on disk before the commit
    finally:
        for prep in preps:
            prep.discard()
    return out


class _Refused(Exception):
    """A row of the files being committed could not be made or written (its savepoint was rolled
    back); ``args[0]`` is the LorahubError or sqlite3.Error why."""


def _commit_files(reg: "Registry", preps: list[Prepared], dirs: set[Path], placed: list[Path]) -> list[Outcome]:
    """Insert the rows of ``preps`` in one savepoint (:func:`_insert_rows`: one ``executemany`` per
    table, a few queries for what is registered already), then rename their blobs into place. A row
    that cannot be made or written raises :class:`_Refused` with nothing of these files written."""
    conn = reg.conn
    conn.execute("SAVEPOINT files")
    try:
        existing, new, entries = _insert_rows(conn, preps)
    except (LorahubError, sqlite3.Error) as exc:
        if is_disk_full(exc):
            raise no_space(conn) from None
        conn.execute("ROLLBACK TO files")
        conn.execute("RELEASE files")
        raise _Refused(exc) from None
    conn.execute("RELEASE files")
    if new:
        try:  # the rows are in: now the files
            for prep in new.values():
                _place_blobs(reg, prep, dirs, placed)
        except OSError as exc:  # a blob could not be renamed into the store: the whole batch stops
            raise os_error(exc, reg.home) from None
        reg.had_entries = True
    out: list[Outcome] = []
    for prep in preps:
        sha = prep.sha256
        if sha in existing:
            out.append((existing[sha], False, None))
        else:  # the first file with this content is created; the others are reported as registered
            out.append((entries[sha], new[sha] is prep, None))
    return out


def _commit_one(reg: "Registry", prep: Prepared, dirs: set[Path], placed: list[Path]) -> Outcome:
    """:func:`_commit_files` of one file; a row refused is that file's error."""
    try:
        return _commit_files(reg, [prep], dirs, placed)[0]
    except _Refused as refused:
        exc = refused.args[0]
        return None, False, exc if isinstance(exc, LorahubError) else LorahubError(f"{prep.path}: cannot register ({exc})")


def _insert_rows(conn, preps: list[Prepared]) -> tuple[dict[str, dict], dict[str, Prepared], dict[str, dict]]:
    """Write the rows of the files ``preps`` not registered yet, a table at a time: entries, full-text
    rows, lineage, previews, sidecars. Returns (the entries already registered, the first file of each
    new content, the new entries), each by SHA-256."""
    existing = {r["sha256"]: r for r in map(queries.decode, _where_in(conn, "*", "sha256", {p.sha256 for p in preps}))}
    new: dict[str, Prepared] = {}
    for prep in preps:
        if prep.sha256 not in existing:
            new.setdefault(prep.sha256, prep)
    entries: dict[str, dict] = {}
    if not new:
        return existing, new, entries
    defaults = {sha: prep.default_name() for sha, prep in new.items()}
    names_taken = _present(conn, "name", {name for name, _ in defaults.values()})
    ids_taken = _present(conn, "id", {sha[:12] for sha in new})
    batch_names: set[str] = set()
    batch_ids: set[str] = set()
    fts_rowid = conn.execute("SELECT coalesce(max(rowid), 0) FROM entries_fts").fetchone()[0]
    rows, fts, lineage, previews, sidecars = [], [], [], [], []
    cols: list[str] | None = None
    for sha, prep in new.items():
        name, raw = defaults[sha]
        if name in names_taken or name in batch_names:
            name = _unique_name(conn, name, batch_names)
        entry_id = sha[:12]
        if entry_id in ids_taken or entry_id in batch_ids:
            entry_id = _new_id(conn, sha, batch_ids)
        batch_names.add(name)
        batch_ids.add(entry_id)
        fts_rowid += 1
        row = prep.entry_row(entry_id, name, raw)
        entry = entries[sha] = queries.decode(row)
        row["fts_rowid"] = fts_rowid
        rows.append(tuple(row.values()))
        fts.append((fts_rowid, *edits.fts_values(entry_id, name, entry["triggers"], entry["tags"], entry["description"])))
        lineage += [(entry_id, item) for item in prep.lineage or []]
        previews += [(entry_id, pv.sha256, pv.kind, pv.ext, pv.width, pv.height, "{}", now_iso()) for pv in prep.previews]
        if prep.sidecar_files:
            from lorahub.metadata import webui_sidecar

            view = edits.dumps(webui_sidecar(entry))
            sidecars += [(entry_id, sc.kind, sc.file_name, sc.data, sc.sha256, view) for sc in prep.sidecar_files]
        if cols is None:
            cols = list(row)
        elif list(row) != cols:  # pragma: no cover (entry_row gives every file the same columns)
            raise LorahubError(f"{prep.path}: its entry has other columns than the batch's")
    conn.executemany(f'INSERT INTO entries ({", ".join(cols)}) VALUES ({", ".join("?" * len(cols))})', rows)
    conn.executemany("INSERT INTO entries_fts(rowid, entry_id, name, triggers, tags, description) "
                     "VALUES (?, ?, ?, ?, ?, ?)", fts)
    for entry_id, item in lineage:
        edits.insert_lineage(conn, entry_id, item)
    conn.executemany("INSERT OR IGNORE INTO previews (entry_id, sha256, kind, ext, width, height, params, added_at) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", previews)
    conn.executemany("INSERT INTO sidecars (entry_id, kind, file_name, data, sha256, view) VALUES (?, ?, ?, ?, ?, ?)",
                     sidecars)
    return existing, new, entries


def _place_blobs(reg: "Registry", prep: Prepared, dirs: set[Path], placed: list[Path]) -> None:
    """Rename a committed file's temp blobs into place (a copied blob was created read-only; a link
    keeps the source's mode); the folders go in ``dirs``, the blobs that were not there in ``placed``."""
    for tmp, sha, chmod in [(pv.tmp, pv.sha256, True) for pv in prep.previews] + [(prep.blob, prep.sha256, False)]:
        new = not reg.store.path(sha).exists()
        dest = reg.store.place(tmp, sha, chmod=chmod, durable=False)
        dirs.add(dest.parent)
        if new:
            placed.append(dest)


def commit(reg: "Registry", prep: Prepared, *, durable: bool = True) -> tuple[dict, bool]:
    """One transaction: insert the entry, its lineage, previews, sidecars and FTS row; rename the blobs in.

    Returns ``(entry, created)``; ``created`` is False (and nothing changes) when another process
    registered the same SHA-256 meanwhile. The temp files are gone afterwards either way.
    """
    entry, created, err = commit_batch(reg, [prep], durable=durable)[0]
    if err is not None:
        raise err
    return entry, created


AddCallback = Callable[[Path, "dict | None", bool, "LorahubError | None"], None]
Result = tuple[object, "Prepared | None", "LorahubError | None"]   # (path, prepared, error) of one file


def _prepare_or_error(store: Store, p, tags: list[str] | None, copy: bool, sidecars: bool) -> Result:
    """:func:`prepare` one file of :func:`add_many` (temp blob not fsynced): any error but a full disk
    is returned, so that one bad file never stops the others."""
    try:
        prep = prepare(store, p, tags=tags, copy=copy, durable=False, sidecars=sidecars)
    except NoSpace:
        raise
    except LorahubError as exc:
        return p, None, exc
    except OSError as exc:
        return p, None, LorahubError(f"{p}: {exc.strerror or exc}")
    except Exception as exc:  # one file that breaks a reader never aborts the others: report it
        return p, None, LorahubError(f"{p}: cannot be read ({type(exc).__name__}: {str(exc)[:200]})")
    try:  # work taken off the committing thread: the row but its id and name, the blob's store folder
        prep.fields = prep.row_fields()
        store.make_folder(prep.sha256)
    except BaseException as exc:
        prep.discard()
        if isinstance(exc, OSError):
            raise os_error(exc, store.root.parent) from None
        raise
    return p, prep, None


# The store of a worker process of add_many (set when the pool forks it: nothing is pickled).
_worker_store: Store | None = None


def _worker_init(store: Store) -> None:
    global _worker_store
    _worker_store = store
    import signal

    # Ctrl-C is the committing process's to handle: it discards what the workers prepared
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _prepare_chunk(chunk: list[tuple[str, bool]], tags: list[str] | None, copy: bool) -> list[Result]:
    """Prepare a few small files in a worker process; on an exception (a full disk) the files this
    call prepared are discarded before it propagates."""
    out: list[Result] = []
    try:
        for p, side in chunk:
            out.append(_prepare_or_error(_worker_store, p, tags, copy, side))
    except BaseException:
        for prep in _prepared(out):
            prep.discard()
        raise
    return out


def _prepared(results: list[Result]) -> list[Prepared]:
    """The files of ``results`` that were prepared (not those that failed)."""
    return [prep for _, prep, _ in results if prep is not None]


def _fork_pool(store: Store, workers: int):
    """A pool of ``workers`` processes forked from this one; None except on Linux, where forking a
    process that runs threads is safe for what the workers do (read, hash and write files)."""
    import multiprocessing as mp

    if not sys.platform.startswith("linux") or "fork" not in mp.get_all_start_methods():
        return None
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_worker_init,
                               initargs=(store,))


def add_many(reg: "Registry", paths: Iterable[str | os.PathLike], *, tags: list[str] | None = None,
             batch_files: int = 256, batch_bytes: int = 256 * 1024 * 1024, workers: int | None = None,
             copy: bool = True, remember: bool = False, callback: AddCallback | None = None,
             sidecars: bool | Callable[[Path], bool] = True) -> dict:
    """Add many files with group commit. ``workers`` (default: one per CPU, 2 to 4) prepare the files
    (detect, hash, copy into temp blobs) while this thread commits the files prepared so far in
    batches of up to ``batch_files`` files / ``batch_bytes`` bytes: per batch, the temp blobs are
    fsynced together (on a background thread, while the next files are prepared), then one
    transaction renames them in, fsyncs the store folders once and commits (see :func:`commit_batch`).
    A batch commits as soon as its fsyncs are done, and the files prepared meanwhile (once there are
    :data:`MIN_BATCH_FILES`) become the next batch: batches follow the pace of the disk and the
    database, and little is left to commit after the last file is prepared.

    Files of :data:`THREAD_MIN_BYTES` or more are prepared on worker threads (hashing and copying
    release the GIL and outweigh the Python work of detection). Smaller files are prepared in
    ``workers`` forked worker processes, a few files per task, when the call has at least
    :data:`PROCESS_MIN_FILES` of them (their Python work would only contend for the GIL on threads;
    measured on 2 CPUs, 1,000 files of 175 KB: see benchmarks/RESULTS.md); else on this thread.
    ``workers=1``: everything on this thread.

    ``callback(path, entry | None, created, error | None)`` is called once per file, in order (a
    file with the same content as another file of this call is reported, not created). A file that
    cannot be added is reported with its error and the others go on; a full disk stops the whole
    call with :class:`~lorahub.fsutil.NoSpace` (the current batch is not committed, no temp file is
    left). ``remember``: record each file in the scan cache (``lorahub scan``). ``sidecars``: whether
    to read the files beside each file (or a function of the path saying so).
    Returns ``{"added": n, "already": n, "failed": n}``.
    """
    from concurrent.futures import BrokenExecutor, ThreadPoolExecutor

    if workers is None:  # hashing, copying and fsyncs release the GIL: a few threads keep the disk busy
        workers = min(4, max(2, os.cpu_count() or 2))
    counts = {"added": 0, "already": 0, "failed": 0}
    pending: list[Result] = []   # files prepared (or failed) since the last batch, in order
    n_pending = size = 0         # the prepared ones among them, their bytes
    paths = list(paths)

    def side(p) -> bool:
        return sidecars(Path(p)) if callable(sidecars) else sidecars

    def prep_one(p) -> list[Result]:
        return [_prepare_or_error(reg.store, p, tags, copy, side(p))]

    def report(p, entry, created, err):
        counts["failed" if err else "added" if created else "already"] += 1
        if callback:
            callback(p, entry, created, err)

    # A batch's blob fsyncs run on a background thread while the next batch is prepared; the batch
    # commits once they are done (the crash guarantees are unchanged: no entry before its blob's data).
    syncing: list[tuple[list[Result], object]] = []   # at most one (batch, future of its fsyncs)
    syncer = ThreadPoolExecutor(1)

    def commit_synced() -> None:
        batch, fut = syncing[0]
        preps = _prepared(batch)
        try:
            fut.result()  # anything else raised here leaves the batch to the cleanup below
        except OSError as exc:
            syncing.clear()
            for prep in preps:
                prep.discard()
            raise os_error(exc, reg.home) from None
        syncing.clear()  # commit_batch removes the temp files whatever happens
        outcomes = iter(commit_batch(reg, preps, durable=True, remember=remember) if preps else [])
        for p, prep, err in batch:  # in order: the files that failed among those committed
            if prep is None:
                report(p, None, False, err)
            else:
                report(prep.path, *next(outcomes))

    def flush(last: bool = False):
        nonlocal pending, n_pending, size
        if syncing:
            commit_synced()  # may raise (so may the callback): ``pending`` is still to be discarded then
        batch, pending, n_pending, size = pending, [], 0, 0
        if batch:
            blobs = [t for prep in _prepared(batch) for t in prep.temp_files() if not (prep.linked and t == prep.blob)]
            syncing.append((batch, syncer.submit(fsync_many, blobs)))
        if last and syncing:
            commit_synced()

    def large(p) -> bool:
        try:
            return os.stat(p).st_size >= THREAD_MIN_BYTES
        except (OSError, ValueError):
            return False  # prepared where small files are, where prepare() says what is wrong

    is_large = [large(p) for p in paths] if workers > 1 else [False] * len(paths)
    n_small = is_large.count(False)
    threads = ThreadPoolExecutor(workers) if workers > 1 and n_small < len(paths) else None
    # The objects made so far (the modules and what they hold) are left out of the garbage collector's
    # passes for the call: its full passes then cost little, in this process and in the workers, whose
    # memory pages, shared with this process, are not copied for its bookkeeping.
    froze = gc.get_freeze_count() == 0  # (a caller's own freeze is left as it is)
    if froze:
        gc.freeze()
    procs = _fork_pool(reg.store, workers) if workers > 1 and n_small >= PROCESS_MIN_FILES else None

    queue: deque = deque()   # futures, in path order, each of a list of results
    ahead = max(2 * workers, batch_files)  # files being prepared while a batch commits
    queued = 0               # files in ``queue``
    nxt = 0                  # index of the next path to submit

    def submit() -> None:
        nonlocal nxt, queued
        while nxt < len(paths) and queued < ahead:
            p = paths[nxt]
            if is_large[nxt]:
                queue.append(threads.submit(prep_one, p))
                nxt += 1
                queued += 1
            elif procs is not None:
                chunk = []
                while nxt < len(paths) and not is_large[nxt] and len(chunk) < PROCESS_CHUNK:
                    chunk.append((paths[nxt], side(paths[nxt])))
                    nxt += 1
                queue.append(procs.submit(_prepare_chunk, chunk, tags, copy))
                queued += len(chunk)
            else:
                queue.append(_Later(prep_one, p))
                nxt += 1
                queued += 1

    broken = False           # a worker process died (killed, out of memory)
    try:
        submit()
        while queue:
            results = queue[0].result()
            queue.popleft()
            queued -= len(results)
            submit()
            for i, (p, prep, err) in enumerate(results):
                pending.append((p, prep, err))
                if prep is None:
                    continue
                n_pending += 1
                size += prep.hashes.size
                # a batch commits as soon as its blobs are on disk, and the next one starts its fsyncs
                # then (once it has a few files): batches follow the pace of the disk and the database,
                # and what is left to commit when the last file is prepared stays small
                ready = not syncing or syncing[0][1].done()
                if (ready and n_pending >= min(batch_files, MIN_BATCH_FILES)) or n_pending >= batch_files \
                        or size >= batch_bytes:
                    try:
                        flush()
                    except BaseException:
                        for rest in _prepared(results[i + 1:]):
                            rest.discard()
                        raise
        flush(last=True)
    except BaseException as exc:
        broken = isinstance(exc, BrokenExecutor)
        for prep in _prepared(pending):
            prep.discard()
        for batch, fut in syncing:  # fsynced or not, never committed: remove its temp files
            try:
                fut.result()
            except BaseException:
                pass
            for prep in _prepared(batch):
                prep.discard()
        for fut in queue:  # files still being prepared: wait, then remove their temp files
            if fut.cancel():
                continue  # never started: nothing to remove
            try:
                results = fut.result()
            except BaseException:
                continue
            for prep in _prepared(results):
                prep.discard()
        if broken:
            raise LorahubError("a worker process of this scan stopped unexpectedly (killed, or out of memory?): "
                               "the files not committed yet were not added") from None
        raise
    finally:
        if froze:
            gc.unfreeze()
        syncer.shutdown(wait=True)
        if threads is not None:
            threads.shutdown(wait=True)
        if procs is not None:
            procs.shutdown(wait=True, cancel_futures=True)
            if broken:  # the temp blobs the dead workers (and those stopped with them) had made
                reg.store.remove_dead_temps()
    return counts


# Files at least this large are prepared on worker threads (their hashing and copying, which release
# the GIL, outweigh the Python work of detection); smaller ones in worker processes or by the
# committing thread.
THREAD_MIN_BYTES = 2 * 1024 * 1024
# A call with this many smaller files prepares them in forked worker processes, PROCESS_CHUNK per task
# (fewer: the pool's start-up is not worth it).
PROCESS_MIN_FILES = 32
PROCESS_CHUNK = 8
# A batch ready to commit takes the files prepared meanwhile as the next batch once there are this many.
MIN_BATCH_FILES = 32


class _Later:
    """A call run by the thread that asks for its result, with the interface of a future."""

    def __init__(self, fn, *args):
        self._fn, self._args = fn, args
        self.ran = False

    def cancel(self) -> bool:
        return not self.ran

    def result(self):
        if not self.ran:
            self.ran = True
            try:
                self._value, self._exc = self._fn(*self._args), None
            except BaseException as exc:  # re-raised below, as a future would
                self._value, self._exc = None, exc
        if self._exc is not None:
            raise self._exc
        return self._value


def _remember(conn, seen: Iterable[tuple[Path, os.stat_result, str]]) -> None:
    rows = [(str(p), st.st_size, st.st_mtime_ns, sha, now_iso()) for p, st, sha in seen]
    if rows:
        conn.executemany(
            "INSERT INTO scan_cache(path, size, mtime_ns, sha256, seen_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
            "sha256 = excluded.sha256, seen_at = excluded.seen_at", rows)


def remember_scanned(reg: "Registry", seen: Iterable[tuple[Path, os.stat_result, str]]) -> None:
    """Record ``(resolved path, stat, sha256)`` of scanned files, so the next scan need not re-hash them."""
    seen = list(seen)
    if seen:
        with transaction(reg.conn):
            _remember(reg.conn, seen)
