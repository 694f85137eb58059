//! Opening a path to the service, stage by stage: resolve the name, connect TCP, and (for
//! a TLS relay) complete TLS. Each stage is timed and each failure is named, so the app
//! can say exactly what went wrong ("timed out (possibly blocked)", "TLS failed", ...).
//!
//! The TLS layer to a relay does not authenticate the relay (its certificate is usually
//! self-signed, as in the reference system): it is camouflage and a second envelope. The
//! Noise handshake inside it authenticates the server end to end.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;

use crate::connection::BoxStream;

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

    fn host(&self) -> String {
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
    /// The relay (or server address) answered but the service behind it did not.
    ServiceDidNotAnswer,
    /// Something answered but could not prove it is the server whose key we pinned.
    ServerIdentity,
    Other(String),
}

impl Failure {
    /// A far end that completed TCP/TLS and then failed server authentication is not
    /// merely broken: it is treated as hostile and not used again in this run.
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
            Failure::ServiceDidNotAnswer => {
                f.write_str("relay reached but the service did not answer")
            }
            Failure::ServerIdentity => {
                f.write_str("the service could not prove its identity (possible interception)")
            }
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

/// The stages a dial went through, and how it ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DialReport {
    pub route: String,
    pub stages: Vec<StageTime>,
    /// The stage that failed and why (`None` when every stage succeeded).
    pub failed: Option<(Stage, Failure)>,
}

impl DialReport {
    fn new(route: &Route) -> Self {
        Self {
            route: route.to_string(),
            stages: Vec::new(),
            failed: None,
        }
    }

    pub fn total(&self) -> Duration {
        self.stages.iter().map(|s| s.took).sum()
    }

    pub(crate) fn record(&mut self, stage: Stage, started: Instant) {
        self.stages.push(StageTime {
            stage,
            took: started.elapsed(),
        });
    }
}

fn split_host(address: &str) -> (String, Option<u16>) {
    if let Some(rest) = address.strip_prefix('[') {
        if let Some((h, p)) = rest.split_once(']') {
            return (
                h.to_string(),
                p.strip_prefix(':').and_then(|p| p.parse().ok()),
            );
        }
    }
    match address.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h.to_string(), p.parse().ok()),
        _ => (address.to_string(), None),
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

/// Opens the byte stream of `route`: resolve, TCP, then TLS for TLS relays. Each stage
/// gets at most `stage_timeout`.
pub async fn dial(route: &Route, stage_timeout: Duration) -> (Result<BoxStream, ()>, DialReport) {
    let mut report = DialReport::new(route);
    let result = dial_stages(route, stage_timeout, &mut report).await;
    match result {
        Ok(s) => (Ok(s), report),
        Err(f) => {
            report.failed = Some(f);
            (Err(()), report)
        }
    }
}

async fn dial_stages(
    route: &Route,
    stage_timeout: Duration,
    report: &mut DialReport,
) -> Result<BoxStream, (Stage, Failure)> {
    let address = route.address();
    let started = Instant::now();
    let addrs: Vec<SocketAddr> =
        match tokio::time::timeout(stage_timeout, tokio::net::lookup_host(&address)).await {
            Err(_) => return Err((Stage::Resolve, Failure::TimedOut)),
            Ok(Err(e)) => return Err((Stage::Resolve, Failure::NameNotResolved(e.to_string()))),
            Ok(Ok(a)) => a.collect(),
        };
    if addrs.is_empty() {
        return Err((
            Stage::Resolve,
            Failure::NameNotResolved("no addresses".into()),
        ));
    }
    report.record(Stage::Resolve, started);

    let started = Instant::now();
    let mut last = Failure::Other("no address worked".into());
    let mut tcp = None;
    for addr in addrs {
        match tokio::time::timeout(stage_timeout, TcpStream::connect(addr)).await {
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
    report.record(Stage::Connect, started);

    if !route.tls() {
        return Ok(Box::new(tcp));
    }
    let started = Instant::now();
    let name = match route.host().parse::<std::net::IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(route.host())
            .map_err(|e| (Stage::Tls, Failure::TlsFailed(e.to_string())))?,
    };
    let connector = tokio_rustls::TlsConnector::from(tls_config());
    let tls = match tokio::time::timeout(stage_timeout, connector.connect(name, tcp)).await {
        Err(_) => return Err((Stage::Tls, Failure::TimedOut)),
        Ok(Err(e)) => return Err((Stage::Tls, Failure::TlsFailed(e.to_string()))),
        Ok(Ok(s)) => s,
    };
    report.record(Stage::Tls, started);
    Ok(Box::new(tls))
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

/// Accepts any relay certificate (still checking the handshake signatures, so the TLS
/// session is real). Safe here because Noise authenticates the server inside it.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
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
        let (r, report) = dial(
            &Route::Direct {
                address: addr.to_string(),
            },
            Duration::from_secs(2),
        )
        .await;
        assert!(r.is_err());
        assert_eq!(report.failed, Some((Stage::Connect, Failure::Refused)));
        let (r, report) = dial(
            &Route::Direct {
                address: "no-such-host.invalid:443".into(),
            },
            Duration::from_secs(5),
        )
        .await;
        assert!(r.is_err());
        assert!(
            matches!(report.failed, Some((Stage::Resolve, _))),
            "{report:?}"
        );
    }
}
