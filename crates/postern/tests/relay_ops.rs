//! Relay operations with real processes on loopback: `postern relay setup`, `relay link`
//! from flags and from the written file, SIGHUP reload without dropping connections, SIGTERM
//! drain, `postern relay doctor` against a real server and relay, and `postern proxy check
//! LINK --network FILE` without a profile.

mod common;

use common::{closed_port, ReadyProcess, TestServer, BIN};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn postern(args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    common::run(cmd)
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn show(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A TCP echo server standing in for the upstream (it echoes whatever arrives).
fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut c in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn echo_once(c: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    c.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got)?;
    assert_eq!(got, msg);
    Ok(())
}

fn connect(addr: SocketAddr) -> TcpStream {
    let c = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c
}

/// Waits (bounded) until `addr` accepts connections (`true`) or refuses them (`false`).
fn wait_accepting(addr: SocketAddr, accepting: bool) {
    let started = Instant::now();
    loop {
        let ok = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok();
        if ok == accepting {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{addr} still {} after 20 s",
            if accepting { "refusing" } else { "accepting" }
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn echo_config(path: &Path, upstream: SocketAddr, plain: &[SocketAddr], grace: &str) {
    let mut t = format!(
        "[limits]\nshutdown_grace = \"{grace}\"\n\n[pool.chat]\nservers = [\"{upstream}\"]\nsend_proxy = \"none\"\n"
    );
    for (i, a) in plain.iter().enumerate() {
        t.push_str(&format!(
            "\n[[listener]]\nname = \"plain-{i}\"\nlisten = \"{a}\"\npool = \"chat\"\n"
        ));
    }
    std::fs::write(path, t).unwrap();
}

fn start_relay(config: &Path) -> ReadyProcess {
    let mut cmd = Command::new(BIN);
    cmd.args(["relay", "--config", s(config), "--no-stats"]);
    ReadyProcess::start(cmd, "relay ready")
}

fn signal(p: &ReadyProcess, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid() as i32), sig).unwrap();
}

fn wait_exit(p: &mut ReadyProcess, within: Duration) {
    let started = Instant::now();
    while p.is_running() {
        assert!(started.elapsed() < within, "still running after {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn setup_writes_the_config_prints_links_and_keeps_what_exists() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let setup = |extra: &[&str]| {
        let mut a = vec![
            "relay",
            "setup",
            "--upstream",
            "chat.example.org:5222",
            "--state-dir",
            s(&state),
        ];
        a.extend_from_slice(extra);
        postern(&a)
    };
    let o = setup(&[
        "--domain",
        "Relay.Example.org",
        "--contact",
        "mailto:me@example.org",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let text = out(&o);
    let link = text
        .lines()
        .find(|l| l.starts_with("postern://proxy?host=relay.example.org&port=443&tls=1&secret="))
        .unwrap_or_else(|| panic!("no TLS link: {text}"))
        .to_string();
    assert!(
        text.contains("port=80&tls=0") && text.contains("port=5222&tls=0"),
        "{text}"
    );
    assert!(
        text.contains('▀') || text.contains('▄') || text.contains('█'),
        "no QR: {text}"
    );

    let config = state.join("relay.toml");
    let written = std::fs::read_to_string(&config).unwrap();
    for needle in [
        "[tls.acme]",
        "domains = [\"relay.example.org\"]",
        "contact = [\"mailto:me@example.org\"]",
        "[secret]",
        "servers = [\"chat.example.org:5222\"]",
        "listen = \"0.0.0.0:443\"",
        "listen = \"[::]:443\"",
        "listen = \"0.0.0.0:80\"",
        "listen = \"[::]:5222\"",
    ] {
        assert!(written.contains(needle), "{needle} missing:\n{written}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&config).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "config readable by others: {mode:o}");
    }
    let secret = std::fs::read_to_string(state.join("secret")).unwrap();

    // `relay link` derives the same links from the file alone (host from [tls.acme]).
    let o = postern(&["relay", "link", "--config", s(&config), "--no-qr"]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(out(&o).lines().any(|l| l == link), "{}", show(&o));
    // ... and from the relay's flags: one link per address.
    let o = postern(&[
        "relay",
        "link",
        "--host",
        "relay.example.org",
        "--plain",
        "0.0.0.0:15222",
        "--tls",
        "0.0.0.0:8443",
        "--tls",
        "[::]:8443",
        "--no-qr",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let links: Vec<&str> = out(&o)
        .leak()
        .lines()
        .filter(|l| l.starts_with("postern://"))
        .collect();
    assert_eq!(
        links,
        [
            "postern://proxy?host=relay.example.org&port=8443&tls=1",
            "postern://proxy?host=relay.example.org&port=15222&tls=0"
        ]
    );

    // An existing configuration is kept unless --force; --force keeps the secret.
    let o = setup(&["--host", "203.0.113.7"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--force"),
        "{}",
        show(&o)
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), written);
    let o = setup(&["--host", "203.0.113.7", "--force", "--no-qr"]);
    assert!(o.status.success(), "{}", show(&o));
    let again = std::fs::read_to_string(&config).unwrap();
    assert!(
        !again.contains("[tls.acme]") && again.contains("names = [\"203.0.113.7\"]"),
        "{again}"
    );
    assert_eq!(
        std::fs::read_to_string(state.join("secret")).unwrap(),
        secret
    );
    assert!(out(&o).contains("postern://proxy?host=203.0.113.7&port=443&tls=1&secret="));

    // Nothing to relay to: a clear error.
    let o = postern(&[
        "relay",
        "setup",
        "--state-dir",
        s(&dir.path().join("other")),
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--network"),
        "{}",
        show(&o)
    );
}

#[test]
fn sighup_reloads_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    let upstream = echo_server();
    let first = closed_port();
    echo_config(&config, upstream, &[first], "5s");
    let mut relay = start_relay(&config);

    let mut held = connect(first);
    echo_once(&mut held, b"before the reload").unwrap();

    // A second listener appears in the file; SIGHUP makes it take effect.
    let second = closed_port();
    echo_config(&config, upstream, &[first, second], "5s");
    signal(&relay, nix::sys::signal::Signal::SIGHUP);
    wait_accepting(second, true);
    echo_once(&mut connect(second), b"new listener").unwrap();
    echo_once(&mut connect(first), b"old port, new relay").unwrap();
    // The connection made before the reload is still relayed.
    echo_once(&mut held, b"after the reload").unwrap();

    // A broken file: the reload is refused and the relay keeps running as it was.
    std::fs::write(&config, "this is not toml = = =").unwrap();
    signal(&relay, nix::sys::signal::Signal::SIGHUP);
    let started = Instant::now();
    while relay.stderr_lines("reload failed").is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no reload failure logged"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(relay.is_running());
    echo_once(&mut connect(second), b"still up").unwrap();
    echo_once(&mut held, b"still held").unwrap();

    // A listener removed by a reload stops accepting; its connections stay.
    echo_config(&config, upstream, &[second], "5s");
    signal(&relay, nix::sys::signal::Signal::SIGHUP);
    wait_accepting(first, false);
    echo_once(&mut held, b"listener gone, connection kept").unwrap();
    assert!(relay.is_running());
}

#[test]
fn sigterm_stops_accepting_and_drains_for_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    let upstream = echo_server();
    let port = closed_port();
    echo_config(&config, upstream, &[port], "2s");
    let mut relay = start_relay(&config);
    let mut held = connect(port);
    echo_once(&mut held, b"hello").unwrap();

    let sent = Instant::now();
    signal(&relay, nix::sys::signal::Signal::SIGTERM);
    // New connections are refused at once ...
    wait_accepting(port, false);
    // ... while the open one keeps working during the grace period ...
    echo_once(&mut held, b"draining").unwrap();
    // ... and is closed when it ends; then the relay exits cleanly.
    let mut buf = [0u8; 16];
    let closed = match held.read(&mut buf) {
        Ok(0) => true,
        Err(e) => {
            e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut
        }
        Ok(_) => false,
    };
    let took = sent.elapsed();
    assert!(closed, "the connection was not closed");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(10),
        "closed after {took:?}, grace is 2 s"
    );
    wait_exit(&mut relay, Duration::from_secs(10));
}

#[test]
fn doctor_and_proxy_check_against_a_real_server_and_relay() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"));
    let network = server.network_file();
    let state = dir.path().join("state");
    let plain = closed_port();
    let tls = closed_port();
    let media = closed_port();
    let o = postern(&[
        "relay",
        "setup",
        "--network",
        s(&network),
        "--state-dir",
        s(&state),
        "--host",
        "127.0.0.1",
        "--plain",
        &plain.to_string(),
        "--tls",
        &tls.to_string(),
        "--media",
        &media.to_string(),
        "--stats",
        "127.0.0.1:0",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        out(&o).contains(&format!("{} (media)", media.port())),
        "{}",
        show(&o)
    );
    // Every link names the media port; the media port gets no link of its own.
    let links: Vec<&str> = out(&o)
        .leak()
        .lines()
        .filter(|l| l.starts_with("postern://"))
        .collect();
    assert_eq!(links.len(), 2, "{links:?}");
    for l in &links {
        assert!(l.ends_with(&format!("&media={}", media.port())), "{l}");
    }
    let link = links
        .iter()
        .find(|l| l.starts_with("postern://proxy?host=127.0.0.1") && l.contains("tls=1"))
        .unwrap()
        .to_string();
    let config = state.join("relay.toml");
    let doctor = || {
        postern(&[
            "relay",
            "doctor",
            "--config",
            s(&config),
            "--state-dir",
            s(&state),
        ])
    };

    // Not running yet: the ports fail, with what to do.
    let o = doctor();
    assert!(!o.status.success(), "{}", show(&o));
    assert!(
        out(&o).contains("✗ port") && out(&o).contains("fix:"),
        "{}",
        show(&o)
    );

    let mut cmd = Command::new(BIN);
    cmd.args(["relay", "--config", s(&config)]);
    let relay = ReadyProcess::start(cmd, "relay ready");
    let o = doctor();
    assert!(o.status.success(), "{}", show(&o));
    let report = out(&o);
    for needle in [
        "✓ configuration",
        "✓ address: 127.0.0.1",
        &format!("✓ port {}", plain.port()),
        &format!("✓ port {}", tls.port()),
        &format!("✓ port {}", media.port()),
        "✓ service via media",
        "✓ certificate: self-signed",
        "✓ service via chat",
        "✓ service via https",
        "All checks passed",
    ] {
        assert!(report.contains(needle), "{needle:?} missing:\n{report}");
    }

    // Anyone with the link and the network file, no profile: the green tick.
    let home = dir.path().join("nobody");
    let o = postern(&[
        "--home",
        s(&home),
        "proxy",
        "check",
        &link,
        "--network",
        s(&network),
    ]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        out(&o).contains("works: the server proved its identity"),
        "{}",
        show(&o)
    );
    assert!(!home.exists(), "a profile was created");

    // The wrong service key: both checks fail (possible interception).
    let other = dir.path().join("other");
    TestServer::start(&other).kill();
    let wrong = other.join("network.toml");
    let o = postern(&[
        "--home",
        s(&home),
        "proxy",
        "check",
        &link,
        "--network",
        s(&wrong),
    ]);
    assert!(!o.status.success(), "{}", show(&o));
    let o = postern(&[
        "relay",
        "doctor",
        "--config",
        s(&config),
        "--state-dir",
        s(&state),
        "--network",
        s(&wrong),
    ]);
    assert!(!o.status.success(), "{}", show(&o));
    assert!(out(&o).contains("✗ service via"), "{}", show(&o));
    drop(relay);
}

/// A self-signed certificate valid for `days`, written as `cert`/`key` (openssl CLI).
fn certificate(cert: &Path, key: &Path, days: u32) {
    let o = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-subj",
            "/CN=relay.test",
            "-addext",
            "subjectAltName=DNS:relay.test",
        ])
        .args([
            "-days",
            &days.to_string(),
            "-keyout",
            s(key),
            "-out",
            s(cert),
        ])
        .output()
        .expect("openssl (apt-get install openssl)");
    assert!(o.status.success(), "{}", show(&o));
}

/// SIGHUP re-reads the certificate files too; `relay doctor` sees the new one, and its
/// expiry check fails for a certificate that expires too soon.
#[test]
fn sighup_reloads_certificates_and_doctor_checks_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    certificate(&cert, &key, 30);
    let upstream = echo_server();
    let tls = closed_port();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n[pool.chat]\nservers = [\"{upstream}\"]\n\
             send_proxy = \"none\"\n\n[[listener]]\nname = \"https\"\nlisten = \"{tls}\"\n\
             tls = true\npool = \"chat\"\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let relay = start_relay(&config);
    let doctor = || {
        let o = postern(&[
            "relay",
            "doctor",
            "--config",
            s(&config),
            "--state-dir",
            s(dir.path()),
            "--host",
            "127.0.0.1",
            "--min-days",
            "100",
        ]);
        out(&o)
    };
    let report = doctor();
    let line = report
        .lines()
        .find(|l| l.contains("certificate:"))
        .unwrap_or_else(|| panic!("{report}"))
        .to_string();
    assert!(
        line.starts_with("✗ certificate: expires") && line.contains("(29 days left)"),
        "{report}"
    );
    assert!(
        report.contains("fix: renew the certificate files"),
        "{report}"
    );

    // New files, SIGHUP: the listener serves the new certificate.
    certificate(&cert, &key, 400);
    signal(&relay, nix::sys::signal::Signal::SIGHUP);
    let started = Instant::now();
    loop {
        let report = doctor();
        if report.contains("✓ certificate: self-signed certificate valid until") {
            assert!(report.contains("(399 days)"), "{report}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not reloaded:\n{report}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // DNS: a name that resolves here passes, one that does not fails with what to do.
    let o = postern(&[
        "relay",
        "doctor",
        "--config",
        s(&config),
        "--state-dir",
        s(dir.path()),
        "--host",
        "localhost",
    ]);
    assert!(out(&o).contains("✓ DNS: localhost → "), "{}", show(&o));
    let o = postern(&[
        "relay",
        "doctor",
        "--config",
        s(&config),
        "--state-dir",
        s(dir.path()),
        "--host",
        "relay.invalid",
    ]);
    assert!(!o.status.success());
    assert!(
        out(&o).contains("✗ DNS: relay.invalid does not resolve"),
        "{}",
        show(&o)
    );
    assert!(
        out(&o).contains("fix: at your DNS provider"),
        "{}",
        show(&o)
    );
    drop(relay);
}
