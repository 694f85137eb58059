//! End-to-end tests: real listeners on loopback with random ports, stand-in upstreams started
//! by the tests, no fixed sleeps (only bounded polling loops).

use postern_relay::accept::proxy_header::{self, V2_SIGNATURE};
use postern_relay::config::RelayConfig;
use postern_relay::{Relay, RunningRelay};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const T: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- stand-in upstreams

/// What a stand-in upstream does with a connection.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Echo everything back (after stripping a PROXY header if `proxy`).
    Echo,
    /// Record everything until EOF, send nothing.
    Sink,
}

#[derive(Default)]
struct Seen {
    /// TCP connections accepted (health checks included).
    accepts: AtomicUsize,
    /// Connections that delivered at least one byte.
    sessions: AtomicUsize,
    /// PROXY header bytes received per connection (when stripping).
    headers: Mutex<Vec<Vec<u8>>>,
    /// All bytes received per connection (sink mode).
    data: Mutex<Vec<Vec<u8>>>,
}

struct Upstream {
    addr: SocketAddr,
    seen: Arc<Seen>,
    task: JoinHandle<()>,
}

impl Upstream {
    async fn start(mode: Mode, proxy: bool) -> Upstream {
        Self::start_at("127.0.0.1:0".parse().unwrap(), mode, proxy, Arc::default()).await
    }

    async fn start_at(addr: SocketAddr, mode: Mode, proxy: bool, seen: Arc<Seen>) -> Upstream {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                s.accepts.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                tokio::spawn(async move {
                    let mut first = Vec::new();
                    if proxy {
                        let mut buf = Vec::new();
                        let mut b = [0u8; 1];
                        loop {
                            match sock.read(&mut b).await {
                                Ok(1) => buf.push(b[0]),
                                _ => return,
                            }
                            if let Ok(proxy_header::Parsed::Complete(_, len)) =
                                proxy_header::parse(&buf)
                            {
                                first = buf.split_off(len);
                                s.headers.lock().unwrap().push(buf);
                                break;
                            }
                        }
                        s.sessions.fetch_add(1, Ordering::SeqCst);
                    }
                    let mut got = first.clone();
                    let mut counted = proxy;
                    if mode == Mode::Echo
                        && !first.is_empty()
                        && sock.write_all(&first).await.is_err()
                    {
                        return;
                    }
                    let mut buf = vec![0u8; 32 * 1024];
                    loop {
                        let n = match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if !counted {
                            counted = true;
                            s.sessions.fetch_add(1, Ordering::SeqCst);
                        }
                        match mode {
                            Mode::Echo => {
                                if sock.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                            Mode::Sink => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    if mode == Mode::Sink {
                        s.data.lock().unwrap().push(got);
                    }
                    let _ = sock.shutdown().await;
                });
            }
        });
        Upstream { addr, seen, task }
    }

    fn accepts(&self) -> usize {
        self.seen.accepts.load(Ordering::SeqCst)
    }
    fn sessions(&self) -> usize {
        self.seen.sessions.load(Ordering::SeqCst)
    }
    fn stop(self) -> (SocketAddr, Arc<Seen>) {
        self.task.abort();
        (self.addr, self.seen)
    }
}

// ---------------------------------------------------------------- helpers

fn config(toml: &str) -> RelayConfig {
    let cfg = RelayConfig::from_toml_str(toml).unwrap();
    cfg.validate().unwrap();
    cfg
}

/// One listener `name` of each given kind routed to pool "p" with the given servers.
fn pool_config(
    listeners: &str,
    servers: &[SocketAddr],
    send_proxy: &str,
    extra: &str,
) -> RelayConfig {
    let servers: Vec<String> = servers.iter().map(|a| format!("\"{a}\"")).collect();
    config(&format!(
        r#"
        {extra}
        [stats]
        listen = "127.0.0.1:0"
        [pool.p]
        servers = [{}]
        send_proxy = "{send_proxy}"
        health_check_interval = "100ms"
        {listeners}
        "#,
        servers.join(", ")
    ))
}

fn listener(name: &str, opts: &str) -> String {
    format!("[[listener]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\npool = \"p\"\n{opts}\n")
}

fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Sends `data`, half-closes, reads until EOF, and checks the echo is identical.
async fn echo_roundtrip<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    data: Vec<u8>,
) {
    let (mut r, mut w) = tokio::io::split(stream);
    let expected = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
        w
    });
    let mut got = Vec::with_capacity(expected.len());
    tokio::time::timeout(T, r.read_to_end(&mut got))
        .await
        .expect("echo timed out")
        .unwrap();
    let _w = writer.await.unwrap();
    assert_eq!(got.len(), expected.len(), "echoed length");
    assert!(got == expected, "echoed bytes differ");
}

/// True if the peer closes (EOF or reset) within `within`.
async fn closed_within<S: AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < T, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(T, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let status = out[9..12].parse().unwrap();
    (status, out)
}

fn addr(r: &RunningRelay, name: &str) -> SocketAddr {
    r.addr(name).unwrap_or_else(|| panic!("no listener {name}"))
}

// ---------------------------------------------------------------- TLS client helpers

mod tls_client {

    use rustls::pki_types::{CertificateDer, ServerName};

    use std::sync::Arc;

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// What the Postern client does: any relay certificate (the shared verifier).
    pub fn insecure() -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(Arc::new(postern_protocol::tls::relay_client_config()))
    }

    pub fn trusting(cert: CertificateDer<'static>) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    }

    pub fn name(s: &str) -> ServerName<'static> {
        ServerName::try_from(s.to_string()).unwrap()
    }
}

// A TLS ClientHello record with an optional SNI and padding extension (shared builder).
use postern_test_kit::tls::client_hello_record as client_hello;

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listener_kind_relays_8mib_both_ways() {
    let up = Upstream::start(Mode::Echo, true).await;
    let cfg = pool_config(
        &[
            listener("plain", ""),
            listener("tls", "tls = true"),
            listener("plain-lb", "accept_proxy = true"),
            listener("tls-lb", "tls = true\naccept_proxy = true"),
        ]
        .concat(),
        &[up.addr],
        "v2",
        "",
    );
    let relay = Relay::start(cfg).await.unwrap();
    let data = pattern(8 * 1024 * 1024);

    let s = TcpStream::connect(addr(&relay, "plain")).await.unwrap();
    echo_roundtrip(s, data.clone()).await;

    let s = TcpStream::connect(addr(&relay, "tls")).await.unwrap();
    let s = tls_client::insecure()
        .connect(tls_client::name("relay.invalid"), s)
        .await
        .unwrap();
    echo_roundtrip(s, data.clone()).await;

    let mut s = TcpStream::connect(addr(&relay, "plain-lb")).await.unwrap();
    s.write_all(b"PROXY TCP4 203.0.113.5 192.0.2.80 40000 8222\r\n")
        .await
        .unwrap();
    echo_roundtrip(s, data.clone()).await;

    let mut s = TcpStream::connect(addr(&relay, "tls-lb")).await.unwrap();
    let src: SocketAddr = "[2001:db8::5]:40001".parse().unwrap();
    let dst: SocketAddr = "[2001:db8::80]:8443".parse().unwrap();
    s.write_all(&proxy_header::encode_v2(src, dst))
        .await
        .unwrap();
    let s = tls_client::insecure()
        .connect(tls_client::name("relay.invalid"), s)
        .await
        .unwrap();
    echo_roundtrip(s, data.clone()).await;

    let m = relay.metrics().prometheus();
    assert!(
        m.contains("postern_relay_connections_total{listener=\"tls-lb\"} 1"),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "postern_relay_bytes_total{{listener=\"plain\",direction=\"upstream_to_client\"}} {}",
            8 * 1024 * 1024
        )),
        "{m}"
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_file_certificate_validates() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["relay.test".to_string()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, ck.cert.pem()).unwrap();
    std::fs::write(&key_path, ck.signing_key.serialize_pem()).unwrap();
    let up = Upstream::start(Mode::Echo, false).await;
    let extra = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\n",
        cert_path.display().to_string(),
        key_path.display().to_string()
    );
    let cfg = pool_config(&listener("tls", "tls = true"), &[up.addr], "none", &extra);
    let relay = Relay::start(cfg).await.unwrap();
    let s = TcpStream::connect(addr(&relay, "tls")).await.unwrap();
    let s = tls_client::trusting(ck.cert.der().clone())
        .connect(tls_client::name("relay.test"), s)
        .await
        .expect("certificate from file must validate for relay.test");
    echo_roundtrip(s, pattern(100_000)).await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_certificate_has_configured_names() {
    let up = Upstream::start(Mode::Echo, false).await;
    let extra = "[tls]\nnames = [\"relay.example.org\", \"127.0.0.1\"]\n";
    let cfg = pool_config(&listener("tls", "tls = true"), &[up.addr], "none", extra);
    let relay = Relay::start(cfg).await.unwrap();
    let s = TcpStream::connect(addr(&relay, "tls")).await.unwrap();
    let s = tls_client::insecure()
        .connect(tls_client::name("relay.example.org"), s)
        .await
        .unwrap();
    let certs = s.get_ref().1.peer_certificates().unwrap().to_vec();
    assert_eq!(certs.len(), 1);
    // The configured name is in the certificate: a client trusting it validates the name.
    let s2 = TcpStream::connect(addr(&relay, "tls")).await.unwrap();
    tls_client::trusting(certs[0].clone())
        .connect(tls_client::name("relay.example.org"), s2)
        .await
        .expect("generated certificate must carry the configured DNS name");
    echo_roundtrip(s, pattern(10_000)).await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_header_sent_upstream_matches_known_vectors() {
    let up = Upstream::start(Mode::Echo, true).await;
    let cfg = pool_config(
        &[listener("plain", ""), listener("lb", "accept_proxy = true")].concat(),
        &[up.addr],
        "v2",
        "trusted_proxies = [\"127.0.0.1\"]",
    );
    let relay = Relay::start(cfg).await.unwrap();

    // Direct client: source is the client's socket, destination the relay's listener.
    let s = TcpStream::connect(addr(&relay, "plain")).await.unwrap();
    let client_port = s.local_addr().unwrap().port();
    let relay_port = addr(&relay, "plain").port();
    echo_roundtrip(s, b"hello".to_vec()).await;
    let mut expected = V2_SIGNATURE.to_vec();
    expected.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c, 127, 0, 0, 1, 127, 0, 0, 1]);
    expected.extend_from_slice(&client_port.to_be_bytes());
    expected.extend_from_slice(&relay_port.to_be_bytes());
    assert_eq!(up.seen.headers.lock().unwrap()[0], expected);

    // Behind a load balancer (v1 in): the addresses from the received header are forwarded.
    let mut s = TcpStream::connect(addr(&relay, "lb")).await.unwrap();
    s.write_all(b"PROXY TCP4 198.51.100.22 203.0.113.1 35646 80\r\n")
        .await
        .unwrap();
    echo_roundtrip(s, b"!".to_vec()).await;
    let h = up.seen.headers.lock().unwrap()[1].clone();
    assert_eq!(
        h,
        [
            &V2_SIGNATURE[..],
            &[0x21, 0x11, 0x00, 0x0c, 198, 51, 100, 22, 203, 0, 113, 1, 0x8b, 0x3e, 0x00, 0x50],
        ]
        .concat()
    );

    // v2 in, IPv6 (the example from the PROXY protocol spec's address block layout).
    let mut s = TcpStream::connect(addr(&relay, "lb")).await.unwrap();
    let v2_in = [
        &V2_SIGNATURE[..],
        &[0x21, 0x21, 0x00, 0x24],
        &[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        &[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        &[0x04, 0xd2, 0x01, 0xbb],
    ]
    .concat();
    s.write_all(&v2_in).await.unwrap();
    echo_roundtrip(s, b"x".to_vec()).await;
    assert_eq!(
        up.seen.headers.lock().unwrap()[2],
        v2_in,
        "forwarded header equals the received one"
    );
    relay.shutdown().await;
}

/// Regression (issue 18, defect 1): a load-balancer listener believed a PROXY header from
/// anyone, so a client reaching it directly could claim any address (and dodge the
/// per-source limit). Only `trusted_proxies` may set the address now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_header_from_an_untrusted_peer_is_ignored() {
    let up = Upstream::start(Mode::Echo, true).await;
    let cfg = pool_config(
        &listener("lb", "accept_proxy = true"),
        &[up.addr],
        "v2",
        "trusted_proxies = [\"192.0.2.0/24\"]\n[limits]\nmax_per_source = 1\n",
    );
    let relay = Relay::start(cfg).await.unwrap();
    let lb = addr(&relay, "lb");
    let mut first = TcpStream::connect(lb).await.unwrap();
    let port = first.local_addr().unwrap().port();
    first
        .write_all(b"PROXY TCP4 198.51.100.22 203.0.113.1 35646 80\r\nping")
        .await
        .unwrap();
    let mut b = [0u8; 4];
    first.read_exact(&mut b).await.unwrap();
    // Forwarded as what it is: a connection from 127.0.0.1, not from 198.51.100.22.
    let h = up.seen.headers.lock().unwrap()[0].clone();
    let mut expected = V2_SIGNATURE.to_vec();
    expected.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c, 127, 0, 0, 1, 127, 0, 0, 1]);
    expected.extend_from_slice(&port.to_be_bytes());
    expected.extend_from_slice(&lb.port().to_be_bytes());
    assert_eq!(h, expected);
    // Claiming another address does not buy a second connection from the same peer.
    let mut second = TcpStream::connect(lb).await.unwrap();
    second
        .write_all(b"PROXY TCP4 198.51.100.23 203.0.113.1 35647 80\r\n")
        .await
        .unwrap();
    assert!(closed_within(&mut second, Duration::from_secs(2)).await);
    let metrics = relay.metrics().prometheus();
    assert!(metrics.contains("reason=\"source_limit\"} 1"), "{metrics}");
    assert!(
        metrics.contains("postern_relay_proxy_untrusted_total{listener=\"lb\"} 2"),
        "{metrics}"
    );
    relay.shutdown().await;
}

/// Regression (issue 18, defect 7): 64 idle connections took every stats slot, so
/// `/healthz` stopped answering and an orchestrator would restart the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_starve_the_health_endpoint() {
    let up = Upstream::start(Mode::Echo, false).await;
    let cfg = pool_config(&listener("plain", ""), &[up.addr], "none", "");
    let relay = Relay::start(cfg).await.unwrap();
    let stats = relay.stats_addr().unwrap();
    let m = relay.metrics();
    wait_until("upstream healthy", move || m.healthy()).await;
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(TcpStream::connect(stats).await.unwrap());
    }
    let t0 = Instant::now();
    let (status, body) = http_get(stats, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert!(t0.elapsed() < Duration::from_secs(2), "answered promptly");
    // From another address the full pages still work.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut other = socket.connect(stats).await.unwrap();
    other
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut page = String::new();
    tokio::time::timeout(T, other.read_to_string(&mut page))
        .await
        .unwrap()
        .unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    // And the idle connections are closed within seconds.
    for s in idle.iter_mut().take(8) {
        assert!(closed_within(s, Duration::from_secs(5)).await);
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_header_rejected_where_not_expected_and_garbage_rejected_where_expected() {
    let up = Upstream::start(Mode::Sink, false).await;
    let cfg = pool_config(
        &[listener("plain", ""), listener("lb", "accept_proxy = true")].concat(),
        &[up.addr],
        "none",
        "",
    );
    let relay = Relay::start(cfg).await.unwrap();

    // A client spoofing a PROXY header on a listener that does not expect one.
    for header in [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\r\nhello".to_vec(),
        [
            &V2_SIGNATURE[..],
            &[0x21, 0x11, 0, 12],
            &[1u8; 12],
            b"hello",
        ]
        .concat(),
    ] {
        let mut s = TcpStream::connect(addr(&relay, "plain")).await.unwrap();
        s.write_all(&header).await.unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    }
    // Garbage where a header is expected: closed before any upstream connection.
    let before = up.accepts();
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"PROXY TCP4 nonsense\r\n",
        &[0x16, 3, 1, 0, 5],
    ] {
        let mut s = TcpStream::connect(addr(&relay, "lb")).await.unwrap();
        s.write_all(junk).await.unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    }
    // The spoofed headers never reached the upstream.
    let seen = up.seen.clone();
    wait_until("sink records", || seen.data.lock().unwrap().len() >= 2).await;
    for d in up.seen.data.lock().unwrap().iter() {
        assert!(d.is_empty(), "upstream received {d:?}");
    }
    // Health checks may connect, but no client session did.
    assert_eq!(up.sessions(), 0);
    let m = relay.metrics().prometheus();
    assert!(m.contains("reason=\"proxy_unexpected\"} 2"), "{m}");
    assert!(
        m.contains(
            "postern_relay_handshake_failures_total{listener=\"lb\",reason=\"proxy_header\"} 3"
        ),
        "{m}"
    );
    let _ = before;
    // Still serving.
    let mut s = TcpStream::connect(addr(&relay, "plain")).await.unwrap();
    s.write_all(b"POST /fine").await.unwrap();
    s.shutdown().await.unwrap();
    assert!(closed_within(&mut s, T).await);
    wait_until("real data", || {
        seen.data.lock().unwrap().iter().any(|d| d == b"POST /fine")
    })
    .await;
    relay.shutdown().await;
}

fn sni_config(sink: SocketAddr, extra_listener: &str) -> RelayConfig {
    let mut cfg = config(&format!(
        r#"
        [limits]
        handshake_timeout = "2s"
        [[listener]]
        name = "media"
        listen = "127.0.0.1:0"
        sni = {{ allow = ["*.media.test", "exact.test"], port = 443 }}
        {extra_listener}
        "#
    ));
    for name in [
        "a.media.test",
        "b.c.media.test",
        "exact.test",
        "media.test",
        "evil.test",
    ] {
        cfg.resolve_override(format!("{name}:443"), sink);
    }
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_routing_only_reaches_allowed_names() {
    let sink = Upstream::start(Mode::Sink, false).await;
    let relay = Relay::start(sni_config(sink.addr, "")).await.unwrap();
    let media = addr(&relay, "media");

    // Refused: disallowed names, apex of a wildcard, no SNI, IP literal, garbage, oversized,
    // a truncated hello followed by EOF.
    let mut refused: Vec<Vec<u8>> = vec![
        client_hello(Some("evil.test"), 0),
        client_hello(Some("media.test"), 0),
        client_hello(Some("a.media.test.evil.test"), 0),
        client_hello(None, 0),
        client_hello(Some("127.0.0.1"), 0),
        client_hello(Some("[::1]"), 0),
        b"GET / HTTP/1.1\r\nHost: a.media.test\r\n\r\n".to_vec(),
        pattern(3000),
        client_hello(Some("a.media.test"), 20_000),
    ];
    let mut truncated = client_hello(Some("a.media.test"), 0);
    truncated.truncate(30);
    refused.push(truncated);
    for (i, bytes) in refused.iter().enumerate() {
        let mut s = TcpStream::connect(media).await.unwrap();
        let _ = s.write_all(bytes).await;
        let _ = s.shutdown().await;
        assert!(
            closed_within(&mut s, Duration::from_secs(5)).await,
            "case {i} not closed"
        );
    }
    assert_eq!(
        sink.accepts(),
        0,
        "a refused ClientHello opened an upstream connection"
    );

    // Allowed, split byte by byte: reaches the upstream with every byte untouched.
    let hello = client_hello(Some("b.c.media.test"), 100);
    let mut s = TcpStream::connect(media).await.unwrap();
    s.set_nodelay(true).unwrap();
    for b in &hello {
        s.write_all(std::slice::from_ref(b)).await.unwrap();
        s.flush().await.unwrap();
        tokio::task::yield_now().await;
    }
    s.write_all(b"after-hello").await.unwrap();
    s.shutdown().await.unwrap();
    assert!(closed_within(&mut s, T).await);
    let seen = sink.seen.clone();
    wait_until("sink data", || !seen.data.lock().unwrap().is_empty()).await;
    let expected = [&hello[..], b"after-hello"].concat();
    assert_eq!(sink.seen.data.lock().unwrap()[0], expected);
    assert_eq!(sink.accepts(), 1);

    let m = relay.metrics().prometheus();
    for (reason, n) in [
        ("sni_not_allowed", 3),
        ("no_sni", 1),
        ("sni_invalid", 2),
        ("not_tls", 2),
        ("bad_client_hello", 1),
    ] {
        let line = format!(
            "postern_relay_handshake_failures_total{{listener=\"media\",reason=\"{reason}\"}} {n}"
        );
        assert!(m.contains(&line), "missing {line}\n{m}");
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_passthrough_with_a_real_tls_client() {
    // The upstream is a real TLS server for a.media.test; the relay passes TLS through.
    let ck = rcgen::generate_simple_self_signed(vec!["a.media.test".to_string()]).unwrap();
    let server_cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![ck.cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let tls_up = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_up_addr = tls_up.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = tls_up.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(s) = acceptor.accept(s).await else {
                    return;
                };
                let (mut r, mut w) = tokio::io::split(s);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    let relay = Relay::start(sni_config(tls_up_addr, "")).await.unwrap();
    let s = TcpStream::connect(addr(&relay, "media")).await.unwrap();
    let s = tls_client::trusting(ck.cert.der().clone())
        .connect(tls_client::name("a.media.test"), s)
        .await
        .expect("end-to-end TLS through the SNI route");
    echo_roundtrip(s, pattern(1 << 20)).await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_servers_out_and_back() {
    let a = Upstream::start(Mode::Echo, false).await;
    let b = Upstream::start(Mode::Echo, false).await;
    let cfg = pool_config(&listener("plain", ""), &[a.addr, b.addr], "none", "");
    let relay = Relay::start(cfg).await.unwrap();
    let plain = addr(&relay, "plain");
    for _ in 0..4 {
        echo_roundtrip(TcpStream::connect(plain).await.unwrap(), b"x".to_vec()).await;
    }
    assert_eq!(a.sessions(), 2, "round-robin over both");
    assert_eq!(b.sessions(), 2);

    // Stop A: within the check interval it leaves rotation; all new connections go to B.
    let (a_addr, a_seen) = a.stop();
    let metrics = relay.metrics();
    let m2 = metrics.clone();
    wait_until("A marked down", move || {
        !m2.pools[0].servers[0].is_healthy()
    })
    .await;
    let (status, _) = http_get(relay.stats_addr().unwrap(), "/healthz").await;
    assert_eq!(status, 200, "B still healthy");
    for _ in 0..6 {
        echo_roundtrip(TcpStream::connect(plain).await.unwrap(), b"y".to_vec()).await;
    }
    assert_eq!(b.sessions(), 8);
    let m = relay.metrics().prometheus();
    assert!(
        m.contains(&format!(
            "postern_relay_upstream_up{{pool=\"p\",server=\"{a_addr}\"}} 0"
        )),
        "{m}"
    );

    // Restart A on the same port: it comes back.
    let a = Upstream::start_at(a_addr, Mode::Echo, false, a_seen).await;
    let m2 = metrics.clone();
    wait_until("A back", move || m2.pools[0].servers[0].is_healthy()).await;
    for _ in 0..4 {
        echo_roundtrip(TcpStream::connect(plain).await.unwrap(), b"z".to_vec()).await;
    }
    assert!(a.sessions() > 2, "A serves again");

    // Both down: /healthz reports 503, connections fail cleanly.
    let _ = a.stop();
    let _ = b.stop();
    let m2 = metrics.clone();
    wait_until("both down", move || !m2.pools[0].any_healthy()).await;
    let (status, _) = http_get(relay.stats_addr().unwrap(), "/healthz").await;
    assert_eq!(status, 503);
    let mut s = TcpStream::connect(plain).await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maxconn_and_per_source_limits_refuse_promptly() {
    let up = Upstream::start(Mode::Echo, false).await;
    let cfg = pool_config(
        &listener("plain", ""),
        &[up.addr],
        "none",
        "[limits]\nmaxconn = 2\nmax_per_source = 0\n",
    );
    let relay = Relay::start(cfg).await.unwrap();
    let plain = addr(&relay, "plain");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(plain).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        held.push(s);
    }
    let t0 = Instant::now();
    let mut s = TcpStream::connect(plain).await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(2)).await);
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "refusal must be immediate"
    );
    assert!(relay
        .metrics()
        .prometheus()
        .contains("postern_relay_connections_refused_total{listener=\"plain\"} 1"));
    drop(held);
    let m = relay.metrics();
    wait_until("slots released", move || {
        m.listeners[0].active.load(Ordering::SeqCst) == 0
    })
    .await;
    echo_roundtrip(TcpStream::connect(plain).await.unwrap(), b"again".to_vec()).await;
    relay.shutdown().await;

    let cfg = pool_config(
        &listener("plain", ""),
        &[up.addr],
        "none",
        "[limits]\nmax_per_source = 2\n",
    );
    let relay = Relay::start(cfg).await.unwrap();
    let plain = addr(&relay, "plain");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(plain).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        held.push(s);
    }
    let t0 = Instant::now();
    let mut s = TcpStream::connect(plain).await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(2)).await);
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert!(relay
        .metrics()
        .prometheus()
        .contains("reason=\"source_limit\"} 1"));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_at_the_deadline_while_others_are_served() {
    let up = Upstream::start(Mode::Echo, false).await;
    let cfg = pool_config(
        &[
            listener("tls", "tls = true"),
            listener("lb", "accept_proxy = true"),
            listener("plain", ""),
        ]
        .concat(),
        &[up.addr],
        "none",
        "[limits]\nhandshake_timeout = \"500ms\"\n",
    );
    let relay = Relay::start(cfg).await.unwrap();
    let t0 = Instant::now();
    let mut slow_tls = TcpStream::connect(addr(&relay, "tls")).await.unwrap();
    slow_tls.write_all(&[0x16, 0x03]).await.unwrap();
    let mut slow_proxy = TcpStream::connect(addr(&relay, "lb")).await.unwrap();
    slow_proxy.write_all(b"PROXY TCP4 1.2.3.4").await.unwrap();
    // Meanwhile a normal client is served.
    echo_roundtrip(
        TcpStream::connect(addr(&relay, "plain")).await.unwrap(),
        pattern(50_000),
    )
    .await;
    assert!(closed_within(&mut slow_tls, Duration::from_secs(5)).await);
    assert!(closed_within(&mut slow_proxy, Duration::from_secs(5)).await);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "cut after {took:?}"
    );
    let m = relay.metrics().prometheus();
    assert!(
        m.contains("postern_relay_handshake_failures_total{listener=\"tls\",reason=\"timeout\"} 1"),
        "{m}"
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_close_timeouts() {
    let up = Upstream::start(Mode::Sink, false).await;
    let cfg = pool_config(
        &listener("plain", ""),
        &[up.addr],
        "none",
        "[limits]\nidle_timeout = \"400ms\"\n",
    );
    let relay = Relay::start(cfg).await.unwrap();
    // Idle: no traffic after the first bytes -> closed after ~400ms, not before.
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr(&relay, "plain")).await.unwrap();
    s.write_all(b"hi").await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    assert!(
        t0.elapsed() >= Duration::from_millis(350),
        "closed too early"
    );
    relay.shutdown().await;

    // Half-close: the client FINs, the upstream neither answers nor closes -> the other
    // direction is cut after ~200ms although the idle timeout is much longer.
    let holder = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let holder_addr = holder.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut keep = Vec::new();
        while let Ok((s, _)) = holder.accept().await {
            keep.push(s);
        }
    });
    let cfg = pool_config(
        &listener("plain", ""),
        &[holder_addr],
        "none",
        "[limits]\nidle_timeout = \"30s\"\nhalf_close_timeout = \"200ms\"\n",
    );
    let relay = Relay::start(cfg).await.unwrap();
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr(&relay, "plain")).await.unwrap();
    s.write_all(b"bye").await.unwrap();
    s.shutdown().await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(10)).await);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_secs(5),
        "half-close timeout not applied: {took:?}"
    );
    relay.shutdown().await;
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_endpoints() {
    let up = Upstream::start(Mode::Echo, false).await;
    let cfg = pool_config(&listener("plain", ""), &[up.addr], "none", "");
    let relay = Relay::start(cfg).await.unwrap();
    echo_roundtrip(
        TcpStream::connect(addr(&relay, "plain")).await.unwrap(),
        b"abc".to_vec(),
    )
    .await;
    relay.metrics().sample();
    echo_roundtrip(
        TcpStream::connect(addr(&relay, "plain")).await.unwrap(),
        b"defg".to_vec(),
    )
    .await;
    relay.metrics().sample();
    let stats = relay.stats_addr().unwrap();
    let (status, body) = http_get(stats, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("# TYPE postern_relay_connections_total counter"));
    assert!(
        body.contains("postern_relay_connections_total{listener=\"plain\"} 2"),
        "{body}"
    );
    assert!(body.contains(
        "postern_relay_bytes_total{listener=\"plain\",direction=\"client_to_upstream\"} 7"
    ));
    assert!(body.contains("postern_relay_upstream_connect_seconds{pool=\"p\""));
    let (status, _) = http_get(stats, "/healthz").await;
    assert_eq!(status, 200);
    let (status, page) = http_get(stats, "/").await;
    assert_eq!(status, 200);
    assert!(
        page.contains("<svg") && page.contains("<polyline"),
        "graph missing"
    );
    assert!(page.contains("Working"));
    assert!(!page.contains("src=\"http"), "no external assets");
    let (status, _) = http_get(stats, "/nope").await;
    assert_eq!(status, 404);
    relay.shutdown().await;
}

/// A stats listener with a token answers only requests that carry it; everything else gets
/// the 404 of an unknown path, on the full listener and on the health fast lane alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_with_a_token_answers_only_its_holder() {
    let up = Upstream::start(Mode::Echo, false).await;
    let mut cfg = pool_config(&listener("plain", ""), &[up.addr], "none", "");
    cfg.stats.as_mut().unwrap().token = Some("0123456789abcdef".into());
    let relay = Relay::start(cfg).await.unwrap();
    let stats = relay.stats_addr().unwrap();
    for path in ["/", "/metrics", "/healthz", "/?token=wrong-token-0000"] {
        let (status, body) = http_get(stats, path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(
            !body.contains("postern"),
            "{path} must not name the relay: {body}"
        );
    }
    let (status, page) = http_get(stats, "/?token=0123456789abcdef").await;
    assert_eq!(status, 200);
    assert!(page.contains("<svg"));
    let (status, _) = http_get(stats, "/healthz?token=0123456789abcdef").await;
    assert_eq!(status, 200);
    let mut s = TcpStream::connect(stats).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer 0123456789abcdef\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    relay.shutdown().await;
}

#[test]
fn a_public_stats_listener_needs_a_token() {
    let base = "[[listener]]\nname = \"p\"\nlisten = \"127.0.0.1:0\"\npool = \"p\"\n[pool.p]\nservers = [\"127.0.0.1:1\"]\n";
    let public =
        RelayConfig::from_toml_str(&format!("{base}[stats]\nlisten = \"0.0.0.0:0\"\n")).unwrap();
    let err = public.validate().unwrap_err().to_string();
    assert!(
        err.contains("needs a token") && err.contains("127.0.0.1"),
        "{err}"
    );
    let short = RelayConfig::from_toml_str(&format!(
        "{base}[stats]\nlisten = \"0.0.0.0:0\"\ntoken = \"short\"\n"
    ))
    .unwrap();
    assert!(short.validate().is_err());
    let unsendable = RelayConfig::from_toml_str(&format!(
        "{base}[stats]\nlisten = \"0.0.0.0:0\"\ntoken = \"0123456789&abcdef\"\n"
    ))
    .unwrap();
    let err = unsendable.validate().unwrap_err().to_string();
    assert!(err.contains("letters, digits"), "{err}");
    let ok = RelayConfig::from_toml_str(&format!(
        "{base}[stats]\nlisten = \"0.0.0.0:0\"\ntoken = \"0123456789abcdef\"\n"
    ))
    .unwrap();
    ok.validate().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_preset_against_loopback_stand_ins() {
    let web = Upstream::start(Mode::Echo, true).await;
    let chat = Upstream::start(Mode::Echo, true).await;
    let media = Upstream::start(Mode::Sink, false).await;
    let mut cfg = postern_relay::config::presets::preset("whatsapp").unwrap();
    cfg.use_ephemeral_ports("127.0.0.1".parse().unwrap());
    cfg.resolve_override("g.whatsapp.net:80", web.addr);
    cfg.resolve_override("g.whatsapp.net:5222", chat.addr);
    cfg.resolve_override("mmg.whatsapp.net:443", media.addr);
    let relay = Relay::start(cfg).await.unwrap();
    let names: Vec<String> = relay.listeners().into_iter().map(|(n, _, _)| n).collect();
    assert_eq!(names, ["http", "https", "chat", "media", "media-alt"]);

    echo_roundtrip(
        TcpStream::connect(addr(&relay, "http")).await.unwrap(),
        b"web".to_vec(),
    )
    .await;
    echo_roundtrip(
        TcpStream::connect(addr(&relay, "chat")).await.unwrap(),
        b"chat".to_vec(),
    )
    .await;
    let s = TcpStream::connect(addr(&relay, "https")).await.unwrap();
    let s = tls_client::insecure()
        .connect(tls_client::name("whatever.example"), s)
        .await
        .unwrap();
    echo_roundtrip(s, b"chat over tls".to_vec()).await;
    assert_eq!(web.sessions(), 1);
    assert_eq!(chat.sessions(), 2);
    assert_eq!(chat.seen.headers.lock().unwrap()[0][..12], V2_SIGNATURE);

    let hello = client_hello(Some("mmg.whatsapp.net"), 0);
    for l in ["media", "media-alt"] {
        let mut s = TcpStream::connect(addr(&relay, l)).await.unwrap();
        s.write_all(&hello).await.unwrap();
        s.shutdown().await.unwrap();
        assert!(closed_within(&mut s, T).await);
    }
    let seen = media.seen.clone();
    wait_until("media bytes", || seen.data.lock().unwrap().len() == 2).await;
    assert!(media.seen.data.lock().unwrap().iter().all(|d| *d == hello));
    // Not under whatsapp.net: refused.
    let mut s = TcpStream::connect(addr(&relay, "media")).await.unwrap();
    s.write_all(&client_hello(Some("example.com"), 0))
        .await
        .unwrap();
    assert!(closed_within(&mut s, T).await);
    assert_eq!(media.accepts(), 2);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_preset_terminates_tls_then_routes_inner_sni() {
    let sink = Upstream::start(Mode::Sink, false).await;
    let mut cfg = postern_relay::config::presets::preset("signal").unwrap();
    cfg.use_ephemeral_ports("127.0.0.1".parse().unwrap());
    cfg.resolve_override("chat.signal.org:443", sink.addr);
    let relay = Relay::start(cfg).await.unwrap();
    let inner = client_hello(Some("chat.signal.org"), 0);
    let s = TcpStream::connect(addr(&relay, "https")).await.unwrap();
    let mut s = tls_client::insecure()
        .connect(tls_client::name("relay.example"), s)
        .await
        .unwrap();
    s.write_all(&inner).await.unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut rest)).await;
    let seen = sink.seen.clone();
    wait_until("inner hello", || !seen.data.lock().unwrap().is_empty()).await;
    assert_eq!(sink.seen.data.lock().unwrap()[0], inner);

    let s = TcpStream::connect(addr(&relay, "https")).await.unwrap();
    let mut s = tls_client::insecure()
        .connect(tls_client::name("relay.example"), s)
        .await
        .unwrap();
    s.write_all(&client_hello(Some("evil.example"), 0))
        .await
        .unwrap();
    assert!(closed_within(&mut s, T).await);
    assert_eq!(sink.accepts(), 1);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_accepting_and_lets_connections_finish() {
    let up = Upstream::start(Mode::Echo, false).await;
    let cfg = pool_config(
        &listener("plain", ""),
        &[up.addr],
        "none",
        "[limits]\nshutdown_grace = \"300ms\"\n",
    );
    let relay = Relay::start(cfg).await.unwrap();
    let plain = addr(&relay, "plain");
    let mut open = TcpStream::connect(plain).await.unwrap();
    open.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    open.read_exact(&mut b).await.unwrap();
    let t0 = Instant::now();
    tokio::time::timeout(T, relay.shutdown())
        .await
        .expect("shutdown hangs");
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "grace period not honoured"
    );
    assert!(
        closed_within(&mut open, Duration::from_secs(2)).await,
        "open connection cut after grace"
    );
    assert!(
        TcpStream::connect(plain).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test]
async fn bind_errors_are_clear() {
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cfg = config(&format!(
        "[pool.p]\nservers = [\"127.0.0.1:9\"]\n[[listener]]\nname = \"x\"\nlisten = \"{}\"\npool = \"p\"\n",
        taken.local_addr().unwrap()
    ));
    let err = Relay::start(cfg)
        .await
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        err.contains("listener \"x\"") && err.contains("another program"),
        "{err}"
    );
}

#[test]
fn example_config_and_preset_files_load_and_validate() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy");
    let example = RelayConfig::load(format!("{root}/relay.example.toml")).unwrap();
    assert_eq!(
        example.pools["chat"].send_proxy,
        postern_relay::config::SendProxy::V2
    );
    for name in postern_relay::config::presets::NAMES {
        let from_file = RelayConfig::load(format!("{root}/presets/{name}.toml")).unwrap();
        let embedded = postern_relay::config::presets::preset(name).unwrap();
        assert_eq!(
            from_file.listeners.len(),
            embedded.listeners.len(),
            "{name}"
        );
    }
    let postern = postern_relay::config::presets::preset("postern").unwrap();
    assert!(postern
        .pools
        .values()
        .all(|p| p.send_proxy == postern_relay::config::SendProxy::V2));
    let enabled: Vec<u16> = postern
        .listeners
        .iter()
        .filter(|l| l.enabled)
        .map(|l| l.listen.port())
        .collect();
    // IPv4 and IPv6.
    assert_eq!(enabled, [80, 443, 5222, 80, 443, 5222]);
    let v6: Vec<bool> = postern
        .listeners
        .iter()
        .filter(|l| l.enabled)
        .map(|l| l.listen.is_ipv6())
        .collect();
    assert_eq!(v6, [false, false, false, true, true, true]);
    assert_eq!(postern.stats.unwrap().listen.port(), 8199);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postern_on_helper_and_run_until() {
    let up = Upstream::start(Mode::Echo, true).await;
    let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let cfg = postern_relay::config::presets::postern_on(
        &[up.addr.to_string()],
        &[lo, lo],
        &[lo],
        Some(lo),
    )
    .unwrap();
    let relay = Relay::start(cfg).await.unwrap();
    let kinds: Vec<(String, bool)> = relay
        .listeners()
        .into_iter()
        .map(|(n, k, _)| (n, k.tls))
        .collect();
    assert_eq!(
        kinds,
        [
            ("plain".into(), false),
            ("plain-2".into(), false),
            ("tls".into(), true)
        ]
    );
    echo_roundtrip(
        TcpStream::connect(addr(&relay, "plain-2")).await.unwrap(),
        b"dev".to_vec(),
    )
    .await;
    assert_eq!(
        up.seen.headers.lock().unwrap().len(),
        1,
        "postern preset sends PROXY v2"
    );
    let stop = relay.stop_token();
    let plain = addr(&relay, "plain");
    let running = tokio::spawn(relay.run_until(std::future::pending::<()>()));
    stop.cancel();
    tokio::time::timeout(T, running).await.unwrap().unwrap();
    assert!(TcpStream::connect(plain).await.is_err());
}

// ---------------------------------------------------------------- parking quiet connections

fn parked(relay: &RunningRelay) -> usize {
    relay.metrics().parked()
}

/// Writes `msg` on `a` while reading it whole on `b`.
async fn pass<A: AsyncWrite + Unpin, B: AsyncRead + Unpin>(a: &mut A, b: &mut B, msg: &[u8]) {
    let write = async {
        a.write_all(msg).await.unwrap();
        a.flush().await.unwrap();
    };
    let mut got = vec![0u8; msg.len()];
    let read = async {
        tokio::time::timeout(T, b.read_exact(&mut got))
            .await
            .expect("bytes did not arrive")
            .unwrap();
    };
    tokio::join!(write, read);
    assert!(got == msg, "bytes differ");
}

/// A quiet connection leaves its task (plain and TLS): bytes from either side wake it, it
/// still counts as open and for graceful shutdown, and nothing is lost or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_connections_are_parked_and_woken_by_either_side() {
    // The test holds the upstream end of each connection, so it can speak first.
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cfg = pool_config(
        &[
            listener("plain", ""),
            listener("tls", "tls = true"),
            listener("plain-lb", "accept_proxy = true"),
        ]
        .concat(),
        &[upstream.local_addr().unwrap()],
        "none",
        "[limits]\npark_after = \"150ms\"\nidle_timeout = \"60s\"\n",
    );
    let relay = Relay::start(cfg).await.unwrap();
    let accept = || async {
        loop {
            let (mut s, _) = upstream.accept().await.unwrap();
            // Health checks connect and close without a byte; a relayed client says hello.
            let mut b = [0u8; 5];
            if s.read_exact(&mut b).await.is_ok() {
                assert_eq!(&b, b"hello");
                return s;
            }
        }
    };

    let mut plain = TcpStream::connect(addr(&relay, "plain")).await.unwrap();
    plain.write_all(b"hello").await.unwrap();
    let mut plain_up = accept().await;
    let tls = TcpStream::connect(addr(&relay, "tls")).await.unwrap();
    let mut tls = tls_client::insecure()
        .connect(tls_client::name("relay.invalid"), tls)
        .await
        .unwrap();
    tls.write_all(b"hello").await.unwrap();
    tls.flush().await.unwrap();
    let mut tls_up = accept().await;
    // Behind a load balancer, with the first bytes in the PROXY header's packet.
    let mut lb = TcpStream::connect(addr(&relay, "plain-lb")).await.unwrap();
    lb.write_all(b"PROXY TCP4 203.0.113.5 192.0.2.80 40000 8222\r\nhello")
        .await
        .unwrap();
    let mut lb_up = accept().await;

    for round in 0..3 {
        wait_until("all three connections parked", || parked(&relay) == 3).await;
        assert!(relay.tasks() >= 3, "parked connections count as running");
        let m = relay.metrics().prometheus();
        assert!(m.contains("postern_relay_connections_parked 3"), "{m}");
        assert!(
            m.contains("postern_relay_connections_active{listener=\"tls\"} 1"),
            "{m}"
        );
        // Round 0 wakes them from the client's side, round 1 from the upstream's, round 2
        // with bytes both ways at once (the larger message spans several TLS records).
        let big = pattern(200_000);
        match round {
            0 => {
                pass(&mut plain, &mut plain_up, b"from the client").await;
                pass(&mut tls, &mut tls_up, b"from the client").await;
                pass(&mut lb, &mut lb_up, b"from the client").await;
            }
            1 => {
                pass(&mut plain_up, &mut plain, b"from the server").await;
                pass(&mut tls_up, &mut tls, b"from the server").await;
                pass(&mut lb_up, &mut lb, b"from the server").await;
            }
            _ => {
                tokio::join!(
                    pass(&mut plain, &mut plain_up, &big),
                    pass(&mut tls_up, &mut tls, &big)
                );
                pass(&mut plain_up, &mut plain, &big).await;
                pass(&mut tls, &mut tls_up, &big).await;
                pass(&mut lb, &mut lb_up, &big).await;
            }
        }
    }

    // Closing either end of a parked connection closes the other.
    wait_until("all parked again", || parked(&relay) == 3).await;
    drop(lb);
    assert!(closed_within(&mut lb_up, Duration::from_secs(5)).await);
    drop(plain);
    assert!(closed_within(&mut plain_up, Duration::from_secs(5)).await);
    drop(tls_up);
    assert!(closed_within(&mut tls, Duration::from_secs(5)).await);
    wait_until("nothing parked", || parked(&relay) == 0).await;
    wait_until("no connection open", || relay_idle(&relay)).await;
    relay.shutdown().await;
}

fn relay_idle(relay: &RunningRelay) -> bool {
    let m = relay.metrics().prometheus();
    ["plain", "tls", "plain-lb"].iter().all(|l| {
        m.contains(&format!(
            "postern_relay_connections_active{{listener=\"{l}\"}} 0"
        ))
    })
}

/// A parked connection still gets its idle timeout, and shutdown cuts parked connections
/// after the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_connections_time_out_and_are_cut_at_shutdown() {
    let up = Upstream::start(Mode::Echo, false).await;
    let cfg = pool_config(
        &listener("plain", ""),
        &[up.addr],
        "none",
        "[limits]\npark_after = \"100ms\"\nidle_timeout = \"1500ms\"\nshutdown_grace = \"300ms\"\n",
    );
    let relay = Relay::start(cfg).await.unwrap();
    let t0 = Instant::now();
    let mut quiet = TcpStream::connect(addr(&relay, "plain")).await.unwrap();
    quiet.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    quiet.read_exact(&mut b).await.unwrap();
    wait_until("parked", || parked(&relay) == 1).await;
    assert!(closed_within(&mut quiet, Duration::from_secs(10)).await);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(6),
        "idle timeout of a parked connection: {took:?}"
    );
    assert_eq!(parked(&relay), 0);

    let mut open = TcpStream::connect(addr(&relay, "plain")).await.unwrap();
    open.write_all(b"y").await.unwrap();
    open.read_exact(&mut b).await.unwrap();
    wait_until("parked", || parked(&relay) == 1).await;
    let t0 = Instant::now();
    tokio::time::timeout(T, relay.shutdown())
        .await
        .expect("shutdown hangs on a parked connection");
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "the grace period applies to parked connections too"
    );
    assert!(closed_within(&mut open, Duration::from_secs(2)).await);
}

/// On a single-threaded runtime nothing else reports a resumed connection's readiness before
/// its first poll: a connection woken long after its last traffic must stay resumed until it
/// has read (an earlier version parked it again at once, and the bytes never got through).
#[tokio::test(flavor = "current_thread")]
async fn a_connection_woken_long_after_its_last_traffic_reads_before_parking_again() {
    let up = Upstream::start(Mode::Echo, false).await;
    let cfg = pool_config(
        &listener("plain", ""),
        &[up.addr],
        "none",
        "[limits]\npark_after = \"100ms\"\n",
    );
    let relay = Relay::start(cfg).await.unwrap();
    let mut s = TcpStream::connect(addr(&relay, "plain")).await.unwrap();
    for round in 0..3 {
        s.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        tokio::time::timeout(T, s.read_exact(&mut b))
            .await
            .unwrap_or_else(|_| panic!("round {round}: the parked connection never answered"))
            .unwrap();
        assert_eq!(&b, b"ping");
        wait_until("parked", || parked(&relay) == 1).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    relay.shutdown().await;
}
