-- meshsync state, schema 5: the digests of the disk versions and of each peer's
-- announcements (mesh.core.digest), kept as rows are written (mesh.store.digests), so
-- that a digest is 4,096 rows read, not every row of the index hashed (issue 16).
-- The functions are registered on the connection (mesh.store.digests.register).

CREATE TABLE digests (
    owner  TEXT NOT NULL,     -- '': our disk versions; else the peer that announced them
    bucket INTEGER NOT NULL,  -- mesh.core.digest.bucket_of(path)
    value  INTEGER NOT NULL,  -- XOR of its rows' item hashes, as a signed 64-bit value
    count  INTEGER NOT NULL,  -- its rows
    PRIMARY KEY (owner, bucket)
) STRICT, WITHOUT ROWID;

INSERT INTO digests (owner, bucket, value, count)
SELECT '', bucket, mesh_digest_of(path, vector), count(*) FROM versions GROUP BY bucket;

INSERT INTO digests (owner, bucket, value, count)
SELECT peer, mesh_bucket(path), mesh_digest_of(path, vector), count(*)
FROM peer_vectors GROUP BY peer, mesh_bucket(path);

-- Each row written is folded into its bucket, each row removed folded out (XOR both
-- ways). The writes are upserts, and connections run with recursive_triggers on, so
-- that a REPLACE's implicit delete would fold its row out too.

CREATE TRIGGER versions_digest_in AFTER INSERT ON versions BEGIN
    INSERT INTO digests VALUES ('', NEW.bucket, mesh_digest_item(NEW.path, NEW.vector), 1)
    ON CONFLICT DO UPDATE SET value = (value | excluded.value) & ~(value & excluded.value),
                              count = count + 1;
END;

CREATE TRIGGER versions_digest_out AFTER DELETE ON versions BEGIN
    UPDATE digests SET value = mesh_digest_fold(value, OLD.path, OLD.vector),
                       count = count - 1
    WHERE owner = '' AND bucket = OLD.bucket;
END;

CREATE TRIGGER versions_digest_change AFTER UPDATE OF path, vector, bucket ON versions
WHEN OLD.path IS NOT NEW.path OR OLD.vector IS NOT NEW.vector OR OLD.bucket IS NOT NEW.bucket
BEGIN
    UPDATE digests SET value = mesh_digest_fold(value, OLD.path, OLD.vector),
                       count = count - 1
    WHERE owner = '' AND bucket = OLD.bucket;
    INSERT INTO digests VALUES ('', NEW.bucket, mesh_digest_item(NEW.path, NEW.vector), 1)
    ON CONFLICT DO UPDATE SET value = (value | excluded.value) & ~(value & excluded.value),
                              count = count + 1;
END;

CREATE TRIGGER peer_vectors_digest_in AFTER INSERT ON peer_vectors BEGIN
    INSERT INTO digests
    VALUES (NEW.peer, mesh_bucket(NEW.path), mesh_digest_item(NEW.path, NEW.vector), 1)
    ON CONFLICT DO UPDATE SET value = (value | excluded.value) & ~(value & excluded.value),
                              count = count + 1;
END;

CREATE TRIGGER peer_vectors_digest_out AFTER DELETE ON peer_vectors BEGIN
    UPDATE digests SET value = mesh_digest_fold(value, OLD.path, OLD.vector),
                       count = count - 1
    WHERE owner = OLD.peer AND bucket = mesh_bucket(OLD.path);
END;

CREATE TRIGGER peer_vectors_digest_change AFTER UPDATE OF peer, path, vector ON peer_vectors
WHEN OLD.peer IS NOT NEW.peer OR OLD.path IS NOT NEW.path OR OLD.vector IS NOT NEW.vector
BEGIN
    UPDATE digests SET value = mesh_digest_fold(value, OLD.path, OLD.vector),
                       count = count - 1
    WHERE owner = OLD.peer AND bucket = mesh_bucket(OLD.path);
    INSERT INTO digests
    VALUES (NEW.peer, mesh_bucket(NEW.path), mesh_digest_item(NEW.path, NEW.vector), 1)
    ON CONFLICT DO UPDATE SET value = (value | excluded.value) & ~(value & excluded.value),
                              count = count + 1;
END;
