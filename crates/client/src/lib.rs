//! The Postern client library: everything an app (the `postern` CLI now, a terminal UI
//! later) needs to be one device of one account.
//!
//! * [`profile`]: the profile directory (`--home`/`POSTERN_HOME`): identity, device
//!   secrets (mode 0600) and the network the account lives on.
//! * [`store`]: the local SQLite database: Olm account and sessions (encrypted pickles),
//!   pinned contact identities, conversation history.
//! * [`crypto`]: Olm (vodozemac) keys and sessions: what is published, what is verified.
//! * `connection`: one Noise channel to the server, with requests and ordered pushes.
//! * [`transport`]: how the byte stream is opened (direct TCP; relays come later).
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
pub mod profile;
pub mod store;
pub mod transport;

pub use client::{Client, ConnectMode, PendingOutcome, CONNECT_TIMEOUT, MAX_TEXT_BYTES};
pub use connection::{BoxStream, Stream};
pub use error::ClientError;
pub use events::{Event, IncomingMessage, MessageId};
pub use store::{HistoryEntry, MessageStatus};
