//! The real `postern relay` command line: help text, links, config errors, and a relay that
//! starts on ephemeral loopback ports, relays bytes and stops on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn postern() -> Command {
    Command::new(env!("CARGO_BIN_EXE_postern"))
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = postern().args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_teaches() {
    let (ok, out, _) = run(&["relay", "--help"]);
    assert!(ok);
    for needle in [
        "--upstream",
        "--plain",
        "--tls",
        "--stats",
        "--preset",
        "Examples:",
        "postern relay link",
    ] {
        assert!(out.contains(needle), "relay --help lacks {needle}:\n{out}");
    }
    let (ok, out, _) = run(&["relay", "link", "--help"]);
    assert!(ok);
    assert!(
        out.contains("--host") && out.contains("postern://proxy"),
        "{out}"
    );
}

#[test]
fn link_prints_link_and_qr() {
    let (ok, out, err) = run(&["relay", "link", "--host", "Relay.Example.org"]);
    assert!(ok, "{err}");
    let first = out.lines().next().unwrap();
    assert_eq!(
        first,
        "postern://proxy?host=relay.example.org&port=443&tls=1"
    );
    assert!(
        out.contains('█') || out.contains('▀') || out.contains('▄'),
        "no QR code:\n{out}"
    );

    let (ok, out, _) = run(&[
        "relay",
        "link",
        "--host",
        "2001:db8::7",
        "--port",
        "5222",
        "--no-tls",
        "--no-qr",
    ]);
    assert!(ok);
    assert_eq!(
        out.trim(),
        "postern://proxy?host=[2001:db8::7]&port=5222&tls=0"
    );

    let (ok, _, err) = run(&["relay", "link", "--host", "bad host!"]);
    assert!(!ok);
    assert!(err.contains("invalid host"), "{err}");

    // A server name other than the host, or none, for relays whose own name is blocked.
    let (ok, out, err) = run(&[
        "relay",
        "link",
        "--host",
        "relay.example.org",
        "--sni",
        "www.example.net",
        "--no-qr",
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        "postern://proxy?host=relay.example.org&port=443&tls=1&sni=www.example.net"
    );
    let (ok, out, err) = run(&[
        "relay",
        "link",
        "--host",
        "relay.example.org",
        "--no-sni",
        "--no-qr",
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        "postern://proxy?host=relay.example.org&port=443&tls=1&sni="
    );
    let (ok, _, err) = run(&[
        "relay",
        "link",
        "--host",
        "relay.example.org",
        "--sni",
        "not a name",
    ]);
    assert!(!ok);
    assert!(err.contains("must be a DNS name"), "{err}");
}

#[test]
fn link_from_config_lists_client_facing_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(
        &path,
        r#"
        [pool.chat]
        servers = ["chat.example.org:5222"]
        [[listener]]
        name = "chat"
        listen = "0.0.0.0:5222"
        pool = "chat"
        [[listener]]
        name = "https"
        listen = "0.0.0.0:443"
        tls = true
        pool = "chat"
        [[listener]]
        name = "lb"
        listen = "0.0.0.0:8222"
        accept_proxy = true
        pool = "chat"
        [[listener]]
        name = "media"
        listen = "0.0.0.0:587"
        sni = { allow = ["*.example.org"], port = 443 }
        "#,
    )
    .unwrap();
    let (ok, out, err) = run(&[
        "relay",
        "link",
        "--host",
        "r.example.org",
        "--no-qr",
        "--config",
        path.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let links: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("postern://"))
        .collect();
    assert_eq!(
        links,
        [
            "postern://proxy?host=r.example.org&port=5222&tls=0&media=587",
            "postern://proxy?host=r.example.org&port=443&tls=1&media=587"
        ]
    );
}

#[test]
fn clear_errors() {
    let (ok, _, err) = run(&["relay", "--plain", "127.0.0.1:0", "--no-stats"]);
    assert!(!ok);
    assert!(err.contains("--upstream"), "{err}");
    let (ok, _, err) = run(&["relay", "--preset", "nope"]);
    assert!(!ok);
    assert!(err.contains("unknown preset"), "{err}");
    let (ok, _, err) = run(&["relay", "--config", "/nonexistent/relay.toml"]);
    assert!(!ok);
    assert!(err.contains("cannot read config file"), "{err}");
}

#[test]
fn relay_runs_relays_and_stops_on_sigterm() {
    // Echo upstream.
    let up = TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = up.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in up.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    let mut child = postern()
        .args([
            "relay",
            "--upstream",
            &up_addr.to_string(),
            "--send-proxy",
            "none",
            "--plain",
            "127.0.0.1:0",
            "--tls",
            "127.0.0.1:0",
            "--stats",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut plain: Option<SocketAddr> = None;
    let mut stats = None;
    let start = Instant::now();
    while plain.is_none() || stats.is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "relay did not start"
        );
        let line = lines.next().expect("relay exited").unwrap();
        if let Some(rest) = line.strip_prefix("listening: ") {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            if parts[1] == "plain" {
                plain = Some(parts[2].parse().unwrap());
            }
        }
        if let Some(rest) = line.strip_prefix("status page: http://") {
            stats = Some(rest.trim_end_matches('/').parse::<SocketAddr>().unwrap());
        }
    }
    let mut s = TcpStream::connect(plain.unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"hello through the relay").unwrap();
    let mut buf = [0u8; 23];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello through the relay");

    let mut h = TcpStream::connect(stats.unwrap()).unwrap();
    h.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    h.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    h.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    drop(s);

    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "relay did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_sigterm_right_after_relay_ready_stops_the_relay_gracefully() {
    // The handlers are installed before "relay ready" is printed, so scripts may stop the
    // relay the moment they see it.
    for _ in 0..3 {
        let mut cmd = postern();
        cmd.args([
            "relay",
            "--upstream",
            "127.0.0.1:9",
            "--plain",
            "127.0.0.1:0",
            "--tls",
            "127.0.0.1:0",
            "--no-stats",
        ]);
        let relay = postern_test_kit::process::ReadyProcess::start(cmd, "relay ready");
        assert!(
            relay.terminate(),
            "the relay did not stop cleanly on SIGTERM"
        );
    }
}
