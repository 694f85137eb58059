-- Postern server schema, version 1.
-- Every table holds only what delivery needs: public keys and ciphertext, never plaintext.

CREATE TABLE accounts (
    id          INTEGER PRIMARY KEY,
    username    TEXT    NOT NULL UNIQUE,
    created_ms  INTEGER NOT NULL
);

-- A device is bound to the Noise static key it registered with: the handshake proves it.
CREATE TABLE devices (
    id          INTEGER PRIMARY KEY,
    account_id  INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    noise_key   BLOB    NOT NULL UNIQUE,
    curve25519  BLOB    NOT NULL,
    ed25519     BLOB    NOT NULL,
    created_ms  INTEGER NOT NULL
);
CREATE INDEX devices_by_account ON devices(account_id);

-- Each one-time key is handed out once, then deleted.
CREATE TABLE one_time_keys (
    id          INTEGER PRIMARY KEY,
    device_id   INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    public_key  BLOB    NOT NULL,
    signature   BLOB    NOT NULL,
    UNIQUE (device_id, public_key)
);

-- Used when a device's one-time keys run out.
CREATE TABLE fallback_keys (
    device_id   INTEGER PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
    public_key  BLOB    NOT NULL,
    signature   BLOB    NOT NULL
);

-- Durable per-device message queue. A row is deleted when the recipient device acknowledges.
CREATE TABLE queue (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient_device INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    message_id       BLOB    NOT NULL,
    sender_device    INTEGER NOT NULL,
    sender           TEXT    NOT NULL,
    server_time_ms   INTEGER NOT NULL,
    olm_type         INTEGER NOT NULL,
    ciphertext       BLOB    NOT NULL,
    UNIQUE (recipient_device, message_id)
);
CREATE INDEX queue_by_device ON queue(recipient_device, seq);

-- Delivery receipts waiting for the sending device.
CREATE TABLE receipts (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id        INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    message_id       BLOB    NOT NULL,
    recipient        TEXT    NOT NULL,
    server_time_ms   INTEGER NOT NULL,
    UNIQUE (device_id, message_id)
);
CREATE INDEX receipts_by_device ON receipts(device_id, seq);
