-- NARs uploaded by plain `nix copy --to http://…` before their narinfo: the
-- NAR arrives first (named by its compressed file hash), the narinfo later
-- names it by NAR hash. A row records that this cache's uploader really sent
-- the NAR, so the narinfo may reference the blob (proof of possession).
CREATE TABLE nix_uploads (
    cache_id   BIGINT NOT NULL REFERENCES caches (id),
    blob_id    BIGINT NOT NULL REFERENCES blobs (id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (cache_id, blob_id)
);
CREATE INDEX nix_uploads_blob ON nix_uploads (blob_id);
CREATE INDEX nix_uploads_created ON nix_uploads (created_at);
