//! Connectivity as a user in a hostile network sees it: routes raced, paths that freeze
//! (a relay that accepts and then stops forwarding, without a reset), a plain connection
//! to a TLS port, pending messages that go out as soon as a route works, and messages to
//! users who do not exist.

mod common;
use common::*;

use std::time::Duration;

/// A server, a relay in front of it, and two registered users, Alice and Bob.
struct TwoUsers {
    _tmp: tempfile::TempDir,
    _server: TestServer,
    relay: TestRelay,
    alice: std::path::PathBuf,
    bob: std::path::PathBuf,
}

fn two_users() -> TwoUsers {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let relay = relay_for(&server);
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    account(&alice, "alice", &server);
    account(&bob, "bob", &server);
    TwoUsers {
        _tmp: tmp,
        _server: server,
        relay,
        alice,
        bob,
    }
}

/// [`two_users`], with Alice's only relay behind a forwarder that is down (accepts and
/// closes) until the test says otherwise.
struct Offline {
    users: TwoUsers,
    front: Forwarder,
}

fn alice_offline() -> Offline {
    let users = two_users();
    let front = Forwarder::start(users.relay.addr("plain"), Tamper::Drop);
    ok(&users.alice, &["proxy", "use", "on"]);
    ok(
        &users.alice,
        &["proxy", "add", &front.addr.to_string(), "--no-tls"],
    );
    Offline { users, front }
}

#[test]
fn a_backlog_gets_through_a_relay_path_that_freezes_every_few_kilobytes() {
    let users = two_users();
    let (relay, alice, bob) = (&users.relay, users.alice.clone(), users.bob.clone());
    // Bob reaches the service only through a path that freezes after 6 KB from the relay
    // (a censor's silent flow freeze): no connection carries more than a dozen messages.
    let freezing = Forwarder::start(relay.addr("plain"), Tamper::FreezeAfter(6 * 1024));
    ok(&bob, &["proxy", "use", "on"]);
    ok(
        &bob,
        &["proxy", "add", &freezing.addr.to_string(), "--no-tls"],
    );

    const BACKLOG: usize = 40;
    let padding = "x".repeat(200);
    for i in 0..BACKLOG {
        ok(&alice, &["send", "bob", &format!("backlog {i} {padding}")]);
    }
    let follower = Follower::start(&bob);
    let ids = follower.incoming_ids(BACKLOG, Duration::from_secs(120));
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), BACKLOG, "every message arrived: {ids:?}");
    assert_eq!(ids.len(), BACKLOG, "none was shown twice");
    assert!(
        freezing
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3,
        "the backlog needed several connections, each noticed as frozen and replaced"
    );
    let history = ok(&bob, &["history", "alice"]);
    for i in 0..BACKLOG {
        assert!(history.contains(&format!("backlog {i} ")), "{history}");
    }
}

#[test]
fn pending_messages_are_resent_over_a_sending_path_that_freezes() {
    // Alice's only relay is down while she types, then comes back on a path that freezes
    // after a few hundred bytes from the relay: a handful of answers per connection.
    let offline = alice_offline();
    let (front, alice, bob) = (
        &offline.front,
        offline.users.alice.clone(),
        offline.users.bob.clone(),
    );
    const TYPED: usize = 12;
    for i in 0..TYPED {
        fails(&alice, &["send", "bob", &format!("typed offline {i}")]);
    }
    front.set_tamper(Tamper::FreezeAfter(700));
    let out = ok(&alice, &["send", "bob", "and the last one"]);
    assert!(!out.trim().is_empty(), "prints the id: {out}");
    let history = ok(&alice, &["history", "bob"]);
    assert!(!history.contains('…'), "nothing left pending: {history}");
    let inbox = ok(&bob, &["inbox"]);
    for i in 0..TYPED {
        assert_eq!(
            inbox.matches(&format!("typed offline {i}\n")).count(),
            1,
            "exactly once: {inbox}"
        );
    }
    assert!(inbox.contains("and the last one"), "{inbox}");
    assert!(front.connections.load(std::sync::atomic::Ordering::Relaxed) >= 2);
}

#[test]
fn status_and_a_following_inbox_send_what_is_pending() {
    let offline = alice_offline();
    let (front, alice, bob) = (
        &offline.front,
        offline.users.alice.clone(),
        offline.users.bob.clone(),
    );

    fails(&alice, &["send", "bob", "waits for status"]);
    front.set_tamper(Tamper::None);
    let status = ok(&alice, &["status"]);
    assert!(
        status.contains("✓ sent an earlier message to bob"),
        "{status}"
    );
    assert!(ok(&alice, &["history", "bob"]).contains("✓ waits for status"));

    // A follower started while every path is down sends the pending message as soon as
    // the relay is back, without another command.
    front.set_tamper(Tamper::Drop);
    fails(&alice, &["send", "bob", "waits for the follower"]);
    let follower = Follower::start(&alice);
    front.set_tamper(Tamper::None);
    let bob_follower = Follower::start(&bob);
    bob_follower.expect(&["\"incoming\"", "waits for the follower"]);
    drop(follower);
}

#[test]
fn a_message_to_someone_who_does_not_exist_stays_in_history_marked_failed() {
    let offline = alice_offline();
    let (front, alice) = (&offline.front, offline.users.alice.clone());
    // Typed while offline, to a name nobody has.
    let err = fails(&alice, &["send", "nobody", "are you there?"]);
    assert!(err.contains("saved"), "{err}");
    front.set_tamper(Tamper::None);
    let out = String::from_utf8_lossy(&postern(&alice, &["inbox"]).stderr).to_string();
    assert!(
        out.contains("✗ an earlier message to nobody was not sent: there is no user named"),
        "{out}"
    );
    let history = ok(&alice, &["history", "nobody"]);
    assert!(
        history.contains("✗ are you there?  (not delivered: there is no user named \"nobody\""),
        "{history}"
    );
    let json = ok(&alice, &["history", "nobody", "--json"]);
    assert!(json.contains("\"status\":\"failed\""), "{json}");
}

#[test]
fn a_plain_connection_to_a_tls_port_is_diagnosed_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let relay = relay_for(&server);
    let alice = tmp.path().join("alice");
    account(&alice, "alice", &server);
    let tls_port = relay.addr("tls").to_string();
    let check = postern(&alice, &["proxy", "check", &tls_port, "--no-tls"]);
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(!check.status.success());
    assert!(out.contains("this port speaks TLS"), "{out}");
    assert!(out.contains("try --tls"), "{out}");
    assert!(!out.contains("possible interception"), "not hostile: {out}");
    let out = ok(&alice, &["proxy", "check", &tls_port, "--tls"]);
    assert!(out.contains("works"), "{out}");
    // Checking an address does not make it a route: only saved ones are remembered.
    let list: serde_json::Value =
        serde_json::from_str(ok(&alice, &["proxy", "list", "--json"]).trim()).unwrap();
    assert!(list["last_route"].is_null(), "{list}");
}

#[test]
fn saving_an_address_says_what_was_understood_and_warns_when_it_does_not_resolve() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let alice = tmp.path().join("alice");
    account(&alice, "alice", &server);
    let out = ok(&alice, &["proxy", "add", "garbage.invalid"]);
    assert!(
        out.contains("Understood: host garbage.invalid, port 443, TLS on."),
        "{out}"
    );
    assert!(out.contains("does not resolve right now"), "{out}");
    assert!(out.contains("Saved proxy"), "still saved: {out}");
    let out = ok(&alice, &["proxy", "add", "127.0.0.1:5222"]);
    assert!(out.contains("host 127.0.0.1, port 5222, TLS off"), "{out}");
    assert!(!out.contains("does not resolve"), "{out}");
}

#[test]
fn racing_starts_with_what_worked_and_never_breaks_the_proxy_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let relay = relay_for(&server);
    let black_hole = BlackHole::start();
    let alice = tmp.path().join("alice");
    account(&alice, "alice", &server);
    ok(
        &alice,
        &["proxy", "add", &black_hole.addr.to_string(), "--no-tls"],
    );
    ok(
        &alice,
        &["proxy", "add", &relay.addr("plain").to_string(), "--no-tls"],
    );

    // Mode off: only the direct route, however many relays are saved.
    ok(&alice, &["proxy", "use", "off"]);
    let v: serde_json::Value =
        serde_json::from_str(ok(&alice, &["status", "--json"]).trim()).unwrap();
    let attempts = v["report"]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{v}");
    assert!(attempts[0]["route"].as_str().unwrap().contains("(direct)"));

    // Mode on: relays only. The black hole goes first (saved first); the relay starts
    // about 250 ms later and wins; the black hole is abandoned, not waited for.
    ok(&alice, &["proxy", "use", "on"]);
    let v: serde_json::Value =
        serde_json::from_str(ok(&alice, &["status", "--json"]).trim()).unwrap();
    let attempts = v["report"]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{v}");
    assert!(attempts
        .iter()
        .all(|a| !a["route"].as_str().unwrap().contains("direct")));
    assert!(attempts[0]["route"]
        .as_str()
        .unwrap()
        .contains(&black_hole.addr.to_string()));
    assert!(attempts[0]["abandoned"].is_string(), "{v}");
    let stagger = attempts[1]["started_ms"].as_f64().unwrap();
    assert!(
        (200.0..2000.0).contains(&stagger),
        "second route started at {stagger} ms"
    );
    assert!(attempts[1]["failed"].is_null() && attempts[1]["abandoned"].is_null());

    // The next start begins with the relay that worked: one attempt, no waiting.
    let v: serde_json::Value =
        serde_json::from_str(ok(&alice, &["status", "--json"]).trim()).unwrap();
    let attempts = v["report"]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{v}");
    assert!(attempts[0]["route"]
        .as_str()
        .unwrap()
        .contains(&relay.addr("plain").to_string()));
}

#[test]
fn a_server_stops_at_once_while_a_frozen_client_holds_its_push_window() {
    let users = two_users();
    let TwoUsers {
        _server: server,
        alice,
        bob,
        ..
    } = users;
    // Bob's flow to the server freezes after 2 KiB, so the server's push of his backlog
    // waits for acknowledgements that never come.
    let freezing = Forwarder::start(server.addr, Tamper::FreezeAfter(2 * 1024));
    ok(&bob, &["proxy", "use", "on"]);
    ok(
        &bob,
        &["proxy", "add", &freezing.addr.to_string(), "--no-tls"],
    );
    for i in 0..20 {
        ok(
            &alice,
            &["send", "bob", &format!("held {i} {}", "y".repeat(200))],
        );
    }
    let follower = Follower::start(&bob);
    assert!(
        !follower.incoming_ids(1, Duration::from_secs(30)).is_empty(),
        "the first window arrived"
    );
    // Shutdown must not wait for the stalled push (the server's grace is 5 s).
    let started = std::time::Instant::now();
    assert!(server.terminate(), "server exits 0 on SIGTERM");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
}
