//! `postern dev` gives a newcomer the whole system: server, relay, instructions that work.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn dev_network_serves_direct_and_relayed_clients_and_stops_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let mut dev = Command::new(BIN)
        .args(["dev", "--listen", "127.0.0.1:0"])
        .args([
            "--relay-plain",
            "127.0.0.1:0",
            "--relay-tls",
            "127.0.0.1:0",
            "--relay-stats",
            "127.0.0.1:0",
        ])
        .current_dir(tmp.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = dev.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut printed = Vec::new();
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    while !printed
        .iter()
        .any(|l: &String| l.starts_with("Press Ctrl-C"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        printed.push(
            rx.recv_timeout(left)
                .expect("postern dev did not finish starting"),
        );
    }
    let field = |name: &str| {
        printed
            .iter()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(name)
                    .map(|v| v.split_whitespace().next().unwrap().to_string())
            })
            .unwrap_or_else(|| panic!("no {name} line in {printed:#?}"))
    };
    let network = tmp.path().join(field("network"));
    let link = field("link");
    let status_page = field("status");
    assert!(
        link.starts_with("postern://proxy?host=127.0.0.1&port="),
        "{link}"
    );

    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    let net = network.to_str().unwrap();
    ok(&alice, &["account", "create", "alice", "--network", net]);
    ok(&bob, &["account", "create", "bob", "--network", net]);
    ok(&alice, &["send", "bob", "hello bob"]);
    assert!(ok(&bob, &["inbox"]).contains("alice: hello bob"));
    // The printed relay path works too.
    ok(&bob, &["proxy", "add", &link]);
    ok(&bob, &["proxy", "use", "on"]);
    assert!(ok(&bob, &["proxy", "check"]).contains("works"));
    ok(&bob, &["send", "alice", "hi alice, via the relay"]);
    assert!(ok(&alice, &["inbox"]).contains("bob: hi alice, via the relay"));
    assert!(ok(&bob, &["status"]).contains("✓ Connected via 127.0.0.1:"));
    // The printed file example: the dev server keeps media (in its data directory).
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
    ok(&alice, &["send", "bob", "--file", readme, "a file"]);
    let files = tmp.path().join("bob-files");
    let got = ok(&bob, &["inbox", "--save-to", files.to_str().unwrap()]);
    assert!(got.contains("📎 README.md from alice saved at"), "{got}");
    assert_eq!(
        std::fs::read(files.join("README.md")).unwrap(),
        std::fs::read(readme).unwrap()
    );
    // The printed group example.
    ok(&alice, &["group", "create", "friends", "bob"]);
    ok(&alice, &["group", "send", "friends", "hello everyone"]);
    let got = ok(&bob, &["inbox"]);
    assert!(got.contains("alice in “friends”: hello everyone"), "{got}");

    // The relay's health endpoint answers.
    let stats = status_page
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(stats).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dev.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(s) = dev.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "postern dev ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "postern dev exits cleanly: {status:?}");
}
