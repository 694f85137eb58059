//! A relay with a secret, end to end on loopback: clients that prove the secret are
//! forwarded; every probe — a web request, random bytes, silence, a TLS handshake with any
//! server name, a replay of a real client's first bytes — reaches the cover site with
//! exactly the bytes it sent, and gets exactly the cover site's answer.

use postern_protocol::relay_auth::{ExporterCapture, RelaySecret};
use postern_relay::config::RelayConfig;
use postern_relay::{Relay, RunningRelay};
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(20);

/// The cover's stand-in "real web site": records what each connection sent before it
/// answered, answers every request the same, and closes.
const SITE_ANSWER: &[u8] =
    b"HTTP/1.1 404 Not Found\r\nServer: site\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found";

struct Site {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
}

async fn site() -> Site {
    site_on("127.0.0.1:0").await
}

async fn site_on(addr: &str) -> Site {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let r = received.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let r = r.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                // A request ends with a blank line; anything else is read until the client
                // stops sending for a moment, as a server's read timeout would.
                loop {
                    match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                    if got.ends_with(b"\r\n\r\n") {
                        break;
                    }
                }
                r.lock().unwrap().push(got);
                let _ = s.write_all(SITE_ANSWER).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Site { addr, received }
}

/// The chat upstream: echoes, and counts connections that sent something.
async fn echo() -> (SocketAddr, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sessions = Arc::new(Mutex::new(0usize));
    let c = sessions.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut counted = false;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if !counted {
                        counted = true;
                        *c.lock().unwrap() += 1;
                    }
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, sessions)
}

struct Setup {
    relay: RunningRelay,
    secret: RelaySecret,
    site: Site,
    sessions: Arc<Mutex<usize>>,
    _state: tempfile::TempDir,
}

async fn setup(cover: &str) -> Setup {
    let state = tempfile::tempdir().unwrap();
    let (upstream, sessions) = echo().await;
    let site = site().await;
    let cover = cover.replace("SITE", &site.addr.to_string());
    let toml = format!(
        r#"
state_dir = "{state}"
[secret]
[cover]
wait = "500ms"
{cover}
[[listener]]
name = "https"
listen = "127.0.0.1:0"
tls = true
pool = "chat"
[[listener]]
name = "http"
listen = "127.0.0.1:0"
pool = "chat"
[pool.chat]
servers = ["{upstream}"]
"#,
        state = state.path().display()
    );
    let cfg = RelayConfig::from_toml_str(&toml).unwrap();
    let relay = Relay::start(cfg).await.unwrap();
    let text = std::fs::read_to_string(state.path().join("secret")).unwrap();
    Setup {
        relay,
        secret: text.parse().unwrap(),
        site,
        sessions,
        _state: state,
    }
}

fn client_config(capture: Option<Arc<ExporterCapture>>) -> Arc<rustls::ClientConfig> {
    let mut config = postern_protocol::tls::relay_client_config();
    if let Some(c) = capture {
        config.key_log = c;
    }
    Arc::new(config)
}

async fn tls(
    addr: SocketAddr,
    sni: &str,
    capture: Option<Arc<ExporterCapture>>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(client_config(capture))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Sends `bytes` (then keeps the stream open) and returns everything until the far end
/// closes.
async fn answer_to<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, bytes: &[u8]) -> Vec<u8> {
    s.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut got)).await;
    got
}

#[tokio::test]
async fn over_tls_the_secret_opens_the_relay_and_every_probe_meets_the_site() {
    let s = setup("upstream = \"SITE\"").await;
    let addr = s.relay.addr("https").unwrap();

    // A client holding the secret: token, then its bytes reach the chat upstream.
    let capture = Arc::new(ExporterCapture::default());
    let mut client = tls(addr, "relay.example.org", Some(capture.clone())).await;
    let token = s.secret.tls_token(&capture.take().expect("TLS 1.3"));
    let mut first = token.to_vec();
    first.extend_from_slice(b"noise hello");
    client.write_all(&first).await.unwrap();
    let mut echoed = [0u8; 11];
    tokio::time::timeout(T, client.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"noise hello");
    drop(client);

    let request = b"GET / HTTP/1.1\r\nHost: relay.example.org\r\n\r\n".to_vec();
    let random: Vec<u8> = (0..300).map(|_| rand::random::<u8>()).collect();
    let probes: Vec<(&str, &str, Vec<u8>)> = vec![
        ("web request", "relay.example.org", request.clone()),
        ("wrong server name", "other.example", request.clone()),
        ("random bytes", "relay.example.org", random.clone()),
        // A censor that recorded the client's first bytes replays them in a new session.
        ("replayed client bytes", "relay.example.org", first.clone()),
    ];
    for (what, sni, bytes) in &probes {
        let got = answer_to(tls(addr, sni, None).await, bytes).await;
        assert_eq!(
            got, SITE_ANSWER,
            "{what}: the relay must answer as the site does"
        );
    }
    // Silence: after the wait the connection is the site's (which answers after its own
    // read timeout here).
    let got = answer_to(tls(addr, "relay.example.org", None).await, b"").await;
    assert_eq!(got, SITE_ANSWER, "silent connection");

    let received = s.site.received.lock().unwrap().clone();
    let sent: Vec<Vec<u8>> = probes
        .iter()
        .map(|(_, _, b)| b.clone())
        .chain([Vec::new()])
        .collect();
    assert_eq!(
        received, sent,
        "the site saw exactly the bytes of each probe"
    );
    assert_eq!(
        *s.sessions.lock().unwrap(),
        1,
        "only the real client reached the chat upstream"
    );
    let m = s.relay.metrics().prometheus();
    assert!(
        m.contains("postern_relay_cover_total{listener=\"https\"} 5"),
        "{m}"
    );
}

#[tokio::test]
async fn on_a_plain_port_an_http_upgrade_with_a_fresh_token_opens_the_relay() {
    let s = setup("upstream = \"SITE\"").await;
    let addr = s.relay.addr("http").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: relay.example.org\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nnoise hello",
        s.secret.http_token(now).path
    );
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"noise hello") {
        let n = tokio::time::timeout(T, client.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{text}"
    );
    assert!(
        text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "{text}"
    );
    drop(client);

    // The same request again (a replay), a web request, another relay's token: the site.
    let other = format!(
        "GET {} HTTP/1.1\r\nHost: relay.example.org\r\n\r\n",
        RelaySecret::generate().http_token(now).path
    );
    let probes = [
        request.as_bytes().to_vec(),
        b"GET / HTTP/1.1\r\nHost: relay.example.org\r\n\r\n".to_vec(),
        other.into_bytes(),
    ];
    for bytes in &probes {
        let got = answer_to(TcpStream::connect(addr).await.unwrap(), bytes).await;
        assert_eq!(got, SITE_ANSWER, "{}", String::from_utf8_lossy(bytes));
    }
    assert_eq!(*s.sessions.lock().unwrap(), 1);
    assert_eq!(
        s.site.received.lock().unwrap().as_slice(),
        probes.as_slice()
    );
}

#[tokio::test]
async fn the_built_in_cover_is_a_plain_web_page_over_tls_and_http() {
    let s = setup("").await;
    let page = b"GET / HTTP/1.1\r\nHost: relay.example.org\r\nConnection: close\r\n\r\n";
    let over_tls = answer_to(
        tls(s.relay.addr("https").unwrap(), "relay.example.org", None).await,
        page,
    )
    .await;
    let plain = answer_to(
        TcpStream::connect(s.relay.addr("http").unwrap())
            .await
            .unwrap(),
        page,
    )
    .await;
    for got in [over_tls, plain] {
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("<title>Welcome</title>"), "{text}");
        assert!(!text.to_lowercase().contains("postern"), "{text}");
    }
    let garbage = answer_to(
        TcpStream::connect(s.relay.addr("http").unwrap())
            .await
            .unwrap(),
        b"\x00\x01garbage\r\n\r\n",
    )
    .await;
    assert!(
        String::from_utf8_lossy(&garbage).starts_with("HTTP/1.1 400 Bad Request"),
        "{garbage:?}"
    );
    assert_eq!(*s.sessions.lock().unwrap(), 0);
}

#[tokio::test]
async fn a_cover_site_on_an_ipv6_address_is_reached() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here; skipped");
        return;
    }
    let v6 = site_on("[::1]:0").await;
    let s = setup(&format!("upstream = \"[::1]:{}\"", v6.addr.port())).await;
    let got = answer_to(
        TcpStream::connect(s.relay.addr("http").unwrap())
            .await
            .unwrap(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(got, SITE_ANSWER);
    assert_eq!(v6.received.lock().unwrap().len(), 1);
}
