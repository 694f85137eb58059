-- Issue 14, groups. A group lives only on its members' devices: each group message goes
-- to every member as a separate pairwise-encrypted message, so the server sees ordinary
-- messages between users and nothing of the group.

CREATE TABLE groups (
    group_id    BLOB    PRIMARY KEY,          -- 16 random bytes chosen by the creator
    name        TEXT    NOT NULL,
    epoch       INTEGER NOT NULL,             -- membership version, one more per change
    -- 1 while this account is a member; 0 once it left or was removed (history is kept).
    joined      INTEGER NOT NULL DEFAULT 1,
    created_ms  INTEGER NOT NULL
);

-- Current members, this account included while it is one.
CREATE TABLE group_members (
    group_id    BLOB    NOT NULL REFERENCES groups(group_id) ON DELETE CASCADE,
    username    TEXT    NOT NULL,
    PRIMARY KEY (group_id, username)
);

-- A group's messages are in `messages` under peer 'group:' || hex(group_id). `sender` is
-- who wrote an incoming group message; `group_context` the encoded GroupContext an
-- outgoing one carries (the group as it was when the message was written).
-- `group_event` is 1 for a membership change (its body describes it: "bob added carol").
ALTER TABLE messages ADD COLUMN sender TEXT;
ALTER TABLE messages ADD COLUMN group_context BLOB;
ALTER TABLE messages ADD COLUMN group_event INTEGER NOT NULL DEFAULT 0;

-- One row per member an outgoing group message goes to, each under a wire id of its own,
-- so every member's ✓ and ✓✓ is known. status: pending, sent, delivered, failed (with
-- `failure`). Rows are sent in rowid order: members who were there before a change first.
CREATE TABLE group_sends (
    wire_id     BLOB    PRIMARY KEY,
    message_id  BLOB    NOT NULL REFERENCES messages(message_id) ON DELETE CASCADE,
    member      TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    failure     TEXT
);
CREATE INDEX group_sends_by_message ON group_sends(message_id, status);
