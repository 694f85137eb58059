//! Listeners: the accept loop (maxconn) and the life of one client connection —
//! PROXY header → per-source limit → TLS termination → route (pool or SNI) → upstream → copy.
//! Every step before relaying shares one handshake deadline.

use crate::accept::gate::{self, Gate, Verdict};
use crate::accept::limits::{ConnLimiter, GlobalSlot, SourceSlot};
use crate::accept::proxy_header;
use crate::accept::sni::{self, AllowList, SniError};
use crate::accept::tls_stream::{TlsAcceptor, TlsClient};
use crate::config::{Limits, SendProxy};
use crate::forward::copy::{CopyParams, End, Relay};
use crate::forward::park::{Parkable, ParkingLot, Relayed};
use crate::stats::{FailReason, ListenerStats};
use crate::stream::{BoxIo, Prefixed};
use crate::upstream::{ActiveGuard, Pool, Resolver};
use futures::FutureExt;
use postern_protocol::ProtocolError;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Largest PROXY header accepted (v2 with TLVs from common load balancers fits easily).
const MAX_PROXY_HEADER: usize = 4096;

/// What a listener does with its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerKind {
    /// Terminates TLS.
    pub tls: bool,
    /// Expects a PROXY header first.
    pub proxy_expected: bool,
    /// Routes by SNI (otherwise to a fixed pool).
    pub sni: bool,
}

impl std::fmt::Display for ListenerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::from(if self.tls { "tls" } else { "plain" });
        if self.sni {
            s.push_str("+sni");
        }
        if self.proxy_expected {
            s.push_str("+proxy");
        }
        f.write_str(&s)
    }
}

/// Where accepted connections go.
#[derive(Debug, Clone)]
pub enum Route {
    /// A fixed upstream pool.
    Pool(Arc<Pool>),
    /// By SNI to allow-listed names on `port`.
    Sni {
        /// Allowed names.
        allow: Arc<AllowList>,
        /// Upstream port.
        port: u16,
    },
}

/// State shared by all listeners.
pub struct Shared {
    /// Limits and timeouts.
    pub limits: Limits,
    /// maxconn and per-source limits.
    pub limiter: Arc<ConnLimiter>,
    /// Outgoing connection resolver.
    pub resolver: Arc<Resolver>,
    /// Log client addresses.
    pub log_addresses: bool,
    /// Peers whose PROXY headers are believed (load balancers); from anyone else a
    /// header is read and ignored, and the peer's own address is used.
    pub trusted: postern_protocol::net::TrustedProxies,
    /// Cancelled to cut open connections.
    pub cut: CancellationToken,
    /// Tracks connection tasks for graceful shutdown.
    pub tracker: TaskTracker,
    /// Where quiet connections wait (none if the relay could not create it, or parking is
    /// off).
    pub lot: Option<Arc<ParkingLot>>,
    /// On a relay with a secret: the gate every pool listener's connections pass, and the
    /// cover site for those that fail it.
    pub gate: Option<Arc<Gate>>,
}

/// One running listener.
pub struct Listener {
    /// Name from the config.
    pub name: String,
    /// Kind.
    pub kind: ListenerKind,
    /// TLS acceptor when `kind.tls`.
    pub tls: Option<TlsAcceptor>,
    /// Route.
    pub route: Route,
    /// Counters.
    pub stats: Arc<ListenerStats>,
    /// How connections are relayed (from the limits; see [`Listener::copy_params`]).
    pub copy: Arc<CopyParams>,
    /// Shared state.
    pub shared: Arc<Shared>,
}

struct Who(Option<SocketAddr>);
impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("[client address hidden]"),
        }
    }
}

impl Listener {
    /// The relaying settings for a listener with this route and these limits.
    pub fn copy_params(
        limits: &Limits,
        route: &Route,
        stats: Arc<ListenerStats>,
    ) -> Arc<CopyParams> {
        // A PROXY header inside the client's own stream could spoof its address towards
        // an upstream that auto-detects headers: refuse it on every pool route.
        CopyParams::new(limits, matches!(route, Route::Pool(_)), stats)
    }

    fn who(&self, a: SocketAddr) -> Who {
        Who(self.shared.log_addresses.then_some(a))
    }

    /// Accepts connections until `stop` is cancelled.
    pub async fn run(self: Arc<Self>, socket: TcpListener, stop: CancellationToken) {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                r = socket.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(listener = %self.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Some(slot) = self.shared.limiter.try_global() else {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                // Refuse at once so the client moves on to another relay.
                drop(tcp);
                continue;
            };
            self.shared
                .tracker
                .spawn(self.clone().handle(tcp, peer, slot));
        }
    }

    /// The handshake phase of one connection, in its own task. Once the connection is ready to
    /// relay, the relaying gets a task of its own and this one ends: a long-lived idle
    /// connection then costs one allocation holding only its relaying state (see
    /// `docs/benchmarks.md`, idle memory).
    async fn handle(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, slot: GlobalSlot) {
        let _ = tcp.set_nodelay(true);
        self.stats.total.fetch_add(1, Ordering::Relaxed);
        let open = Open::new(self.stats.clone(), slot);
        let prepared = match self.prepare(tcp, peer).await {
            Ok(Next::Relay(p)) => p,
            Ok(Next::Cover {
                io,
                read,
                source_slot,
                cover,
            }) => {
                self.stats.cover.fetch_add(1, Ordering::Relaxed);
                let cut = self.shared.cut.clone();
                // The connection keeps its slots while the cover site serves it.
                let held = (open, source_slot);
                cover.serve(io.boxed(), read, cut).await;
                drop(held);
                return;
            }
            Err(reason) => {
                self.stats.fail(reason);
                tracing::debug!(listener = %self.name, client = %self.who(peer),
                    reason = reason.as_str(), "connection refused during handshake");
                return;
            }
        };
        let params = self.copy.clone();
        // The client's address is kept for the closing log line only when it may be logged.
        let client = self.shared.log_addresses.then(|| Box::new(peer));
        let Prepared {
            io,
            upstream,
            source_slot,
            guard,
        } = prepared;
        let shared = self.shared.clone();
        let held = (self, open, source_slot, guard);
        let finish = move |end: End| {
            let (this, _open, _source_slot, _guard) = held;
            tracing::debug!(listener = %this.name, client = %Who(client.map(|c| *c)), ?end,
                "connection closed");
        };
        match io {
            ClientIo::Tcp(tcp) => relay(&shared, tcp, upstream, params, finish),
            ClientIo::Tls(tls) => relay(&shared, tls, upstream, params, finish),
            ClientIo::Prefixed(io) => relay(&shared, io, upstream, params, finish),
        }
    }

    async fn prepare(&self, mut tcp: TcpStream, peer: SocketAddr) -> Result<Next, FailReason> {
        let limits = &self.shared.limits;
        let deadline = Instant::now() + limits.handshake_timeout;
        let local = tcp.local_addr().unwrap_or(peer);

        // 1. PROXY header from a load balancer. Read exactly the header through a small
        //    buffer, then hand on the bytes that came with it and the bare socket.
        let (client, dest, leftover) = if self.kind.proxy_expected {
            let mut reader = tokio::io::BufReader::with_capacity(512, tcp);
            let header = timeout_at(
                deadline,
                proxy_header::read_required(&mut reader, MAX_PROXY_HEADER),
            )
            .await
            .map_err(|_| FailReason::Timeout)?
            .map_err(|e| match e {
                ProtocolError::Closed | ProtocolError::Io(_) => FailReason::ClosedEarly,
                _ => FailReason::ProxyHeader,
            })?;
            let rest = reader.buffer().to_vec();
            tcp = reader.into_inner();
            // Only a trusted load balancer may say who the client is.
            if header.source.is_some() && !self.shared.trusted.trusts(peer.ip()) {
                self.stats.proxy_untrusted.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(listener = %self.name, peer = %self.who(peer),
                    "PROXY header from a peer not in trusted_proxies: ignored");
            }
            let client = self.shared.trusted.client_address(peer, header.source);
            let dest = if client == peer {
                local
            } else {
                header.destination.unwrap_or(local)
            };
            (client, dest, rest)
        } else {
            (peer, local, Vec::new())
        };

        // 2. Per-source limit (on the real client address).
        let source_slot = self
            .shared
            .limiter
            .try_source(client.ip())
            .ok_or(FailReason::SourceLimit)?;

        // 3. TLS termination. A plain TCP client socket stays bare so that the relay can
        //    splice it; bytes that came with the PROXY header are replayed by a wrapper.
        //    Behind a secret gate the session's exporter secret is kept for the token.
        let gated = self.shared.gate.is_some() && matches!(self.route, Route::Pool(_));
        let mut exporter = None;
        let mut io = match &self.tls {
            Some(acceptor) => {
                let io = Prefixed::new(leftover, tcp);
                let handshake = async {
                    if gated {
                        acceptor.accept_with_exporter(io).await
                    } else {
                        acceptor.accept(io).await.map(|tls| (tls, None))
                    }
                };
                let (mut tls, secret) = timeout_at(deadline, handshake)
                    .await
                    .map_err(|_| FailReason::Timeout)?
                    .map_err(|_| FailReason::Tls)?;
                // An ACME CA validating our domain (TLS-ALPN-01): the handshake, with its
                // challenge certificate, was the whole answer. Close; never forward it (nor
                // hand it to the secret gate's cover site).
                if tls.alpn_protocol() == Some(crate::accept::acme::ACME_TLS_ALPN) {
                    let _ = timeout_at(deadline, tls.shutdown()).await;
                    return Err(FailReason::AcmeChallenge);
                }
                exporter = secret;
                ClientIo::Tls(tls)
            }
            None if leftover.is_empty() => ClientIo::Tcp(tcp),
            None => ClientIo::Prefixed(Prefixed::new(leftover, tcp)),
        };

        // 4. On a relay with a secret: the client proves it holds the link, or the
        //    connection goes to the cover site with everything read from it.
        let mut first_bytes = Vec::new();
        if let (true, Some(g)) = (gated, &self.shared.gate) {
            let verdict = if self.kind.tls {
                let expected = exporter.map(|e| g.secret.tls_token(&e));
                gate::tls_token(&mut io, expected, g.wait).await
            } else {
                gate::http_request(&mut io, &g.secret, &g.replay, g.wait).await
            };
            match verdict {
                Verdict::Client { leftover } => first_bytes = leftover,
                Verdict::Cover { read } => {
                    return Ok(Next::Cover {
                        io,
                        read,
                        source_slot,
                        cover: g.cover.clone(),
                    })
                }
            }
        }

        // 5. Route and connect.
        let (upstream, guard) = match &self.route {
            Route::Pool(pool) => {
                let (mut up, server, guard) = pool
                    .connect(&self.shared.resolver, limits.connect_timeout)
                    .await
                    .map_err(|_| FailReason::UpstreamUnavailable)?;
                tracing::debug!(listener = %self.name, client = %self.who(client),
                    upstream = %server.target, "relaying");
                let header = match pool.send_proxy {
                    SendProxy::None => Vec::new(),
                    SendProxy::V1 => proxy_header::encode_v1(client, dest),
                    SendProxy::V2 => proxy_header::encode_v2(client, dest),
                };
                if !header.is_empty() && up.write_all(&header).await.is_err() {
                    return Err(FailReason::UpstreamUnavailable);
                }
                (up, Some(guard))
            }
            Route::Sni { allow, port } => {
                let (name, hello) = timeout_at(
                    deadline,
                    sni::read_client_hello(&mut io, limits.max_client_hello),
                )
                .await
                .map_err(|_| FailReason::Timeout)?
                .map_err(|e| match e {
                    SniError::NotTls => FailReason::NotTls,
                    SniError::Missing => FailReason::NoSni,
                    SniError::InvalidName => FailReason::SniInvalid,
                    SniError::TooLarge | SniError::Malformed | SniError::Ambiguous => {
                        FailReason::BadClientHello
                    }
                    SniError::Eof | SniError::Io(_) => FailReason::ClosedEarly,
                })?;
                if !allow.allows(&name) {
                    return Err(FailReason::SniNotAllowed);
                }
                let target = format!("{name}:{port}");
                let up = self
                    .shared
                    .resolver
                    .connect_absolute(&name, *port, limits.connect_timeout)
                    .await
                    .map_err(|_| FailReason::UpstreamUnavailable)?;
                tracing::debug!(listener = %self.name, client = %self.who(client),
                    upstream = %target, "relaying by SNI");
                first_bytes = hello;
                (up, None)
            }
        };
        let mut upstream = upstream;
        if !first_bytes.is_empty() {
            upstream
                .write_all(&first_bytes)
                .await
                .map_err(|_| FailReason::UpstreamUnavailable)?;
            self.stats
                .bytes_in
                .fetch_add(first_bytes.len() as u64, Ordering::Relaxed);
        }

        Ok(Next::Relay(Prepared {
            io,
            upstream,
            source_slot,
            guard,
        }))
    }
}

/// Where a connection goes after its handshake.
enum Next {
    /// To an upstream.
    Relay(Prepared),
    /// To the cover site (it did not prove the relay's secret).
    Cover {
        io: ClientIo,
        read: Vec<u8>,
        source_slot: SourceSlot,
        cover: Arc<crate::cover::Cover>,
    },
}

/// A connection ready to relay, with the slots it holds.
struct Prepared {
    io: ClientIo,
    upstream: TcpStream,
    source_slot: SourceSlot,
    guard: Option<ActiveGuard>,
}

/// The client side of a connection: a bare TCP socket (which the relay can splice), or a
/// stream with TLS or replayed bytes on top.
enum ClientIo {
    Tcp(TcpStream),
    Tls(TlsClient),
    /// Bytes that came with a PROXY header are replayed first.
    Prefixed(Prefixed<TcpStream>),
}

impl ClientIo {
    fn boxed(self) -> BoxIo {
        match self {
            ClientIo::Tcp(t) => Box::new(t),
            ClientIo::Tls(t) => Box::new(t),
            ClientIo::Prefixed(p) => Box::new(p),
        }
    }
}

/// Relays a connection in a task of its own, parking it while quiet if the relay parks.
fn relay<C: Parkable, F: FnOnce(End) + Send + 'static>(
    shared: &Shared,
    client: C,
    upstream: TcpStream,
    params: Arc<CopyParams>,
    finish: F,
) {
    let cut = shared.cut.clone();
    match &shared.lot {
        Some(lot) => {
            let lot = lot.clone();
            shared
                .tracker
                .spawn(Relayed::new(client, upstream, params, cut, lot, finish));
        }
        None => {
            shared
                .tracker
                .spawn(Relay::new(client, upstream, params, cut).map(finish));
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Tcp(t) => Pin::new(t).poll_write(cx, buf),
            ClientIo::Tls(t) => Pin::new(t).poll_write(cx, buf),
            ClientIo::Prefixed(p) => Pin::new(p).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientIo::Tcp(t) => Pin::new(t).poll_flush(cx),
            ClientIo::Tls(t) => Pin::new(t).poll_flush(cx),
            ClientIo::Prefixed(p) => Pin::new(p).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientIo::Tcp(t) => Pin::new(t).poll_shutdown(cx),
            ClientIo::Tls(t) => Pin::new(t).poll_shutdown(cx),
            ClientIo::Prefixed(p) => Pin::new(p).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientIo::Tcp(t) => Pin::new(t).poll_read(cx, buf),
            ClientIo::Tls(t) => Pin::new(t).poll_read(cx, buf),
            ClientIo::Prefixed(p) => Pin::new(p).poll_read(cx, buf),
        }
    }
}

/// Counts an open connection on its listener for as long as it lives, and holds its
/// `maxconn` slot.
struct Open {
    stats: Arc<ListenerStats>,
    _slot: GlobalSlot,
}

impl Open {
    fn new(stats: Arc<ListenerStats>, slot: GlobalSlot) -> Open {
        stats.active.fetch_add(1, Ordering::Relaxed);
        Open { stats, _slot: slot }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}
