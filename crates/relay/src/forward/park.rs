//! Parking quiet connections outside the runtime, so that an idle connection costs a few
//! hundred bytes instead of a task and two I/O registrations.
//!
//! A chat relay holds thousands of connections that are silent for minutes: a phone keeps its
//! connection open and a message or a keep-alive passes now and then. While relayed, each of
//! them is a tokio task (its [`Relay`] future, about 640 bytes once allocated) plus two tokio
//! I/O registrations (about 256 bytes each): most of what an idle connection costs (see
//! `docs/benchmarks.md`, idle memory).
//!
//! Once a connection has been quiet for `park_after` (and nothing is buffered in it), its
//! relaying future hands its two sockets to the [`ParkingLot`] and ends. The lot keeps, per
//! connection, the two file descriptors (and for TLS the session state), the settings, when
//! bytes last moved and what to do when the connection ends — in one allocation — and watches
//! the descriptors with an epoll set of its own, which is itself one registration in tokio.
//! When either socket becomes readable (data, a close, an error) the connection gets its
//! sockets back in tokio and a fresh relaying task; the first bytes wait a few tens of
//! microseconds longer than on a connection that was not parked.
//!
//! The lot applies the connection's idle timeout itself (checked every second), closes every
//! parked connection when the relay cuts its connections, and keeps a [`TaskTracker`] token
//! per parked connection so that graceful shutdown and configuration reloads still wait for
//! them like for any other connection.

use crate::forward::copy::{CopyParams, End, Relay, Socket};
use crate::stream::Prefixed;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll as MioPoll, Token};
use slab::Slab;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{task_tracker::TaskTrackerToken, TaskTracker};

/// How often parked connections are checked against their idle timeout.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A client-side stream that can leave the runtime while its connection is quiet.
pub trait Parkable: Socket + Sized + Send + 'static {
    /// What is kept while parked: the bare socket, and whatever state the stream needs to
    /// carry on (a TLS session).
    type Parked: Send + 'static;

    /// Takes the stream out of the runtime. Only called when [`Socket::is_quiet`] said so.
    fn park(self) -> io::Result<Self::Parked>;

    /// The descriptor to watch while parked.
    fn fd(parked: &Self::Parked) -> RawFd;

    /// Back into the runtime (must run inside it).
    fn unpark(parked: Self::Parked) -> io::Result<Self>;
}

impl Parkable for TcpStream {
    type Parked = std::net::TcpStream;

    fn park(self) -> io::Result<std::net::TcpStream> {
        // Deregisters from tokio's reactor; the socket stays non-blocking.
        self.into_std()
    }

    fn fd(parked: &std::net::TcpStream) -> RawFd {
        parked.as_raw_fd()
    }

    fn unpark(parked: std::net::TcpStream) -> io::Result<TcpStream> {
        TcpStream::from_std(parked)
    }
}

/// A plain client whose first bytes came with a PROXY header: once they are relayed it parks
/// as its bare socket.
impl Parkable for Prefixed<TcpStream> {
    type Parked = std::net::TcpStream;

    fn park(self) -> io::Result<std::net::TcpStream> {
        if !self.unread().is_empty() {
            return Err(io::Error::other("replayed bytes not yet relayed"));
        }
        self.into_inner().into_std()
    }

    fn fd(parked: &std::net::TcpStream) -> RawFd {
        parked.as_raw_fd()
    }

    fn unpark(parked: std::net::TcpStream) -> io::Result<Self> {
        Ok(Prefixed::new(Vec::new(), TcpStream::from_std(parked)?))
    }
}

/// A parked connection, whatever its client stream.
trait ParkedConn: Send {
    /// Client and upstream descriptors.
    fn fds(&self) -> [RawFd; 2];
    /// When the idle timeout closes it.
    fn deadline(&self) -> Instant;
    /// Back to relaying, in a new task.
    fn resume(self: Box<Self>, lot: &Arc<ParkingLot>);
    /// Closed while parked (idle timeout, shutdown).
    fn end(self: Box<Self>, end: End);
}

struct ParkedRelay<C: Parkable, F> {
    client: C::Parked,
    upstream: std::net::TcpStream,
    params: Arc<CopyParams>,
    last: Instant,
    finish: F,
    /// Counts as a running task for graceful shutdown while parked.
    _task: TaskTrackerToken,
}

impl<C: Parkable, F: FnOnce(End) + Send + 'static> ParkedConn for ParkedRelay<C, F> {
    fn fds(&self) -> [RawFd; 2] {
        [C::fd(&self.client), self.upstream.as_raw_fd()]
    }

    fn deadline(&self) -> Instant {
        self.last + self.params.idle
    }

    fn resume(self: Box<Self>, lot: &Arc<ParkingLot>) {
        let ParkedRelay {
            client,
            upstream,
            params,
            last: _,
            finish,
            _task,
        } = *self;
        let sockets = C::unpark(client).and_then(|c| Ok((c, TcpStream::from_std(upstream)?)));
        match sockets {
            Ok((client, upstream)) => {
                let relay = Relay::resume(client, upstream, params, lot.cut.clone());
                lot.tracker.spawn(Relayed {
                    relay,
                    finish: Some(finish),
                    lot: lot.clone(),
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, "a parked connection could not be resumed");
                finish(End::Error);
            }
        }
    }

    fn end(self: Box<Self>, end: End) {
        (self.finish)(end);
    }
}

/// Where quiet connections wait; one per running relay. See the module documentation.
pub struct ParkingLot {
    /// Adds and removes descriptors of the lot's epoll set (thread-safe).
    registry: mio::Registry,
    /// Parked connections; the slab key is the epoll token of both their descriptors.
    parked: Mutex<Slab<Box<dyn ParkedConn>>>,
    /// The relay's: cancelled to cut every connection.
    cut: CancellationToken,
    /// Cancelled (by `cut`, or when the set can no longer be watched) once the lot takes no
    /// more connections.
    closed: CancellationToken,
    tracker: TaskTracker,
}

impl ParkingLot {
    /// Creates the lot and starts its task, which runs until `cut` is cancelled (then every
    /// parked connection is closed). Resumed connections are spawned on `tracker`.
    pub fn start(cut: CancellationToken, tracker: TaskTracker) -> io::Result<Arc<ParkingLot>> {
        let poll = MioPoll::new()?;
        let lot = Arc::new(ParkingLot {
            registry: poll.registry().try_clone()?,
            parked: Mutex::new(Slab::new()),
            closed: cut.child_token(),
            cut,
            tracker,
        });
        // SAFETY: `EpollSet` owns the epoll descriptor it returns; it stays open, and the
        // same, for as long as the `AsyncFd` holds it (it closes when the set is dropped).
        let watched = unsafe {
            AsyncFd::register_with_interest(EpollSet(poll), tokio::io::Interest::READABLE)
        }
        .map_err(io::Error::from)?;
        tokio::spawn(lot.clone().run(watched));
        Ok(lot)
    }

    /// Connections parked now.
    pub fn len(&self) -> usize {
        self.slab().len()
    }

    /// Whether none is parked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn slab(&self) -> MutexGuard<'_, Slab<Box<dyn ParkedConn>>> {
        // Nothing panics while holding it; recover rather than take the relay down.
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks a quiet connection; `finish` runs when it ends.
    fn park<C: Parkable, F: FnOnce(End) + Send + 'static>(
        &self,
        client: C,
        upstream: TcpStream,
        params: Arc<CopyParams>,
        last: Instant,
        finish: F,
    ) {
        if self.closed.is_cancelled() {
            finish(End::Shutdown);
            return;
        }
        let parked = C::park(client).and_then(|c| Ok((c, upstream.into_std()?)));
        let (client, upstream) = match parked {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "a quiet connection could not be parked");
                finish(End::Error);
                return;
            }
        };
        let conn: Box<dyn ParkedConn> = Box::new(ParkedRelay::<C, F> {
            client,
            upstream,
            params,
            last,
            finish,
            _task: self.tracker.token(),
        });
        let mut slab = self.slab();
        if self.closed.is_cancelled() {
            // Closed while this connection was leaving its task (see `run`).
            drop(slab);
            conn.end(End::Shutdown);
            return;
        }
        let entry = slab.vacant_entry();
        let token = Token(entry.key());
        let fds = conn.fds();
        // Registered under the lock: the lot cannot see an event for this token before the
        // entry is in place. Adding a socket that is already readable reports it at once, so
        // bytes that arrived while parking are not missed.
        for (i, fd) in fds.iter().enumerate() {
            if let Err(e) = self
                .registry
                .register(&mut SourceFd(fd), token, Interest::READABLE)
            {
                tracing::debug!(error = %e, "could not watch a parked connection");
                for fd in &fds[..i] {
                    let _ = self.registry.deregister(&mut SourceFd(fd));
                }
                drop(slab);
                conn.end(End::Error);
                return;
            }
        }
        entry.insert(conn);
    }

    /// Takes a parked connection out of the lot (its descriptors no longer watched).
    fn take(&self, slab: &mut Slab<Box<dyn ParkedConn>>, key: usize) -> Box<dyn ParkedConn> {
        let conn = slab.remove(key);
        for fd in conn.fds() {
            let _ = self.registry.deregister(&mut SourceFd(&fd));
        }
        conn
    }

    async fn run(self: Arc<Self>, mut watched: AsyncFd<EpollSet>) {
        let mut events = Events::with_capacity(256);
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.closed.cancelled() => break,
                _ = sweep.tick() => self.expire(Instant::now()),
                ready = watched.readable_mut() => {
                    let mut guard = match ready {
                        Ok(g) => g,
                        Err(e) => {
                            // Only when the runtime is going away. Parking now would strand
                            // connections with nothing to wake them: close the lot.
                            tracing::warn!(error = %e, "parked connections cannot be watched");
                            self.closed.cancel();
                            break;
                        }
                    };
                    // Drain the set: tokio tells of new readiness only once the set has
                    // been emptied (edge-triggered).
                    loop {
                        events.clear();
                        if let Err(e) = guard.get_inner_mut().0.poll(&mut events, Some(Duration::ZERO)) {
                            if e.kind() != io::ErrorKind::Interrupted {
                                tracing::warn!(error = %e, "watching parked connections failed");
                            }
                        }
                        if events.is_empty() {
                            guard.clear_ready();
                            break;
                        }
                        let woken: Vec<Box<dyn ParkedConn>> = {
                            let mut slab = self.slab();
                            events
                                .iter()
                                .filter_map(|ev| {
                                    // Both descriptors share a token: the second event of a
                                    // pair finds the entry already gone.
                                    let key = ev.token().0;
                                    slab.contains(key).then(|| self.take(&mut slab, key))
                                })
                                .collect()
                        };
                        for conn in woken {
                            conn.resume(&self);
                        }
                    }
                }
            }
        }
        // Cut (or closed): close everything still parked. `closed` is cancelled before the
        // slab is emptied under its lock, and `park` checks it under the same lock, so a
        // connection parking at this moment is either emptied here or refused there.
        let all: Vec<Box<dyn ParkedConn>> = {
            let mut slab = self.slab();
            let keys: Vec<usize> = slab.iter().map(|(k, _)| k).collect();
            keys.into_iter().map(|k| self.take(&mut slab, k)).collect()
        };
        for conn in all {
            conn.end(End::Shutdown);
        }
    }

    /// Closes parked connections whose idle timeout has passed.
    fn expire(&self, now: Instant) {
        let expired: Vec<Box<dyn ParkedConn>> = {
            let mut slab = self.slab();
            let keys: Vec<usize> = slab
                .iter()
                .filter(|(_, c)| c.deadline() <= now)
                .map(|(k, _)| k)
                .collect();
            keys.into_iter().map(|k| self.take(&mut slab, k)).collect()
        };
        for conn in expired {
            conn.end(End::Idle);
        }
    }
}

impl std::fmt::Debug for ParkingLot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParkingLot")
            .field("parked", &self.len())
            .finish_non_exhaustive()
    }
}

/// The lot's epoll set, watched by tokio as one descriptor.
struct EpollSet(MioPoll);

impl AsRawFd for EpollSet {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

pin_project_lite::pin_project! {
    /// A relayed connection that parks itself in `lot` when quiet; `finish` runs once, when
    /// the connection ends (parked or not).
    pub struct Relayed<C, F> {
        #[pin]
        relay: Relay<C, TcpStream>,
        finish: Option<F>,
        lot: Arc<ParkingLot>,
    }
}

impl<C: Parkable, F: FnOnce(End) + Send + 'static> Relayed<C, F> {
    /// Relays `client` and `upstream`; `params.park_after` says when a quiet connection parks.
    pub fn new(
        client: C,
        upstream: TcpStream,
        params: Arc<CopyParams>,
        cut: CancellationToken,
        lot: Arc<ParkingLot>,
        finish: F,
    ) -> Self {
        Relayed {
            relay: Relay::new(client, upstream, params, cut).parking(),
            finish: Some(finish),
            lot,
        }
    }
}

impl<C: Parkable, F: FnOnce(End) + Send + 'static> Future for Relayed<C, F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let end = ready!(this.relay.as_mut().poll(cx));
        let Some(finish) = this.finish.take() else {
            return Poll::Ready(());
        };
        match end {
            End::Quiet => match this.relay.take_sockets() {
                Some((client, upstream, params, last)) => {
                    this.lot.park(client, upstream, params, last, finish)
                }
                None => finish(End::Error),
            },
            end => finish(end),
        }
        Poll::Ready(())
    }
}
