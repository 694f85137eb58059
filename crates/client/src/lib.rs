//! The Postern client library: everything an app (the `postern` CLI now, a terminal UI
//! later) needs to be one device of one account.
//!
//! * [`profile`]: the profile directory (`--home`/`POSTERN_HOME`): identity, device
//!   secrets (mode 0600) and the network the account lives on.
//! * [`store`]: the local SQLite database: Olm account and sessions (encrypted pickles),
//!   pinned contact identities, conversation history.
//! * [`crypto`]: Olm (vodozemac) keys and sessions: what is published, what is verified.
//! * `connection`: one Noise channel to the server, with requests and ordered pushes.
//! * [`proxy`]: proxy settings (mode off/on/auto, saved relays, links).
//! * [`route`]: opening the byte stream of one route (direct, relay, relay with TLS),
//!   stage by stage, with failures named in the user's words.
//! * `manager`: choosing routes (mode, last that worked, hostile relays skipped),
//!   fail-over, reconnection with back-off, background re-probing, proxy checks.
//! * [`Client`]: the API: create an account, connect, send, receive, history, and an
//!   [`Event`] stream (incoming message, sent ✓, delivered ✓✓, connection state).
//!
//! Trust: the server is authenticated by the Noise handshake against the key in the
//! network file; message contents are encrypted end to end with Olm per device, so neither
//! a relay nor the server can read them.

mod client;
mod connection;
pub mod crypto;
mod error;
mod events;
mod manager;
pub mod profile;
pub mod proxy;
pub mod route;
pub mod store;

pub use client::{Client, ConnectMode, PendingOutcome, CONNECT_TIMEOUT, MAX_TEXT_BYTES};
pub use connection::{BoxStream, Stream};
pub use error::ClientError;
pub use events::{Event, IncomingMessage, MessageId};
pub use manager::{ConnectReport, BACKOFF_MAX, HANDSHAKE_TIMEOUT, STAGE_TIMEOUT};
pub use proxy::{ProxyEntry, ProxyMode};
pub use route::{DialReport, Failure, Route, Stage};
pub use store::{HistoryEntry, MessageStatus};
