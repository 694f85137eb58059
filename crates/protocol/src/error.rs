//! Errors of the wire protocol.

use std::io;

/// What went wrong while speaking the protocol on one connection.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error(
        "the server did not prove its identity: the connection may be intercepted \
         (the server key does not match the network file, or a relay on the path altered the traffic)"
    )]
    ServerAuthentication,
    #[error(
        "the service did not answer: the connection was closed during the handshake \
         (a relay may not reach the server, or the server is overloaded)"
    )]
    HandshakeClosed,
    #[error("the handshake was not made for this server's key")]
    HandshakeUndecryptable,
    #[error("the Noise handshake failed: {0}")]
    Handshake(String),
    #[error("a message failed authentication: the traffic was altered on the way")]
    Decrypt,
    #[error("malformed message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("protocol violation: {0}")]
    Violation(String),
    #[error("timed out after {0:?} waiting for the peer")]
    Timeout(std::time::Duration),
    #[error("invalid PROXY header: {0}")]
    ProxyHeader(String),
}
