-- Issue 14, attachments. A file sent or received with a message (one per message). The
-- key and digest came inside the end-to-end encrypted message; the server holds only the
-- ciphertext, under media_id.
--
-- state, outgoing: 'uploading' (the ciphertext waits in `upload_path`; the message stays
-- pending until the upload completes), 'uploaded'; incoming: 'downloading', 'done'; either:
-- 'failed' (with `error`). `path` is the file itself, here: the copy kept of a file sent,
-- or a received one once decrypted.
CREATE TABLE attachments (
    message_id      BLOB    PRIMARY KEY REFERENCES messages(message_id) ON DELETE CASCADE,
    outgoing        INTEGER NOT NULL,
    media_id        BLOB    NOT NULL,
    key             BLOB    NOT NULL,
    nonce           BLOB    NOT NULL,
    segment_size    INTEGER NOT NULL,
    size            INTEGER NOT NULL,
    ciphertext_size INTEGER NOT NULL,
    sha256          BLOB    NOT NULL,
    file_name       TEXT    NOT NULL,
    content_type    TEXT    NOT NULL,
    state           TEXT    NOT NULL,
    -- Ciphertext bytes the server acknowledged (upload) or that arrived (download).
    transferred     INTEGER NOT NULL DEFAULT 0,
    upload_path     TEXT,
    path            TEXT,
    error           TEXT
);
CREATE INDEX attachments_by_state ON attachments(state);
