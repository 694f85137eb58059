-- Hardening (issue 18): queued messages expire, senders are told, and each account's
-- undelivered bytes are bounded.

-- A receipt telling the sender its message expired undelivered (instead of delivered).
ALTER TABLE receipts ADD COLUMN expired INTEGER NOT NULL DEFAULT 0;

-- The expiry sweep finds the oldest messages without scanning the whole queue.
CREATE INDEX queue_by_time ON queue(server_time_ms);

-- Bytes of ciphertext each sending account has waiting in queues (the per-account byte
-- quota), kept up to date as messages are queued, acknowledged and expired, so checking
-- the quota never scans the queue.
CREATE TABLE queued_bytes (
    account_id  INTEGER PRIMARY KEY REFERENCES accounts(id) ON DELETE CASCADE,
    bytes       INTEGER NOT NULL
);
INSERT INTO queued_bytes (account_id, bytes)
    SELECT d.account_id, SUM(LENGTH(q.ciphertext)) FROM queue q
    JOIN devices d ON d.id = q.sender_device GROUP BY d.account_id;
