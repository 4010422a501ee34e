-- Garbage collection (issue 13): what GC needs to keep closures whole, honour
-- pins, hold a Bazel cache to a size budget and retire packs safely.

-- A Nix object's references as rows, so that GC can ask "does anything left
-- in this cache refer to this path?" with one index probe instead of a scan
-- of every `refs` text. Self-references are left out: they keep nothing.
CREATE TABLE nix_object_refs (
    cache_id      INTEGER NOT NULL REFERENCES caches (id),
    referrer_hash TEXT    NOT NULL CHECK (length(referrer_hash) = 32),
    ref_hash      TEXT    NOT NULL CHECK (length(ref_hash) = 32),
    PRIMARY KEY (cache_id, referrer_hash, ref_hash)
) STRICT, WITHOUT ROWID;
CREATE INDEX nix_object_refs_ref ON nix_object_refs (cache_id, ref_hash);

WITH RECURSIVE words (cache_id, referrer_hash, rest, word) AS (
    SELECT cache_id, store_path_hash, refs || ' ', NULL FROM nix_objects
    UNION ALL
    SELECT cache_id, referrer_hash,
           substr(rest, instr(rest, ' ') + 1), substr(rest, 1, instr(rest, ' ') - 1)
    FROM words WHERE rest <> ''
)
INSERT INTO nix_object_refs (cache_id, referrer_hash, ref_hash)
SELECT DISTINCT cache_id, referrer_hash, substr(word, 1, 32) FROM words
WHERE length(word) > 33 AND substr(word, 1, 32) <> referrer_hash;

-- GC roots: a pinned store path never expires (nor, through the references
-- above, does its closure) until the pin is removed or `expires_at` passes.
-- A pin names a path, not an object, so it may be set before the push.
CREATE TABLE nix_pins (
    cache_id        INTEGER NOT NULL REFERENCES caches (id),
    name            TEXT    NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    store_path_hash TEXT    NOT NULL CHECK (length(store_path_hash) = 32),
    store_path      TEXT    NOT NULL,
    expires_at      INTEGER,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (cache_id, name)
) STRICT;
CREATE INDEX nix_pins_path ON nix_pins (cache_id, store_path_hash);

-- A Bazel cache's budget for the logical bytes of its CAS entries; GC
-- evicts the least recently used beyond it. NULL: no budget.
ALTER TABLE caches ADD COLUMN cas_budget_bytes INTEGER CHECK (cas_budget_bytes > 0);

-- When GC found a pack without live bytes (or moved its live chunks to a
-- new pack). The object is deleted a grace period later, so that a reader
-- that looked up a chunk's place just before can still read it.
ALTER TABLE packs ADD COLUMN dead_at INTEGER;
