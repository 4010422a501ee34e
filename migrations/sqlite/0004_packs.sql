-- The SQLite twin of migrations/postgres/0004_packs.sql.
CREATE TABLE packs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    key         BLOB    NOT NULL UNIQUE CHECK (length(key) = 16),
    size        INTEGER NOT NULL CHECK (size > 0),
    live_bytes  INTEGER NOT NULL CHECK (live_bytes >= 0 AND live_bytes <= size),
    created_at  INTEGER NOT NULL
) STRICT;

ALTER TABLE chunks ADD COLUMN pack_id INTEGER REFERENCES packs (id);
ALTER TABLE chunks ADD COLUMN pack_offset INTEGER
    CHECK ((pack_id IS NULL) = (pack_offset IS NULL) AND pack_offset >= 0);
CREATE INDEX chunks_pack ON chunks (pack_id) WHERE pack_id IS NOT NULL;
