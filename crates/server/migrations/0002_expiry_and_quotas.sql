-- Hardening (issue 18): queued messages expire, senders are told, and per-account byte
-- quotas are computed from the queue.

-- A receipt telling the sender its message expired undelivered (instead of delivered).
ALTER TABLE receipts ADD COLUMN expired INTEGER NOT NULL DEFAULT 0;

-- The expiry sweep finds the oldest messages without scanning the whole queue.
CREATE INDEX queue_by_time ON queue(server_time_ms);

-- Per-account byte quota: the bytes one sender's devices have waiting.
CREATE INDEX queue_by_sender ON queue(sender_device);
