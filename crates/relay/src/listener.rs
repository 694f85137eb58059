//! Listeners: the accept loop (maxconn) and the life of one client connection —
//! PROXY header → per-source limit → TLS termination → route (pool or SNI) → upstream → copy.
//! Every step before relaying shares one handshake deadline.

use crate::config::{Limits, SendProxy};
use crate::copy::{relay, CopyParams, End};
use crate::limits::{ConnLimiter, GlobalSlot};
use crate::proxy_header::{self, ProxyHeaderError};
use crate::sni::{self, AllowList, SniError};
use crate::stats::{FailReason, ListenerStats};
use crate::stream::{BoxIo, Prefixed};
use crate::upstream::{Pool, Resolver};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout_at, Instant};
use tokio_rustls::TlsAcceptor;
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
    /// Cancelled to cut open connections.
    pub cut: CancellationToken,
    /// Tracks connection tasks for graceful shutdown.
    pub tracker: TaskTracker,
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
            let this = self.clone();
            self.shared.tracker.spawn(async move {
                this.handle(tcp, peer, slot).await;
            });
        }
    }

    async fn handle(&self, tcp: TcpStream, peer: SocketAddr, _slot: GlobalSlot) {
        let _ = tcp.set_nodelay(true);
        self.stats.total.fetch_add(1, Ordering::Relaxed);
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        let result = self.serve(tcp, peer).await;
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(end) => {
                tracing::debug!(listener = %self.name, client = %self.who(peer), ?end, "connection closed")
            }
            Err(reason) => {
                self.stats.fail(reason);
                tracing::debug!(listener = %self.name, client = %self.who(peer),
                    reason = reason.as_str(), "connection refused during handshake");
            }
        }
    }

    async fn serve(&self, tcp: TcpStream, peer: SocketAddr) -> Result<End, FailReason> {
        // The handshakes (PROXY header, TLS, ClientHello, connect) run in a boxed future that
        // is freed once they are done: only the small relaying state stays with the task of a
        // long-lived idle connection (see docs/benchmarks.md, idle memory).
        let Prepared {
            io,
            upstream,
            _source_slot,
            _guard,
        } = Box::pin(self.prepare(tcp, peer)).await?;
        let limits = &self.shared.limits;

        // 5. Relay (boxed too: measured, the task's future is smaller this way).
        let end = Box::pin(relay(
            io,
            upstream,
            CopyParams {
                buffer: limits.buffer_size,
                idle: limits.idle_timeout,
                half_close: limits.half_close_timeout,
                // A PROXY header inside the client's own stream could spoof its address towards
                // an upstream that auto-detects headers: refuse it on every pool route.
                refuse_proxy_header: matches!(self.route, Route::Pool(_)),
                up: &self.stats.bytes_in,
                down: &self.stats.bytes_out,
                cancel: &self.shared.cut,
            },
        ))
        .await;
        if end == End::ProxyUnexpected {
            return Err(FailReason::ProxyUnexpected);
        }
        Ok(end)
    }

    async fn prepare(&self, mut tcp: TcpStream, peer: SocketAddr) -> Result<Prepared, FailReason> {
        let limits = &self.shared.limits;
        let deadline = Instant::now() + limits.handshake_timeout;
        let local = tcp.local_addr().unwrap_or(peer);

        // 1. PROXY header from a load balancer.
        let (client, dest, leftover) = if self.kind.proxy_expected {
            let (addrs, rest) = timeout_at(
                deadline,
                proxy_header::read_header(&mut tcp, MAX_PROXY_HEADER),
            )
            .await
            .map_err(|_| FailReason::Timeout)?
            .map_err(|e| match e {
                ProxyHeaderError::Eof | ProxyHeaderError::Io(_) => FailReason::ClosedEarly,
                _ => FailReason::ProxyHeader,
            })?;
            (
                addrs.source.unwrap_or(peer),
                addrs.destination.unwrap_or(local),
                rest,
            )
        } else {
            (peer, local, Vec::new())
        };

        // 2. Per-source limit (on the real client address).
        let _source_slot = self
            .shared
            .limiter
            .try_source(client.ip())
            .ok_or(FailReason::SourceLimit)?;

        // 3. TLS termination.
        let io: BoxIo = Box::new(Prefixed::new(leftover, tcp));
        let mut io: BoxIo = match &self.tls {
            Some(acceptor) => Box::new(
                timeout_at(deadline, acceptor.accept(io))
                    .await
                    .map_err(|_| FailReason::Timeout)?
                    .map_err(|_| FailReason::Tls)?,
            ),
            None => io,
        };

        // 4. Route and connect.
        let mut first_bytes = Vec::new();
        let (upstream, _guard) = match &self.route {
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
                    SniError::TooLarge | SniError::Malformed => FailReason::BadClientHello,
                    SniError::Eof | SniError::Io(_) => FailReason::ClosedEarly,
                })?;
                if !allow.allows(&name) {
                    return Err(FailReason::SniNotAllowed);
                }
                let target = format!("{name}:{port}");
                let up = self
                    .shared
                    .resolver
                    .connect(&target, limits.connect_timeout)
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

        Ok(Prepared {
            io,
            upstream,
            _source_slot,
            _guard,
        })
    }
}

/// A connection ready to relay, with the slots it holds.
struct Prepared {
    io: BoxIo,
    upstream: TcpStream,
    _source_slot: crate::limits::SourceSlot,
    _guard: Option<crate::upstream::ActiveGuard>,
}
