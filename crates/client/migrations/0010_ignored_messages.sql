-- Messages this device decrypted and then would not show (a group message from someone
-- the device does not know as a member, an older membership change, a malformed group).
-- Decrypting used up the Olm message key, so if the server delivers the same envelope
-- again (its acknowledgement was lost) it must be dropped as a duplicate, not shown as
-- "could not be decrypted". Rows older than the server's queue lifetime can go.
CREATE TABLE ignored_messages (
    message_id  BLOB    PRIMARY KEY,
    ignored_ms  INTEGER NOT NULL
);
