-- The SQLite twin of migrations/postgres/0003_upload_sessions.sql.
DROP TABLE upload_sessions;

CREATE TABLE upload_sessions (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    cache_id       INTEGER NOT NULL REFERENCES caches (id),
    resource       TEXT    NOT NULL,
    generation     INTEGER NOT NULL CHECK (generation > 0),
    committed_size INTEGER NOT NULL CHECK (committed_size >= 0),
    file_size      INTEGER NOT NULL CHECK (file_size >= 0),
    expires_at     INTEGER NOT NULL,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    UNIQUE (cache_id, resource)
) STRICT;
CREATE INDEX upload_sessions_expires ON upload_sessions (expires_at);

CREATE TABLE upload_session_chunks (
    session_id  INTEGER NOT NULL REFERENCES upload_sessions (id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL CHECK (seq >= 0),
    chunk_id    INTEGER NOT NULL REFERENCES chunks (id),
    byte_offset INTEGER NOT NULL CHECK (byte_offset >= 0),
    file_offset INTEGER NOT NULL CHECK (file_offset >= 0),
    PRIMARY KEY (session_id, seq)
) STRICT, WITHOUT ROWID;
CREATE INDEX upload_session_chunks_chunk ON upload_session_chunks (chunk_id);
