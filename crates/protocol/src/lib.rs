//! The Postern wire protocol, shared by the server, the client library and tools.
//!
//! A connection between a client and the server is layered like this (outermost first):
//!
//! 1. [`proxy_header`]: an optional PROXY protocol v1/v2 header, sent by a relay so the
//!    server learns the client's address. It is advisory only: nothing is authorised on it.
//! 2. [`frame`]: every unit on the wire is a big-endian `u16` length followed by that many
//!    bytes, so no frame can ever exceed [`frame::MAX_FRAME_LEN`] (65,535) bytes.
//! 3. [`noise`]: the first two frames are a Noise `IK` handshake. The client already knows
//!    the server's static key (from its [`network`] file) and refuses any server that does
//!    not hold it; the client's own static key identifies its device. Every later frame is
//!    a Noise transport message, so a relay can neither read nor forge traffic.
//! 4. [`schema`]: inside the Noise channel, protobuf messages generated from
//!    `proto/postern.proto` (the schema in one place), each frame one `ClientFrame` or
//!    `ServerFrame`.
//!
//! Message contents are additionally encrypted end to end between devices (Olm, in the
//! client crate), so the server only ever stores and forwards ciphertext.
//!
//! [`username`] holds the account-name rules both sides enforce; [`link`] the proxy
//! links (`postern://proxy?host=…`) that relays print and clients import, and
//! [`relay_auth`] the relay secrets such links may carry and the token that proves them.
//! [`client_hello`] finds a TLS ClientHello in a connection's first bytes, for the relay's
//! SNI routing and the testbed censor's SNI and fingerprint checks; [`stream`] replays the
//! bytes such peeking read ahead, for the relay and the server alike.

pub mod client_hello;
pub mod error;
pub mod frame;
pub mod fsutil;
pub mod link;
pub mod net;
pub mod network;
pub mod noise;
pub mod proxy_header;
pub mod relay_auth;
pub mod stream;
#[cfg(feature = "tls")]
pub mod tls;
pub mod units;
pub mod username;

/// Protobuf types generated from `proto/postern.proto`.
pub mod schema {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/postern.v1.rs"));
}

pub use error::ProtocolError;

/// The protocol version spoken by this crate (sent in the handshake payloads).
pub const PROTOCOL_VERSION: u32 = 1;

/// Milliseconds since the Unix epoch, the protocol's timestamp unit.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
