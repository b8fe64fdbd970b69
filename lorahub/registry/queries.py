"""Reading the catalogue: entries by id, name or hash, full-text search, duplicates, lineage, previews.

Every function takes the connection (and, for file paths, the :class:`~lorahub.registry.store.Store`)
and returns plain dicts: an entry is the ``entries`` row with its JSON columns decoded. Standard
library only: this is the path of ``lorahub list``, ``search`` and ``show``.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from typing import Iterable

from lorahub.errors import Ambiguous, LorahubError, NotFound
from lorahub.vocab import INT_LIMIT

HASH_COLUMNS = ("sha256", "autov3", "blake3", "autov2", "autov1", "crc32")
JSON_COLUMNS = {"parts": list, "tokens": list, "triggers": list, "tags": list, "metadata": dict, "extra": dict}
# what `list`/`search --json` print of an entry, and the columns of their table
SHORT_KEYS = ("id", "name", "kind", "format", "base", "base_model", "rank", "rank_min", "rank_max", "alpha", "type", "triggers",
              "tags", "size", "sha256", "autov2", "autov3", "file_name")
MAX_ANCESTRY_DEPTH = 8
_HEX = re.compile(r"^[0-9a-fA-F]+$")


def is_hash_prefix(text: str) -> bool:
    """True when ``text`` may be an id or hash prefix (6 or more hex digits)."""
    return len(text) >= 6 and bool(_HEX.match(text))


def decode(row: sqlite3.Row | None) -> dict | None:
    """An ``entries`` row as an entry dict (JSON columns decoded; internal columns dropped)."""
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
    d.pop("fts_rowid", None)
    return d


def short(entry: dict) -> dict:
    """The short view of an entry that ``list``/``search``/``dupes`` print as JSON."""
    return {k: entry.get(k) for k in SHORT_KEYS}


def rank_text(entry: dict) -> str:
    """``"4"``, ``"2-16"`` for mixed ranks, ``""`` when the entry has no rank."""
    if entry.get("rank_min") is not None and entry.get("rank_max") is not None and entry["rank_min"] != entry["rank_max"]:
        return f"{entry['rank_min']}-{entry['rank_max']}"
    return "" if entry.get("rank") is None else str(entry["rank"])


def get(conn: sqlite3.Connection, entry_id: str) -> dict:
    row = conn.execute("SELECT * FROM entries WHERE id = ?", (entry_id,)).fetchone()
    if row is None:
        raise NotFound(f"no registry entry with id {entry_id}")
    return decode(row)


def exists(conn: sqlite3.Connection, entry_id: str) -> bool:
    return conn.execute("SELECT 1 FROM entries WHERE id = ?", (entry_id,)).fetchone() is not None


def find_sha256(conn: sqlite3.Connection, sha256: str) -> dict | None:
    return decode(conn.execute("SELECT * FROM entries WHERE sha256 = ?", (sha256.lower(),)).fetchone())


def _hash_prefix_matches(conn: sqlite3.Connection, prefix: str) -> dict[str, sqlite3.Row]:
    h = prefix.lower()
    rows: dict[str, sqlite3.Row] = {}
    for col in ("id",) + HASH_COLUMNS:
        for r in conn.execute(f"SELECT * FROM entries WHERE {col} >= ? AND {col} < ?", (h, h + "g")):
            rows.setdefault(r["id"], r)
    return rows


def _by_file_name(conn: sqlite3.Connection, ref: str) -> list[sqlite3.Row]:
    """Entries whose original file name is ``ref``, or whose file stem (the name without its last
    suffix, the webui's handle: ``aqua_v2`` for ``aqua_v2.safetensors``) is ``ref``."""
    rows = {r["id"]: r for r in conn.execute("SELECT * FROM entries WHERE file_name = ?", (ref,))}
    for r in conn.execute("SELECT * FROM entries WHERE file_name >= ? AND file_name < ?", (ref + ".", ref + "/")):
        if os.path.splitext(r["file_name"])[0] == ref:
            rows.setdefault(r["id"], r)
    return list(rows.values())


def _ambiguous(ref: str, rows, what: str) -> Ambiguous:
    names = ", ".join(f"{r['id']} ({r['name']})" for r in list(rows)[:5])
    return Ambiguous(f"{ref!r} {what} {len(rows)} entries: {names}; give the id or more characters")


def resolve(conn: sqlite3.Connection, ref: str) -> dict:
    """An entry by id, exact name, any hash (SHA256, AutoV1/2/3, CRC32, BLAKE3) or hash prefix (>= 6
    hex), the original file name or its stem (``aqua_v2``, as in ``<lora:aqua_v2:0.7>``), or the
    name in any case. A prefix or file name matching several entries raises
    :class:`~lorahub.errors.Ambiguous`; a reference that looks like a path (a separator or a LoRA
    suffix) and matches nothing is reported as a missing file."""
    from lorahub.vocab import has_separator, looks_like_path

    ref = str(ref).strip()
    if not ref:
        raise NotFound("empty registry reference")
    row = conn.execute("SELECT * FROM entries WHERE id = ?", (ref.lower(),)).fetchone()
    if row is not None:
        return decode(row)
    row = conn.execute("SELECT * FROM entries WHERE name = ?", (ref,)).fetchone()
    if row is not None:
        return decode(row)
    if is_hash_prefix(ref):
        rows = _hash_prefix_matches(conn, ref)
        if len(rows) == 1:
            return decode(next(iter(rows.values())))
        if len(rows) > 1:
            raise _ambiguous(ref, rows.values(), "matches")
    if not has_separator(ref):
        files = _by_file_name(conn, ref)
        if len(files) == 1:
            return decode(files[0])
        if len(files) > 1:
            raise _ambiguous(ref, files, "is the file name of")
    rows = conn.execute("SELECT * FROM entries WHERE name = ? COLLATE NOCASE", (ref,)).fetchall()
    if len(rows) == 1:
        return decode(rows[0])
    if looks_like_path(ref):
        raise NotFound(f"{ref}: no such file (and no registry entry has this file name)")
    raise NotFound(f"no registry entry matches {ref!r} (id, name, file name or stem, or hash prefix of 6+ hex)")


def entries(conn: sqlite3.Connection, *, order: str = "name") -> list[dict]:
    """Every entry, by name (``order="name"``) or newest first (``order="added"``)."""
    order_sql = {"name": "name COLLATE NOCASE", "added": "added_at DESC, name"}.get(order, "name COLLATE NOCASE")
    return [decode(r) for r in conn.execute(f"SELECT * FROM entries ORDER BY {order_sql}")]


def count(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM entries").fetchone()[0]


def count_blobs(conn: sqlite3.Connection) -> int:
    """How many stored files the catalogue refers to (entries + previews): what ``verify`` checks."""
    return conn.execute("SELECT (SELECT count(*) FROM entries) + (SELECT count(*) FROM previews)").fetchone()[0]


def fts_query(query: str) -> str | None:
    """Turn free text into a safe FTS5 query: every word must match (as a prefix)."""
    words = re.findall(r"[\w]+", query, flags=re.UNICODE)
    if not words:
        return None
    return " AND ".join(f'"{w}"*' for w in words)


# How a search can be sorted besides best match first (``order=None``): name, newest first, largest
# file first, highest rank first.
SEARCH_ORDERS = {
    "name": "e.name COLLATE NOCASE",
    "added": "e.added_at DESC, e.name COLLATE NOCASE",
    "size": "e.size DESC, e.name COLLATE NOCASE",
    "rank": "coalesce(e.rank_max, e.rank) DESC NULLS LAST, e.name COLLATE NOCASE",
}


def _check_int(name: str, value, *, minimum: int | None = None) -> None:
    """``value`` is None or an integer SQLite can hold (and at least ``minimum``), else a LorahubError."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise LorahubError(f"{name}: {value!r} is not an integer")
    if abs(value) > INT_LIMIT:
        raise LorahubError(f"{name}: {value} is out of range (at most {INT_LIMIT} in magnitude)")
    if minimum is not None and value < minimum:
        raise LorahubError(f"{name}: {value} is below {minimum}")


def _matching(query: str | None, *, type: str | None, base: str | None, tags: Iterable[str], kind: str | None,
              rank_min: int | None, rank_max: int | None, format: str | None,
              base_model: str | None = None) -> tuple[str, list, str] | None:
    """``FROM ... WHERE ...`` of the entries a search matches, its arguments and its best-match order;
    None when the query has no word to look for (nothing matches). Bad arguments raise a LorahubError."""
    _check_int("rank_min", rank_min)
    _check_int("rank_max", rank_max)
    if query is not None and not isinstance(query, str):
        raise LorahubError(f"query: {query!r} is not text")
    tag_list = None if isinstance(tags, str) else list(tags)
    if tag_list is None or not all(isinstance(t, str) for t in tag_list):
        raise LorahubError(f"tags: {tags!r} is not a list of strings")
    tags = tag_list
    for label, value in (("type", type), ("base", base), ("kind", kind), ("format", format),
                         ("base_model", base_model)):
        if value is not None and not isinstance(value, str):
            raise LorahubError(f"{label}: {value!r} is not text")
    where, args = [], []
    join = ""
    order = "e.name COLLATE NOCASE"
    fts = fts_query(query) if query else None
    if query and fts is None:
        return None
    if fts:
        join = ("LEFT JOIN (SELECT entry_id, bm25(entries_fts, 0, 10.0, 5.0, 5.0, 1.0) AS score FROM entries_fts "
                "WHERE entries_fts MATCH ?) f ON f.entry_id = e.id")
        args.append(fts)
        q = query.strip()
        if is_hash_prefix(q):
            h = q.lower()
            conds = " OR ".join(f"(e.{c} >= ? AND e.{c} < ?)" for c in ("id",) + HASH_COLUMNS)
            where.append(f"(f.entry_id IS NOT NULL OR {conds})")
            for _c in ("id",) + HASH_COLUMNS:
                args += [h, h + "g"]
        else:
            where.append("f.entry_id IS NOT NULL")
        order = "f.score NULLS LAST, e.name COLLATE NOCASE"
    for col, value in (("type", type), ("base", base), ("kind", kind), ("format", format)):
        if value:
            where.append(f"e.{col} = ?")
            args.append(value)
    if base_model:
        where.append("e.base_model = ? COLLATE NOCASE")
        args.append(base_model.strip())
    for t in tags:
        where.append("EXISTS (SELECT 1 FROM json_each(e.tags) WHERE value = ? COLLATE NOCASE)")
        args.append(t)
    # rank filters: an entry matches when its rank range overlaps [rank_min, rank_max]
    if rank_min is not None:
        where.append("coalesce(e.rank_max, e.rank) >= ?")
        args.append(rank_min)
    if rank_max is not None:
        where.append("coalesce(e.rank_min, e.rank) <= ?")
        args.append(rank_max)
    sql = f"FROM entries e {join}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return sql, args, order


def search(conn: sqlite3.Connection, query: str | None = None, *, type: str | None = None,
           base: str | None = None, tags: Iterable[str] = (), kind: str | None = None,
           rank_min: int | None = None, rank_max: int | None = None, format: str | None = None,
           limit: int | None = None, offset: int = 0, order: str | None = None,
           base_model: str | None = None) -> list[dict]:
    """Entries matching a full-text ``query`` (name, triggers, tags, description; every word as a
    prefix; a hash prefix finds its entry too) and the filters, best match first (by name without a
    query), or in one of the ``SEARCH_ORDERS``; ``limit`` entries from the ``offset``-th on."""
    if order is not None and order not in SEARCH_ORDERS:
        raise LorahubError(f"unknown order {order!r}; choose one of {', '.join(SEARCH_ORDERS)}")
    _check_int("limit", limit, minimum=0)
    _check_int("offset", offset, minimum=0)
    found = _matching(query, type=type, base=base, tags=tags, kind=kind, rank_min=rank_min, rank_max=rank_max,
                      format=format, base_model=base_model)
    if found is None:
        return []
    sql, args, best = found
    order_by = f"ORDER BY {SEARCH_ORDERS[order] if order else best}"
    try:
        if not limit:
            return [decode(r) for r in conn.execute(f"SELECT e.* {sql} {order_by}", args)]
        # one page: sort the ids only, then read the page's rows (whole rows, with their metadata,
        # would all go through the sorter)
        ids = [r[0] for r in conn.execute(f"SELECT e.id {sql} {order_by} LIMIT {int(limit)} OFFSET {int(offset)}",
                                          args)]
        rows = {r["id"]: r for r in conn.execute(f"SELECT * FROM entries WHERE id IN ({','.join('?' * len(ids))})",
                                                 ids)}
        return [decode(rows[i]) for i in ids if i in rows]
    except sqlite3.OperationalError as exc:
        raise LorahubError(f"bad search query {query!r} ({exc})") from None


def search_count(conn: sqlite3.Connection, query: str | None = None, *, type: str | None = None,
                 base: str | None = None, tags: Iterable[str] = (), kind: str | None = None,
                 rank_min: int | None = None, rank_max: int | None = None, format: str | None = None,
                 base_model: str | None = None) -> int:
    """How many entries :func:`search` finds with the same query and filters."""
    found = _matching(query, type=type, base=base, tags=tags, kind=kind, rank_min=rank_min, rank_max=rank_max,
                      format=format, base_model=base_model)
    if found is None:
        return 0
    sql, args, _ = found
    try:
        return conn.execute(f"SELECT count(*) {sql}", args).fetchone()[0]
    except sqlite3.OperationalError as exc:
        raise LorahubError(f"bad search query {query!r} ({exc})") from None


def dupes(conn: sqlite3.Connection) -> list[list[dict]]:
    """Groups of entries with the same tensors (same AutoV3) under other names or metadata."""
    groups = []
    for (v3,) in conn.execute(
            "SELECT autov3 FROM entries WHERE autov3 IS NOT NULL GROUP BY autov3 HAVING count(*) > 1 ORDER BY autov3"):
        groups.append([decode(r) for r in conn.execute(
            "SELECT * FROM entries WHERE autov3 = ? ORDER BY added_at, name", (v3,))])
    return groups


def lineage(conn: sqlite3.Connection, entry_id: str) -> list[dict]:
    """Parents of an entry: relation, parent (as given), parent_id/parent_name when registered, detail."""
    out = []
    for r in conn.execute(
            "SELECT l.*, p.name AS parent_name FROM lineage l LEFT JOIN entries p ON p.id = l.parent_id "
            "WHERE l.entry_id = ? ORDER BY l.seq", (entry_id,)):
        d = dict(r)
        d["detail"] = json.loads(d["detail"] or "{}")
        d.pop("seq", None)
        out.append(d)
    return out


def ancestry(conn: sqlite3.Connection, entry_id: str, *, max_depth: int = MAX_ANCESTRY_DEPTH) -> list[dict]:
    """The lineage tree of an entry: each item of :func:`lineage` with ``parents``, the registered
    parent's own ancestry (each entry visited once, at most ``max_depth`` levels)."""
    seen = {entry_id}

    def grow(eid: str, depth: int) -> list[dict]:
        out = []
        for item in lineage(conn, eid):
            node = dict(item)
            node["parents"] = []
            pid = item.get("parent_id")
            if pid and pid not in seen and depth < max_depth:
                seen.add(pid)
                node["parents"] = grow(pid, depth + 1)
            out.append(node)
        return out

    return grow(entry_id, 0)


def children(conn: sqlite3.Connection, entry_id: str) -> list[dict]:
    """Entries made from this one: relation, entry_id, name."""
    return [dict(r) for r in conn.execute(
        "SELECT l.relation, l.entry_id, e.name FROM lineage l JOIN entries e ON e.id = l.entry_id "
        "WHERE l.parent_id = ? ORDER BY l.seq", (entry_id,))]


def previews(conn: sqlite3.Connection, store, entry_id: str) -> list[dict]:
    """An entry's preview images: id, entry_id, sha256, kind, ext, width, height, params, path."""
    out = []
    for r in conn.execute("SELECT * FROM previews WHERE entry_id = ? ORDER BY seq", (entry_id,)):
        d = dict(r)
        d["id"] = d.pop("seq")
        d["params"] = json.loads(d["params"] or "{}")
        d["path"] = str(store.path(d["sha256"]))
        out.append(d)
    return out


def remotes(conn: sqlite3.Connection, entry_id: str) -> list[dict]:
    """Where an entry lives on a hub: repo, revision, commit, endpoint, updated_at."""
    out = []
    for r in conn.execute("SELECT * FROM remotes WHERE entry_id = ? ORDER BY seq", (entry_id,)):
        d = dict(r)
        d.pop("seq", None)
        out.append(d)
    return out


def sidecars(conn: sqlite3.Connection, entry_id: str) -> list[dict]:
    """The sidecar files an entry was imported with: kind, file_name, data (bytes), sha256, view."""
    return [dict(r) for r in conn.execute(
        "SELECT kind, file_name, data, sha256, view FROM sidecars WHERE entry_id = ? ORDER BY kind", (entry_id,))]


def scanned_sha256(conn: sqlite3.Connection, path: str, size: int, mtime_ns: int) -> str | None:
    """The SHA-256 a file had when a scan last saw it with this size and mtime, else None."""
    r = conn.execute("SELECT sha256, size, mtime_ns FROM scan_cache WHERE path = ?", (path,)).fetchone()
    if r is not None and r["size"] == size and r["mtime_ns"] == mtime_ns:
        return r["sha256"]
    return None
