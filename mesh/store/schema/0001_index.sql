-- meshsync state, schema 1. Every table is STRICT.
-- A version is a list of heads (concurrent writes), stored as a msgpack
-- array of manifest-wire entries; the winner's columns are denormalized for
-- queries (status, verify) that should not decode every row.

CREATE TABLE versions (
    path    TEXT PRIMARY KEY,
    heads   BLOB NOT NULL,
    vector  BLOB NOT NULL,       -- msgpack map: the merged vector
    hash    BLOB,                -- winner's content hash; NULL: a tombstone
    size    INTEGER NOT NULL,
    mode    INTEGER NOT NULL,
    kind    INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- Versions this node converges to but does not hold yet.
CREATE TABLE targets (
    path    TEXT PRIMARY KEY,
    heads   BLOB NOT NULL
) STRICT, WITHOUT ROWID;

-- What each peer last announced it holds: the gate's input.
CREATE TABLE peer_vectors (
    peer   TEXT NOT NULL,
    path   TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (peer, path)
) STRICT, WITHOUT ROWID;

-- The conflict log: the same id on every node (DESIGN.md).
CREATE TABLE conflicts (
    id          TEXT PRIMARY KEY,
    path        TEXT NOT NULL,
    rule        TEXT NOT NULL,
    copy_path   TEXT,
    winner      BLOB NOT NULL,   -- msgpack entry (manifest wire form)
    loser       BLOB NOT NULL,
    logged_ms   INTEGER NOT NULL, -- when this node logged it
    restored_ms INTEGER           -- when an operator restored the loser here
) STRICT;
CREATE INDEX conflicts_by_time ON conflicts (logged_ms);
CREATE INDEX conflicts_by_path ON conflicts (path);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value ANY
) STRICT, WITHOUT ROWID;
