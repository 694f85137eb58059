-- Proxy settings (client issue "proxy support"): a mode and an ordered list of relays.

CREATE TABLE settings (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);

CREATE TABLE proxies (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    host        TEXT    NOT NULL,
    port        INTEGER NOT NULL,
    tls         INTEGER NOT NULL,
    media_port  INTEGER,
    added_ms    INTEGER NOT NULL,
    UNIQUE (host, port)
);
