//! The Postern client library: everything an app (the `postern` CLI, the web app) needs
//! to be one device of one account.
//!
//! How the parts fit, from the network inwards:
//!
//! * [`connector`]: every way of reaching the service (direct, relays, TLS relays),
//!   raced Happy-Eyeballs style, their outcomes remembered in the profile, and the one
//!   authenticated Noise connection kept alive — pinged when silent, replaced when a
//!   censor freezes it. It knows nothing about messages.
//! * `sessions`: end-to-end encryption with Olm (vodozemac) to every device of a
//!   contact, decryption, one-time key top-up ([`crypto`] holds the key rules); keys
//!   pinned on first use, a later change accepted but marked in the conversation, and
//!   [`safety`] numbers to compare them in person.
//! * `outbox` / `inbox`: what the user typed until the server holds it (pending →
//!   ✓ sent, or failed with the reason), and what arrives until it is stored and
//!   acknowledged (duplicates dropped by id, receipts turning ✓ into ✓✓).
//! * [`groups`]: groups whose membership lives only on the members' devices, each message
//!   fanned out pairwise to every member (why not Megolm is explained there).
//! * [`Client`]: the thin façade an app drives — create an account, connect or
//!   [`Client::keep_connected`], send, history — with an [`Event`] stream.
//! * [`profile`], [`store`], [`proxy`]: the profile directory, its SQLite database, and
//!   the proxy settings; [`timeouts`]: every time limit, named once.
//!
//! Trust: the server is authenticated by the Noise handshake against the key in the
//! network file; message contents are encrypted end to end with Olm per device, so neither
//! a relay nor the server can read them.

pub mod attachments;
mod client;
pub mod connector;
pub mod crypto;
mod error;
mod events;
pub mod groups;
mod inbox;
mod outbox;
pub mod profile;
pub mod proxy;
pub mod safety;
mod sessions;
pub mod store;
pub mod timeouts;

pub use attachments::SavedAttachment;
pub use client::{Client, ContactSafety, RECONNECTS_PER_OPERATION};
pub use connector::connection::{BoxStream, Stream};
pub use connector::health::RouteHealth;
pub use connector::media::MediaRoute;
pub use connector::route::{self as route, DialReport, Failure, Route, Stage};
pub use connector::{check_route_without_profile, ConnectMode, ConnectReport};
pub use error::ClientError;
pub use events::{AttachmentSummary, Event, GroupRef, IncomingMessage, MessageId, MessageIdError};
pub use groups::{GroupId, GroupInfo, MembershipChange, MAX_GROUP_MEMBERS};
pub use outbox::{PendingOutcome, MAX_TEXT_BYTES};
pub use postern_protocol::units::human_bytes;
pub use proxy::{ProxyEntry, ProxyMode, ProxyParseError};
pub use safety::{SafetyNumber, SafetyNumberError};
pub use store::{
    AttachmentInfo, Conversation, GroupProgress, HistoryEntry, MemberDelivery, MemberStatus,
    MessageStatus, TransferState,
};
