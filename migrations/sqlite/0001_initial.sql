-- The SQLite twin of migrations/postgres/0001_initial.sql: same tables,
-- columns, constraints and indexes; only the types differ. STRICT makes SQLite
-- reject a value of the wrong type as Postgres would, AUTOINCREMENT keeps ids
-- from being reused (a stale id held by a GC worker can never name a newer
-- row), and the composite-key tables are WITHOUT ROWID so they are clustered
-- on their key.

CREATE TABLE caches (
    id                       INTEGER PRIMARY KEY AUTOINCREMENT,
    name                     TEXT    NOT NULL,
    is_public                INTEGER NOT NULL CHECK (is_public IN (0, 1)),
    store_dir                TEXT    NOT NULL,
    priority                 INTEGER NOT NULL,
    signing_key              TEXT    NOT NULL,
    upstream_cache_key_names TEXT    NOT NULL DEFAULT '[]',
    retention_period         INTEGER CHECK (retention_period >= 0),
    created_at               INTEGER NOT NULL,
    deleted_at               INTEGER
) STRICT;
CREATE UNIQUE INDEX caches_live_name ON caches (name) WHERE deleted_at IS NULL;

CREATE TABLE chunks (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    hash         BLOB    NOT NULL UNIQUE CHECK (length(hash) = 32),
    size         INTEGER NOT NULL CHECK (size > 0),
    stored_size  INTEGER NOT NULL CHECK (stored_size > 0),
    frame_hash   BLOB    NOT NULL CHECK (length(frame_hash) = 32),
    compression  TEXT    NOT NULL CHECK (compression IN ('zstd', 'none')),
    refcount     INTEGER NOT NULL CHECK (refcount >= 0),
    deletable_at INTEGER,
    state        TEXT    NOT NULL DEFAULT 'valid' CHECK (state IN ('valid', 'deleting')),
    created_at   INTEGER NOT NULL,
    CHECK (refcount > 0 OR deletable_at IS NOT NULL)
) STRICT;
CREATE INDEX chunks_gc ON chunks (deletable_at) WHERE refcount = 0;

CREATE TABLE blobs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    hash         BLOB    NOT NULL UNIQUE CHECK (length(hash) = 32),
    size         INTEGER NOT NULL CHECK (size >= 0),
    file_hash    BLOB    NOT NULL CHECK (length(file_hash) = 32),
    file_size    INTEGER NOT NULL CHECK (file_size >= 0),
    chunk_count  INTEGER NOT NULL CHECK (chunk_count >= 0),
    refcount     INTEGER NOT NULL CHECK (refcount >= 0),
    deletable_at INTEGER,
    created_at   INTEGER NOT NULL,
    CHECK (refcount > 0 OR deletable_at IS NOT NULL)
) STRICT;
CREATE INDEX blobs_gc ON blobs (deletable_at) WHERE refcount = 0;

CREATE TABLE blob_chunks (
    blob_id     INTEGER NOT NULL REFERENCES blobs (id),
    seq         INTEGER NOT NULL CHECK (seq >= 0),
    chunk_id    INTEGER NOT NULL REFERENCES chunks (id),
    byte_offset INTEGER NOT NULL CHECK (byte_offset >= 0),
    file_offset INTEGER NOT NULL CHECK (file_offset >= 0),
    PRIMARY KEY (blob_id, seq)
) STRICT, WITHOUT ROWID;
CREATE UNIQUE INDEX blob_chunks_offset ON blob_chunks (blob_id, byte_offset);
CREATE UNIQUE INDEX blob_chunks_file_offset ON blob_chunks (blob_id, file_offset);
CREATE INDEX blob_chunks_chunk ON blob_chunks (chunk_id);

CREATE TABLE nix_objects (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    cache_id        INTEGER NOT NULL REFERENCES caches (id),
    store_path_hash TEXT    NOT NULL CHECK (length(store_path_hash) = 32),
    store_path      TEXT    NOT NULL,
    blob_id         INTEGER NOT NULL REFERENCES blobs (id),
    nar_hash        BLOB    NOT NULL CHECK (length(nar_hash) = 32),
    nar_size        INTEGER NOT NULL CHECK (nar_size >= 0),
    refs            TEXT    NOT NULL,
    deriver         TEXT,
    sigs            TEXT    NOT NULL,
    ca              TEXT,
    system          TEXT,
    created_at      INTEGER NOT NULL,
    accessed_at     INTEGER NOT NULL,
    UNIQUE (cache_id, store_path_hash)
) STRICT;
CREATE INDEX nix_objects_blob ON nix_objects (blob_id);
CREATE INDEX nix_objects_accessed ON nix_objects (cache_id, accessed_at);

CREATE TABLE cas_entries (
    cache_id    INTEGER NOT NULL REFERENCES caches (id),
    blob_id     INTEGER NOT NULL REFERENCES blobs (id),
    created_at  INTEGER NOT NULL,
    accessed_at INTEGER NOT NULL,
    PRIMARY KEY (cache_id, blob_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX cas_entries_blob ON cas_entries (blob_id);
CREATE INDEX cas_entries_accessed ON cas_entries (cache_id, accessed_at);

CREATE TABLE action_results (
    cache_id    INTEGER NOT NULL REFERENCES caches (id),
    action_hash BLOB    NOT NULL CHECK (length(action_hash) = 32),
    result      BLOB    NOT NULL,
    created_at  INTEGER NOT NULL,
    accessed_at INTEGER NOT NULL,
    PRIMARY KEY (cache_id, action_hash)
) STRICT, WITHOUT ROWID;

CREATE INDEX action_results_accessed ON action_results (cache_id, accessed_at);

CREATE TABLE upload_sessions (
    id             TEXT    PRIMARY KEY,
    cache_id       INTEGER NOT NULL REFERENCES caches (id),
    resource       TEXT    NOT NULL,
    committed_size INTEGER NOT NULL DEFAULT 0 CHECK (committed_size >= 0),
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
) STRICT;
CREATE INDEX upload_sessions_updated ON upload_sessions (updated_at);
