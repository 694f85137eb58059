-- Connectivity issue: what each route did last (so the next start begins with what
-- worked), and messages that can never be delivered (kept in history, marked failed).

CREATE TABLE route_health (
    -- The route as JSON (`{"kind":"direct","address":...}` or a relay entry).
    route            TEXT    PRIMARY KEY,
    last_ok_ms       INTEGER,
    last_failure_ms  INTEGER,
    last_failure     TEXT,
    last_latency_ms  INTEGER,
    hostile          INTEGER NOT NULL DEFAULT 0
);

-- Why an outgoing message failed (status 'failed'), e.g. the contact does not exist.
ALTER TABLE messages ADD COLUMN failure TEXT;
