//! Neither the path nor the server can read messages, and nobody can impersonate the
//! server or alter traffic unnoticed.

mod common;
use common::*;

const CANARY: &str = "canary-7f3a9b-the-eagle-lands-at-dawn";

fn setup_via_forwarder(
    tmp: &std::path::Path,
) -> (
    TestServer,
    Forwarder,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let server = TestServer::start(&tmp.join("server"));
    let forwarder = Forwarder::start(server.addr, Tamper::None);
    let net = tmp.join("via-forwarder.toml");
    network_file_via(&server.data, forwarder.addr, &net);
    let net = net.to_str().unwrap();
    let (alice, bob) = (tmp.join("alice"), tmp.join("bob"));
    ok(&alice, &["account", "create", "alice", "--network", net]);
    ok(&bob, &["account", "create", "bob", "--network", net]);
    (server, forwarder, alice, bob)
}

#[test]
fn plaintext_never_crosses_the_wire_nor_reaches_the_server_database() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, forwarder, alice, bob) = setup_via_forwarder(tmp.path());
    ok(&alice, &["send", "bob", CANARY]);
    assert!(
        ok(&bob, &["inbox"]).contains(CANARY),
        "the message arrives intact"
    );
    ok(&bob, &["send", "alice", &format!("re: {CANARY}")]);
    assert!(ok(&alice, &["inbox"]).contains(CANARY));

    let wire = forwarder.captured();
    assert!(
        wire.len() > 1000,
        "the forwarder saw the traffic ({} bytes)",
        wire.len()
    );
    assert!(
        !contains(&wire, CANARY.as_bytes()),
        "plaintext crossed the client-server path"
    );
    assert!(
        !contains(&wire, b"the-eagle"),
        "part of the plaintext crossed the path"
    );

    // Stop the server so every database page is on disk, then read every file it wrote.
    let data = server.data.clone();
    assert!(server.terminate());
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !contains(&bytes, CANARY.as_bytes()) && !contains(&bytes, b"the-eagle"),
            "plaintext found in the server's {}",
            path.display()
        );
    }
}

#[test]
fn a_client_refuses_a_server_that_does_not_hold_the_pinned_key() {
    let tmp = tempfile::tempdir().unwrap();
    let real = TestServer::start(&tmp.path().join("real"));
    let impostor = TestServer::start(&tmp.path().join("impostor"));
    // The network file pins the real server's key, but the address leads to another server.
    let net = tmp.path().join("hijacked.toml");
    network_file_via(&real.data, impostor.addr, &net);
    let err = fails(
        &tmp.path().join("alice"),
        &[
            "account",
            "create",
            "alice",
            "--network",
            net.to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("could not prove its identity (possible interception)"),
        "{err}"
    );
    assert!(
        !tmp.path().join("alice").join("profile.toml").exists(),
        "no half-made profile"
    );
}

#[test]
fn tampering_on_the_path_breaks_the_connection_without_delivering_junk() {
    let tmp = tempfile::tempdir().unwrap();
    let (_server, forwarder, alice, bob) = setup_via_forwarder(tmp.path());

    // A byte of Alice's request is flipped: the server drops the connection and queues
    // nothing from it. Alice's client connects again and re-sends (each connection is
    // altered at the same offset, so it may get through or stay pending); either way
    // only the intact message can ever reach Bob (checked at the end).
    forwarder.set_tamper(Tamper::FlipClientByte(400));
    let _ = postern(&alice, &["send", "bob", "first attempt"]);
    forwarder.set_tamper(Tamper::None);

    // The handshake answer is altered: the client says the server is not authentic.
    forwarder.set_tamper(Tamper::FlipServerByte(20));
    let err = fails(&alice, &["inbox"]);
    assert!(err.contains("prove its identity"), "{err}");
    assert!(err.contains("interception"), "{err}");

    // Now the path is clean: the pending message goes out intact.
    forwarder.set_tamper(Tamper::None);
    ok(&alice, &["send", "bob", "second attempt"]);

    // A pushed envelope is altered on its way to Bob: his connection fails, nothing is
    // stored, and the server keeps the message for a clean connection.
    forwarder.set_tamper(Tamper::FlipServerByte(300));
    let out = postern(&bob, &["inbox"]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("attempt"),
        "junk delivered"
    );
    assert!(
        ok(&bob, &["history", "alice", "--json"]).trim().is_empty(),
        "nothing stored"
    );
    forwarder.set_tamper(Tamper::None);
    let inbox = ok(&bob, &["inbox"]);
    assert_eq!(inbox.matches("alice: first attempt").count(), 1, "{inbox}");
    assert_eq!(inbox.matches("alice: second attempt").count(), 1, "{inbox}");
}
