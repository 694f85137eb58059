-- Postern client profile database.
-- Olm state is stored as vodozemac pickles encrypted with the profile's pickle key
-- (kept in secrets.toml, mode 0600), never in the clear.

CREATE TABLE olm_account (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    pickle  TEXT NOT NULL
);

-- Pairwise Olm sessions with other devices.
CREATE TABLE olm_sessions (
    session_id     TEXT    PRIMARY KEY,
    username       TEXT    NOT NULL,
    device_id      INTEGER NOT NULL,
    pickle         TEXT    NOT NULL,
    last_used_ms   INTEGER NOT NULL
);
CREATE INDEX olm_sessions_by_device ON olm_sessions(username, device_id, last_used_ms);

-- Devices of contacts and their identity keys, pinned on first use.
CREATE TABLE contact_devices (
    username     TEXT    NOT NULL,
    device_id    INTEGER NOT NULL,
    curve25519   BLOB    NOT NULL,
    ed25519      BLOB,
    first_seen_ms INTEGER NOT NULL,
    PRIMARY KEY (username, device_id)
);

-- Conversation history. status: pending (typed, not yet accepted by the server), sent (✓),
-- delivered (✓✓), received (incoming), undecryptable (incoming, could not be decrypted).
CREATE TABLE messages (
    message_id      BLOB    PRIMARY KEY,
    peer            TEXT    NOT NULL,
    outgoing        INTEGER NOT NULL,
    body            TEXT    NOT NULL,
    created_ms      INTEGER NOT NULL,
    server_time_ms  INTEGER,
    status          TEXT    NOT NULL
);
CREATE INDEX messages_by_peer ON messages(peer, created_ms);
