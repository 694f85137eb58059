//! A message acknowledged by the server survives the server being killed.

mod common;
use common::*;

#[test]
fn acknowledged_message_survives_sigkill_and_is_delivered_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let server = TestServer::start(&data);
    let net = server.network_file();
    let net = net.to_str().unwrap();
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    ok(&alice, &["account", "create", "alice", "--network", net]);
    ok(&bob, &["account", "create", "bob", "--network", net]);

    // `send` returns only after the server acknowledged (✓); then the server dies hard
    // before Bob ever connects.
    let id = ok(&alice, &["send", "bob", "written before the crash"])
        .trim()
        .to_string();
    let addr = server.addr;
    server.kill();

    let _server = TestServer::start_on(&data, addr);
    let first = ok(&bob, &["inbox", "--json"]);
    assert_eq!(first.matches(&id).count(), 1, "{first}");
    assert!(first.contains("written before the crash"));
    let second = ok(&bob, &["inbox", "--json"]);
    assert!(!second.contains(&id), "delivered again: {second}");
    let history = ok(&bob, &["history", "alice", "--json"]);
    assert_eq!(
        history.matches(&id).count(),
        1,
        "exactly once in history: {history}"
    );
    ok(&alice, &["inbox"]);
    assert!(ok(&alice, &["history", "bob"]).contains("✓✓ written before the crash"));
}
