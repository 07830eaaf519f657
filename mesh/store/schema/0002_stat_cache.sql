-- meshsync state, schema 2: the scanner's stat cache.
-- A regular file whose size, mtime, ctime and inode are what they were when
-- it was last hashed is not hashed again (the idea of git's index).
-- ino is stored as a signed 64-bit value (see mesh.store.statcache).

CREATE TABLE stat_cache (
    path     TEXT PRIMARY KEY,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    ino      INTEGER NOT NULL,
    hash     BLOB NOT NULL
) STRICT, WITHOUT ROWID;
