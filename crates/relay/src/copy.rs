//! Bidirectional copy with an idle timeout, a half-close timeout and optional refusal of a
//! PROXY header at the start of the client's stream.
//!
//! Memory: an idle connection holds **no copy buffer**. Each direction reads into a per-thread
//! scratch buffer (`buffer_size` bytes) and writes straight from it; only bytes the writer
//! cannot take at once are copied into a per-connection buffer, which is freed as soon as the
//! reader has nothing more to give. A chat relay holds thousands of mostly idle connections, so
//! this is what keeps its per-connection footprint small (see `docs/benchmarks.md`).
//!
//! Both directions are driven by one future, without `tokio::io::split` (no lock per poll).

use crate::proxy_header::{signature, Signature};
use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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
    /// Largest read per direction (the per-thread scratch buffer), and the most a slow writer
    /// can make a connection hold per direction.
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DirEnd {
    Eof,
    Err,
    Proxy,
}

thread_local! {
    /// Read buffer shared by every connection polled on this thread.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// One direction's state.
#[derive(Default)]
struct Dir {
    /// Bytes read but not yet accepted by the writer (empty, unallocated, while idle).
    pending: Vec<u8>,
    /// Start of the unwritten part of `pending`.
    pos: usize,
    /// The reader reached EOF: finish writing, then shut the writer down.
    eof: bool,
    /// Still checking the start of the stream for a PROXY signature.
    guard_proxy: bool,
    /// Finished (with this result).
    done: Option<DirEnd>,
}

/// Writes `data` until done or the writer is not ready; returns bytes written.
fn write_some<W: AsyncWrite + Unpin>(
    w: &mut W,
    cx: &mut Context<'_>,
    data: &[u8],
    counter: &AtomicU64,
) -> Result<usize, ()> {
    let mut off = 0;
    while off < data.len() {
        match Pin::new(&mut *w).poll_write(cx, &data[off..]) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Err(()),
            Poll::Ready(Ok(n)) => {
                off += n;
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
            Poll::Pending => break,
        }
    }
    Ok(off)
}

impl Dir {
    /// Moves bytes from `r` to `w` until one of them is not ready or the direction ends.
    /// Sets `active` when bytes moved.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        buffer: usize,
        counter: &AtomicU64,
        active: &mut bool,
    ) -> Poll<DirEnd>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if let Some(d) = self.done {
            return Poll::Ready(d);
        }
        let end = loop {
            // 1. Finish what the writer could not take earlier.
            if self.pos < self.pending.len() && !self.guard_proxy {
                match write_some(w, cx, &self.pending[self.pos..], counter) {
                    Err(()) => break DirEnd::Err,
                    Ok(n) => {
                        if n > 0 {
                            *active = true;
                        }
                        self.pos += n;
                        if self.pos < self.pending.len() {
                            return Poll::Pending;
                        }
                        self.pending.clear();
                        self.pos = 0;
                    }
                }
            }
            if self.eof {
                match Pin::new(&mut *w).poll_shutdown(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(_) => break DirEnd::Eof,
                }
            }
            // 2. Read into the thread's scratch buffer and write straight from it.
            let step = SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                if s.len() < buffer {
                    s.resize(buffer, 0);
                }
                let mut rb = ReadBuf::new(&mut s[..buffer]);
                match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                    Poll::Pending => Step::Idle,
                    Poll::Ready(Err(_)) => Step::End(DirEnd::Err),
                    Poll::Ready(Ok(())) if rb.filled().is_empty() => Step::Eof,
                    Poll::Ready(Ok(())) => {
                        *active = true;
                        let data = rb.filled();
                        if self.guard_proxy {
                            self.pending.extend_from_slice(data);
                            return match signature(&self.pending) {
                                Signature::Yes => Step::End(DirEnd::Proxy),
                                Signature::Maybe => Step::Again,
                                Signature::No => {
                                    self.guard_proxy = false;
                                    Step::Again
                                }
                            };
                        }
                        match write_some(w, cx, data, counter) {
                            Err(()) => Step::End(DirEnd::Err),
                            Ok(n) if n == data.len() => Step::Again,
                            Ok(n) => {
                                // The writer is full: keep the rest, at most `buffer` bytes.
                                self.pending.extend_from_slice(&data[n..]);
                                self.pos = 0;
                                Step::Blocked
                            }
                        }
                    }
                }
            });
            match step {
                Step::Again => continue,
                Step::Blocked => return Poll::Pending,
                Step::End(e) => break e,
                Step::Eof => {
                    // A stream shorter than a PROXY signature: pass it on as is.
                    self.guard_proxy = false;
                    self.eof = true;
                    continue;
                }
                Step::Idle => {
                    // Nothing to read: push out anything a TLS writer still buffers, and
                    // give the memory back while the connection is quiet.
                    if let Poll::Ready(Err(_)) = Pin::new(&mut *w).poll_flush(cx) {
                        break DirEnd::Err;
                    }
                    if !self.guard_proxy {
                        self.pending = Vec::new();
                        self.pos = 0;
                    }
                    return Poll::Pending;
                }
            }
        };
        self.pending = Vec::new();
        self.pos = 0;
        self.done = Some(end);
        Poll::Ready(end)
    }
}

enum Step {
    Again,
    Blocked,
    Idle,
    Eof,
    End(DirEnd),
}

/// Relays between `client` and `upstream` until both directions end or a timeout hits.
pub async fn relay<C, U>(mut client: C, mut upstream: U, p: CopyParams<'_>) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Dir {
        guard_proxy: p.refuse_proxy_header,
        ..Dir::default()
    };
    let mut down = Dir::default();
    let buffer = p.buffer.max(1);
    let mut last = Instant::now();
    let mut limit = p.idle;
    let sleep = tokio::time::sleep_until(last + limit);
    let cancelled = p.cancel.cancelled();
    tokio::pin!(sleep, cancelled);
    poll_fn(|cx| {
        if cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(End::Shutdown);
        }
        let mut active = false;
        let u = up.poll(cx, &mut client, &mut upstream, buffer, p.up, &mut active);
        let d = down.poll(cx, &mut upstream, &mut client, buffer, p.down, &mut active);
        match (&u, &d) {
            (Poll::Ready(DirEnd::Proxy), _) => return Poll::Ready(End::ProxyUnexpected),
            (Poll::Ready(DirEnd::Err), _) | (_, Poll::Ready(DirEnd::Err)) => {
                return Poll::Ready(End::Error)
            }
            (Poll::Ready(_), Poll::Ready(_)) => return Poll::Ready(End::Done),
            (Poll::Ready(_), _) | (_, Poll::Ready(_)) if limit != p.half_close => {
                // One side finished: the other direction now gets the half-close timeout,
                // counted from now.
                limit = p.half_close;
                active = true;
            }
            _ => {}
        }
        let now = Instant::now();
        if active {
            last = now;
        }
        let deadline = last + limit;
        if now >= deadline {
            return Poll::Ready(End::Idle);
        }
        // The timer is only re-armed when it fires (activity just moves `last`) or when the
        // deadline comes closer (half-close).
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        if sleep.as_mut().poll(cx).is_ready() {
            sleep.as_mut().reset(deadline);
            let _ = sleep.as_mut().poll(cx);
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn params<'a>(
        buffer: usize,
        idle: Duration,
        refuse: bool,
        up: &'a AtomicU64,
        down: &'a AtomicU64,
        cancel: &'a CancellationToken,
    ) -> CopyParams<'a> {
        CopyParams {
            buffer,
            idle,
            half_close: Duration::from_secs(1).min(idle),
            refuse_proxy_header: refuse,
            up,
            down,
            cancel,
        }
    }

    #[tokio::test]
    async fn copies_both_ways_through_small_pipes() {
        // Pipes smaller than the data force the pending-buffer path.
        let (client, c_far) = tokio::io::duplex(1000);
        let (upstream, mut u_far) = tokio::io::duplex(700);
        let (up, down, cancel) = (
            AtomicU64::new(0),
            AtomicU64::new(0),
            CancellationToken::new(),
        );
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let d2 = data.clone();
        let echo = tokio::spawn(async move {
            let mut got = vec![0u8; d2.len()];
            u_far.read_exact(&mut got).await.unwrap();
            assert_eq!(got, d2);
            u_far.write_all(&got).await.unwrap();
            u_far.shutdown().await.unwrap();
        });
        let d3 = data.clone();
        let client_task = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(c_far);
            let writer = tokio::spawn(async move {
                w.write_all(&d3).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.unwrap();
            writer.await.unwrap();
            back
        });
        let end = relay(
            client,
            upstream,
            params(4096, Duration::from_secs(5), true, &up, &down, &cancel),
        )
        .await;
        assert_eq!(end, End::Done);
        assert_eq!(client_task.await.unwrap(), data);
        echo.await.unwrap();
        assert_eq!(up.load(Ordering::Relaxed), data.len() as u64);
        assert_eq!(down.load(Ordering::Relaxed), data.len() as u64);
    }

    #[tokio::test]
    async fn refuses_a_proxy_header_split_across_reads() {
        let (client, mut c_far) = tokio::io::duplex(64);
        let (upstream, mut u_far) = tokio::io::duplex(64);
        let (up, down, cancel) = (
            AtomicU64::new(0),
            AtomicU64::new(0),
            CancellationToken::new(),
        );
        tokio::spawn(async move {
            c_far.write_all(b"PRO").await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            c_far
                .write_all(b"XY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
                .await
                .unwrap();
            let _ = c_far.read(&mut [0u8; 8]).await;
        });
        let end = relay(
            client,
            upstream,
            params(8192, Duration::from_secs(5), true, &up, &down, &cancel),
        )
        .await;
        assert_eq!(end, End::ProxyUnexpected);
        let mut b = [0u8; 8];
        assert_eq!(
            u_far.read(&mut b).await.unwrap(),
            0,
            "nothing reached upstream"
        );
    }

    #[tokio::test]
    async fn idle_timeout_fires() {
        let (client, _c) = tokio::io::duplex(64);
        let (upstream, _u) = tokio::io::duplex(64);
        let (up, down, cancel) = (
            AtomicU64::new(0),
            AtomicU64::new(0),
            CancellationToken::new(),
        );
        let end = relay(
            client,
            upstream,
            params(8192, Duration::from_millis(100), false, &up, &down, &cancel),
        )
        .await;
        assert_eq!(end, End::Idle);
    }
}
