//! Two people exchanging messages through a real server process.

mod common;
use common::*;

#[test]
fn two_clients_exchange_messages_both_ways_with_sent_then_delivered() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let net = server.network_file();
    let net = net.to_str().unwrap();
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    ok(&alice, &["account", "create", "alice", "--network", net]);
    ok(&bob, &["account", "create", "bob", "--network", net]);

    // Bob is online and follows his inbox; Alice sends.
    let bob_inbox = Follower::start(&bob);
    let id = ok(&alice, &["send", "bob", "hello bob"]).trim().to_string();
    assert_eq!(id.len(), 32, "send prints the message id: {id:?}");
    let history = ok(&alice, &["history", "bob"]);
    assert!(history.contains("hello bob"), "{history}");
    let line = bob_inbox.expect(&["\"incoming\"", "hello bob", &id]);
    assert!(line.contains("\"from\":\"alice\""), "{line}");

    // Alice's next connection learns that Bob's device stored it: ✓✓.
    let alice_inbox = Follower::start(&alice);
    alice_inbox.expect(&["\"delivered\"", &id]);
    let history = ok(&alice, &["history", "bob"]);
    assert!(history.contains("✓✓ hello bob"), "{history}");

    // And back: Bob replies, Alice (still following) gets it live.
    let reply = ok(&bob, &["send", "alice", "hi alice"]).trim().to_string();
    alice_inbox.expect(&["\"incoming\"", "hi alice", &reply]);
    bob_inbox.expect(&["\"delivered\"", &reply]);
    let bob_history = ok(&bob, &["history", "alice"]);
    assert!(bob_history.contains("alice: hello bob"), "{bob_history}");
    assert!(bob_history.contains("✓✓ hi alice"), "{bob_history}");
}

#[test]
fn offline_recipient_receives_on_next_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let net = server.network_file();
    let net = net.to_str().unwrap();
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    ok(&alice, &["account", "create", "alice", "--network", net]);
    ok(&bob, &["account", "create", "bob", "--network", net]);
    for i in 0..3 {
        ok(
            &alice,
            &["send", "bob", &format!("message {i} while bob is away")],
        );
    }
    // Sent (✓), not delivered: Bob has not connected.
    let history = ok(&alice, &["history", "bob"]);
    assert_eq!(history.matches("→ bob ✓ message").count(), 3, "{history}");
    let inbox = ok(&bob, &["inbox"]);
    for i in 0..3 {
        assert!(
            inbox.contains(&format!("alice: message {i} while bob is away")),
            "{inbox}"
        );
    }
    // Delivered exactly once: a second look finds nothing new.
    let again = postern(&bob, &["inbox"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).trim().is_empty());
    assert!(String::from_utf8_lossy(&again.stderr).contains("no new messages"));
    // Alice's next connection collects the receipts: ✓✓.
    let receipts = ok(&alice, &["inbox"]);
    assert_eq!(
        receipts.matches("✓✓ delivered to bob").count(),
        3,
        "{receipts}"
    );
    let history = ok(&alice, &["history", "bob"]);
    assert_eq!(history.matches("→ bob ✓✓ message").count(), 3, "{history}");
}

#[test]
fn clear_errors_and_nothing_typed_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let net = server.network_file();
    let net = net.to_str().unwrap();
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    ok(&alice, &["account", "create", "alice", "--network", net]);
    ok(&bob, &["account", "create", "bob", "--network", net]);

    let err = fails(&alice, &["send", "carol", "hi"]);
    assert!(err.contains("there is no user named \"carol\""), "{err}");
    // Kept, marked failed with the reason, never silently deleted.
    let history = ok(&alice, &["history", "carol"]);
    assert!(
        history.contains("✗ hi  (not delivered: there is no user named"),
        "{history}"
    );
    let err = fails(
        &tmp.path().join("bob2"),
        &["account", "create", "bob", "--network", net],
    );
    assert!(err.contains("taken"), "{err}");
    let err = fails(
        &tmp.path().join("x"),
        &["account", "create", "Bad Name", "--network", net],
    );
    assert!(err.contains("lowercase"), "{err}");
    let err = fails(&tmp.path().join("nobody"), &["send", "bob", "hi"]);
    assert!(err.contains("postern account create"), "{err}");

    // Server down: the message is kept and goes out with the next command.
    let data = server.data.clone();
    let addr = server.addr;
    server.kill();
    let err = fails(&alice, &["send", "bob", "typed while the server was down"]);
    assert!(err.contains("could not reach the service"), "{err}");
    assert!(
        err.contains("TCP connect: connection refused"),
        "names the stage: {err}"
    );
    assert!(err.contains("saved"), "{err}");
    assert_eq!(
        err.matches("connection refused").count(),
        1,
        "cause printed once: {err}"
    );
    let history = ok(&alice, &["history", "bob"]);
    assert!(
        history.contains("… typed while the server was down"),
        "{history}"
    );
    let _server = TestServer::start_on(&data, addr);
    ok(&alice, &["send", "bob", "and one more"]);
    let inbox = ok(&bob, &["inbox"]);
    let first = inbox
        .find("typed while the server was down")
        .expect("pending message delivered");
    let second = inbox.find("and one more").expect("new message delivered");
    assert!(first < second, "order kept: {inbox}");
}

#[test]
fn server_stops_cleanly_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let net = server.network_file();
    let alice = tmp.path().join("alice");
    ok(
        &alice,
        &[
            "account",
            "create",
            "alice",
            "--network",
            net.to_str().unwrap(),
        ],
    );
    let _follower = Follower::start(&alice);
    assert!(
        server.terminate(),
        "server exits 0 on SIGTERM with a client connected"
    );
}
