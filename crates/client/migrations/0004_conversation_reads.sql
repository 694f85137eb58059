-- App issue: unread counts. The read marker is the last message's rowid the user has
-- seen in a conversation (rowids only grow, unlike the senders' clocks).

CREATE TABLE conversation_reads (
    peer        TEXT    PRIMARY KEY,
    read_rowid  INTEGER NOT NULL
);
