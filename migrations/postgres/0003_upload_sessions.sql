-- Resumable ByteStream uploads shared by every replica on this database. A
-- session is keyed by cache and resource name (the ByteStream resource after
-- the instance, `uploads/<uuid>/blobs/<hash>/<size>`) and lists, in order, the
-- chunks the upload has made durable in the blob store, so a Write reaching
-- another replica resumes at committed_size instead of 0.
--
-- generation grows by one each time a Write takes the session over; a
-- checkpoint names the generation it holds, so a stale writer on another
-- replica (dead or still running) can no longer append. committed_size and
-- file_size are the uncompressed and stored bytes the chunks cover.
--
-- The table 0001 created for this was never used, so it is replaced.
DROP TABLE upload_sessions;

CREATE TABLE upload_sessions (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    cache_id       BIGINT NOT NULL REFERENCES caches (id),
    resource       TEXT   NOT NULL,
    generation     BIGINT NOT NULL CHECK (generation > 0),
    committed_size BIGINT NOT NULL CHECK (committed_size >= 0),
    file_size      BIGINT NOT NULL CHECK (file_size >= 0),
    expires_at     BIGINT NOT NULL,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    UNIQUE (cache_id, resource)
);
CREATE INDEX upload_sessions_expires ON upload_sessions (expires_at);

-- Like blob_chunks, without uniqueness of offsets: the list only grows at its
-- end, and the session's sizes say where that is. GC of chunks looks up
-- chunk_id to spare the chunks a live session holds.
CREATE TABLE upload_session_chunks (
    session_id  BIGINT NOT NULL REFERENCES upload_sessions (id) ON DELETE CASCADE,
    seq         BIGINT NOT NULL CHECK (seq >= 0),
    chunk_id    BIGINT NOT NULL REFERENCES chunks (id),
    byte_offset BIGINT NOT NULL CHECK (byte_offset >= 0),
    file_offset BIGINT NOT NULL CHECK (file_offset >= 0),
    PRIMARY KEY (session_id, seq)
);
CREATE INDEX upload_session_chunks_chunk ON upload_session_chunks (chunk_id);
