-- Recipients sharded across several databases (docs/server.md, "Sharding").
--
-- Each database records which shard it is, so a node given the databases in another order,
-- or a different number of them, refuses to start instead of writing accounts to the
-- wrong place. Written by the first node that opens the database (store/sharded.rs).
CREATE TABLE shard (
    only_row     BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    shard_index  BIGINT  NOT NULL,
    shard_count  BIGINT  NOT NULL,
    created_ms   BIGINT  NOT NULL
);

-- A queue row lives in the recipient's shard, its sender's account possibly in another:
-- the row names the sending account itself, and the quota table no longer refers to the
-- accounts table (the quota counts what the sender has waiting in this shard).
ALTER TABLE queue ADD COLUMN sender_account BIGINT;
ALTER TABLE queued_bytes DROP CONSTRAINT queued_bytes_account_id_fkey;
