-- garret's metadata schema. Times are unix seconds chosen by the caller; ids
-- are BIGINT identities (never reused, so a stale id held by a GC worker can
-- never name a newer row); digests are raw 32-byte SHA-256.
--
-- Refcounted rows (chunks, blobs) keep the invariant
--   refcount > 0 OR deletable_at IS NOT NULL
-- so a row that nothing references always carries the time GC may take it.

CREATE TABLE caches (
    id                       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name                     TEXT    NOT NULL,
    is_public                BOOLEAN NOT NULL,
    store_dir                TEXT    NOT NULL,
    priority                 INTEGER NOT NULL,
    signing_key              TEXT    NOT NULL,
    upstream_cache_key_names TEXT    NOT NULL DEFAULT '[]',
    retention_period         BIGINT  CHECK (retention_period >= 0),
    created_at               BIGINT  NOT NULL,
    deleted_at               BIGINT
);
-- A soft-deleted cache frees its name.
CREATE UNIQUE INDEX caches_live_name ON caches (name) WHERE deleted_at IS NULL;

CREATE TABLE chunks (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    hash         BYTEA  NOT NULL UNIQUE CHECK (length(hash) = 32),
    size         BIGINT NOT NULL CHECK (size > 0),
    stored_size  BIGINT NOT NULL CHECK (stored_size > 0),
    frame_hash   BYTEA  NOT NULL CHECK (length(frame_hash) = 32),
    compression  TEXT   NOT NULL CHECK (compression IN ('zstd', 'none')),
    refcount     BIGINT NOT NULL CHECK (refcount >= 0),
    deletable_at BIGINT,
    state        TEXT   NOT NULL DEFAULT 'valid' CHECK (state IN ('valid', 'deleting')),
    created_at   BIGINT NOT NULL,
    CHECK (refcount > 0 OR deletable_at IS NOT NULL)
);
CREATE INDEX chunks_gc ON chunks (deletable_at) WHERE refcount = 0;

CREATE TABLE blobs (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    hash         BYTEA  NOT NULL UNIQUE CHECK (length(hash) = 32),
    size         BIGINT NOT NULL CHECK (size >= 0),
    file_hash    BYTEA  NOT NULL CHECK (length(file_hash) = 32),
    file_size    BIGINT NOT NULL CHECK (file_size >= 0),
    chunk_count  BIGINT NOT NULL CHECK (chunk_count >= 0),
    refcount     BIGINT NOT NULL CHECK (refcount >= 0),
    deletable_at BIGINT,
    created_at   BIGINT NOT NULL,
    CHECK (refcount > 0 OR deletable_at IS NOT NULL)
);
CREATE INDEX blobs_gc ON blobs (deletable_at) WHERE refcount = 0;

-- byte_offset is the chunk's start in the uncompressed blob and file_offset
-- the start of its stored frame in the blob's file (the frames concatenated),
-- so a range read of either finds its first chunk with one index probe.
CREATE TABLE blob_chunks (
    blob_id     BIGINT NOT NULL REFERENCES blobs (id),
    seq         BIGINT NOT NULL CHECK (seq >= 0),
    chunk_id    BIGINT NOT NULL REFERENCES chunks (id),
    byte_offset BIGINT NOT NULL CHECK (byte_offset >= 0),
    file_offset BIGINT NOT NULL CHECK (file_offset >= 0),
    PRIMARY KEY (blob_id, seq)
);
CREATE UNIQUE INDEX blob_chunks_offset ON blob_chunks (blob_id, byte_offset);
CREATE UNIQUE INDEX blob_chunks_file_offset ON blob_chunks (blob_id, file_offset);
CREATE INDEX blob_chunks_chunk ON blob_chunks (chunk_id);

CREATE TABLE nix_objects (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    cache_id        BIGINT NOT NULL REFERENCES caches (id),
    store_path_hash TEXT   NOT NULL CHECK (length(store_path_hash) = 32),
    store_path      TEXT   NOT NULL,
    blob_id         BIGINT NOT NULL REFERENCES blobs (id),
    nar_hash        BYTEA  NOT NULL CHECK (length(nar_hash) = 32),
    nar_size        BIGINT NOT NULL CHECK (nar_size >= 0),
    refs            TEXT   NOT NULL,
    deriver         TEXT,
    sigs            TEXT   NOT NULL,
    ca              TEXT,
    system          TEXT,
    created_at      BIGINT NOT NULL,
    accessed_at     BIGINT NOT NULL,
    UNIQUE (cache_id, store_path_hash)
);
CREATE INDEX nix_objects_blob ON nix_objects (blob_id);
-- Retention: a cache's least recently accessed objects first.
CREATE INDEX nix_objects_accessed ON nix_objects (cache_id, accessed_at);

CREATE TABLE cas_entries (
    cache_id    BIGINT NOT NULL REFERENCES caches (id),
    blob_id     BIGINT NOT NULL REFERENCES blobs (id),
    created_at  BIGINT NOT NULL,
    accessed_at BIGINT NOT NULL,
    PRIMARY KEY (cache_id, blob_id)
);
CREATE INDEX cas_entries_blob ON cas_entries (blob_id);
CREATE INDEX cas_entries_accessed ON cas_entries (cache_id, accessed_at);

CREATE TABLE action_results (
    cache_id    BIGINT NOT NULL REFERENCES caches (id),
    action_hash BYTEA  NOT NULL CHECK (length(action_hash) = 32),
    result      BYTEA  NOT NULL,
    created_at  BIGINT NOT NULL,
    accessed_at BIGINT NOT NULL,
    PRIMARY KEY (cache_id, action_hash)
);

CREATE INDEX action_results_accessed ON action_results (cache_id, accessed_at);

CREATE TABLE upload_sessions (
    id             TEXT   PRIMARY KEY,
    cache_id       BIGINT NOT NULL REFERENCES caches (id),
    resource       TEXT   NOT NULL,
    committed_size BIGINT NOT NULL DEFAULT 0 CHECK (committed_size >= 0),
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL
);
CREATE INDEX upload_sessions_updated ON upload_sessions (updated_at);
