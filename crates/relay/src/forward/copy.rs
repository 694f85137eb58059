//! Bidirectional copy with an idle timeout, a half-close timeout and optional refusal of a
//! PROXY header at the start of the client's stream.
//!
//! Memory: an idle connection holds **no copy buffer**. Each direction reads into a per-thread
//! scratch buffer (`buffer_size` bytes) and writes straight from it; only bytes the writer
//! cannot take at once are copied into a per-connection buffer, which is freed as soon as the
//! reader has nothing more to give. A chat relay holds thousands of mostly idle connections, so
//! this is what keeps its per-connection footprint small (see `docs/benchmarks.md`).
//!
//! Between two plain TCP sockets the bytes do not pass through user space at all: they are
//! spliced through a pipe that is held only while bytes are in flight ([`crate::forward::splice`]).
//!
//! Both directions, the idle timer and the shutdown signal live in one [`Relay`] future with
//! no further allocation: it is most of what a long-lived connection costs.

use crate::forward::splice::{Moved, Pipe};
use crate::stats::ListenerStats;
use postern_protocol::proxy_header::{signature, Signature};
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

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
    /// Quiet for `park_after` with nothing buffered: the sockets can be parked
    /// ([`crate::forward::park`]). Only a relay made with [`Relay::parking`] ends this way.
    Quiet,
}

/// Settings of relayed connections (one per listener, shared by its connections).
pub struct CopyParams {
    /// Largest read per direction (the per-thread scratch buffer), and the most a slow writer
    /// can make a connection hold per direction.
    pub buffer: usize,
    /// Inactivity timeout while both directions are open.
    pub idle: Duration,
    /// Inactivity timeout once one direction has finished.
    pub half_close: Duration,
    /// Refuse a PROXY signature at the start of the client's stream.
    pub refuse_proxy_header: bool,
    /// Splice between plain TCP sockets instead of copying through user space.
    pub splice: bool,
    /// Park a connection quiet for this long (`None`: never; see [`crate::forward::park`]).
    pub park_after: Option<Duration>,
    /// Byte counters: client → upstream is `bytes_in`, upstream → client `bytes_out`.
    pub stats: Arc<ListenerStats>,
}

impl CopyParams {
    /// The settings `limits` give, counting into `stats`; whether a PROXY signature is
    /// refused is the caller's (it depends on where the bytes go).
    pub fn new(
        limits: &crate::config::Limits,
        refuse_proxy_header: bool,
        stats: Arc<ListenerStats>,
    ) -> Arc<CopyParams> {
        Arc::new(CopyParams {
            buffer: limits.buffer_size,
            idle: limits.idle_timeout,
            half_close: limits.half_close_timeout,
            refuse_proxy_header,
            splice: limits.splice,
            park_after: (!limits.park_after.is_zero()).then_some(limits.park_after),
            stats,
        })
    }
}

/// A byte stream the relay copies from and to. Plain TCP sockets say so, which lets the
/// relay splice between them.
pub trait Socket: AsyncRead + AsyncWrite + Unpin {
    /// The TCP socket itself, when this stream is one (no TLS or replay layer on top).
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }

    /// Nothing is buffered inside the stream (a TLS layer holds no partial record, no
    /// unsent ciphertext): the connection may be parked.
    fn is_quiet(&self) -> bool {
        true
    }
}

impl Socket for TcpStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl Socket for crate::stream::BoxIo {}
impl Socket for crate::stream::Prefixed<TcpStream> {
    fn is_quiet(&self) -> bool {
        self.unread().is_empty()
    }
}
#[cfg(test)]
impl Socket for tokio::io::DuplexStream {}

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
    /// The pipe holding this direction's in-flight bytes when splicing (none while idle).
    pipe: Option<Pipe>,
    /// Bytes in `pipe`.
    in_pipe: usize,
    /// May splice: enabled, both ends are TCP sockets (decided once, in [`Relay::new`]), and
    /// pipes have been available so far.
    splice: bool,
    /// Splicing now: a read filled the whole buffer, so a burst is under way. Reset when the
    /// reader runs dry: small messages go through `read`/`write`, which costs one system call
    /// less per message than `splice` (tokio knows a short read emptied the socket).
    bursting: bool,
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
    fn new(guard_proxy: bool, splice: bool) -> Dir {
        Dir {
            guard_proxy,
            splice,
            ..Dir::default()
        }
    }

    /// Both ends open, nothing held: parking loses nothing.
    fn is_quiet(&self) -> bool {
        self.done.is_none()
            && !self.eof
            && !self.guard_proxy
            && self.pending.is_empty()
            && self.in_pipe == 0
    }

    /// Gives the (empty) pipe back to the thread's pool while the reader is quiet.
    fn release_pipe(&mut self) {
        if self.in_pipe == 0 {
            if let Some(p) = self.pipe.take() {
                p.give_back();
            }
        }
    }

    /// Moves bytes from `r` to `w` until one of them is not ready or the direction ends.
    /// Sets `active` when bytes moved.
    fn poll<R: Socket, W: Socket>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        buffer: usize,
        counter: &AtomicU64,
        active: &mut bool,
    ) -> Poll<DirEnd> {
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
            if self.in_pipe > 0 {
                let (Some(pipe), Some(dst)) = (&self.pipe, w.tcp()) else {
                    unreachable!("bytes are only spliced between TCP sockets")
                };
                match pipe.drain(cx, dst, self.in_pipe) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(_)) => break DirEnd::Err,
                    Poll::Ready(Ok(n)) => {
                        *active = true;
                        self.in_pipe -= n;
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        continue;
                    }
                }
            }
            if self.eof {
                match Pin::new(&mut *w).poll_shutdown(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(_) => break DirEnd::Eof,
                }
            }
            // 2. Read: splice into a pipe between TCP sockets, otherwise into the thread's
            //    scratch buffer and write straight from it.
            let spliced = match (self.bursting, r.tcp()) {
                (true, Some(src)) => Some(self.splice_in(cx, src, active)),
                _ => None,
            };
            let step = match spliced {
                Some(step) => step,
                None => self.read_and_write(cx, r, w, buffer, counter, active),
            };
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
                    self.release_pipe();
                    self.bursting = false;
                    return Poll::Pending;
                }
            }
        };
        self.pending = Vec::new();
        self.pos = 0;
        self.release_pipe();
        self.pipe = None;
        self.done = Some(end);
        Poll::Ready(end)
    }

    /// Splices what `src` has into this direction's pipe (taken from the pool on demand).
    fn splice_in(&mut self, cx: &mut Context<'_>, src: &TcpStream, active: &mut bool) -> Step {
        let pipe = match &self.pipe {
            Some(p) => p,
            None => match Pipe::take() {
                Ok(p) => self.pipe.insert(p),
                Err(e) => {
                    // Out of file descriptors, or not Linux: copy instead, for good.
                    tracing::debug!(error = %e, "no pipe for splicing, copying instead");
                    self.splice = false;
                    self.bursting = false;
                    return Step::Again;
                }
            },
        };
        match pipe.fill(cx, src) {
            Poll::Pending => Step::Idle,
            Poll::Ready(Err(_)) => Step::End(DirEnd::Err),
            Poll::Ready(Ok(Moved::Eof)) => Step::Eof,
            Poll::Ready(Ok(Moved::Bytes(n))) => {
                *active = true;
                self.in_pipe = n;
                Step::Again
            }
        }
    }

    /// One read into the thread's scratch buffer, written on at once.
    fn read_and_write<R: Socket, W: Socket>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        buffer: usize,
        counter: &AtomicU64,
        active: &mut bool,
    ) -> Step {
        SCRATCH.with(|s| {
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
                    // A full read means more is waiting: splice the rest of the burst.
                    self.bursting = self.splice && data.len() == buffer;
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
        })
    }
}

enum Step {
    Again,
    Blocked,
    Idle,
    Eof,
    End(DirEnd),
}

pin_project_lite::pin_project! {
    /// A relayed connection: copies both ways until both directions end, a timeout hits, or
    /// the relay cuts its connections.
    pub struct Relay<C, U> {
        // Taken out only when the connection is parked (then the future is done).
        client: Option<C>,
        upstream: Option<U>,
        up: Dir,
        down: Dir,
        params: Arc<CopyParams>,
        // Last time bytes moved.
        last: Instant,
        // One direction has finished: the half-close timeout applies.
        half_closed: bool,
        // Ends with `End::Quiet` after `params.park_after` without traffic.
        may_park: bool,
        #[pin]
        timer: Sleep,
        #[pin]
        cancelled: WaitForCancellationFutureOwned,
    }
}

impl<C: Socket, U: Socket> Relay<C, U> {
    /// Relays between `client` and `upstream`; `cut` ends it early.
    pub fn new(client: C, upstream: U, params: Arc<CopyParams>, cut: CancellationToken) -> Self {
        let guard = params.refuse_proxy_header;
        Self::with_state(client, upstream, params, cut, Instant::now(), guard)
    }

    /// Relays a connection that was parked (the start of its stream was checked before).
    ///
    /// Its timers start afresh: the sockets have just been registered with the runtime, whose
    /// first report of their readiness comes a moment after this future is first polled.
    /// Counted from the last traffic instead, a connection woken after `park_after` would be
    /// quiet again at once, park before that report arrived, and be woken again by the same
    /// bytes, forever.
    pub fn resume(client: C, upstream: U, params: Arc<CopyParams>, cut: CancellationToken) -> Self {
        Self::with_state(client, upstream, params, cut, Instant::now(), false).parking()
    }

    fn with_state(
        client: C,
        upstream: U,
        params: Arc<CopyParams>,
        cut: CancellationToken,
        last: Instant,
        guard_proxy: bool,
    ) -> Self {
        let splice = params.splice && client.tcp().is_some() && upstream.tcp().is_some();
        Relay {
            up: Dir::new(guard_proxy, splice),
            down: Dir::new(false, splice),
            timer: tokio::time::sleep_until(last + params.idle),
            cancelled: cut.cancelled_owned(),
            last,
            half_closed: false,
            may_park: false,
            client: Some(client),
            upstream: Some(upstream),
            params,
        }
    }

    /// Ends with [`End::Quiet`] once quiet for the settings' `park_after` (if set); the
    /// caller then takes the sockets with [`Relay::take_sockets`].
    pub fn parking(mut self) -> Self {
        if let Some(after) = self.params.park_after {
            self.may_park = true;
            self.timer = tokio::time::sleep_until(self.last + after.min(self.params.idle));
        }
        self
    }

    /// After [`End::Quiet`]: the two sockets, the settings and when bytes last moved.
    pub fn take_sockets(self: Pin<&mut Self>) -> Option<(C, U, Arc<CopyParams>, Instant)> {
        let this = self.project();
        this.up.release_pipe();
        this.down.release_pipe();
        Some((
            this.client.take()?,
            this.upstream.take()?,
            this.params.clone(),
            *this.last,
        ))
    }
}

impl<C: Socket, U: Socket> Future for Relay<C, U> {
    type Output = End;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<End> {
        let mut this = self.project();
        if this.cancelled.poll(cx).is_ready() {
            return Poll::Ready(End::Shutdown);
        }
        let (Some(client), Some(upstream)) = (this.client.as_mut(), this.upstream.as_mut()) else {
            // Parked: the sockets have left; nothing more happens here.
            return Poll::Ready(End::Quiet);
        };
        let p = &*this.params;
        let buffer = p.buffer.max(1);
        let mut active = false;
        let u = this.up.poll(
            cx,
            &mut *client,
            &mut *upstream,
            buffer,
            &p.stats.bytes_in,
            &mut active,
        );
        let d = this.down.poll(
            cx,
            &mut *upstream,
            &mut *client,
            buffer,
            &p.stats.bytes_out,
            &mut active,
        );
        match (&u, &d) {
            (Poll::Ready(DirEnd::Proxy), _) => {
                // Counted here, before the sockets close, so the counter is never behind.
                p.stats.fail(crate::stats::FailReason::ProxyUnexpected);
                return Poll::Ready(End::ProxyUnexpected);
            }
            (Poll::Ready(DirEnd::Err), _) | (_, Poll::Ready(DirEnd::Err)) => {
                return Poll::Ready(End::Error)
            }
            (Poll::Ready(_), Poll::Ready(_)) => return Poll::Ready(End::Done),
            (Poll::Ready(_), _) | (_, Poll::Ready(_)) if !*this.half_closed => {
                // One side finished: the other direction now gets the half-close timeout,
                // counted from now.
                *this.half_closed = true;
                active = true;
            }
            _ => {}
        }
        let now = Instant::now();
        if active {
            *this.last = now;
        }
        let limit = if *this.half_closed {
            p.half_close
        } else {
            p.idle
        };
        let mut deadline = *this.last + limit;
        if now >= deadline {
            return Poll::Ready(End::Idle);
        }
        if let (true, false, Some(after)) = (*this.may_park, *this.half_closed, p.park_after) {
            let quiet = this.up.is_quiet()
                && this.down.is_quiet()
                && client.is_quiet()
                && upstream.is_quiet();
            if quiet {
                let park_at = *this.last + after;
                if now >= park_at {
                    return Poll::Ready(End::Quiet);
                }
                deadline = deadline.min(park_at);
            }
        }
        // The timer is only re-armed when it fires (activity just moves `last`) or when the
        // deadline comes closer (half-close).
        if this.timer.deadline() > deadline {
            this.timer.as_mut().reset(deadline);
        }
        if this.timer.as_mut().poll(cx).is_ready() {
            this.timer.as_mut().reset(deadline);
            let _ = this.timer.as_mut().poll(cx);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn params(
        buffer: usize,
        idle: Duration,
        refuse: bool,
    ) -> (Arc<CopyParams>, Arc<ListenerStats>) {
        let stats = ListenerStats::new("test", "plain", "127.0.0.1:1".parse().unwrap());
        let p = CopyParams {
            buffer,
            idle,
            half_close: Duration::from_secs(1).min(idle),
            refuse_proxy_header: refuse,
            splice: true,
            park_after: None,
            stats: stats.clone(),
        };
        (Arc::new(p), stats)
    }

    async fn relay<C: Socket, U: Socket>(client: C, upstream: U, p: Arc<CopyParams>) -> End {
        Relay::new(client, upstream, p, CancellationToken::new()).await
    }

    #[tokio::test]
    async fn copies_both_ways_through_small_pipes() {
        // Pipes smaller than the data force the pending-buffer path.
        let (client, c_far) = tokio::io::duplex(1000);
        let (upstream, mut u_far) = tokio::io::duplex(700);
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
        let (p, stats) = params(4096, Duration::from_secs(5), true);
        let end = relay(client, upstream, p).await;
        assert_eq!(end, End::Done);
        assert_eq!(client_task.await.unwrap(), data);
        echo.await.unwrap();
        assert_eq!(stats.bytes_in.load(Ordering::Relaxed), data.len() as u64);
        assert_eq!(stats.bytes_out.load(Ordering::Relaxed), data.len() as u64);
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Between TCP sockets the bytes are spliced: 4 MiB each way arrive intact, with
    /// half-close, and the PROXY guard still sees the start of the client's stream.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn splices_between_tcp_sockets_both_ways() {
        let (mut c_far, client) = tcp_pair().await;
        let (upstream, mut u_far) = tcp_pair().await;
        let data: Vec<u8> = (0..4_000_000u32).map(|i| (i * 13 % 253) as u8).collect();
        let d2 = data.clone();
        let echo = tokio::spawn(async move {
            let mut got = Vec::new();
            u_far.read_to_end(&mut got).await.unwrap();
            assert!(got == d2, "upstream got different bytes");
            u_far.write_all(&got).await.unwrap();
            u_far.shutdown().await.unwrap();
        });
        let d3 = data.clone();
        let client_task = tokio::spawn(async move {
            let (mut r, mut w) = c_far.split();
            let write = async {
                w.write_all(&d3).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut back = Vec::new();
            let (_, read) = tokio::join!(write, r.read_to_end(&mut back));
            read.unwrap();
            back
        });
        let (p, stats) = params(65536, Duration::from_secs(5), true);
        let pooled_before = crate::forward::splice::pooled();
        assert_eq!(relay(client, upstream, p).await, End::Done);
        // Pipes went back to this thread's pool: the bursts were spliced, not copied.
        assert!(
            crate::forward::splice::pooled() > pooled_before,
            "nothing was spliced"
        );
        assert!(
            client_task.await.unwrap() == data,
            "client got different bytes"
        );
        echo.await.unwrap();
        assert_eq!(stats.bytes_in.load(Ordering::Relaxed), data.len() as u64);
        assert_eq!(stats.bytes_out.load(Ordering::Relaxed), data.len() as u64);
    }

    #[tokio::test]
    async fn refuses_a_proxy_header_between_tcp_sockets() {
        let (mut c_far, client) = tcp_pair().await;
        let (upstream, mut u_far) = tcp_pair().await;
        c_far
            .write_all(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nhello")
            .await
            .unwrap();
        let (p, _) = params(65536, Duration::from_secs(5), true);
        assert_eq!(relay(client, upstream, p).await, End::ProxyUnexpected);
        let mut b = [0u8; 8];
        assert_eq!(
            u_far.read(&mut b).await.unwrap(),
            0,
            "nothing reached upstream"
        );
    }

    #[tokio::test]
    async fn refuses_a_proxy_header_split_across_reads() {
        let (client, mut c_far) = tokio::io::duplex(64);
        let (upstream, mut u_far) = tokio::io::duplex(64);
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
            params(8192, Duration::from_secs(5), true).0,
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
        let end = relay(
            client,
            upstream,
            params(8192, Duration::from_millis(100), false).0,
        )
        .await;
        assert_eq!(end, End::Idle);
    }
}
#[cfg(test)]
mod size {
    use super::*;

    /// What an idle plain connection costs is mostly this future (plus two tokio I/O
    /// registrations and the task header): keep it from growing unnoticed.
    #[test]
    fn idle_connection_state_stays_small() {
        let n = std::mem::size_of::<Relay<TcpStream, TcpStream>>();
        assert!(n <= 416, "Relay<TcpStream, TcpStream> is {n} bytes");
    }
}
