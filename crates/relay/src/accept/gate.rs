//! The secret gate: on a relay with a secret, decides from a connection's first bytes
//! whether it is a Postern client holding the relay's link — then it is forwarded — or
//! anyone else, who gets the cover site with every byte read so far.
//!
//! * On a TLS listener the client sends a session-bound token right after the handshake
//!   ([`RelaySecret::tls_token`]). The bytes are compared as they arrive; the first byte
//!   that differs hands the connection to the cover site, which then sees the same bytes a
//!   web server would have seen. Comparing byte by byte leaks nothing useful: the token is
//!   new in every session, so a prober cannot learn it one byte at a time.
//! * On a plain listener the client's first bytes are an HTTP/1.1 request whose path is an
//!   HTTP token ([`RelaySecret::check_http_path`]); the relay answers `101 Switching
//!   Protocols`. A valid token's nonce goes into the [`ReplayCache`], so a recorded request
//!   replayed later gets the cover site.
//!
//! Either way a connection that stays silent for the cover's `wait` is handed to the cover
//! site (which then waits for a request like any web server).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use postern_protocol::relay_auth::{RelaySecret, TOKEN_LEN};
use sha1::{Digest, Sha1};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};

/// The gate of a relay with a secret.
pub struct Gate {
    /// The relay's secret.
    pub secret: RelaySecret,
    /// Nonces of HTTP tokens already used.
    pub replay: ReplayCache,
    /// Where everyone else goes.
    pub cover: std::sync::Arc<crate::cover::Cover>,
    /// How long a connection may stay silent before it is handed to the cover site.
    pub wait: Duration,
}

/// Largest HTTP request head the gate reads before deciding (a client's is ~250 bytes).
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// What the gate decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A client with the secret; `leftover` are the bytes after its proof (the start of
    /// its Noise handshake), to be forwarded first.
    Client {
        /// Bytes read past the proof.
        leftover: Vec<u8>,
    },
    /// Anyone else: serve the cover site, replaying `read` first.
    Cover {
        /// Every byte read from the connection so far.
        read: Vec<u8>,
    },
}

/// Reads the TLS token. `expected` is `None` when the session has no exporter secret
/// (TLS 1.2), which no Postern client uses: such a session goes to the cover site at once.
pub async fn tls_token<S: AsyncRead + Unpin>(
    io: &mut S,
    expected: Option<[u8; TOKEN_LEN]>,
    wait: Duration,
) -> Verdict {
    let Some(expected) = expected else {
        return Verdict::Cover { read: Vec::new() };
    };
    let deadline = Instant::now() + wait;
    let mut read = Vec::new();
    loop {
        let before = read.len();
        if !read_more(io, deadline, &mut read).await {
            return Verdict::Cover { read };
        }
        let upto = read.len().min(TOKEN_LEN);
        if read[before.min(TOKEN_LEN)..upto] != expected[before.min(TOKEN_LEN)..upto] {
            return Verdict::Cover { read };
        }
        if read.len() >= TOKEN_LEN {
            return Verdict::Client {
                leftover: read.split_off(TOKEN_LEN),
            };
        }
    }
}

/// Reads an HTTP request head; a valid, fresh HTTP token in its path is answered with
/// `101 Switching Protocols` and makes the connection a client's.
pub async fn http_request<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    secret: &RelaySecret,
    replay: &ReplayCache,
    wait: Duration,
) -> Verdict {
    let deadline = Instant::now() + wait;
    let mut read = Vec::new();
    loop {
        if !read_more(io, deadline, &mut read).await {
            return Verdict::Cover { read };
        }
        match inspect_head(&read, secret, now_unix()) {
            Head::Partial if read.len() < MAX_REQUEST_HEAD => continue,
            Head::Partial | Head::NotOurs => return Verdict::Cover { read },
            Head::Ours {
                len,
                nonce,
                websocket_key,
            } => {
                if !replay.insert(nonce, Instant::now()) {
                    tracing::debug!("replayed relay HTTP token: cover site");
                    return Verdict::Cover { read };
                }
                let response = switching_protocols(websocket_key.as_deref());
                if io.write_all(response.as_bytes()).await.is_err() {
                    return Verdict::Cover { read };
                }
                return Verdict::Client {
                    leftover: read.split_off(len),
                };
            }
        }
    }
}

/// Appends the next bytes from `io` to `read`; false on silence until `deadline`, end of
/// stream or an error — the cover site then deals with it as a web server would (it reads
/// the same end of stream or error again).
async fn read_more<S: AsyncRead + Unpin>(
    io: &mut S,
    deadline: Instant,
    read: &mut Vec<u8>,
) -> bool {
    let mut chunk = [0u8; 2048];
    match timeout_at(deadline, io.read(&mut chunk)).await {
        Ok(Ok(n)) if n > 0 => {
            read.extend_from_slice(&chunk[..n]);
            true
        }
        _ => false,
    }
}

/// What the bytes read so far are.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// Could still become a client's request.
    Partial,
    /// Not a client's request (not HTTP, another path, a bad or stale token).
    NotOurs,
    /// A complete client request of `len` bytes.
    Ours {
        len: usize,
        nonce: [u8; 16],
        websocket_key: Option<String>,
    },
}

fn inspect_head(buf: &[u8], secret: &RelaySecret, now: u64) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let status = match req.parse(buf) {
        Ok(s) => s,
        Err(_) => return Head::NotOurs,
    };
    // Decide as soon as the request line is there, so a web request reaches the cover
    // site without waiting for the rest of its head.
    if let Some(method) = req.method {
        if method != "GET" {
            return Head::NotOurs;
        }
    }
    let nonce = match req.path {
        Some(path) => match secret.check_http_path(path, now) {
            Ok(nonce) => nonce,
            Err(_) => return Head::NotOurs,
        },
        None => return Head::Partial,
    };
    match status {
        httparse::Status::Partial => Head::Partial,
        httparse::Status::Complete(len) => Head::Ours {
            len,
            nonce,
            websocket_key: req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(|v| v.trim().to_string()),
        },
    }
}

/// The relay's answer to a client's request: a WebSocket-style upgrade, as a proxy on
/// port 80 in front of a chat service would send it.
fn switching_protocols(websocket_key: Option<&str>) -> String {
    let mut response = String::from(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    );
    if let Some(key) = websocket_key {
        // RFC 6455 §4.2.2.
        let mut sha = Sha1::new();
        sha.update(key.as_bytes());
        sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        response.push_str(&format!(
            "Sec-WebSocket-Accept: {}\r\n",
            STANDARD.encode(sha.finalize())
        ));
    }
    response.push_str("\r\n");
    response
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Nonces of HTTP tokens already used, kept while their tokens could still be accepted
/// (twice the allowed clock skew). Only tokens with a valid MAC get here, so only holders
/// of the secret can fill it; past [`ReplayCache::MAX`] live entries new tokens are refused
/// (the client retries, over TLS or a little later).
#[derive(Debug, Default)]
pub struct ReplayCache {
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    nonces: HashMap<[u8; 16], Instant>,
    /// When expired nonces were last dropped (a sweep is a pass over all of them, so it
    /// runs at most every [`ReplayCache::SWEEP_EVERY`] unless the cache is full).
    swept: Option<Instant>,
}

impl ReplayCache {
    /// Most nonces remembered at once.
    pub const MAX: usize = 100_000;

    /// How long a nonce is remembered.
    pub const KEEP: Duration =
        Duration::from_secs(2 * postern_protocol::relay_auth::HTTP_TOKEN_SKEW.as_secs());

    /// Most often expired nonces are swept while the cache is not full.
    pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

    /// Records `nonce` at `now`; false if it was seen before (a replay) or the cache is full.
    pub fn insert(&self, nonce: [u8; 16], now: Instant) -> bool {
        let mut guard = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *guard;
        let due = state
            .swept
            .is_none_or(|t| now.saturating_duration_since(t) >= Self::SWEEP_EVERY);
        if state.nonces.len() >= Self::MAX || due {
            state
                .nonces
                .retain(|_, at| now.saturating_duration_since(*at) < Self::KEEP);
            state.swept = Some(now);
        }
        let seen = &mut state.nonces;
        if seen.len() >= Self::MAX {
            tracing::warn!("relay HTTP token replay cache full: refusing new HTTP clients for now");
            return false;
        }
        match seen.entry(nonce) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                if now.saturating_duration_since(*e.get()) < Self::KEEP {
                    false
                } else {
                    e.insert(now);
                    true
                }
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::AsyncWriteExt;

    async fn tls_verdict(sent: &[u8], expected: [u8; TOKEN_LEN]) -> Verdict {
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(sent).await.unwrap();
        drop(client);
        tls_token(&mut server, Some(expected), Duration::from_secs(5)).await
    }

    #[tokio::test]
    async fn the_tls_token_opens_the_gate_and_keeps_what_follows() {
        let token = [7u8; TOKEN_LEN];
        let mut sent = token.to_vec();
        sent.extend_from_slice(b"noise");
        assert_eq!(
            tls_verdict(&sent, token).await,
            Verdict::Client {
                leftover: b"noise".to_vec()
            }
        );
    }

    #[tokio::test]
    async fn anything_else_goes_to_the_cover_with_every_byte_read() {
        let token = [7u8; TOKEN_LEN];
        let request = b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n".to_vec();
        assert_eq!(
            tls_verdict(&request, token).await,
            Verdict::Cover { read: request }
        );
        // A wrong last byte: everything read goes on to the cover.
        let mut almost = token.to_vec();
        almost[TOKEN_LEN - 1] ^= 1;
        assert_eq!(
            tls_verdict(&almost, token).await,
            Verdict::Cover {
                read: almost.clone()
            }
        );
        // A prefix of the token and then end of stream.
        assert_eq!(
            tls_verdict(&token[..10], token).await,
            Verdict::Cover {
                read: token[..10].to_vec()
            }
        );
        // TLS 1.2 (no exporter secret) never authenticates.
        let (_c, mut server) = tokio::io::duplex(64);
        assert_eq!(
            tls_token(&mut server, None, Duration::from_secs(1)).await,
            Verdict::Cover { read: vec![] }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_goes_to_the_cover_after_the_wait() {
        let (_client, mut server) = tokio::io::duplex(64);
        let started = Instant::now();
        let v = tls_token(&mut server, Some([1; TOKEN_LEN]), Duration::from_secs(5)).await;
        assert_eq!(v, Verdict::Cover { read: vec![] });
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    fn client_request(secret: &RelaySecret, now: u64) -> String {
        format!(
            "GET {} HTTP/1.1\r\nHost: relay.example.org\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            secret.http_token(now).path
        )
    }

    async fn http_verdict(
        sent: &[u8],
        secret: &RelaySecret,
        replay: &ReplayCache,
    ) -> (Verdict, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(16 * 1024);
        client.write_all(sent).await.unwrap();
        let v = http_request(&mut server, secret, replay, Duration::from_secs(5)).await;
        drop(server);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        (v, answer)
    }

    #[tokio::test]
    async fn an_http_token_upgrades_once_and_its_replay_gets_the_cover() {
        let secret = RelaySecret::generate();
        let replay = ReplayCache::default();
        let request = client_request(&secret, now_unix());
        let mut sent = request.clone().into_bytes();
        sent.extend_from_slice(b"noise");
        let (v, answer) = http_verdict(&sent, &secret, &replay).await;
        assert_eq!(
            v,
            Verdict::Client {
                leftover: b"noise".to_vec()
            }
        );
        let answer = String::from_utf8(answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        // RFC 6455's own example key and answer.
        assert!(answer.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));

        let (v, answer) = http_verdict(&sent, &secret, &replay).await;
        assert_eq!(v, Verdict::Cover { read: sent });
        assert!(answer.is_empty(), "the gate itself never answers a replay");
    }

    #[tokio::test]
    async fn web_requests_and_foreign_tokens_get_the_cover() {
        let secret = RelaySecret::generate();
        let replay = ReplayCache::default();
        let other = client_request(&RelaySecret::generate(), now_unix()).into_bytes();
        let stale = client_request(&secret, now_unix() - 600).into_bytes();
        let post = client_request(&secret, now_unix())
            .replacen("GET", "POST", 1)
            .into_bytes();
        for sent in [
            b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n".to_vec(),
            b"GET /index.html HTTP/1.1\r\n".to_vec(),
            b"\x16\x03\x01\x02\x00random".to_vec(),
            other,
            stale,
            post,
        ] {
            let (v, answer) = http_verdict(&sent, &secret, &replay).await;
            assert_eq!(v, Verdict::Cover { read: sent });
            assert!(answer.is_empty());
        }
    }

    #[test]
    fn a_request_line_decides_before_the_head_is_complete() {
        let secret = RelaySecret::generate();
        assert_eq!(
            inspect_head(b"GET /index.html HTTP/1.1\r\nHo", &secret, now_unix()),
            Head::NotOurs
        );
        assert_eq!(inspect_head(b"GE", &secret, now_unix()), Head::Partial);
        let own = client_request(&secret, now_unix());
        assert_eq!(
            inspect_head(&own.as_bytes()[..own.len() - 4], &secret, now_unix()),
            Head::Partial
        );
    }

    #[test]
    fn the_replay_cache_forgets_only_expired_nonces() {
        let cache = ReplayCache::default();
        let t0 = Instant::now();
        assert!(cache.insert([1; 16], t0));
        assert!(!cache.insert([1; 16], t0 + Duration::from_secs(1)));
        assert!(cache.insert([2; 16], t0));
        assert!(cache.insert([1; 16], t0 + ReplayCache::KEEP));
    }

    proptest! {
        #[test]
        fn inspecting_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let secret = RelaySecret::generate();
            let _ = inspect_head(&bytes, &secret, 1_800_000_000);
        }
    }
}
