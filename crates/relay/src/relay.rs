//! Starting and stopping a whole relay from a [`RelayConfig`].

use crate::accept::gate::{Gate, ReplayCache};
use crate::accept::limits::ConnLimiter;
use crate::accept::listener::{Listener, ListenerKind, Route, Shared};
use crate::accept::sni::AllowList;
use crate::accept::tls::TlsError;
use crate::config::{ConfigError, RelayConfig};
use crate::cover::Cover;
use crate::forward::park::ParkingLot;
use crate::stats::{ListenerStats, Metrics};
use crate::upstream::{Pool, Resolver};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Errors starting a relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// ACME (`[tls.acme]`) could not be set up.
    #[error(transparent)]
    Acme(#[from] crate::accept::acme::AcmeError),
    /// The relay's secret could not be read or created.
    #[error("{0} (check the state directory: --state-dir / state_dir)")]
    Secret(#[from] postern_protocol::relay_auth::SecretError),
    /// A listening socket could not be opened.
    #[error("listener {name:?} cannot listen on {addr}: {source}{hint}")]
    Bind {
        /// Listener name ("stats" for the stats listener).
        name: String,
        /// Address.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
        /// Advice for common cases.
        hint: &'static str,
    },
}

/// Entry point: `Relay::start(config)`.
pub struct Relay;

/// A relay that is listening. [`RunningRelay::shutdown`] stops it gracefully; dropping it
/// stops it abruptly (listeners close, open connections are cut).
pub struct RunningRelay {
    listeners: Vec<(String, ListenerKind, SocketAddr)>,
    stats_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    cut: CancellationToken,
    tracker: TaskTracker,
    grace: Duration,
    /// The tasks holding listening sockets (client listeners, stats): they end when `stop`
    /// is cancelled, and their ports are free once they have.
    accepting: Vec<tokio::task::JoinHandle<()>>,
}

fn bind_hint(e: &std::io::Error, addr: SocketAddr) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => {
            " (ports below 1024 need root or CAP_NET_BIND_SERVICE; or use high ports with --plain/--tls/--stats)"
        }
        std::io::ErrorKind::AddrInUse => " (another program already uses this port; pick another address with --plain/--tls/--stats)",
        _ => "",
    }
}

/// A listening socket. IPv6 addresses listen for IPv6 only (`IPV6_V6ONLY`), so `[::]:443`
/// can sit beside `0.0.0.0:443` whatever the system's `bindv6only` default.
fn listen_socket(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // As std and tokio do on Unix: rebinding right after a restart or reload works even
    // while connections accepted on the old socket are still open.
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

/// The error says the system has no IPv6 (disabled, or no such address family).
fn no_ipv6(e: &std::io::Error) -> bool {
    // EAFNOSUPPORT is 97 on Linux, 47 on the BSDs and macOS.
    e.kind() == std::io::ErrorKind::AddrNotAvailable
        || matches!(e.raw_os_error(), Some(97) if cfg!(target_os = "linux"))
        || matches!(e.raw_os_error(), Some(47) if !cfg!(target_os = "linux"))
}

/// The lot where quiet connections wait, unless parking is off (`limits.park_after = 0`) or
/// the system refuses an epoll set (then connections are simply not parked).
fn parking_lot(
    limits: &crate::config::Limits,
    cut: &CancellationToken,
    tracker: &TaskTracker,
) -> Option<Arc<ParkingLot>> {
    if limits.park_after.is_zero() {
        return None;
    }
    match ParkingLot::start(cut.clone(), tracker.clone()) {
        Ok(lot) => Some(lot),
        Err(e) => {
            tracing::warn!(error = %e, "quiet connections will not be parked");
            None
        }
    }
}

async fn bind(name: &str, addr: SocketAddr) -> Result<TcpListener, RelayError> {
    listen_socket(addr).map_err(|source| RelayError::Bind {
        name: name.to_string(),
        addr,
        hint: bind_hint(&source, addr),
        source,
    })
}

impl Relay {
    /// Validates `config`, binds every enabled listener and the stats listener, starts health
    /// checks, and returns once everything is listening.
    pub async fn start(config: RelayConfig) -> Result<RunningRelay, RelayError> {
        config.validate()?;
        let limits = config.limits.clone();
        let stop = CancellationToken::new();
        let cut = CancellationToken::new();
        let tracker = TaskTracker::new();
        let resolver = Arc::new(Resolver::new(config.resolve.clone()));

        let needs_tls = config.listeners.iter().any(|l| l.enabled && l.tls);
        let (mut acceptor, acme) = if needs_tls {
            let (a, acme) = crate::accept::acme::tls_acceptor(&config).await?;
            (Some(a), acme)
        } else {
            (None, None)
        };

        let gate = match &config.secret {
            Some(settings) => {
                let path = settings.path(config.state_dir.as_deref())?;
                let (secret, created) =
                    postern_protocol::relay_auth::RelaySecret::load_or_create(&path)?;
                if created {
                    tracing::info!(file = %path.display(),
                        "created the relay's secret: links must carry it now (postern relay link)");
                }
                // The cover site speaks HTTP/1.1 only; offering h2 would promise what it
                // cannot keep. (ACME validations still need their acme-tls/1.)
                let alpn: &[&[u8]] = match acme {
                    Some(_) => &[b"http/1.1", crate::accept::acme::ACME_TLS_ALPN],
                    None => &[b"http/1.1"],
                };
                acceptor = acceptor.map(|a| a.with_alpn(alpn));
                Some(Arc::new(Gate {
                    secret,
                    replay: ReplayCache::default(),
                    cover: Cover::new(&config.cover, &limits, resolver.clone()),
                    wait: config.cover.wait,
                }))
            }
            None => None,
        };

        let pools: BTreeMap<String, Arc<Pool>> = config
            .pools
            .iter()
            .map(|(name, cfg)| (name.clone(), Pool::new(name, cfg)))
            .collect();

        let trusted = config.trusted()?;
        if trusted.is_empty() && config.listeners.iter().any(|l| l.enabled && l.accept_proxy) {
            tracing::warn!(
                "a listener expects PROXY headers but no load balancer is trusted: their \
                 headers are ignored and every connection counts as the balancer's address \
                 (set --trusted-proxy / trusted_proxies)"
            );
        }

        // Bind everything first so a failure leaves nothing running.
        let mut bound = Vec::new();
        for lc in config.listeners.iter().filter(|l| l.enabled) {
            let socket = match bind(&lc.name, lc.listen).await {
                Ok(s) => s,
                // `[::]` beside `0.0.0.0` in the standard set: a machine without IPv6
                // still runs the relay on IPv4.
                Err(RelayError::Bind { source, .. })
                    if lc.listen.is_ipv6()
                        && lc.listen.ip().is_unspecified()
                        && no_ipv6(&source) =>
                {
                    tracing::warn!(listener = %lc.name, addr = %lc.listen,
                        "this machine has no IPv6: listener not opened ({source})");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let addr = socket.local_addr().map_err(|source| RelayError::Bind {
                name: lc.name.clone(),
                addr: lc.listen,
                hint: "",
                source,
            })?;
            bound.push((lc, socket, addr));
        }
        let stats_socket = match &config.stats {
            Some(s) => Some(bind("stats", s.listen).await?),
            None => None,
        };
        // Only now, with nothing left that can fail: the parking lot starts a task.
        let shared = Arc::new(Shared {
            limits: limits.clone(),
            limiter: ConnLimiter::new(limits.maxconn, limits.max_per_source),
            resolver: resolver.clone(),
            log_addresses: config.log_client_addresses,
            trusted,
            cut: cut.clone(),
            tracker: tracker.clone(),
            lot: parking_lot(&limits, &cut, &tracker),
            gate: gate.clone(),
        });

        let stats_access = match config.stats.as_ref().and_then(|s| s.token.as_deref()) {
            Some(t) => crate::stats::http::Access::token(t),
            None => crate::stats::http::Access::open(),
        };

        let mut listeners = Vec::new();
        let mut all_stats = Vec::new();
        let mut runners = Vec::new();
        for (lc, socket, addr) in bound {
            let route = match (&lc.pool, &lc.sni) {
                (Some(p), _) => Route::Pool(pools[p].clone()),
                (None, Some(sni)) => Route::Sni {
                    allow: Arc::new(AllowList::new(&sni.allow)),
                    port: sni.port,
                },
                (None, None) => unreachable!("validated"),
            };
            let kind = ListenerKind {
                tls: lc.tls,
                proxy_expected: lc.accept_proxy,
                sni: lc.sni.is_some(),
            };
            let stats = ListenerStats::new(&lc.name, &kind.to_string(), addr);
            all_stats.push(stats.clone());
            listeners.push((lc.name.clone(), kind, addr));
            tracing::info!(listener = %lc.name, %addr, %kind, "listening");
            runners.push((
                Arc::new(Listener {
                    name: lc.name.clone(),
                    kind,
                    tls: if lc.tls { acceptor.clone() } else { None },
                    copy: Listener::copy_params(&limits, &route, stats.clone()),
                    route,
                    stats,
                    shared: shared.clone(),
                }),
                socket,
            ));
        }
        let mut accepting = Vec::new();
        for (listener, socket) in runners {
            accepting.push(tracker.spawn(listener.run(socket, stop.clone())));
        }
        if let Some(acme) = acme {
            tracker.spawn(acme.run(stop.clone()));
        }
        for pool in pools.values() {
            tracker.spawn(pool.clone().health_loop(
                resolver.clone(),
                limits.connect_timeout,
                stop.clone(),
            ));
        }
        if let Some(g) = &gate {
            all_stats.push(g.cover.stats());
        }
        let metrics = Metrics::new(
            all_stats,
            pools.values().cloned().collect(),
            shared.lot.clone(),
        );
        let mut stats_addr = None;
        if let Some(socket) = stats_socket {
            stats_addr = socket.local_addr().ok();
            if let Some(a) = stats_addr {
                tracing::info!(addr = %a, "stats page listening");
            }
            accepting.push(tracker.spawn(crate::stats::http::serve(
                socket,
                metrics.clone(),
                stop.clone(),
                Duration::from_secs(60),
                stats_access,
            )));
        }
        Ok(RunningRelay {
            listeners,
            stats_addr,
            metrics,
            stop,
            cut,
            tracker,
            grace: limits.shutdown_grace,
            accepting,
        })
    }
}

impl RunningRelay {
    /// `(listener name, kind, bound address)` for every enabled listener, in config order.
    pub fn listeners(&self) -> Vec<(String, ListenerKind, SocketAddr)> {
        self.listeners.clone()
    }

    /// Bound address of the listener called `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, a)| *a)
    }

    /// Bound address of the stats listener.
    pub fn stats_addr(&self) -> Option<SocketAddr> {
        self.stats_addr
    }

    /// Live counters (also served on the stats listener).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// A token that, when cancelled, begins the same shutdown as [`RunningRelay::shutdown`]
    /// (stops accepting; connections are cut after the grace period only by `shutdown`).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Completes when shutdown has begun (via [`RunningRelay::stop_token`] or `shutdown`).
    pub async fn stopped(&self) {
        self.stop.cancelled().await
    }

    /// Runs until `signal` completes (e.g. `tokio::signal::ctrl_c()`) or the stop token is
    /// cancelled, then shuts down gracefully.
    pub async fn run_until<F: std::future::Future>(self, signal: F) {
        tokio::select! {
            _ = signal => {}
            _ = self.stop.cancelled() => {}
        }
        self.shutdown().await
    }

    /// Stops accepting and returns once every listening socket (stats included) is closed,
    /// so a new relay can listen on the same ports; open connections go on untouched (until
    /// they end, [`RunningRelay::shutdown`], or this is dropped). A configuration reload is
    /// `stop_accepting` on the old relay, then [`Relay::start`] with the new configuration.
    pub async fn stop_accepting(&mut self) {
        self.stop.cancel();
        for task in self.accepting.drain(..) {
            let _ = task.await;
        }
    }

    /// Connections (and other tasks) still running: 0 once a relay that stopped accepting
    /// has no connection left.
    pub fn tasks(&self) -> usize {
        self.tracker.len()
    }

    /// Stops accepting, lets open connections finish for the grace period, then cuts them.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(self.grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::info!("grace period over, closing remaining connections");
            self.cut.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait()).await;
        }
    }
}

impl Drop for RunningRelay {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut.cancel();
    }
}
