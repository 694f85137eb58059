//! The client's TLS ClientHello to relays is a browser's. Both hellos are captured on
//! loopback the way a censor's DPI sees them: a real Chromium (Debian's `chromium`, headless)
//! opening `https://relay.postern.test:PORT/`, and the Postern client dialling a relay at
//! the same listener with `sni=relay.postern.test`. Their JA4 must be equal — and equal
//! to Chrome's published one — and so must what JA4 summarises (cipher order, groups, key
//! shares, ALPN, signature algorithms, GREASE placement, per-connection extension order).
//!
//! Chromium comes from Debian's `chromium` package; the test installs it when it runs as
//! root and it is missing, and otherwise fails with the apt-get line to run.

use std::process::{Command, Stdio};
use std::time::Duration;

use postern_client::connector::browser_tls::CHROME_JA4;
use postern_client::route::{self, Progress};
use postern_client::{ProxyEntry, Route};
use postern_protocol::link::Sni;
use postern_test_kit::process::KillOnDrop;
use postern_testbed::fingerprint::{is_grease, Hello};
use tokio::net::TcpListener;

const CHROMIUM: &str = "/usr/bin/chromium";
const NAME: &str = "relay.postern.test";
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(60);

/// Accepts connections until one brings a ClientHello, reads it, and hangs up.
///
/// Chromium may open a spare connection and close it unused (it races connection attempts
/// and preconnects), which reaches here as a connection that ends without a byte: skipped.
async fn capture(listener: &TcpListener) -> Hello {
    let accept_and_read = async {
        loop {
            let (mut conn, _) = listener.accept().await.expect("accept");
            let mut bytes = Vec::new();
            match postern_protocol::client_hello::read(&mut conn, 16384, &mut bytes).await {
                Ok(message) => return Hello::parse(&message).expect("a parseable ClientHello"),
                Err(e) if bytes.is_empty() => eprintln!("skipped a connection without data: {e:?}"),
                Err(e) => panic!("a ClientHello: {e:?}"),
            }
        }
    };
    tokio::time::timeout(CAPTURE_TIMEOUT, accept_and_read)
        .await
        .expect("a ClientHello within a minute")
}

async fn chromium_hello() -> Hello {
    postern_test_kit::apt::ensure(&[CHROMIUM], &["chromium"], "the browser-fingerprint test");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let profile = tempfile::tempdir().expect("profile dir");
    // Killed when dropped, also when the capture fails.
    let _chromium = KillOnDrop(
        Command::new(CHROMIUM)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("--host-resolver-rules=MAP {NAME} 127.0.0.1"))
            .arg(format!("https://{NAME}:{port}/"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium"),
    );
    capture(&listener).await
}

async fn postern_hello(listener: &TcpListener, sni: Sni) -> Hello {
    let route = Route::Relay(ProxyEntry {
        host: "127.0.0.1".into(),
        port: listener.local_addr().expect("addr").port(),
        tls: true,
        secret: None,
        sni,
        media: None,
    });
    // The dial fails once the listener hangs up; only its hello matters here.
    let dial = tokio::spawn(async move {
        let _ = route::dial(&route, &Progress::new(&route)).await;
    });
    let hello = capture(listener).await;
    let _ = dial.await;
    hello
}

fn without_grease(v: &[u16]) -> Vec<u16> {
    v.iter().copied().filter(|x| !is_grease(*x)).collect()
}

fn grease_at(v: &[u16]) -> Vec<usize> {
    (0..v.len()).filter(|i| is_grease(v[*i])).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_hello_to_relays_is_chromes() {
    let chrome = chromium_hello().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ours = postern_hello(&listener, Sni::Name(NAME.into())).await;
    let again = postern_hello(&listener, Sni::Name(NAME.into())).await;
    eprintln!("chromium: {} {chrome:?}", chrome.ja4());
    eprintln!("postern:  {} {ours:?}", ours.ja4());

    assert_eq!(chrome.sni.as_deref(), Some(NAME));
    assert_eq!(ours.sni.as_deref(), Some(NAME));
    assert_eq!(ours.ja4(), chrome.ja4(), "JA4 differs from Chromium's");
    assert_eq!(
        chrome.ja4(),
        CHROME_JA4,
        "Debian's Chromium no longer has the JA4 the client copies: update browser_tls.rs"
    );
    // What JA4 hashes, and what it leaves out (orders), compared one by one.
    assert_eq!(
        without_grease(&ours.ciphers),
        without_grease(&chrome.ciphers)
    );
    assert_eq!(without_grease(&ours.groups), without_grease(&chrome.groups));
    assert_eq!(
        without_grease(&ours.key_shares),
        without_grease(&chrome.key_shares)
    );
    assert_eq!(
        without_grease(&ours.versions),
        without_grease(&chrome.versions)
    );
    assert_eq!(ours.alpn, chrome.alpn);
    assert_eq!(
        without_grease(&ours.signature_algorithms),
        without_grease(&chrome.signature_algorithms)
    );
    let mut ours_ext = without_grease(&ours.extensions);
    let mut chrome_ext = without_grease(&chrome.extensions);
    ours_ext.sort_unstable();
    chrome_ext.sort_unstable();
    assert_eq!(ours_ext, chrome_ext, "extension sets differ");
    // GREASE where Chrome puts it: first cipher, first and last extension, first group,
    // first key share, first version, first signature algorithm.
    assert_eq!(grease_at(&ours.ciphers), grease_at(&chrome.ciphers));
    assert_eq!(grease_at(&ours.extensions), grease_at(&chrome.extensions));
    assert_eq!(grease_at(&ours.groups), grease_at(&chrome.groups));
    assert_eq!(grease_at(&ours.key_shares), grease_at(&chrome.key_shares));
    assert_eq!(grease_at(&ours.versions), grease_at(&chrome.versions));
    assert_eq!(
        grease_at(&ours.signature_algorithms),
        grease_at(&chrome.signature_algorithms)
    );
    // Like Chrome, a new extension order on every connection (17! orders: equal by chance
    // about once in 3*10^14 runs).
    assert_ne!(
        ours.extensions, again.extensions,
        "extension order is not permuted"
    );
    assert_eq!(ours.ja4(), again.ja4());
}

#[tokio::test]
async fn sni_follows_the_link() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    // `sni=` (none): no server name, as a browser sends to an IP address.
    let none = postern_hello(&listener, Sni::Omit).await;
    assert_eq!(none.sni, None);
    assert!(!none.extensions.contains(&0x0000));
    assert!(
        none.ja4().starts_with("t13i1516h2_8daaf6152771_"),
        "{}",
        none.ja4()
    );
    // No `sni=` and an IP host: none either.
    let by_address = postern_hello(&listener, Sni::Host).await;
    assert_eq!(by_address.sni, None);
    // `sni=NAME`: that name, whatever address is dialled.
    let named = postern_hello(&listener, Sni::Name("cdn.example.net".into())).await;
    assert_eq!(named.sni.as_deref(), Some("cdn.example.net"));
    assert_eq!(named.ja4(), CHROME_JA4);
}
