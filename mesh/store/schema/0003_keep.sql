-- meshsync state, schema 3: what the keep area holds, and the peers this node
-- has heard (issue 14, DESIGN.md "The keep area").

-- One row per version filed into <data>/.mesh-keep/objects: the write it held
-- at its path, the merged vector of the version it was part of (what must be
-- superseded everywhere before it may go), when and why it was filed.
-- Several rows may name one object (same content).
CREATE TABLE kept (
    id      INTEGER PRIMARY KEY,
    path    TEXT NOT NULL,
    hash    BLOB NOT NULL,
    entry   BLOB NOT NULL,       -- msgpack entry (manifest wire form): the kept write
    vector  BLOB NOT NULL,       -- msgpack map
    size    INTEGER NOT NULL,
    kept_ms INTEGER NOT NULL,
    reason  TEXT NOT NULL
) STRICT;
CREATE INDEX kept_by_path ON kept (path, kept_ms);
CREATE INDEX kept_by_hash ON kept (hash);
CREATE INDEX kept_by_time ON kept (kept_ms);

-- The collector walks the deletes on disk by path (a partial index: only
-- tombstones are in it, so the writes of live paths do not pay for it).
CREATE INDEX versions_tombstones ON versions (path) WHERE hash IS NULL;

-- Every peer this node has heard. A peer not heard for forget_after of this
-- node's own running time no longer holds tombstones back.
CREATE TABLE peers_heard (
    peer      TEXT PRIMARY KEY,
    heard_ms  INTEGER NOT NULL,  -- when its link was last seen up
    missed_ms INTEGER NOT NULL   -- how long this node has run since, without hearing it
) STRICT, WITHOUT ROWID;
