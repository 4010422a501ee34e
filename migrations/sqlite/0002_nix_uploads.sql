-- The SQLite twin of migrations/postgres/0002_nix_uploads.sql.
CREATE TABLE nix_uploads (
    cache_id   INTEGER NOT NULL REFERENCES caches (id),
    blob_id    INTEGER NOT NULL REFERENCES blobs (id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (cache_id, blob_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX nix_uploads_blob ON nix_uploads (blob_id);
CREATE INDEX nix_uploads_created ON nix_uploads (created_at);
