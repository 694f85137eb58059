//! Helpers shared by Postern's fuzz targets (`fuzz_targets/`) and the seed generator
//! (`examples/seeds.rs`).
//!
//! The parsers under test are the real ones, called through their public entry points; the
//! helpers only drive them: a runtime for the async readers, a reader that hands bytes over
//! in chosen segments (a slow or fragmenting peer), and the client half of the Noise
//! handshake built from `snow` so that the *server's* code decodes payloads the fuzzer
//! chose.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use postern_protocol::noise::{StaticKeypair, NOISE_PARAMS, PROLOGUE};
use tokio::io::{AsyncRead, ReadBuf};

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime always builds");
}

/// Runs `fut` to completion on a per-thread runtime (with timers, which the handshake's
/// deadline needs; inputs are in memory, so nothing ever waits for them).
pub fn block_on<F: Future>(fut: F) -> F::Output {
    RUNTIME.with(|rt| rt.block_on(fut))
}

/// A reader that returns `data` in segments of the given sizes (cycled; a size of 0 counts
/// as 1), then end of stream: a peer whose bytes arrive one TCP segment at a time.
pub struct Segments {
    chunks: VecDeque<Vec<u8>>,
}

impl Segments {
    pub fn new(data: &[u8], sizes: &[u8]) -> Self {
        let mut chunks = VecDeque::new();
        let mut pos = 0;
        let mut i = 0;
        while pos < data.len() {
            let size = sizes
                .get(i % sizes.len().max(1))
                .map_or(data.len(), |s| usize::from(*s).max(1));
            let end = (pos + size).min(data.len());
            chunks.push_back(data[pos..end].to_vec());
            pos = end;
            i += 1;
        }
        Self { chunks }
    }
}

impl AsyncRead for Segments {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(mut seg) = self.chunks.pop_front() {
            let n = seg.len().min(buf.remaining());
            buf.put_slice(&seg[..n]);
            if n < seg.len() {
                self.chunks.push_front(seg.split_off(n));
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The fixed identities of one fuzzing process: the server's key pair (what
/// `postern server init` writes) and a client device's raw key pair.
pub struct Keys {
    pub server: StaticKeypair,
    pub client_private: Vec<u8>,
    pub client_public: [u8; 32],
}

/// The process's keys, generated once.
pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let server = StaticKeypair::generate();
        let client = snow::Builder::new(params())
            .generate_keypair()
            .expect("key generation cannot fail");
        let mut client_public = [0u8; 32];
        client_public.copy_from_slice(&client.public);
        Keys {
            server,
            client_private: client.private.clone(),
            client_public,
        }
    })
}

fn params() -> snow::params::NoiseParams {
    NOISE_PARAMS.parse().expect("NOISE_PARAMS is valid")
}

/// A client handshake state (initiator) for the process's server key, as a real client
/// builds it.
pub fn initiator() -> snow::HandshakeState {
    let k = keys();
    snow::Builder::new(params())
        .local_private_key(&k.client_private)
        .and_then(|b| b.remote_public_key(k.server.public()))
        .and_then(|b| b.prologue(PROLOGUE))
        .and_then(|b| b.build_initiator())
        .expect("a valid initiator")
}

/// Handshake message 1 carrying `payload` (any bytes, not necessarily a `ClientHello`),
/// framed as on the wire: a `u16` length, then the message.
pub fn message_one(hs: &mut snow::HandshakeState, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 2 + 65_535];
    let n = hs
        .write_message(payload, &mut out[2..])
        .expect("payload fits a handshake message");
    let len = u16::try_from(n).expect("bounded by the buffer");
    out[..2].copy_from_slice(&len.to_be_bytes());
    out.truncate(2 + n);
    out
}

/// `payload` encrypted as transport message number `nonce` by `transport`, framed.
pub fn transport_frame(
    transport: &snow::StatelessTransportState,
    nonce: u64,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = vec![0u8; 2 + payload.len() + 16];
    let n = transport
        .write_message(nonce, payload, &mut out[2..])
        .expect("payload fits a transport message");
    let len = u16::try_from(n).expect("bounded by MAX_PAYLOAD_LEN");
    out[..2].copy_from_slice(&len.to_be_bytes());
    out.truncate(2 + n);
    out
}

/// Splits `data` into at most `max` pieces, each a `u16` big-endian length and then that
/// many bytes (cut short at the end of `data`); each piece is capped at `cap` bytes.
pub fn length_prefixed(mut data: &[u8], max: usize, cap: usize) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while out.len() < max && data.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([data[0], data[1]])).min(cap);
        let end = (2 + len).min(data.len());
        out.push(&data[2..end]);
        data = &data[end..];
    }
    out
}

/// A TLS ClientHello handshake message (without the record layer) with the given server
/// names in one SNI extension, then `padding` bytes of the padding extension. Used to make
/// seeds of shapes that real clients do not send (several names, odd lengths).
pub fn client_hello(names: &[&[u8]], padding: usize) -> Vec<u8> {
    let mut ext = Vec::new();
    if !names.is_empty() {
        let mut list = Vec::new();
        for n in names {
            list.push(0);
            list.extend_from_slice(&(n.len() as u16).to_be_bytes());
            list.extend_from_slice(n);
        }
        ext.extend_from_slice(&[0x00, 0x00]);
        ext.extend_from_slice(&((list.len() + 2) as u16).to_be_bytes());
        ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
        ext.extend_from_slice(&list);
    }
    if padding > 0 {
        ext.extend_from_slice(&[0x00, 0x15]);
        ext.extend_from_slice(&(padding as u16).to_be_bytes());
        ext.extend(std::iter::repeat_n(0u8, padding));
    }
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0);
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]);
    body.extend_from_slice(&[0x01, 0x00]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut msg = vec![0x01];
    msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    msg.extend_from_slice(&body);
    msg
}

/// `msg` cut into TLS handshake records of at most `per_record` bytes each.
pub fn records(msg: &[u8], per_record: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for c in msg.chunks(per_record.max(1)) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(c.len() as u16).to_be_bytes());
        out.extend_from_slice(c);
    }
    out
}
