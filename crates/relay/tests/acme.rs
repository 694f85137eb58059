//! `[tls.acme]` against a real ACME server: Pebble, Let's Encrypt's test CA (Debian package
//! `pebble`; started by `postern_test_kit::pebble`, with `pebble-challtestsrv` as its DNS
//! server so the test domain resolves to 127.0.0.1). Pebble validates TLS-ALPN-01 by
//! connecting to the relay's TLS listener; the relay must answer with the challenge
//! certificate, switch from its self-signed certificate to the issued one without a
//! restart, keep it in the cache, and serve it from the cache after a restart. No fixed
//! sleeps: bounded polling only.

use postern_relay::config::RelayConfig;
use postern_relay::{Relay, RunningRelay};
use postern_test_kit::pebble::{free_port, Pebble};
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

const DOMAIN: &str = "relay.postern.test";
/// How long issuance may take (Pebble without sleeps needs about a second; the relay's
/// first order may fail while Pebble starts and is retried after rustls-acme's backoff).
const ISSUE: Duration = Duration::from_secs(60);

fn relay_config(tls: SocketAddr, upstream: SocketAddr, directory: &str, dir: &Path) -> RelayConfig {
    let cfg = RelayConfig::from_toml_str(&format!(
        r#"
        state_dir = {state:?}
        [stats]
        listen = "127.0.0.1:0"
        [tls.acme]
        domains = ["{DOMAIN}"]
        directory = "{directory}"
        contact = ["mailto:volunteer@postern.test"]
        ca_roots = {roots:?}
        [[listener]]
        name = "tls"
        listen = "{tls}"
        tls = true
        pool = "p"
        [pool.p]
        servers = ["{upstream}"]
        "#,
        state = dir.join("state").display().to_string(),
        roots = dir.join("ca.pem").display().to_string(),
    ))
    .unwrap();
    cfg.validate().unwrap();
    cfg
}

/// The certificate the relay presents to a client asking for `DOMAIN`.
async fn served_certificate(addr: SocketAddr) -> Option<CertificateDer<'static>> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(postern_protocol::tls::relay_client_config()));
    let name = ServerName::try_from(DOMAIN.to_string()).ok()?;
    let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .ok()?
        .ok()?;
    tls.get_ref().1.peer_certificates()?.first().cloned()
}

/// (issuer common name, DNS names) of a certificate.
fn describe(cert: &CertificateDer<'_>) -> (String, Vec<String>) {
    let (_, c) = x509_parser::parse_x509_certificate(cert).unwrap();
    let issuer = c
        .issuer()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let names = c
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    (issuer, names)
}

/// A pool server that counts bytes it receives (none may arrive from a validation).
async fn counting_upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let g = got.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let g = g.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    g.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
    });
    (addr, got)
}

fn tls_addr(relay: &RunningRelay) -> SocketAddr {
    relay.addr("tls").unwrap()
}

fn init_logs() {
    // The relay's ACME log lines, shown when a test fails (RUST_LOG overrides).
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "postern_relay=debug".into()),
        )
        .try_init();
}

/// No CA reachable: TLS still works with the self-signed certificate, a stray `acme-tls/1`
/// handshake (no challenge pending) is refused and reaches nothing, and the retrying ACME
/// task does not hold up shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_ca_the_relay_serves_self_signed_and_stops_promptly() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    // Only the file the configuration names as ca_roots is needed here.
    std::fs::write(
        dir.path().join("ca.pem"),
        rcgen::generate_simple_self_signed(vec!["ca.test".into()])
            .unwrap()
            .cert
            .pem(),
    )
    .unwrap();
    let (upstream, upstream_bytes) = counting_upstream().await;
    let relay = Relay::start(relay_config(
        "127.0.0.1:0".parse().unwrap(),
        upstream,
        // Nothing listens on port 1: every order fails and is retried.
        "https://127.0.0.1:1/dir",
        dir.path(),
    ))
    .await
    .unwrap();
    let cert = served_certificate(tls_addr(&relay))
        .await
        .expect("TLS works before any ACME certificate");
    let (issuer, names) = describe(&cert);
    assert!(!issuer.starts_with("Pebble"), "{issuer}");
    assert!(!names.iter().any(|n| n == DOMAIN), "self-signed: {names:?}");

    let mut validation = postern_protocol::tls::relay_client_config();
    validation.alpn_protocols = vec![b"acme-tls/1".to_vec()];
    let tcp = TcpStream::connect(tls_addr(&relay)).await.unwrap();
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(validation))
            .connect(ServerName::try_from(DOMAIN).unwrap(), tcp),
    )
    .await
    .expect("refused in time");
    assert!(refused.is_err(), "acme-tls/1 without a pending challenge");
    assert_eq!(
        upstream_bytes.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing reached the upstream"
    );

    let started = Instant::now();
    relay.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "shutdown waited {:?} (the ACME task must stop with the relay)",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_pebble_is_served_and_survives_a_restart() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    // The relay's TLS port comes first: Pebble must know where to validate.
    let tls_port = free_port();
    let tls: SocketAddr = format!("127.0.0.1:{tls_port}").parse().unwrap();
    let pebble = Pebble::start(dir.path(), tls_port);
    let (upstream, upstream_bytes) = counting_upstream().await;
    let relay = Relay::start(relay_config(tls, upstream, &pebble.directory, dir.path()))
        .await
        .unwrap();

    // Until Pebble issues, the relay answers with its self-signed certificate, then
    // switches to Pebble's without a restart.
    let started = Instant::now();
    let issued = loop {
        if let Some(cert) = served_certificate(tls_addr(&relay)).await {
            let (issuer, names) = describe(&cert);
            if issuer == pebble.intermediate {
                break (issuer, names);
            }
        }
        assert!(
            started.elapsed() < ISSUE,
            "no certificate from Pebble within {ISSUE:?} (the relay's log is above)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(issued.1, [DOMAIN], "the certificate names the domain");

    // Pebble's validation was answered by the handshake and closed, never forwarded.
    // (Pebble checks from several connections, like Let's Encrypt's several vantage points.)
    let metrics = relay.metrics().prometheus();
    let validations: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("postern_relay_handshake_failures_total{listener=\"tls\",reason=\"acme_challenge\"} "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        validations >= 1,
        "no validation connection counted:\n{metrics}"
    );
    assert_eq!(
        upstream_bytes.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "validation bytes reached the upstream"
    );

    // The cache (state_dir/acme) holds the account key and the certificate, private.
    let cache = dir.path().join("state/acme");
    let files: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.iter().any(|f| f.starts_with("cached_cert_")),
        "{files:?}"
    );
    assert!(
        files.iter().any(|f| f.starts_with("cached_account_")),
        "{files:?}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&cache).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "cache directory mode");
    }

    // Restart with the CA gone: the first connection already gets the saved certificate.
    relay.shutdown().await;
    let directory = pebble.directory.clone();
    drop(pebble);
    let relay = Relay::start(relay_config(
        "127.0.0.1:0".parse().unwrap(),
        upstream,
        &directory,
        dir.path(),
    ))
    .await
    .unwrap();
    let cert = served_certificate(tls_addr(&relay))
        .await
        .expect("TLS handshake after restart");
    assert_eq!(describe(&cert), issued, "served from the cache at once");
    relay.shutdown().await;
}

/// On a relay with a secret, a CA's validation is answered before the secret gate (which
/// would otherwise hand it to the cover site), so the certificate is still issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_with_a_secret_still_gets_its_certificate() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let tls_port = free_port();
    let tls: SocketAddr = format!("127.0.0.1:{tls_port}").parse().unwrap();
    let pebble = Pebble::start(dir.path(), tls_port);
    let (upstream, upstream_bytes) = counting_upstream().await;
    let mut cfg = relay_config(tls, upstream, &pebble.directory, dir.path());
    cfg.secret = Some(Default::default());
    cfg.validate().unwrap();
    let relay = Relay::start(cfg).await.unwrap();
    let started = Instant::now();
    loop {
        if let Some(cert) = served_certificate(tls_addr(&relay)).await {
            if describe(&cert).0 == pebble.intermediate {
                break;
            }
        }
        assert!(
            started.elapsed() < ISSUE,
            "no certificate from Pebble within {ISSUE:?} behind the secret gate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        upstream_bytes.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing reached the upstream"
    );
    relay.shutdown().await;
}
