-- Packs: objects holding the stored frames of many chunks, so that a chunk
-- no longer costs an object (a create and a sync, or a PUT) of its own.
--
-- A pack is written once by one upload and named by a random 16-byte key.
-- `size` is the object's length; `live_bytes` the stored bytes of the chunk
-- rows that point into it. Frames a concurrent writer's commit made
-- redundant, and frames whose chunk rows GC deleted, are the difference:
-- GC deletes packs with no live bytes and rewrites those with few.
CREATE TABLE packs (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key         BYTEA  NOT NULL UNIQUE CHECK (length(key) = 16),
    size        BIGINT NOT NULL CHECK (size > 0),
    live_bytes  BIGINT NOT NULL CHECK (live_bytes >= 0 AND live_bytes <= size),
    created_at  BIGINT NOT NULL
);

-- Chunks stored before packs keep their own object (both columns NULL).
ALTER TABLE chunks
    ADD COLUMN pack_id BIGINT REFERENCES packs (id),
    ADD COLUMN pack_offset BIGINT,
    ADD CONSTRAINT chunks_pack_place
        CHECK ((pack_id IS NULL) = (pack_offset IS NULL) AND pack_offset >= 0);
CREATE INDEX chunks_pack ON chunks (pack_id) WHERE pack_id IS NOT NULL;
