-- Schema version 8: each entry records the rowid of its full-text row (entries_fts), so rewriting
-- that row when tags, triggers, name or description change deletes it by rowid (one B-tree lookup)
-- instead of scanning the index's unindexed entry_id column (tagging 10k entries took 63 s).
-- The FTS5 table keeps its own rowids (VACUUM does not renumber them); NULL: the entry has no row.
ALTER TABLE entries ADD COLUMN fts_rowid INTEGER;
UPDATE entries SET fts_rowid = f.rid
    FROM (SELECT rowid AS rid, entry_id FROM entries_fts) AS f
    WHERE f.entry_id = entries.id;
