//! Proving a relay's secret (see [`postern_protocol::relay_auth`]): a relay with a secret
//! forwards a connection only when the client shows, first thing, that it holds the
//! relay's link; everyone else gets the relay's cover web site.
//!
//! * Over TLS: right after the handshake, a token bound to the TLS session (an HMAC keyed
//!   by the secret over the session's exporter master secret, captured per connection by
//!   [`super::browser_tls`]).
//! * On a plain port: an HTTP/1.1 `GET` whose path is a fresh HTTP token, shaped like a
//!   WebSocket upgrade; the relay answers `101 Switching Protocols`. The client does not
//!   wait for the answer: its Noise handshake follows at once, and [`Upgraded`] reads the
//!   answer's head off the stream before the first Noise byte.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use postern_protocol::relay_auth::RelaySecret;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest answer head accepted from a relay's port 80.
const MAX_ANSWER_HEAD: usize = 4096;

/// What the far end says when it is a web site rather than a relay that took the proof:
/// the link's secret is missing, wrong or old.
pub const WEB_SITE_ANSWER: &str = "the relay answered as a web site";

/// The HTTP request that opens a plain connection to a relay with a secret.
pub fn upgrade_request(secret: &RelaySecret, host: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    postern_protocol::relay_auth::http_upgrade_request(secret, host, now)
}

/// Whether the first bytes a relay sent are a web page rather than the chat service (or
/// the relay's `101` answer).
pub fn is_web_answer(first: &[u8]) -> bool {
    first.starts_with(b"HTTP/") && !first.starts_with(b"HTTP/1.1 101")
}

/// A plain stream to a relay's port 80 after the upgrade request: the first read consumes
/// the relay's answer head (it must be `101`), then bytes flow untouched.
pub struct Upgraded<S> {
    inner: S,
    /// The answer head read so far; `None` once it has been read and checked.
    head: Option<Vec<u8>>,
    /// Bytes that came after the head in the same read.
    pending: Vec<u8>,
}

impl<S> Upgraded<S> {
    pub fn new(inner: S) -> Self {
        Upgraded {
            inner,
            head: Some(Vec::new()),
            pending: Vec::new(),
        }
    }
}

fn web_site() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, WEB_SITE_ANSWER)
}

impl<S: AsyncRead + Unpin> AsyncRead for Upgraded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while let Some(head) = &mut this.head {
            let mut chunk = [0u8; 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            head.extend_from_slice(rb.filled());
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut answer = httparse::Response::new(&mut headers);
            match answer.parse(head) {
                Ok(httparse::Status::Complete(len)) => {
                    if answer.code != Some(101) {
                        return Poll::Ready(Err(web_site()));
                    }
                    this.pending = head.split_off(len);
                    this.head = None;
                }
                Ok(httparse::Status::Partial) if head.len() < MAX_ANSWER_HEAD => {}
                _ => return Poll::Ready(Err(web_site())),
            }
        }
        if !this.pending.is_empty() {
            let n = this.pending.len().min(buf.remaining());
            buf.put_slice(&this.pending[..n]);
            this.pending.drain(..n);
            if this.pending.is_empty() {
                this.pending = Vec::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Upgraded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_answer_head_is_consumed_and_what_follows_kept() {
        let (mut relay, client) = tokio::io::duplex(4096);
        relay
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\nnoise")
            .await
            .unwrap();
        drop(relay);
        let mut up = Upgraded::new(client);
        let mut got = Vec::new();
        up.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"noise");
    }

    #[tokio::test]
    async fn a_web_page_is_an_error_naming_it() {
        let (mut relay, client) = tokio::io::duplex(4096);
        relay
            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        let mut up = Upgraded::new(client);
        let e = up.read_u8().await.unwrap_err();
        assert_eq!(e.to_string(), WEB_SITE_ANSWER);
        assert!(is_web_answer(b"HTTP/1.1 400 Bad Request"));
        assert!(!is_web_answer(b"HTTP/1.1 101 Switching"));
    }

    #[test]
    fn the_request_carries_a_token_the_relay_accepts() {
        let secret = RelaySecret::generate();
        let req = upgrade_request(&secret, "2001:db8::1");
        let path = req.split(' ').nth(1).unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(secret.check_http_path(path, now).is_ok());
        assert!(req.contains("\r\nHost: [2001:db8::1]\r\n"));
        assert!(req.ends_with("\r\n\r\n"));
    }
}
