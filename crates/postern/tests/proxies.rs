//! Client proxy support: messages through real relays, fail-over, hostile relays,
//! mode `on`, links, and nothing lost while every path is down.

mod common;
use common::*;

use std::path::Path;

fn server_logging_addresses(dir: &Path) -> TestServer {
    TestServer::start_with(
        dir,
        "127.0.0.1:0".parse().unwrap(),
        // The test relays run on loopback: their PROXY headers are believed.
        &["--log-client-addresses", "--trusted-proxy", "127.0.0.1"],
    )
}

#[test]
fn messages_flow_through_plain_tls_and_proxy_header_relay_listeners() {
    let tmp = tempfile::tempdir().unwrap();
    let server = server_logging_addresses(&tmp.path().join("server"));
    let relay = relay_for(&server);
    let (alice, bob, carol) = (
        tmp.path().join("alice"),
        tmp.path().join("bob"),
        tmp.path().join("carol"),
    );
    for (home, name) in [(&alice, "alice"), (&bob, "bob"), (&carol, "carol")] {
        account(home, name, &server);
        ok(home, &["proxy", "use", "on"]);
    }
    // Alice: the plain listener (5222-style). Bob: the TLS listener (443-style).
    ok(
        &alice,
        &["proxy", "add", &relay.addr("plain").to_string(), "--no-tls"],
    );
    ok(
        &bob,
        &["proxy", "add", &relay.addr("tls").to_string(), "--tls"],
    );
    // Carol: behind a load balancer that speaks PROXY to the relay's PROXY listener.
    let lb = proxy_header_forwarder(relay.addr("plain+proxy"), "203.0.113.9");
    ok(&carol, &["proxy", "add", &lb.to_string(), "--no-tls"]);

    let status = ok(&bob, &["status"]);
    assert!(
        status.contains(&format!("✓ Connected via {} (TLS)", relay.addr("tls"))),
        "{status}"
    );
    ok(&alice, &["send", "bob", "through the plain relay"]);
    assert!(ok(&bob, &["inbox"]).contains("alice: through the plain relay"));
    ok(&bob, &["send", "carol", "through the TLS relay"]);
    assert!(ok(&carol, &["inbox"]).contains("bob: through the TLS relay"));
    ok(&carol, &["send", "alice", "through the PROXY listener"]);
    assert!(ok(&alice, &["inbox"]).contains("carol: through the PROXY listener"));

    // The server saw Carol's original address, carried by the relay's PROXY header.
    let seen = server.log_lines("handshake received");
    assert!(
        seen.iter()
            .any(|l| l.contains("client=203.0.113.9:40000") && l.contains("via_proxy=true")),
        "{seen:#?}"
    );
}

#[test]
fn fails_over_to_the_working_relay_and_starts_there_next_time() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let relay = relay_for(&server);
    let refusing = closed_port();
    let black_hole = BlackHole::start();
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    account(&alice, "alice", &server);
    account(&bob, "bob", &server);
    ok(&alice, &["proxy", "use", "on"]);
    ok(&alice, &["proxy", "add", &refusing.to_string(), "--no-tls"]);
    ok(
        &alice,
        &["proxy", "add", &black_hole.addr.to_string(), "--no-tls"],
    );
    ok(
        &alice,
        &["proxy", "add", &relay.addr("tls").to_string(), "--tls"],
    );

    let started = std::time::Instant::now();
    let status = ok(&alice, &["status"]);
    // Routes are raced: the refused one fails at once and starts the next, the black
    // hole is left pending while the relay after it (started 250 ms later) wins. The
    // black hole costs nothing like its handshake timeout.
    let took = started.elapsed();
    assert!(
        took < postern_client::timeouts::HANDSHAKE_TIMEOUT,
        "fail-over took {took:?}"
    );
    assert!(
        status.contains(&format!(
            "{refusing} (plain) — TCP connect: connection refused"
        )),
        "{status}"
    );
    assert!(
        status.contains(&format!(
            "· +0.00 s {} (plain) — server handshake: no answer yet, stopped (another route won)",
            black_hole.addr
        )),
        "{status}"
    );
    assert!(
        status.contains(&format!("✓ Connected via {} (TLS)", relay.addr("tls"))),
        "{status}"
    );

    ok(&alice, &["send", "bob", "made it through the third relay"]);
    assert!(ok(&bob, &["inbox"]).contains("made it through the third relay"));

    // The next start goes straight to the relay that worked.
    let json = ok(&alice, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let attempts = v["report"]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{json}");
    assert!(attempts[0]["route"]
        .as_str()
        .unwrap()
        .contains(&relay.addr("tls").to_string()));
    let list = ok(&alice, &["proxy", "list"]);
    assert!(list.contains("(worked last)"), "{list}");
}

#[test]
fn a_tampering_relay_is_reported_as_interception_and_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let impostor = TestServer::start(&tmp.path().join("impostor"));
    let relay = relay_for(&server);
    // One "relay" leads to a server with another key, one flips a byte of the answer.
    let to_impostor = Forwarder::start(impostor.addr, Tamper::None);
    let flipping = Forwarder::start(server.addr, Tamper::FlipServerByte(20));
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    account(&alice, "alice", &server);
    account(&bob, "bob", &server);
    ok(&alice, &["proxy", "use", "on"]);
    ok(
        &alice,
        &["proxy", "add", &to_impostor.addr.to_string(), "--no-tls"],
    );
    ok(
        &alice,
        &["proxy", "add", &flipping.addr.to_string(), "--no-tls"],
    );
    ok(
        &alice,
        &["proxy", "add", &relay.addr("plain").to_string(), "--no-tls"],
    );

    let status = ok(&alice, &["status"]);
    for hostile in [to_impostor.addr, flipping.addr] {
        assert!(
            status.contains(&format!(
                "⚠ {hostile} (plain) failed the server's authentication: possible interception"
            )),
            "{status}"
        );
    }
    let check = postern(&alice, &["proxy", "check", &flipping.addr.to_string()]);
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(!check.status.success());
    assert!(
        out.contains("the service could not prove its identity (possible interception)"),
        "{out}"
    );

    let secret = "nobody on the path may read this";
    ok(&alice, &["send", "bob", secret]);
    assert!(ok(&bob, &["inbox"]).contains(secret));
    for f in [&to_impostor, &flipping] {
        assert!(!contains(&f.captured(), secret.as_bytes()));
    }
}

#[test]
fn mode_on_never_opens_a_direct_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let server = server_logging_addresses(&tmp.path().join("server"));
    let relay = relay_for(&server);
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    account(&bob, "bob", &server);
    // Alice registers through the relay itself, then forbids direct connections.
    let link = format!(
        "postern://proxy?host=127.0.0.1&port={}&tls=1",
        relay.addr("tls").port()
    );
    let net = server.network_file();
    ok(
        &alice,
        &[
            "account",
            "create",
            "alice",
            "--network",
            net.to_str().unwrap(),
            "--proxy",
            &link,
        ],
    );
    ok(&alice, &["proxy", "use", "on"]);
    let before = server.log_lines("handshake received").len();
    ok(&alice, &["send", "bob", "no direct connection"]);
    ok(&alice, &["inbox"]);
    ok(&alice, &["status"]);
    ok(&alice, &["proxy", "check"]);
    let alice_lines: Vec<String> = server.log_lines("handshake received").split_off(before);
    assert!(alice_lines.len() >= 4, "{alice_lines:#?}");
    for l in &alice_lines {
        assert!(
            l.contains("via_proxy=true"),
            "a direct connection in mode on: {l}"
        );
    }

    // With the relay gone, mode `on` fails rather than falling back to direct.
    relay.stop();
    let count = server.log_lines("handshake received").len();
    let err = fails(&alice, &["send", "bob", "must wait for a relay"]);
    assert!(err.contains("saved"), "{err}");
    assert_eq!(
        server.log_lines("handshake received").len(),
        count,
        "no direct attempt"
    );
}

#[test]
fn relay_links_import_and_work_and_malformed_links_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let relay = relay_for(&server);
    let alice = tmp.path().join("alice");
    account(&alice, "alice", &server);

    let port = relay.addr("tls").port().to_string();
    let mut link_cmd = std::process::Command::new(BIN);
    link_cmd.args([
        "relay",
        "link",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--no-qr",
    ]);
    let out = run(link_cmd);
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    let link = printed
        .split_whitespace()
        .find(|w| w.starts_with("postern://proxy?"))
        .unwrap_or_else(|| panic!("no link in {printed}"))
        .to_string();
    ok(&alice, &["proxy", "add", &link]);
    ok(&alice, &["proxy", "use", "on"]);
    let check = ok(&alice, &["proxy", "check"]);
    assert!(
        check.contains("works: the server proved its identity"),
        "{check}"
    );
    assert!(check.contains("✓ TLS"), "{check}");

    for (bad, says) in [
        ("postern://proxy?port=443", "missing host"),
        (
            "postern://proxy?host=relay.example&port=99999",
            "port must be 1-65535",
        ),
        (
            "postern://proxy?host=relay.example&tls=maybe",
            "tls must be 1 or 0",
        ),
        ("postern://proxy?host=2001:db8::1", "brackets"),
        (
            "https://example.org/proxy?host=x",
            "not a Postern proxy link",
        ),
    ] {
        let err = fails(&alice, &["proxy", "add", bad]);
        assert!(err.contains(says), "{bad}: {err}");
    }
    let list: serde_json::Value =
        serde_json::from_str(ok(&alice, &["proxy", "list", "--json"]).trim()).unwrap();
    assert_eq!(list["proxies"].as_array().map(|p| p.len()).unwrap_or(0), 1);

    // A media port that does not answer is reported on its own.
    let closed = closed_port().port();
    let with_media = format!("postern://proxy?host=127.0.0.1&port={port}&tls=1&media={closed}");
    let check = ok(&alice, &["proxy", "check", &with_media]);
    assert!(check.contains("works"), "{check}");
    assert!(check.contains("Media: unavailable"), "{check}");
}

#[test]
fn a_message_sent_while_every_path_is_down_is_delivered_when_a_relay_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    account(&alice, "alice", &server);
    account(&bob, "bob", &server);
    // The saved proxy's address is held by a forwarder that is "down" for now (it
    // accepts and closes), so no other process can take the port meanwhile.
    let front = Forwarder::start(server.addr, Tamper::Drop);
    ok(&alice, &["proxy", "use", "on"]);
    ok(
        &alice,
        &["proxy", "add", &front.addr.to_string(), "--no-tls"],
    );

    let err = fails(&alice, &["send", "bob", "written in the dark"]);
    assert!(err.contains("saved"), "{err}");
    assert!(ok(&alice, &["history", "bob"]).contains("… written in the dark"));

    // A relay comes up behind the saved address; the next connection sends the message.
    let upstream = server.addr.to_string();
    let relay = TestRelay::start(&[
        "--upstream",
        &upstream,
        "--plain",
        "127.0.0.1:0",
        "--no-stats",
    ]);
    front.set_target(relay.addr("plain"));
    front.set_tamper(Tamper::None);
    ok(&alice, &["inbox"]);
    assert!(ok(&bob, &["inbox"]).contains("alice: written in the dark"));
}

#[test]
fn a_following_inbox_reconnects_when_its_relay_comes_back() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    account(&alice, "alice", &server);
    account(&bob, "bob", &server);
    let upstream = server.addr.to_string();
    let relay = TestRelay::start(&[
        "--upstream",
        &upstream,
        "--plain",
        "127.0.0.1:0",
        "--no-stats",
    ]);
    // Bob's saved proxy address stays the same while relays come and go behind it.
    let front = Forwarder::start(relay.addr("plain"), Tamper::None);
    ok(&bob, &["proxy", "use", "on"]);
    ok(&bob, &["proxy", "add", &front.addr.to_string(), "--no-tls"]);

    let follower = Follower::start(&bob);
    ok(&alice, &["send", "bob", "before the relay restarts"]);
    follower.expect(&["\"incoming\"", "before the relay restarts"]);

    // The relay dies (its connections with it) and another comes up behind the same
    // address; the follower's connection manager reconnects by itself (back-off with
    // jitter) and the next message arrives.
    front.set_tamper(Tamper::Drop);
    relay.stop();
    let relay = TestRelay::start(&[
        "--upstream",
        &upstream,
        "--plain",
        "127.0.0.1:0",
        "--no-stats",
    ]);
    front.set_target(relay.addr("plain"));
    front.set_tamper(Tamper::None);
    ok(&alice, &["send", "bob", "after the relay restarted"]);
    follower.expect(&["\"incoming\"", "after the relay restarted"]);
}

/// A relay run with `--secret`: its links (TLS on one port, the HTTP-looking transport on
/// the plain one) carry the secret and work; the same relay without the secret in the link
/// is a web site, and the client says so.
#[test]
fn a_relay_with_a_secret_carries_only_holders_of_its_link() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let state = tmp.path().join("relay-state");
    let state_arg = state.to_str().unwrap();
    let relay = TestRelay::start(&[
        "--upstream",
        &server.addr.to_string(),
        "--plain",
        "127.0.0.1:0",
        "--tls",
        "127.0.0.1:0",
        "--stats",
        "127.0.0.1:0",
        "--secret",
        "--state-dir",
        state_arg,
    ]);
    assert!(
        state.join("secret").exists(),
        "the secret lives in the state directory"
    );
    let link = |port: u16, tls: bool| {
        let port = port.to_string();
        let mut args = vec![
            "relay",
            "link",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--secret",
            "--state-dir",
            state_arg,
            "--no-qr",
        ];
        if !tls {
            args.push("--no-tls");
        }
        let out = ok(&tmp.path().join("operator"), &args);
        out.trim().to_string()
    };
    let tls_link = link(relay.addr("tls").port(), true);
    let http_link = link(relay.addr("plain").port(), false);
    assert!(tls_link.contains("&secret="), "{tls_link}");

    let (alice, bob, eve) = (
        tmp.path().join("alice"),
        tmp.path().join("bob"),
        tmp.path().join("eve"),
    );
    for (home, name) in [(&alice, "alice"), (&bob, "bob"), (&eve, "eve")] {
        account(home, name, &server);
        ok(home, &["proxy", "use", "on"]);
    }
    let added = ok(&alice, &["proxy", "add", &tls_link]);
    assert!(added.contains("with secret"), "{added}");
    ok(&bob, &["proxy", "add", &http_link]);
    ok(&alice, &["send", "bob", "over TLS with the secret"]);
    assert!(ok(&bob, &["inbox"]).contains("alice: over TLS with the secret"));
    ok(&bob, &["send", "alice", "over the HTTP upgrade"]);
    assert!(ok(&alice, &["inbox"]).contains("bob: over the HTTP upgrade"));

    // Without the secret, both ports are a web site.
    for args in [
        vec!["proxy", "check", &*relay.addr("tls").to_string(), "--tls"],
        vec![
            "proxy",
            "check",
            &*relay.addr("plain").to_string(),
            "--no-tls",
        ],
    ] {
        let check = postern(&eve, &args);
        let out = String::from_utf8_lossy(&check.stdout);
        assert!(!check.status.success(), "{out}");
        assert!(out.contains("answered as a web site"), "{out}");
        assert!(!out.contains("possible interception"), "not hostile: {out}");
    }
    let stats = http_answer(
        relay.stats.expect("stats listener"),
        "/metrics",
        std::time::Duration::from_secs(5),
    )
    .unwrap();
    assert!(
        stats.contains("postern_relay_cover_total{listener=\"https\"} 1"),
        "{stats}"
    );
}

/// Issue 13: the link names the server name the ClientHello carries (`sni=NAME`, `sni=` for
/// none), apart from the address dialled, and a relay takes any of them. Through a TLS relay
/// with a secret, whose proof is bound to the TLS session the client's BoringSSL negotiated.
#[test]
fn a_relay_is_reached_whatever_server_name_the_link_chooses() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let state = tmp.path().join("relay-state");
    let state_arg = state.to_str().unwrap();
    let relay = TestRelay::start(&[
        "--upstream",
        &server.addr.to_string(),
        "--tls",
        "127.0.0.1:0",
        "--secret",
        "--state-dir",
        state_arg,
    ]);
    let port = relay.addr("tls").port().to_string();
    let link = ok(
        &tmp.path().join("operator"),
        &[
            "relay",
            "link",
            "--host",
            "localhost",
            "--port",
            &port,
            "--secret",
            "--state-dir",
            state_arg,
            "--no-qr",
        ],
    );
    let link = link.trim();
    let alice = tmp.path().join("alice");
    account(&alice, "alice", &server);
    for (variant, shown) in [
        (link.to_string(), None),
        (
            format!("{link}&sni=www.example.net"),
            Some("SNI www.example.net"),
        ),
        (format!("{link}&sni="), Some("no SNI")),
    ] {
        let check = ok(&alice, &["proxy", "check", &variant]);
        assert!(
            check.contains("works: the server proved its identity"),
            "{variant}: {check}"
        );
        if let Some(shown) = shown {
            assert!(check.contains(shown), "{variant}: {check}");
        }
    }
    // The same through the flags, and a saved proxy keeps its choice.
    let check = ok(
        &alice,
        &["proxy", "check", link, "--sni", "cdn.example.org"],
    );
    assert!(check.contains("SNI cdn.example.org"), "{check}");
    ok(&alice, &["proxy", "add", link, "--no-sni"]);
    ok(&alice, &["proxy", "use", "on"]);
    let list = ok(&alice, &["proxy", "list"]);
    assert!(list.contains("&sni="), "the saved link keeps sni=: {list}");
    let bob = tmp.path().join("bob");
    account(&bob, "bob", &server);
    ok(&alice, &["send", "bob", "with no server name"]);
    assert!(ok(&bob, &["inbox"]).contains("alice: with no server name"));
    // A name that is not a DNS name is refused, saying why.
    let bad = postern(&alice, &["proxy", "add", &format!("{link}&sni=10.0.0.1")]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("must be a DNS name"));
}
