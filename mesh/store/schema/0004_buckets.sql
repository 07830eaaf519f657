-- meshsync state, schema 4: each disk version's digest bucket
-- (mesh.core.digest.bucket_of, registered on the connection as mesh_bucket), so
-- that a peer's catch-up picks the rows of the buckets it asks for in SQLite,
-- not by hashing every path of the tree in Python for each request (issue 16).
-- No index on it: it cost each version written 15 us, more than the filter saves.
ALTER TABLE versions ADD COLUMN bucket INTEGER NOT NULL DEFAULT -1;
UPDATE versions SET bucket = mesh_bucket(path)
