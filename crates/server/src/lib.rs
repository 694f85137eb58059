//! The Postern server: accounts, device keys, durable per-device message queues, and
//! delivery over the Noise channel defined in `postern-protocol`.
//!
//! The server never sees message plaintext: clients encrypt each message end to end (Olm)
//! for every recipient device, and the server stores and forwards that ciphertext.
//!
//! * [`data_dir`]: the key, network file and database in one directory (`server init`).
//! * [`store`]: SQLite (default, through rusqlite on a writer thread) or PostgreSQL
//!   (through sqlx), group-committed; what is
//!   acknowledged is on disk. Several nodes may share one PostgreSQL database.
//! * [`hub`]: which devices are online on this node, to wake their connections (woken
//!   from other nodes through PostgreSQL `LISTEN/NOTIFY`).
//! * [`limits`]: every bound (handshake time, idle time, queue length, registrations,
//!   connections per source, message rate, key claims), the bounded per-key limiter and the
//!   refusal counters. Per-address limits count by `postern_protocol::net::SourceKey`.
//! * [`disk`]: the free-space high-water mark below which new messages are refused.
//! * [`media`]: attachments' ciphertext on disk, uploaded in resumable chunks and fetched
//!   by id (the keys travel only inside end-to-end encrypted messages).
//! * `connection`: one client connection, from PROXY header to the request loop; its
//!   reader task applies acknowledgements as they arrive.
//! * `push_window`: how much a connection may push unacknowledged (so a path that
//!   freezes after some kilobytes still makes progress).
//! * [`Server`]: binds, accepts, and shuts down cleanly.
//!
//! Delivery is at-least-once: a message stays queued until the recipient device
//! acknowledges that it stored it; clients drop duplicates by message id.

mod connection;
pub mod data_dir;
pub mod delivery;
pub mod disk;
mod error;
pub mod hub;
pub mod limits;
pub mod media;
mod push_window;
mod server;
pub mod store;

pub use data_dir::{DataDir, InitReport};
pub use error::ServerError;
pub use limits::Limits;
pub use server::{Server, ServerConfig};

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use postern_protocol::noise::StaticKeypair;

/// State every connection shares.
pub(crate) struct Shared {
    pub store: store::Store,
    pub hub: Arc<hub::Hub>,
    pub keys: StaticKeypair,
    pub limits: Limits,
    pub registrations: limits::RegistrationLimiter,
    /// Open connections per source address.
    pub per_source: Arc<postern_protocol::net::PerSource>,
    /// Messages per sending account per minute.
    pub message_rate: limits::WindowLimiter<i64>,
    /// Key claims per requesting account per minute.
    pub claims_by_requester: limits::WindowLimiter<i64>,
    /// One-time keys handed out per target username per minute.
    pub claims_by_target: limits::WindowLimiter<String>,
    pub disk: disk::DiskGuard,
    /// None when the operator turned media off (`--no-media`).
    pub media: Option<media::MediaStore>,
    pub refusals: limits::Refusals,
    pub log_client_addresses: bool,
    pub next_conn_id: AtomicU64,
}
