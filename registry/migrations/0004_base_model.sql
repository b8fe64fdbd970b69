-- Schema version 4: the base model inside a family a file was made for (pony, illustrious, noobai,
-- playground for SDXL derivatives; flux-1-dev, sd3.5-large for variants), kept apart from `base` (the
-- family: sd1 | sd2 | sdxl | sd3 | flux | other:<name> | unknown) so a catalogue can filter on either.
-- NULL when nothing names one. Why an entry got its base is in extra.base_evidence.
ALTER TABLE entries ADD COLUMN base_model TEXT;
CREATE INDEX IF NOT EXISTS entries_base_model ON entries(base_model);
