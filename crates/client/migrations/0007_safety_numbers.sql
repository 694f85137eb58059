-- Issue 14, safety numbers. What the user compared in person for each contact, and when
-- the contact's identity keys last changed after first use (a key change also puts a
-- 'key_changed' line in the conversation: a messages row with that status).

CREATE TABLE contact_verification (
    username         TEXT    PRIMARY KEY,
    -- The 60-digit safety number the user confirmed; NULL: not verified (never, or the
    -- keys changed since).
    verified_number  TEXT,
    -- When the user last confirmed a number (kept after a key change, to say "changed
    -- since you verified it").
    verified_ms      INTEGER,
    -- When the contact's identity keys last changed.
    key_changed_ms   INTEGER
);
