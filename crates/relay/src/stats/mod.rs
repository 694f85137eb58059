//! Observability: per-listener counters, upstream state and a one-hour history of
//! per-minute samples ([`Metrics`]); the Prometheus text rendering lives here too.
//!
//! * [`page`] renders the human status page from a [`Metrics`] (inline SVG graphs);
//! * [`http`] is the stats listener serving `/metrics`, `/healthz` and `/` (the page).
//!
//! The counters know nothing of HTTP; `page` knows only the counters; `http` knows both.

pub mod http;
pub mod page;

use crate::forward::park::ParkingLot;
use crate::upstream::Pool;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Why a connection failed before relaying started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// Handshake deadline passed (slow or silent client).
    Timeout,
    /// TLS handshake failed.
    Tls,
    /// Invalid PROXY header on a PROXY listener.
    ProxyHeader,
    /// A PROXY header sent to a listener that does not expect one.
    ProxyUnexpected,
    /// Not a TLS ClientHello on an SNI listener.
    NotTls,
    /// ClientHello without a server name.
    NoSni,
    /// Server name is an IP literal or invalid.
    SniInvalid,
    /// Server name not in the allow-list.
    SniNotAllowed,
    /// ClientHello too large or malformed.
    BadClientHello,
    /// Per-source-address limit reached.
    SourceLimit,
    /// No upstream reachable.
    UpstreamUnavailable,
    /// Client closed before the handshake completed.
    ClosedEarly,
    /// Not a fault: an ACME CA's TLS-ALPN-01 validation, answered by the TLS handshake
    /// alone and closed, never forwarded (see [`crate::accept::acme`]).
    AcmeChallenge,
}

impl FailReason {
    /// All reasons, in metric order.
    pub const ALL: [FailReason; 13] = [
        FailReason::Timeout,
        FailReason::Tls,
        FailReason::ProxyHeader,
        FailReason::ProxyUnexpected,
        FailReason::NotTls,
        FailReason::NoSni,
        FailReason::SniInvalid,
        FailReason::SniNotAllowed,
        FailReason::BadClientHello,
        FailReason::SourceLimit,
        FailReason::UpstreamUnavailable,
        FailReason::ClosedEarly,
        FailReason::AcmeChallenge,
    ];

    /// Label value used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::Timeout => "timeout",
            FailReason::Tls => "tls",
            FailReason::ProxyHeader => "proxy_header",
            FailReason::ProxyUnexpected => "proxy_unexpected",
            FailReason::NotTls => "not_tls",
            FailReason::NoSni => "no_sni",
            FailReason::SniInvalid => "sni_invalid",
            FailReason::SniNotAllowed => "sni_not_allowed",
            FailReason::BadClientHello => "bad_client_hello",
            FailReason::SourceLimit => "source_limit",
            FailReason::UpstreamUnavailable => "upstream_unavailable",
            FailReason::ClosedEarly => "closed_early",
            FailReason::AcmeChallenge => "acme_challenge",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Counters of one listener.
#[derive(Debug)]
pub struct ListenerStats {
    /// Listener name.
    pub name: String,
    /// Short description ("plain", "tls", "sni", "plain+proxy", ...).
    pub kind: String,
    /// Bound address.
    pub addr: SocketAddr,
    /// Open connections.
    pub active: AtomicU64,
    /// Connections accepted since start.
    pub total: AtomicU64,
    /// Connections refused because `maxconn` was reached.
    pub refused: AtomicU64,
    /// PROXY headers ignored because the peer is not in `trusted_proxies`.
    pub proxy_untrusted: AtomicU64,
    /// Connections that did not prove the relay's secret and got the cover site.
    pub cover: AtomicU64,
    /// Bytes from clients to upstreams.
    pub bytes_in: AtomicU64,
    /// Bytes from upstreams to clients.
    pub bytes_out: AtomicU64,
    failures: [AtomicU64; 13],
}

impl ListenerStats {
    /// New zeroed counters.
    pub fn new(name: &str, kind: &str, addr: SocketAddr) -> Arc<Self> {
        Arc::new(ListenerStats {
            name: name.into(),
            kind: kind.into(),
            addr,
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            proxy_untrusted: AtomicU64::new(0),
            cover: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            failures: Default::default(),
        })
    }

    /// Counts a handshake failure.
    pub fn fail(&self, r: FailReason) {
        self.failures[r.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Handshake failures for a reason.
    pub fn failures(&self, r: FailReason) -> u64 {
        self.failures[r.index()].load(Ordering::Relaxed)
    }
}

/// One per-minute sample for the status page.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Unix time of the sample, seconds.
    pub at: u64,
    /// Open connections at sample time.
    pub active: u64,
    /// New connections since the previous sample.
    pub new_conns: u64,
    /// Bytes relayed (both directions) since the previous sample.
    pub bytes: u64,
}

#[derive(Debug, Default)]
struct History {
    samples: VecDeque<Sample>,
    last_total: u64,
    last_bytes: u64,
}

/// Everything the stats listener reports.
#[derive(Debug)]
pub struct Metrics {
    /// Per-listener counters.
    pub listeners: Vec<Arc<ListenerStats>>,
    /// Upstream pools.
    pub pools: Vec<Arc<Pool>>,
    /// Where quiet connections are parked, if the relay parks them.
    lot: Option<Arc<ParkingLot>>,
    history: Mutex<History>,
    started: Instant,
}

/// History length: one hour of per-minute samples.
pub const HISTORY_LEN: usize = 60;

impl Metrics {
    /// New metrics over these listeners and pools.
    pub fn new(
        listeners: Vec<Arc<ListenerStats>>,
        pools: Vec<Arc<Pool>>,
        lot: Option<Arc<ParkingLot>>,
    ) -> Arc<Self> {
        Arc::new(Metrics {
            listeners,
            pools,
            lot,
            history: Mutex::new(History::default()),
            started: Instant::now(),
        })
    }

    fn sum(&self, f: impl Fn(&ListenerStats) -> &AtomicU64) -> u64 {
        self.listeners
            .iter()
            .map(|l| f(l).load(Ordering::Relaxed))
            .sum()
    }

    /// Takes a sample into the one-hour ring buffer (called every minute).
    pub fn sample(&self) {
        let total = self.sum(|l| &l.total);
        let bytes = self.sum(|l| &l.bytes_in) + self.sum(|l| &l.bytes_out);
        let active = self.sum(|l| &l.active);
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let s = Sample {
            at,
            active,
            new_conns: total - h.last_total.min(total),
            bytes: bytes - h.last_bytes.min(bytes),
        };
        h.last_total = total;
        h.last_bytes = bytes;
        h.samples.push_back(s);
        while h.samples.len() > HISTORY_LEN {
            h.samples.pop_front();
        }
    }

    /// The samples of the last hour, oldest first.
    pub fn history(&self) -> Vec<Sample> {
        let h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        h.samples.iter().copied().collect()
    }

    /// Open connections parked now (quiet; see [`crate::forward::park`]).
    pub fn parked(&self) -> usize {
        self.lot.as_ref().map_or(0, |l| l.len())
    }

    /// True when every pool has at least one healthy server.
    pub fn healthy(&self) -> bool {
        self.pools.iter().all(|p| p.any_healthy())
    }

    /// Prometheus text exposition.
    pub fn prometheus(&self) -> String {
        let mut out = String::with_capacity(4096);
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        type Getter = fn(&ListenerStats) -> &AtomicU64;
        let per_listener: [(&str, &str, &str, Getter); 5] = [
            (
                "postern_relay_connections_active",
                "gauge",
                "Open client connections.",
                |l| &l.active,
            ),
            (
                "postern_relay_connections_total",
                "counter",
                "Client connections accepted.",
                |l| &l.total,
            ),
            (
                "postern_relay_connections_refused_total",
                "counter",
                "Connections refused because maxconn was reached.",
                |l| &l.refused,
            ),
            (
                "postern_relay_proxy_untrusted_total",
                "counter",
                "PROXY headers ignored because the peer is not a trusted proxy.",
                |l| &l.proxy_untrusted,
            ),
            (
                "postern_relay_cover_total",
                "counter",
                "Connections without the relay's secret, answered by the cover site.",
                |l| &l.cover,
            ),
        ];
        for (name, kind, help, get) in per_listener {
            head(&mut out, name, kind, help);
            for l in &self.listeners {
                let _ = writeln!(
                    out,
                    "{name}{{listener=\"{}\"}} {}",
                    esc(&l.name),
                    get(l).load(Ordering::Relaxed)
                );
            }
        }
        head(
            &mut out,
            "postern_relay_connections_parked",
            "gauge",
            "Open connections quiet for limits.park_after, waiting without a task of their own.",
        );
        let _ = writeln!(out, "postern_relay_connections_parked {}", self.parked());
        head(
            &mut out,
            "postern_relay_bytes_total",
            "counter",
            "Bytes relayed, by direction.",
        );
        for l in &self.listeners {
            let n = esc(&l.name);
            let _ = writeln!(
                out,
                "postern_relay_bytes_total{{listener=\"{n}\",direction=\"client_to_upstream\"}} {}",
                l.bytes_in.load(Ordering::Relaxed)
            );
            let _ = writeln!(
                out,
                "postern_relay_bytes_total{{listener=\"{n}\",direction=\"upstream_to_client\"}} {}",
                l.bytes_out.load(Ordering::Relaxed)
            );
        }
        head(
            &mut out,
            "postern_relay_handshake_failures_total",
            "counter",
            "Connections that failed before relaying started, by reason.",
        );
        for l in &self.listeners {
            for r in FailReason::ALL {
                let _ = writeln!(
                    out,
                    "postern_relay_handshake_failures_total{{listener=\"{}\",reason=\"{}\"}} {}",
                    esc(&l.name),
                    r.as_str(),
                    l.failures(r)
                );
            }
        }
        head(
            &mut out,
            "postern_relay_upstream_up",
            "gauge",
            "1 when the upstream server is in rotation.",
        );
        for p in &self.pools {
            for s in &p.servers {
                let _ = writeln!(
                    out,
                    "postern_relay_upstream_up{{pool=\"{}\",server=\"{}\"}} {}",
                    esc(&p.name),
                    esc(&s.target),
                    u8::from(s.is_healthy())
                );
            }
        }
        head(
            &mut out,
            "postern_relay_upstream_connect_seconds",
            "gauge",
            "Latency of the last successful TCP connect to the server.",
        );
        for p in &self.pools {
            for s in &p.servers {
                let _ = writeln!(
                    out,
                    "postern_relay_upstream_connect_seconds{{pool=\"{}\",server=\"{}\"}} {:.6}",
                    esc(&p.name),
                    esc(&s.target),
                    s.latency().as_secs_f64()
                );
            }
        }
        head(
            &mut out,
            "postern_relay_upstream_connections_active",
            "gauge",
            "Open relayed connections per server.",
        );
        for p in &self.pools {
            for s in &p.servers {
                let _ = writeln!(
                    out,
                    "postern_relay_upstream_connections_active{{pool=\"{}\",server=\"{}\"}} {}",
                    esc(&p.name),
                    esc(&s.target),
                    s.active()
                );
            }
        }
        head(
            &mut out,
            "postern_relay_upstream_connect_failures_total",
            "counter",
            "Failed connection attempts (clients and health checks).",
        );
        for p in &self.pools {
            for s in &p.servers {
                let _ = writeln!(
                    out,
                    "postern_relay_upstream_connect_failures_total{{pool=\"{}\",server=\"{}\"}} {}",
                    esc(&p.name),
                    esc(&s.target),
                    s.failed.load(Ordering::Relaxed)
                );
            }
        }
        head(
            &mut out,
            "postern_relay_uptime_seconds",
            "gauge",
            "Seconds since the relay started.",
        );
        let _ = writeln!(
            out,
            "postern_relay_uptime_seconds {}",
            self.started.elapsed().as_secs()
        );
        out
    }

    /// How long the relay has been running.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Escapes a Prometheus label value.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
