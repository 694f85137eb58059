//! Upstream pools: servers, load balancing, passive failure counting and active TCP health
//! checks. Also the resolver used for every outgoing connection (fixed overrides, then DNS).

use crate::config::{Balance, PoolConfig, SendProxy};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Resolves `host:port` targets: fixed overrides first, then the system resolver.
#[derive(Debug, Default)]
pub struct Resolver {
    overrides: BTreeMap<String, SocketAddr>,
}

impl Resolver {
    /// A resolver with fixed `"host:port" -> address` entries.
    pub fn new(overrides: BTreeMap<String, SocketAddr>) -> Self {
        Resolver { overrides }
    }

    /// Opens a TCP connection to `target` within `timeout`, with TCP_NODELAY set.
    pub async fn connect(&self, target: &str, timeout: Duration) -> std::io::Result<TcpStream> {
        self.connect_via(target, target.to_string(), timeout).await
    }

    /// Connects to the DNS name `name` (from a client's SNI) as a fully qualified name:
    /// resolved as `name.`, so the resolver's search domains are never appended (a client
    /// naming `intranet.example` must not reach `intranet.example.corp.local`).
    /// Overrides are looked up under `name:port`.
    pub async fn connect_absolute(
        &self,
        name: &str,
        port: u16,
        timeout: Duration,
    ) -> std::io::Result<TcpStream> {
        let key = format!("{name}:{port}");
        self.connect_via(&key, format!("{}:{port}", absolute_name(name)), timeout)
            .await
    }

    async fn connect_via(
        &self,
        key: &str,
        lookup: String,
        timeout: Duration,
    ) -> std::io::Result<TcpStream> {
        let fut = async {
            match self.overrides.get(key) {
                Some(addr) => TcpStream::connect(*addr).await,
                None => TcpStream::connect(lookup.as_str()).await,
            }
        };
        let stream = tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout"))??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// `name` with a trailing dot (a fully qualified name); IP literals are left alone.
pub fn absolute_name(name: &str) -> String {
    if name.ends_with('.') || name.parse::<std::net::IpAddr>().is_ok() {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

/// One upstream server and its live state.
#[derive(Debug)]
pub struct Server {
    /// `host:port` as configured.
    pub target: String,
    healthy: AtomicBool,
    failures: AtomicU32,
    active: AtomicUsize,
    /// Last successful connect latency, microseconds.
    latency_us: AtomicU64,
    /// Connections handed to this server.
    pub total: AtomicU64,
    /// Failed connection attempts (clients and checks).
    pub failed: AtomicU64,
}

impl Server {
    /// Whether the server is in rotation.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }
    /// Active relayed connections.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
    /// Last measured connect latency.
    pub fn latency(&self) -> Duration {
        Duration::from_micros(self.latency_us.load(Ordering::Relaxed))
    }
}

/// Keeps a server's active count up while a relayed connection lives.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Server>);
impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A pool of interchangeable servers.
#[derive(Debug)]
pub struct Pool {
    /// Pool name from the config.
    pub name: String,
    /// Servers in configuration order.
    pub servers: Vec<Arc<Server>>,
    /// PROXY header to send.
    pub send_proxy: SendProxy,
    balance: Balance,
    interval: Duration,
    fall: u32,
    next: AtomicUsize,
}

/// No server of the pool accepted a connection.
#[derive(Debug, thiserror::Error)]
#[error("no upstream server of pool {0:?} is reachable")]
pub struct Unavailable(pub String);

impl Pool {
    /// Builds a pool; servers start healthy (the first check runs at once).
    pub fn new(name: &str, cfg: &PoolConfig) -> Arc<Self> {
        Arc::new(Pool {
            name: name.to_string(),
            servers: cfg
                .servers
                .iter()
                .map(|t| {
                    Arc::new(Server {
                        target: t.clone(),
                        healthy: AtomicBool::new(true),
                        failures: AtomicU32::new(0),
                        active: AtomicUsize::new(0),
                        latency_us: AtomicU64::new(0),
                        total: AtomicU64::new(0),
                        failed: AtomicU64::new(0),
                    })
                })
                .collect(),
            send_proxy: cfg.send_proxy,
            balance: cfg.balance,
            interval: cfg.health_check_interval,
            fall: cfg.fall,
            next: AtomicUsize::new(0),
        })
    }

    /// Whether at least one server is in rotation.
    pub fn any_healthy(&self) -> bool {
        self.servers.iter().any(|s| s.is_healthy())
    }

    /// Order in which servers are tried for a new connection: healthy ones by the balancing
    /// algorithm, then (as a last resort) the unhealthy ones.
    pub fn candidates(&self) -> Vec<Arc<Server>> {
        let n = self.servers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n.max(1);
        let rotated: Vec<Arc<Server>> = (0..n)
            .map(|i| self.servers[(start + i) % n].clone())
            .collect();
        let (mut healthy, unhealthy): (Vec<_>, Vec<_>) =
            rotated.into_iter().partition(|s| s.is_healthy());
        if self.balance == Balance::LeastConn {
            healthy.sort_by_key(|s| s.active());
        }
        healthy.extend(unhealthy);
        healthy
    }

    fn record_success(&self, s: &Server, latency: Duration) {
        s.failures.store(0, Ordering::Release);
        s.latency_us.store(
            latency.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
        if !s.healthy.swap(true, Ordering::AcqRel) {
            tracing::info!(pool = %self.name, server = %s.target, "upstream is back in rotation");
        }
    }

    fn record_failure(&self, s: &Server, why: &std::io::Error, from_check: bool) {
        s.failed.fetch_add(1, Ordering::Relaxed);
        let n = s.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if (from_check || n >= self.fall) && s.healthy.swap(false, Ordering::AcqRel) {
            tracing::warn!(pool = %self.name, server = %s.target, error = %why,
                "upstream taken out of rotation");
        }
    }

    /// Connects to the best available server, failing over to the next on error.
    pub async fn connect(
        &self,
        resolver: &Resolver,
        timeout: Duration,
    ) -> Result<(TcpStream, Arc<Server>, ActiveGuard), Unavailable> {
        for s in self.candidates() {
            let t0 = Instant::now();
            match resolver.connect(&s.target, timeout).await {
                Ok(stream) => {
                    self.record_success(&s, t0.elapsed());
                    s.total.fetch_add(1, Ordering::Relaxed);
                    s.active.fetch_add(1, Ordering::AcqRel);
                    let guard = ActiveGuard(s.clone());
                    return Ok((stream, s, guard));
                }
                Err(e) => {
                    tracing::debug!(pool = %self.name, server = %s.target, error = %e,
                        "upstream connect failed, trying the next server");
                    self.record_failure(&s, &e, false);
                }
            }
        }
        Err(Unavailable(self.name.clone()))
    }

    /// Active L4 health check of every server, every `interval`, until `stop`.
    pub async fn health_loop(
        self: Arc<Self>,
        resolver: Arc<Resolver>,
        timeout: Duration,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let check_timeout = timeout.min(self.interval.max(Duration::from_millis(500)));
            let checks = self.servers.iter().map(|s| {
                let resolver = resolver.clone();
                async move {
                    let t0 = Instant::now();
                    let r = resolver.connect(&s.target, check_timeout).await;
                    (s, r.map(|_| t0.elapsed()))
                }
            });
            let results = tokio::select! {
                _ = stop.cancelled() => return,
                r = futures::future::join_all(checks) => r,
            };
            for (s, r) in results {
                match r {
                    Ok(lat) => self.record_success(s, lat),
                    Err(e) => self.record_failure(s, &e, true),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (issue 18, defect 8): SNI names were looked up as relative names, so
    /// the resolver's search domains could turn them into other hosts.
    #[test]
    fn sni_targets_are_looked_up_as_fully_qualified_names() {
        assert_eq!(absolute_name("media.example.net"), "media.example.net.");
        assert_eq!(absolute_name("media.example.net."), "media.example.net.");
        assert_eq!(absolute_name("192.0.2.1"), "192.0.2.1");
    }

    #[tokio::test]
    async fn absolute_connects_use_overrides_by_name() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let r = Resolver::new([("a.example.net:443".to_string(), addr)].into());
        r.connect_absolute("a.example.net", 443, Duration::from_secs(5))
            .await
            .unwrap();
    }

    fn pool(balance: Balance) -> Arc<Pool> {
        Pool::new(
            "p",
            &PoolConfig {
                servers: vec!["a:1".into(), "b:1".into(), "c:1".into()],
                send_proxy: SendProxy::None,
                balance,
                health_check_interval: Duration::from_secs(60),
                fall: 2,
            },
        )
    }

    fn names(v: &[Arc<Server>]) -> Vec<&str> {
        v.iter().map(|s| s.target.as_str()).collect()
    }

    #[test]
    fn round_robin_skips_unhealthy_and_keeps_them_last() {
        let p = pool(Balance::RoundRobin);
        assert_eq!(names(&p.candidates()), ["a:1", "b:1", "c:1"]);
        assert_eq!(names(&p.candidates()), ["b:1", "c:1", "a:1"]);
        let e = std::io::Error::other("x");
        p.record_failure(&p.servers[1], &e, false);
        assert!(
            p.servers[1].is_healthy(),
            "one client failure is not enough (fall = 2)"
        );
        p.record_failure(&p.servers[1], &e, false);
        assert!(!p.servers[1].is_healthy());
        assert_eq!(names(&p.candidates()), ["c:1", "a:1", "b:1"]);
        p.record_success(&p.servers[1], Duration::from_millis(1));
        assert!(p.servers[1].is_healthy());
    }

    #[test]
    fn least_conn_prefers_idle_servers() {
        let p = pool(Balance::LeastConn);
        p.servers[0].active.store(5, Ordering::SeqCst);
        p.servers[1].active.store(1, Ordering::SeqCst);
        p.servers[2].active.store(3, Ordering::SeqCst);
        assert_eq!(names(&p.candidates()), ["b:1", "c:1", "a:1"]);
    }
}
