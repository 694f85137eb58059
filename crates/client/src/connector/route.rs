//! Opening a path to the service, stage by stage: resolve the name, connect TCP, and (for
//! a TLS relay) complete TLS. Each stage is timed (with its own bound from
//! [`crate::timeouts`]) and each failure is named, so the app can say exactly what went
//! wrong ("timed out (possibly blocked)", "TLS failed", ...). Stages are recorded in a
//! [`Progress`] as they complete, so an attempt that is abandoned halfway (another route
//! won the race) still tells how far it got.
//!
//! The TLS layer to a relay does not authenticate the relay (its certificate is usually
//! self-signed, as in the reference system): it is camouflage and a second envelope. The
//! Noise handshake inside it authenticates the server end to end.

use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::connection::BoxStream;
use super::{browser_tls, relay_proof};
use crate::timeouts::{CONNECT_TIMEOUT, RESOLVE_TIMEOUT, TLS_TIMEOUT};

/// A way to reach the service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Route {
    /// Straight to the server's address from the network file.
    Direct { address: String },
    /// Through a relay.
    Relay(crate::proxy::ProxyEntry),
}

impl Route {
    /// `host:port` this route connects to first.
    pub fn address(&self) -> String {
        match self {
            Route::Direct { address } => address.clone(),
            Route::Relay(p) => p.address(),
        }
    }

    pub fn tls(&self) -> bool {
        matches!(self, Route::Relay(p) if p.tls)
    }

    pub(crate) fn host(&self) -> String {
        match self {
            Route::Direct { address } => split_host(address).0,
            Route::Relay(p) => p.host.clone(),
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Direct { address } => write!(f, "{address} (direct)"),
            Route::Relay(p) => write!(
                f,
                "{} ({})",
                p.address(),
                if p.tls { "TLS" } else { "plain" }
            ),
        }
    }
}

/// The stages of reaching the service, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Resolve,
    Connect,
    Tls,
    /// The Noise handshake with the server (through the relay, if any).
    Handshake,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Resolve => "resolve name",
            Stage::Connect => "TCP connect",
            Stage::Tls => "TLS",
            Stage::Handshake => "server handshake",
        })
    }
}

/// Why a route did not work, in the user's words.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "reason", content = "detail", rename_all = "snake_case")]
pub enum Failure {
    NameNotResolved(String),
    Refused,
    TimedOut,
    Unreachable(String),
    TlsFailed(String),
    /// A plain connection reached a port that answered in TLS: the route needs TLS on.
    SpeaksTls,
    /// The relay (or server address) answered but the service behind it did not.
    ServiceDidNotAnswer,
    /// Something answered but could not prove it is the server whose key we pinned.
    ServerIdentity,
    /// The relay showed its cover web site: the link's secret is missing, wrong or old.
    WrongSecret,
    Other(String),
}

impl Failure {
    /// A far end that completed TCP/TLS and then failed server authentication is not
    /// merely broken: it is treated as hostile and not used again.
    pub fn is_hostile(&self) -> bool {
        matches!(self, Failure::ServerIdentity)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::NameNotResolved(e) => write!(f, "name did not resolve ({e})"),
            Failure::Refused => f.write_str("connection refused"),
            Failure::TimedOut => f.write_str("timed out (possibly blocked)"),
            Failure::Unreachable(e) => write!(f, "network unreachable ({e})"),
            Failure::TlsFailed(e) => write!(f, "TLS failed ({e})"),
            Failure::SpeaksTls => f.write_str("this port speaks TLS, but the route has TLS off"),
            Failure::ServiceDidNotAnswer => {
                f.write_str("relay reached but the service did not answer")
            }
            Failure::ServerIdentity => {
                f.write_str("the service could not prove its identity (possible interception)")
            }
            Failure::WrongSecret => f.write_str(
                "the relay answered as a web site: its link's secret is missing or out of date (import the relay's current link)",
            ),
            Failure::Other(e) => f.write_str(e),
        }
    }
}

/// One completed stage and how long it took.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageTime {
    pub stage: Stage,
    #[serde(serialize_with = "as_millis")]
    pub took: Duration,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

/// The stages an attempt went through, and how it ended: every stage succeeded
/// (`failed` and `abandoned` both `None`), one failed, or the attempt was abandoned in
/// the middle of a stage because another route won the race.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DialReport {
    pub route: String,
    /// When the attempt started, counted from the start of the race.
    #[serde(rename = "started_ms", serialize_with = "as_millis")]
    pub started: Duration,
    pub stages: Vec<StageTime>,
    /// The stage that failed and why.
    pub failed: Option<(Stage, Failure)>,
    /// The stage the attempt was in when it was given up (another route won).
    pub abandoned: Option<Stage>,
}

impl DialReport {
    pub(crate) fn new(route: &Route) -> Self {
        Self {
            route: route.to_string(),
            started: Duration::ZERO,
            stages: Vec::new(),
            failed: None,
            abandoned: None,
        }
    }

    /// Time the completed stages took.
    pub fn total(&self) -> Duration {
        self.stages.iter().map(|s| s.took).sum()
    }

    /// Every stage succeeded.
    pub fn succeeded(&self) -> bool {
        self.failed.is_none() && self.abandoned.is_none()
    }

    /// The stage after the last completed one (where an abandoned attempt was).
    pub(crate) fn next_stage(&self, tls: bool) -> Stage {
        match self.stages.last().map(|s| s.stage) {
            None => Stage::Resolve,
            Some(Stage::Resolve) => Stage::Connect,
            Some(Stage::Connect) if tls => Stage::Tls,
            Some(_) => Stage::Handshake,
        }
    }
}

/// A [`DialReport`] being filled in by a running attempt, shared with whoever may
/// abandon it — and with whoever watches it: an app shows a check stage by stage as the
/// stages complete ([`Progress::watch`]), rather than only the final report.
#[derive(Debug, Clone)]
pub struct Progress(Arc<watch::Sender<DialReport>>);

impl Progress {
    pub fn new(route: &Route) -> Self {
        Self(Arc::new(watch::Sender::new(DialReport::new(route))))
    }

    /// Every change to the report, as it happens.
    pub fn watch(&self) -> watch::Receiver<DialReport> {
        self.0.subscribe()
    }

    /// Records that `stage`, started at `started`, completed.
    pub fn record(&self, stage: Stage, started: Instant) {
        self.0.send_modify(|r| {
            r.stages.push(StageTime {
                stage,
                took: started.elapsed(),
            })
        });
    }

    pub(crate) fn set_started(&self, offset: Duration) {
        self.0.send_modify(|r| r.started = offset);
    }

    pub(crate) fn fail(&self, stage: Stage, failure: Failure) {
        self.0.send_modify(|r| r.failed = Some((stage, failure)));
    }

    pub(crate) fn abandon(&self, tls: bool) {
        self.0.send_if_modified(|r| {
            if r.failed.is_some() {
                return false;
            }
            r.abandoned = Some(r.next_stage(tls));
            true
        });
    }

    /// A copy of the report as it stands.
    pub fn report(&self) -> DialReport {
        self.0.borrow().clone()
    }
}

pub(crate) fn split_host(address: &str) -> (String, Option<u16>) {
    match postern_protocol::net::split_host_port(address) {
        Ok((h, p)) => (h.to_string(), p.and_then(|p| p.parse().ok())),
        Err(_) => (address.to_string(), None),
    }
}

fn io_failure(e: &std::io::Error) -> Failure {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => Failure::Refused,
        TimedOut => Failure::TimedOut,
        HostUnreachable | NetworkUnreachable => Failure::Unreachable(e.to_string()),
        _ => Failure::Other(e.to_string()),
    }
}

/// Resolves `host:port` within [`RESOLVE_TIMEOUT`].
pub async fn resolve(address: &str) -> Result<Vec<SocketAddr>, Failure> {
    match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(address)).await {
        Err(_) => Err(Failure::TimedOut),
        Ok(Err(e)) => Err(Failure::NameNotResolved(e.to_string())),
        Ok(Ok(a)) => {
            let addrs: Vec<SocketAddr> = a.collect();
            if addrs.is_empty() {
                Err(Failure::NameNotResolved("no addresses".into()))
            } else {
                Ok(addrs)
            }
        }
    }
}

/// Opens the byte stream of `route`: resolve, TCP, then TLS for TLS relays, recording
/// each completed stage in `progress`. The stream remembers the first bytes the far end
/// sent (see [`FirstBytes`]), so a failed handshake can tell a TLS port from a dead one.
pub async fn dial(
    route: &Route,
    progress: &Progress,
) -> Result<(BoxStream, SeenBytes), (Stage, Failure)> {
    let started = Instant::now();
    let addrs = resolve(&route.address())
        .await
        .map_err(|f| (Stage::Resolve, f))?;
    progress.record(Stage::Resolve, started);

    let started = Instant::now();
    let mut last = Failure::Other("no address worked".into());
    let mut tcp = None;
    for addr in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Err(_) => last = Failure::TimedOut,
            Ok(Err(e)) => last = io_failure(&e),
            Ok(Ok(s)) => {
                tcp = Some(s);
                break;
            }
        }
    }
    let tcp = tcp.ok_or((Stage::Connect, last))?;
    let _ = tcp.set_nodelay(true);
    progress.record(Stage::Connect, started);

    let secret = match route {
        Route::Relay(p) => p.secret.clone(),
        Route::Direct { .. } => None,
    };
    if !route.tls() {
        let mut stream = FirstBytes::new(tcp);
        let seen = stream.seen();
        let Some(secret) = secret else {
            return Ok((Box::new(stream), seen));
        };
        // A relay with a secret on a plain port: an HTTP request carrying the proof; the
        // Noise handshake follows without waiting for the answer.
        use tokio::io::AsyncWriteExt;
        // The name shown in the request's Host header: the link's `sni=` name if it has one
        // (a censor reads both alike), else the relay's host.
        let shown = match route {
            Route::Relay(p) => match &p.sni {
                postern_protocol::link::Sni::Name(n) => n.clone(),
                _ => route.host(),
            },
            Route::Direct { .. } => route.host(),
        };
        let request = relay_proof::upgrade_request(&secret, &shown);
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| (Stage::Connect, io_failure(&e)))?;
        return Ok((Box::new(relay_proof::Upgraded::new(stream)), seen));
    }
    let started = Instant::now();
    let sni = match route {
        Route::Relay(p) => p.sni.name_for(&p.host),
        Route::Direct { .. } => None,
    };
    let (mut tls, exporter) =
        match tokio::time::timeout(TLS_TIMEOUT, browser_tls::connect(tcp, sni)).await {
            Err(_) => return Err((Stage::Tls, Failure::TimedOut)),
            Ok(Err(e)) => return Err((Stage::Tls, Failure::TlsFailed(e.to_string()))),
            Ok(Ok(s)) => s,
        };
    if let Some(secret) = &secret {
        let exporter = exporter.ok_or_else(|| {
            (
                Stage::Tls,
                Failure::TlsFailed(
                    "the relay did not negotiate TLS 1.3, which its secret needs".into(),
                ),
            )
        })?;
        use tokio::io::AsyncWriteExt;
        tls.write_all(&secret.tls_token(&exporter))
            .await
            .map_err(|e| (Stage::Tls, io_failure(&e)))?;
    }
    progress.record(Stage::Tls, started);
    let stream = FirstBytes::new(tls);
    let seen = stream.seen();
    Ok((Box::new(stream), seen))
}

/// The first bytes a stream received, readable after the stream is boxed away.
pub type SeenBytes = Arc<Mutex<Vec<u8>>>;

/// Remembers the first bytes read from a stream (at most [`FirstBytes::KEPT`]), to
/// diagnose a failed handshake: a TLS record header there means a plain connection hit
/// a TLS port.
pub struct FirstBytes<S> {
    inner: S,
    seen: SeenBytes,
}

impl<S> FirstBytes<S> {
    const KEPT: usize = 5;

    pub fn new(inner: S) -> Self {
        Self {
            inner,
            seen: Arc::default(),
        }
    }

    /// A handle that keeps reading the recorded bytes after the stream is boxed away.
    pub fn seen(&self) -> SeenBytes {
        self.seen.clone()
    }
}

/// A TLS record header (handshake, alert or application data; version 3.x): what a TLS
/// server answers to bytes that are not a ClientHello.
pub fn looks_like_tls(first: &[u8]) -> bool {
    first.len() >= 3 && matches!(first[0], 0x15..=0x17) && first[1] == 0x03 && first[2] <= 0x04
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstBytes<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if poll.is_ready() {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if seen.len() < Self::KEPT {
                let new = &buf.filled()[before..];
                let take = new.len().min(Self::KEPT - seen.len());
                seen.extend_from_slice(&new[..take]);
            }
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstBytes<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_splitting() {
        assert_eq!(
            split_host("relay.example.org:443"),
            ("relay.example.org".into(), Some(443))
        );
        assert_eq!(
            split_host("[2001:db8::1]:5222"),
            ("2001:db8::1".into(), Some(5222))
        );
        assert_eq!(split_host("2001:db8::1"), ("2001:db8::1".into(), None));
    }

    #[tokio::test]
    async fn refused_and_unresolvable_are_named() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let route = Route::Direct {
            address: addr.to_string(),
        };
        let progress = Progress::new(&route);
        let r = dial(&route, &progress).await;
        assert_eq!(r.err().map(|e| e.1), Some(Failure::Refused));
        assert_eq!(progress.report().stages.len(), 1, "resolve completed");
        let route = Route::Direct {
            address: "no-such-host.invalid:443".into(),
        };
        let r = dial(&route, &Progress::new(&route)).await;
        assert!(matches!(r, Err((Stage::Resolve, _))));
    }

    #[test]
    fn tls_record_headers_are_recognised() {
        assert!(looks_like_tls(&[0x15, 0x03, 0x03, 0x00, 0x02]));
        assert!(looks_like_tls(&[0x16, 0x03, 0x01]));
        assert!(!looks_like_tls(&[0x00, 0x30, 0x15]));
        assert!(!looks_like_tls(&[0x15, 0x03]));
    }

    #[test]
    fn an_abandoned_attempt_names_the_stage_it_was_in() {
        let route = Route::Direct {
            address: "127.0.0.1:1".into(),
        };
        let p = Progress::new(&route);
        p.record(Stage::Resolve, Instant::now());
        p.abandon(false);
        assert_eq!(p.report().abandoned, Some(Stage::Connect));
        let p = Progress::new(&route);
        p.fail(Stage::Connect, Failure::Refused);
        p.abandon(false);
        assert_eq!(p.report().abandoned, None, "a failed attempt stays failed");
    }
}
