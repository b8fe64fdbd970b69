-- Schema version 2: remember which file (path, size, mtime) had which sha256, so a repeated
-- `lorahub scan` does not re-hash files it has already seen.
CREATE TABLE scan_cache (
    path        TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    mtime_ns    INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    seen_at     TEXT NOT NULL
);
