"""Adding files to the catalogue: prepare (read, hash, copy; no database) then commit (one transaction).

:func:`prepare` detects the file's format from its header, collects header metadata and sidecars,
hashes the file in one pass while copying it into a temp blob of the store, and checks any preview
images; it returns a typed :class:`Prepared`. :func:`commit` then inserts the entry, its lineage,
previews and full-text row and renames the blobs into place in one write transaction.
:func:`add_many` runs the slow half on worker threads and batches the fsyncs (``lorahub scan``).

Rows are written with the standard library's sqlite3 (:func:`~lorahub.registry.schema.insert`):
sqlite-utils on this path measured ~0.1 s of import (it imports numpy) plus ~0.25 ms per row,
12 % of ``lorahub scan``'s time on small files.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from lorahub.errors import FormatError, LorahubError, NotFound
from lorahub.registry import edits, queries
from lorahub.registry.schema import insert, now_iso, transaction
from lorahub.registry.store import Store, fsync_dir, fsync_file, fsync_many
from lorahub.formats.families import check_base
from lorahub.vocab import LORA_TYPES

if TYPE_CHECKING:  # pragma: no cover
    from lorahub.formats.detect import Detection
    from lorahub.hashing import Hashes
    from lorahub.metadata import Imported
    from lorahub.registry import Registry


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
class Prepared:
    """A file read, detected, hashed and copied into a temp blob: everything :func:`commit` needs.

    The first group is what was found; the second is what the caller asked for (None: take what
    the file and its sidecars say). Holding a ``Prepared`` holds temp files: commit it or call
    :meth:`discard`.
    """

    path: Path
    detection: "Detection"
    header: dict[str, str]          # the safetensors header metadata ({} for pickles)
    imported: "Imported"            # metadata and sidecars (lorahub.metadata.collect)
    hashes: "Hashes"
    blob: Path                      # temp file in the store (a hard link to ``path`` when ``linked``)
    linked: bool
    previews: list[ImageBlob] = field(default_factory=list)

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

    @property
    def sha256(self) -> str:
        return self.hashes.sha256

    def temp_files(self) -> list[Path]:
        return [self.blob] + [p.tmp for p in self.previews]

    def discard(self) -> None:
        """Remove the temp files (after a commit they are gone already)."""
        for t in self.temp_files():
            t.unlink(missing_ok=True)

    def entry_row(self, entry_id: str, name: str) -> dict:
        """The ``entries`` row this file becomes (JSON columns as JSON text)."""
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
        return {
            "id": entry_id, "sha256": h.sha256, "name": name, "file_name": self.path.name,
            "autov1": h.autov1, "autov2": h.autov2, "autov3": h.autov3, "crc32": h.crc32, "blake3": h.blake3,
            "size": h.size, "format": det.format, "base": base, "kind": det.kind,
            "rank": det.rank, "rank_min": det.rank_min, "rank_max": det.rank_max, "alpha": det.alpha,
            "n_layers": det.n_layers, "parts": edits.dumps(list(det.parts)), "tokens": edits.dumps(list(det.tokens)),
            "type": self.type or imp.type, "triggers": edits.dumps(triggers),
            "tags": edits.dumps(dedupe(list(imp.tags) + list(self.tags or []))),
            "description": self.description or imp.description,
            "source": self.source or imp.source or str(self.path.resolve()),
            "created_at": imp.created_at or _mtime_iso(self.path),
            "added_at": now_iso(),
            "metadata": edits.dumps(_slim_meta(self.header)),
            "extra": edits.dumps(extra),
            "blob_mode": "link" if self.linked else "copy",
            **({"base_model": base_model} if base_model else {}),
        }


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


def image_blob(store: Store, data_or_path: bytes | Path, kind: str, *, durable: bool = True) -> ImageBlob:
    """Check an image (:func:`lorahub.metadata.read_image`) and write it as a temp file of the store."""
    import hashlib

    from lorahub.metadata import read_image

    img = read_image(data_or_path)
    return ImageBlob(kind, store.write_temp(img.data, durable=durable), hashlib.sha256(img.data).hexdigest(),
                     img.ext, img.width, img.height)


def _copy_and_hash(store: Store, p: Path, *, copy: bool, durable: bool) -> tuple["Hashes", Path, bool]:
    """Hash ``p`` in one pass while copying it to a temp blob (``copy=False``: hard-link it when the
    store is on the same file system, else copy). Returns (hashes, temp blob, linked)."""
    from lorahub.hashing import hash_file

    tmp = store.temp()
    linked = False
    try:
        if copy:
            with open(tmp, "wb") as out:
                try:
                    hashes = hash_file(p, copy_to=out)
                except OSError as exc:
                    raise LorahubError(f"{p}: cannot read ({exc.strerror or exc})") from None
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
                    fsync_file(tmp)
        if hashes.size != p.stat().st_size:
            raise FormatError(f"{p}: file changed while it was added")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return hashes, tmp, linked


def prepare(store: Store, path: str | os.PathLike, *, name: str | None = None, type: str | None = None,
            triggers: list[str] | None = None, tags: list[str] | None = None, base: str | None = None,
            description: str | None = None, source: str | None = None, lineage: list[dict] | None = None,
            extra: dict | None = None, copy: bool = True, sidecars: bool = True, durable: bool = True) -> Prepared:
    """Read, detect, hash and copy ``path`` into the store's temp files. No database access.

    Bad input (missing file, unknown format, hostile header, bad ``type``/``base``) raises
    :class:`~lorahub.errors.LorahubError` and leaves nothing behind. Unreadable preview images are
    skipped with a note.
    """
    from lorahub import metadata as md
    from lorahub.formats.detect import detect

    p = Path(path)
    if not p.exists():
        raise NotFound(f"{path}: no such file")
    if not p.is_file():
        raise LorahubError(f"{path}: not a regular file")
    edits.check_choice("type", type, LORA_TYPES)
    check_base(base)
    det = detect(p)
    header = dict(det.metadata)
    imported = md.collect(p, header, sidecars=sidecars)
    hashes, tmp, linked = _copy_and_hash(store, p, copy=copy, durable=durable)
    prep = Prepared(p, det, header, imported, hashes, tmp, linked, name=name, type=type, triggers=triggers,
                    tags=tags, base=base, description=description, source=source, lineage=lineage, extra=extra)
    try:
        for kind, src in imported.previews:
            try:
                prep.previews.append(image_blob(store, src, kind, durable=durable))
            except (LorahubError, OSError):
                imported.notes.append(f"{kind} preview is not a readable image, ignored")
    except BaseException:
        prep.discard()
        raise
    return prep


def _new_id(conn, sha256: str) -> str:
    for length in (12, 16, 20, 64):
        cand = sha256[:length]
        if not queries.exists(conn, cand):
            return cand
    raise LorahubError("cannot derive an entry id")  # pragma: no cover


def _unique_name(conn, name: str) -> str:
    base, n = name, 1
    while conn.execute("SELECT 1 FROM entries WHERE name = ?", (name,)).fetchone() is not None:
        n += 1
        name = f"{base}-{n}"
    return name


def commit(reg: "Registry", prep: Prepared, *, durable: bool = True) -> tuple[dict, bool]:
    """One transaction: insert the entry, its lineage, previews and FTS row; rename the blobs in.

    Returns ``(entry, created)``; ``created`` is False (and nothing changes) when another process
    registered the same SHA-256 meanwhile. The temp files are gone afterwards either way.
    """
    conn = reg.conn
    try:
        with transaction(conn):
            existing = queries.find_sha256(conn, prep.sha256)
            if existing is not None:
                return existing, False
            entry_id = _new_id(conn, prep.sha256)
            stem = prep.path.name[: -len(prep.path.suffix)] if prep.path.suffix else prep.path.name
            name = _unique_name(conn, edits.clean_name(prep.name or prep.imported.name or stem))
            insert(conn, "entries", prep.entry_row(entry_id, name))
            for item in prep.lineage or []:
                edits.insert_lineage(conn, entry_id, item)
            for pv in prep.previews:
                reg.store.place(pv.tmp, pv.sha256, durable=durable)
                insert(conn, "previews", {"entry_id": entry_id, "sha256": pv.sha256, "kind": pv.kind, "ext": pv.ext,
                                          "width": pv.width, "height": pv.height, "params": "{}",
                                          "added_at": now_iso()}, or_ignore=True)
            edits.fts_sync(conn, entry_id)
            reg.store.place(prep.blob, prep.sha256, chmod=not prep.linked, durable=durable)
    finally:
        prep.discard()
    return queries.get(conn, entry_id), True


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


AddCallback = Callable[[Path, "dict | None", bool, "LorahubError | None"], None]


def add_many(reg: "Registry", paths: Iterable[str | os.PathLike], *, tags: list[str] | None = None,
             batch_files: int = 64, batch_bytes: int = 256 * 1024 * 1024, workers: int = 2, copy: bool = True,
             callback: AddCallback | None = None) -> dict:
    """Add many files: one transaction per file, with the fsyncs of a batch issued together.

    Blobs stay temp files until their data is synced; each entry is then committed (and its blob
    renamed into place) in its own transaction; the store folders are synced at the end of the batch.
    ``callback(path, entry | None, created, error | None)`` is called once per file (a file with the
    same content as another file of this call is reported, not created, once that one is committed).
    Returns ``{"added": n, "already": n, "failed": n}``.
    """
    from concurrent.futures import ThreadPoolExecutor

    counts = {"added": 0, "already": 0, "failed": 0}
    pending: list[Prepared] = []
    twins: dict[str, list] = {}  # sha256 of a pending file -> other paths with the same bytes
    size = 0

    def prep_one(p):
        try:
            return p, prepare(reg.store, p, tags=tags, copy=copy, durable=False), None
        except LorahubError as exc:
            return p, None, exc
        except OSError as exc:
            return p, None, LorahubError(f"{p}: {exc.strerror or exc}")

    def report(p, entry, created, err):
        counts["failed" if err else "added" if created else "already"] += 1
        if callback:
            callback(p, entry, created, err)

    def flush():
        nonlocal pending, size
        if not pending:
            return
        fsync_many([t for prep in pending for t in prep.temp_files() if not (prep.linked and t == prep.blob)])
        dirs = set()
        try:
            for prep in pending:
                try:
                    entry, created = commit(reg, prep, durable=False)
                except LorahubError as exc:
                    for p in [prep.path] + twins.pop(prep.sha256, []):
                        report(p, None, False, exc)
                    continue
                if created:
                    dirs.add(reg.store.path(entry["sha256"]).parent)
                    dirs.update(reg.store.path(pv.sha256).parent for pv in prep.previews)
                report(prep.path, entry, created, None)
                for p in twins.pop(prep.sha256, []):
                    report(p, entry, False, None)
        finally:
            for prep in pending:
                prep.discard()
            fsync_many(sorted(dirs), fsync_dir)
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
                existing = queries.find_sha256(reg.conn, prep.sha256)
                if existing is not None or any(x.sha256 == prep.sha256 for x in pending):
                    prep.discard()
                    if existing is not None:
                        report(p, existing, False, None)
                    else:  # reported once the first file with these bytes is committed
                        twins.setdefault(prep.sha256, []).append(p)
                    continue
                pending.append(prep)
                size += prep.hashes.size
                if len(pending) >= batch_files or size >= batch_bytes:
                    flush()
    finally:
        flush()
    return counts


def remember_scanned(reg: "Registry", seen: Iterable[tuple[Path, os.stat_result, str]]) -> None:
    """Record ``(resolved path, stat, sha256)`` of scanned files, so the next scan need not re-hash them."""
    rows = [(str(p), st.st_size, st.st_mtime_ns, sha, now_iso()) for p, st, sha in seen]
    if rows:
        with transaction(reg.conn):
            reg.conn.executemany(
                "INSERT INTO scan_cache(path, size, mtime_ns, sha256, seen_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
                "sha256 = excluded.sha256, seen_at = excluded.seen_at", rows)
