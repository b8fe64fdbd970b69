-- Schema version 3: the sidecar files an entry was imported with (the webui's <stem>.json, Civitai
-- Helper's <stem>.civitai.info, the <stem>.txt description), byte for byte, so that `export` writes
-- them back unchanged. For the webui .json, `view` holds the webui fields the entry had at import
-- (description, activation text, preferred weight, ...): export tells from it what was edited since.
CREATE TABLE IF NOT EXISTS sidecars (
    entry_id    TEXT NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
    kind        TEXT NOT NULL,             -- json | civitai | txt
    file_name   TEXT NOT NULL,             -- its name beside the file when imported
    data        BLOB NOT NULL,
    sha256      TEXT NOT NULL,
    view        TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (entry_id, kind)
);
-- entries are also found by their original file name or stem (`lorahub show aqua_v2`)
CREATE INDEX IF NOT EXISTS entries_file_name ON entries(file_name);
