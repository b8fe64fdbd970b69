-- lorahub catalogue, schema version 1.
-- Hash columns hold lower-case hex. JSON columns hold JSON text. Times are ISO 8601 UTC.
CREATE TABLE entries (
    id          TEXT PRIMARY KEY,          -- 12 hex, sha256[:12] (longer only on a prefix clash)
    sha256      TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL UNIQUE,
    file_name   TEXT NOT NULL,
    autov1      TEXT,                      -- 8 hex, NULL for files < 2 MiB
    autov2      TEXT NOT NULL,             -- 10 hex
    autov3      TEXT,                      -- 64 hex, NULL for non-safetensors files
    crc32       TEXT NOT NULL,             -- 8 hex, little-endian byte order
    blake3      TEXT NOT NULL,
    size        INTEGER NOT NULL,
    format      TEXT NOT NULL,
    base        TEXT NOT NULL DEFAULT 'unknown',
    kind        TEXT NOT NULL,
    rank        INTEGER,
    rank_min    INTEGER,
    rank_max    INTEGER,
    alpha       REAL,
    n_layers    INTEGER,
    parts       TEXT NOT NULL DEFAULT '[]',
    tokens      TEXT NOT NULL DEFAULT '[]',
    type        TEXT,
    triggers    TEXT NOT NULL DEFAULT '[]',
    tags        TEXT NOT NULL DEFAULT '[]',
    description TEXT,
    source      TEXT,
    created_at  TEXT,
    added_at    TEXT NOT NULL,
    metadata    TEXT NOT NULL DEFAULT '{}',
    extra       TEXT NOT NULL DEFAULT '{}', -- imported sidecar fields, detection notes
    blob_mode   TEXT NOT NULL DEFAULT 'copy'
);
CREATE INDEX entries_autov3 ON entries(autov3);
CREATE INDEX entries_autov2 ON entries(autov2);
CREATE INDEX entries_blake3 ON entries(blake3);
CREATE INDEX entries_crc32 ON entries(crc32);
CREATE INDEX entries_autov1 ON entries(autov1);

CREATE TABLE lineage (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    entry_id    TEXT NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
    relation    TEXT NOT NULL,
    parent      TEXT NOT NULL,             -- as given: entry id, sha256 or free text
    parent_id   TEXT,                      -- the registry entry it resolved to, if any
    parent_sha256 TEXT,
    detail      TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX lineage_entry ON lineage(entry_id);
CREATE INDEX lineage_parent ON lineage(parent_id);

CREATE TABLE previews (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    entry_id    TEXT NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
    sha256      TEXT NOT NULL,             -- the image blob in objects/
    kind        TEXT NOT NULL,
    ext         TEXT NOT NULL,
    width       INTEGER,
    height      INTEGER,
    params      TEXT NOT NULL DEFAULT '{}',
    added_at    TEXT NOT NULL,
    UNIQUE(entry_id, sha256, kind)
);
CREATE INDEX previews_entry ON previews(entry_id);

CREATE TABLE remotes (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    entry_id    TEXT NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
    repo        TEXT NOT NULL,
    revision    TEXT,
    "commit"    TEXT,
    endpoint    TEXT,
    updated_at  TEXT NOT NULL,
    UNIQUE(entry_id, repo, endpoint)
);
CREATE INDEX remotes_entry ON remotes(entry_id);

-- Full-text index over name, triggers, tags, description (kept in step by lorahub.registry).
CREATE VIRTUAL TABLE entries_fts USING fts5(
    entry_id UNINDEXED, name, triggers, tags, description,
    tokenize = "unicode61 remove_diacritics 2"
);
