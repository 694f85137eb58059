//! Bidirectional copy with small per-direction buffers, an idle timeout, a half-close
//! timeout and optional refusal of a PROXY header at the start of the client's stream.

use crate::proxy_header::{signature, Signature};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Size of the copy buffer a direction starts with; it grows to the configured
/// `buffer_size` on the first read that fills it.
pub const INITIAL_BUFFER: usize = 2048;

/// How a relayed connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Both directions finished.
    Done,
    /// No traffic for the idle (or half-close) timeout.
    Idle,
    /// An I/O error on either side.
    Error,
    /// The client began with a PROXY header where none is allowed.
    ProxyUnexpected,
    /// The relay is shutting down.
    Shutdown,
}

/// Settings of one relayed connection.
pub struct CopyParams<'a> {
    /// Buffer per direction.
    pub buffer: usize,
    /// Inactivity timeout while both directions are open.
    pub idle: Duration,
    /// Inactivity timeout once one direction has finished.
    pub half_close: Duration,
    /// Refuse a PROXY signature at the start of the client's stream.
    pub refuse_proxy_header: bool,
    /// Client → upstream byte counter.
    pub up: &'a AtomicU64,
    /// Upstream → client byte counter.
    pub down: &'a AtomicU64,
    /// Cancelled when connections must be cut (end of the shutdown grace period).
    pub cancel: &'a CancellationToken,
}

enum DirEnd {
    Eof,
    Err,
    Proxy,
}

async fn one_way<R, W>(
    mut r: R,
    mut w: W,
    buffer: usize,
    counter: &AtomicU64,
    activity: &AtomicU64,
    origin: Instant,
    mut guard_proxy: bool,
) -> DirEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Start small: most chat connections are idle most of the time. A read that fills the
    // buffer means bulk traffic, and the buffer grows to its configured size.
    let mut buf = vec![0u8; buffer.min(INITIAL_BUFFER)];
    let mut held: Vec<u8> = Vec::new();
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) => {
                if !held.is_empty() && w.write_all(&held).await.is_err() {
                    return DirEnd::Err;
                }
                let _ = w.shutdown().await;
                return DirEnd::Eof;
            }
            Ok(n) => n,
            Err(_) => return DirEnd::Err,
        };
        let grow = n == buf.len() && buf.len() < buffer;
        activity.store(origin.elapsed().as_millis() as u64, Ordering::Relaxed);
        let data: &[u8] = if guard_proxy {
            held.extend_from_slice(&buf[..n]);
            match signature(&held) {
                Signature::Yes => return DirEnd::Proxy,
                Signature::Maybe => continue,
                Signature::No => {
                    guard_proxy = false;
                    &held
                }
            }
        } else {
            &buf[..n]
        };
        if w.write_all(data).await.is_err() {
            return DirEnd::Err;
        }
        counter.fetch_add(data.len() as u64, Ordering::Relaxed);
        activity.store(origin.elapsed().as_millis() as u64, Ordering::Relaxed);
        if !held.is_empty() && !guard_proxy {
            held = Vec::new();
        }
        if grow {
            buf.resize(buffer, 0);
        }
    }
}

/// Relays between `client` and `upstream` until both directions end or a timeout hits.
pub async fn relay<C, U>(client: C, upstream: U, p: CopyParams<'_>) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (cr, cw) = tokio::io::split(client);
    let (ur, uw) = tokio::io::split(upstream);
    let origin = Instant::now();
    let activity = AtomicU64::new(0);
    let up = one_way(
        cr,
        uw,
        p.buffer,
        p.up,
        &activity,
        origin,
        p.refuse_proxy_header,
    );
    let down = one_way(ur, cw, p.buffer, p.down, &activity, origin, false);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let mut limit = p.idle;
    loop {
        let last = origin + Duration::from_millis(activity.load(Ordering::Relaxed));
        let deadline = last + limit;
        tokio::select! {
            r = &mut up, if !up_done => {
                up_done = true;
                match r {
                    DirEnd::Eof => {}
                    DirEnd::Err => return End::Error,
                    DirEnd::Proxy => return End::ProxyUnexpected,
                }
            }
            r = &mut down, if !down_done => {
                down_done = true;
                if !matches!(r, DirEnd::Eof) { return End::Error; }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let last = origin + Duration::from_millis(activity.load(Ordering::Relaxed));
                if Instant::now() >= last + limit {
                    return End::Idle;
                }
            }
            _ = p.cancel.cancelled() => return End::Shutdown,
        }
        if up_done && down_done {
            return End::Done;
        }
        if up_done || down_done {
            // One side finished: the other direction now gets the half-close timeout,
            // counted from now.
            if limit != p.half_close {
                limit = p.half_close;
                activity.store(origin.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
        }
    }
}
