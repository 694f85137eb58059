-- Postern server schema for PostgreSQL: the SQLite schema (migrations/0001 and 0002) in
-- one step. Every table holds only what delivery needs: public keys and ciphertext.
-- Integers are BIGINT throughout (the server reads them as i64).

CREATE TABLE accounts (
    id          BIGSERIAL PRIMARY KEY,
    username    TEXT    NOT NULL UNIQUE,
    created_ms  BIGINT  NOT NULL
);

-- A device is bound to the Noise static key it registered with: the handshake proves it.
CREATE TABLE devices (
    id          BIGSERIAL PRIMARY KEY,
    account_id  BIGINT  NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    noise_key   BYTEA   NOT NULL UNIQUE,
    curve25519  BYTEA   NOT NULL,
    ed25519     BYTEA   NOT NULL,
    created_ms  BIGINT  NOT NULL
);
CREATE INDEX devices_by_account ON devices(account_id);

-- Each one-time key is handed out once, then deleted.
CREATE TABLE one_time_keys (
    id          BIGSERIAL PRIMARY KEY,
    device_id   BIGINT  NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    public_key  BYTEA   NOT NULL,
    signature   BYTEA   NOT NULL,
    UNIQUE (device_id, public_key)
);

-- Used when a device's one-time keys run out.
CREATE TABLE fallback_keys (
    device_id   BIGINT  PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
    public_key  BYTEA   NOT NULL,
    signature   BYTEA   NOT NULL
);

-- Durable per-device message queue. A row is deleted when the recipient device acknowledges.
-- Rows of one device are inserted under an advisory lock (see store/postgres.rs), so they
-- become visible in seq order.
CREATE TABLE queue (
    seq              BIGSERIAL PRIMARY KEY,
    recipient_device BIGINT  NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    message_id       BYTEA   NOT NULL,
    sender_device    BIGINT  NOT NULL,
    sender           TEXT    NOT NULL,
    server_time_ms   BIGINT  NOT NULL,
    olm_type         BIGINT  NOT NULL,
    ciphertext       BYTEA   NOT NULL,
    UNIQUE (recipient_device, message_id)
);
CREATE INDEX queue_by_device ON queue(recipient_device, seq);
CREATE INDEX queue_by_time ON queue(server_time_ms);

-- Delivery receipts waiting for the sending device; expired = 1 when the message was
-- deleted undelivered (queue time-to-live).
CREATE TABLE receipts (
    seq              BIGSERIAL PRIMARY KEY,
    device_id        BIGINT  NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    message_id       BYTEA   NOT NULL,
    recipient        TEXT    NOT NULL,
    server_time_ms   BIGINT  NOT NULL,
    expired          BIGINT  NOT NULL DEFAULT 0,
    UNIQUE (device_id, message_id)
);
CREATE INDEX receipts_by_device ON receipts(device_id, seq);

-- Bytes of ciphertext each sending account has waiting in queues (the per-account quota).
CREATE TABLE queued_bytes (
    account_id  BIGINT PRIMARY KEY REFERENCES accounts(id) ON DELETE CASCADE,
    bytes       BIGINT NOT NULL
);
