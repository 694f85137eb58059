//! Stream plumbing: a boxed bidirectional stream type, and [`Prefixed`] (shared with the
//! server, in `postern_protocol::stream`) that replays bytes already read (after a PROXY
//! header or a ClientHello) before reading from the socket.

use tokio::io::{AsyncRead, AsyncWrite};

/// Any bidirectional byte stream the relay handles (TCP, TLS over TCP, ...).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

pub use postern_protocol::stream::Prefixed;
