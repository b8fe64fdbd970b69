"""Changing catalogued entries: editable fields, tags, lineage, remotes, removal, the full-text row.

Every function here runs inside the caller's write transaction (:func:`~lorahub.registry.schema.transaction`)
and uses only the standard library: ``lorahub tag``/``edit``/``rm`` start as fast as ``list``.
"""

from __future__ import annotations

import json
import re
import sqlite3
from typing import Any, Iterable

from lorahub.errors import LorahubError, NotFound
from lorahub.registry import queries
from lorahub.registry.schema import insert, now_iso
from lorahub.formats.families import check_base, check_base_model
from lorahub.vocab import LORA_TYPES

UPDATABLE = ("name", "type", "triggers", "tags", "description", "base", "base_model", "source", "created_at", "extra")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def check_choice(what: str, value, choices) -> None:
    """Raise unless ``value`` is None or one of ``choices``."""
    if value is not None and value not in choices:
        raise LorahubError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


MAX_NAME = 200
# what an entry name may not hold: path separators and control characters (C0, DEL, C1, and the
# Unicode line/paragraph separators and bidirectional overrides that make text lie about itself)
_BAD_NAME = re.compile(r"[/\\\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def check_name(name: str) -> str:
    """A name a user gave (``add``/``edit``/``update``): surrounding blanks stripped, at most 200
    characters. Path separators, control characters, ``.`` and ``..`` are refused."""
    text = str(name).strip()
    if not text:
        raise LorahubError("a name cannot be empty")
    bad = _BAD_NAME.search(text)
    if bad is not None:
        what = "path separators" if bad.group() in "/\\" else "control characters"
        raise LorahubError(f"a name cannot contain {what}: {text!r}")
    if text in (".", ".."):
        raise LorahubError(f"{text!r} is not a name")
    return text[:MAX_NAME]


def sanitize_name(raw: str | None) -> str | None:
    """A name taken from a file (its metadata, sidecars or stem) made acceptable to :func:`check_name`:
    path separators become ``_``, control characters a space; None when nothing is left."""
    if raw is None:
        return None
    text = _BAD_NAME.sub(lambda m: "_" if m.group() in "/\\" else " ", str(raw))
    text = re.sub(r"\s+", " ", text).strip()
    if not text or text in (".", ".."):
        return None
    return text[:MAX_NAME]


def clean_name(name: str) -> str:
    """An entry name as stored (see :func:`check_name`)."""
    return check_name(name)


def dumps(value) -> str:
    """JSON text as the catalogue stores it (UTF-8 kept, anything else as its string)."""
    return json.dumps(value, ensure_ascii=False, default=str)


def word_list(values: Iterable) -> list[str]:
    """Triggers or tags as stored: stripped, empty ones dropped, case-insensitive duplicates removed."""
    from lorahub.metadata import dedupe

    return dedupe([str(x).strip() for x in (values or []) if str(x).strip()])


def _fts_text(name: str) -> str:
    # index "my_lora-v2" also as "my lora v2" so word searches find it
    spaced = re.sub(r"[_\-.]+", " ", name)
    return name if spaced == name else f"{name} {spaced}"


def fts_values(entry_id: str, name: str, triggers: list[str], tags: list[str], description: str | None) -> tuple:
    """The full-text row of an entry: ``(entry_id, name, triggers, tags, description)`` as indexed."""
    return entry_id, _fts_text(name), " ; ".join(triggers), " ; ".join(tags), description or ""


def fts_insert(conn: sqlite3.Connection, entry_id: str, name: str, triggers: list[str], tags: list[str],
               description: str | None) -> int:
    """Write the full-text row of an entry that has none (yet); returns its rowid, which the caller
    stores in the entry's ``fts_rowid`` column."""
    cur = conn.execute("INSERT INTO entries_fts(entry_id, name, triggers, tags, description) VALUES (?, ?, ?, ?, ?)",
                       fts_values(entry_id, name, triggers, tags, description))
    return cur.lastrowid


def _fts_delete(conn: sqlite3.Connection, fts_rowid: int | None) -> None:
    if fts_rowid is not None:
        conn.execute("DELETE FROM entries_fts WHERE rowid = ?", (fts_rowid,))


def fts_sync(conn: sqlite3.Connection, entry_id: str) -> None:
    """Rewrite the full-text row of an entry from its name, triggers, tags and description (the old
    row is found by the rowid the entry records: O(1), however large the catalogue)."""
    r = conn.execute("SELECT id, name, triggers, tags, description, fts_rowid FROM entries WHERE id = ?",
                     (entry_id,)).fetchone()
    if r is None:
        return
    _fts_delete(conn, r["fts_rowid"])
    rowid = fts_insert(conn, r["id"], r["name"], json.loads(r["triggers"]), json.loads(r["tags"]), r["description"])
    conn.execute("UPDATE entries SET fts_rowid = ? WHERE id = ?", (rowid, entry_id))


def insert_lineage(conn: sqlite3.Connection, entry_id: str, item: dict) -> None:
    """Record one parent of an entry: ``{"relation": ..., "parent": id|name|sha256|text|entry dict,
    "detail": {...}}``. A parent that resolves to an entry is linked to it; a bare SHA-256 is kept."""
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
            pe = queries.resolve(conn, parent)
            parent_id, parent_sha = pe["id"], pe["sha256"]
        except LorahubError:
            if _SHA256.fullmatch(parent):
                parent_sha = parent.lower()
    insert(conn, "lineage", {"entry_id": entry_id, "relation": relation, "parent": parent, "parent_id": parent_id,
                             "parent_sha256": parent_sha, "detail": dumps(item.get("detail") or {})})


def update(conn: sqlite3.Connection, entry_id: str, fields: dict[str, Any]) -> None:
    """Change editable fields of an entry (see ``UPDATABLE``); names stay unique."""
    bad = [k for k in fields if k not in UPDATABLE]
    if bad:
        raise LorahubError(f"cannot edit field(s) {', '.join(bad)}; editable: {', '.join(UPDATABLE)}")
    if "type" in fields:
        check_choice("type", fields["type"], LORA_TYPES)
    if "base" in fields:
        if fields["base"] is None:
            fields["base"] = "unknown"
        check_base(fields["base"])
    if "base_model" in fields:
        fields["base_model"] = check_base_model(fields["base_model"])
    sets, args = [], []
    for k, v in fields.items():
        if k == "name":
            v = check_name(v)
            other = conn.execute("SELECT id FROM entries WHERE name = ?", (v,)).fetchone()
            if other is not None and other["id"] != entry_id:
                raise LorahubError(f"the name {v!r} is taken by entry {other['id']}")
        if k in ("triggers", "tags"):
            v = dumps(word_list(v))
        elif k == "extra":
            v = dumps(v or {})
        sets.append(f'"{k}" = ?')
        args.append(v)
    if sets:
        conn.execute(f"UPDATE entries SET {', '.join(sets)} WHERE id = ?", args + [entry_id])
        fts_sync(conn, entry_id)


def change_tags(conn: sqlite3.Connection, entry_id: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> None:
    """Add and remove tags (case-insensitive), reading the current tags under the caller's write lock."""
    from lorahub.metadata import dedupe

    drop = {t.casefold() for t in remove}
    row = conn.execute("SELECT tags FROM entries WHERE id = ?", (entry_id,)).fetchone()
    if row is None:
        raise NotFound(f"no registry entry matches {entry_id!r} (it was just removed)")
    tags = [t for t in json.loads(row["tags"]) if t.casefold() not in drop]
    tags = dedupe(tags + [t for t in add if t.casefold() not in drop])
    conn.execute("UPDATE entries SET tags = ? WHERE id = ?", (dumps(tags), entry_id))
    fts_sync(conn, entry_id)


def remove(conn: sqlite3.Connection, entry_id: str) -> None:
    """Delete an entry; its children keep their lineage as text."""
    row = conn.execute("SELECT fts_rowid FROM entries WHERE id = ?", (entry_id,)).fetchone()
    conn.execute("UPDATE lineage SET parent_id = NULL WHERE parent_id = ?", (entry_id,))
    conn.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
    if row is not None:
        _fts_delete(conn, row["fts_rowid"])


def set_remote(conn: sqlite3.Connection, entry_id: str, *, repo: str, revision: str | None, commit: str | None,
               endpoint: str | None) -> None:
    """Record (or replace) where an entry lives on a hub endpoint."""
    conn.execute("DELETE FROM remotes WHERE entry_id = ? AND repo = ? AND endpoint IS ?", (entry_id, repo, endpoint))
    insert(conn, "remotes", {"entry_id": entry_id, "repo": repo, "revision": revision, "commit": commit,
                             "endpoint": endpoint, "updated_at": now_iso()})


def set_preview(conn: sqlite3.Connection, entry_id: str, blob, params: dict | None) -> None:
    """Link a stored image blob (:class:`~lorahub.registry.ingest.ImageBlob`) to an entry as a
    preview; the same image of the same kind again only updates its ``params``."""
    conn.execute(
        "INSERT INTO previews(entry_id, sha256, kind, ext, width, height, params, added_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(entry_id, sha256, kind) DO UPDATE SET params = excluded.params",
        (entry_id, blob.sha256, blob.kind, blob.ext, blob.width, blob.height, json.dumps(params or {}, default=str),
         now_iso()))
