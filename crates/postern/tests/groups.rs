//! Groups (issue 14): three people through a real TLS relay and a real server, one of them
//! offline; per-member delivery marks; a file to the group; removal and leaving; and the
//! server never learning the group's name, members or words.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// Three profiles (alice, bob, carol) whose only route is the relay's TLS listener.
fn three_through_a_relay(tmp: &Path, server: &TestServer, relay: &TestRelay) -> [PathBuf; 3] {
    ["alice", "bob", "carol"].map(|name| {
        let home = tmp.join(name);
        account(&home, name, server);
        ok(&home, &["proxy", "use", "on"]);
        ok(
            &home,
            &["proxy", "add", &relay.addr("tls").to_string(), "--tls"],
        );
        home
    })
}

/// The line of `history` output that contains `needle`.
fn line_with<'a>(history: &'a str, needle: &str) -> &'a str {
    history
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{history}"))
}

#[test]
fn a_group_of_three_with_one_member_offline_gets_everything_through_a_tls_relay() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let relay = relay_for(&server);
    let [alice, bob, carol] = three_through_a_relay(tmp.path(), &server, &relay);

    // Alice creates the group; carol stays offline for now.
    let out = postern(&alice, &["group", "create", "night train", "bob", "carol"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(id.len(), 32, "the group id is printed: {id}");
    assert!(stderr.contains("the members have been told"), "{stderr}");
    let list = ok(&alice, &["group", "list"]);
    assert!(
        list.contains("“night train”") && list.contains("alice (you), bob, carol"),
        "{list}"
    );

    let inbox = ok(&bob, &["inbox"]);
    assert!(
        inbox.contains("⚙ “night train”: alice created the group “night train” with you, carol"),
        "{inbox}"
    );
    ok(
        &alice,
        &["group", "send", "night train", "the train leaves at nine"],
    );
    let inbox = ok(&bob, &["inbox"]);
    assert!(
        inbox.contains("alice in “night train”: the train leaves at nine"),
        "{inbox}"
    );

    // Bob has it, carol not yet: ✓✓ for one of two.
    ok(&alice, &["inbox"]);
    let history = ok(&alice, &["group", "history", "night train"]);
    assert!(
        line_with(&history, "the train leaves at nine").contains("✓✓ 1/2"),
        "{history}"
    );
    // The JSON history says where each member's copy stands.
    let json = ok(&alice, &["group", "history", &id[..8], "--json"]);
    let entry: serde_json::Value = serde_json::from_str(
        json.lines()
            .find(|l| l.contains("the train leaves at nine"))
            .unwrap(),
    )
    .unwrap();
    let states: Vec<(String, String)> = entry["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["member"].as_str().unwrap().to_string(),
                d["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("bob".to_string(), "delivered".to_string()),
            ("carol".to_string(), "sent".to_string())
        ]
    );

    // Bob answers the group, with a file; it reaches alice and (later) carol.
    let map = tmp.path().join("map.bin");
    let data: Vec<u8> = (0..300_000).map(|_| rand::random::<u8>()).collect();
    std::fs::write(&map, &data).unwrap();
    ok(
        &bob,
        &[
            "group",
            "send",
            "night train",
            "--file",
            map.to_str().unwrap(),
            "platform 4",
        ],
    );
    let saved_alice = tmp.path().join("saved-alice");
    let inbox = ok(
        &alice,
        &["inbox", "--save-to", saved_alice.to_str().unwrap()],
    );
    assert!(
        inbox.contains("bob in “night train”: platform 4 📎 map.bin"),
        "{inbox}"
    );
    assert_eq!(std::fs::read(saved_alice.join("map.bin")).unwrap(), data);

    // Carol comes online: everything waited for her, in order.
    let saved_carol = tmp.path().join("saved-carol");
    let inbox = ok(
        &carol,
        &["inbox", "--save-to", saved_carol.to_str().unwrap()],
    );
    let created = inbox.find("alice created the group").expect(&inbox);
    let first = inbox.find("the train leaves at nine").expect(&inbox);
    let second = inbox.find("platform 4").expect(&inbox);
    assert!(created < first && first < second, "{inbox}");
    assert_eq!(std::fs::read(saved_carol.join("map.bin")).unwrap(), data);

    // Now every member has alice's message: ✓✓ without a count.
    let inbox = ok(&alice, &["inbox"]);
    assert!(
        inbox.contains("✓✓ delivered to carol in “night train” (every member has it now)"),
        "{inbox}"
    );
    let history = ok(&alice, &["group", "history", "night train"]);
    let line = line_with(&history, "the train leaves at nine");
    assert!(line.contains("✓✓") && !line.contains("1/2"), "{history}");
    // Carol's view has who wrote what.
    let history = ok(&carol, &["group", "history", "night train"]);
    assert!(
        line_with(&history, "platform 4").contains("← bob:"),
        "{history}"
    );

    // The server held ciphertext only: no group name, member list or words.
    let data_dir = server.data.clone();
    relay.stop();
    assert!(server.terminate());
    for (path, bytes) in files_under(&data_dir) {
        for secret in ["night train", "the train leaves at nine", "platform 4"] {
            assert!(
                !contains(&bytes, secret.as_bytes()),
                "{secret:?} found in the server's {}",
                path.display()
            );
        }
    }
}

#[test]
fn a_removed_member_hears_no_more_and_one_who_left_is_not_written_to() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let relay = relay_for(&server);
    let [alice, bob, carol] = three_through_a_relay(tmp.path(), &server, &relay);

    ok(&alice, &["group", "create", "team", "bob", "carol"]);
    ok(&bob, &["inbox"]);
    ok(&carol, &["inbox"]);

    // Alice removes carol: carol is told, and bob's next message does not reach her.
    let out = postern(&alice, &["group", "remove", "team", "carol"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inbox = ok(&carol, &["inbox"]);
    assert!(inbox.contains("⚙ “team”: alice removed you"), "{inbox}");
    let refused = fails(&carol, &["group", "send", "team", "still here?"]);
    assert!(
        refused.contains("you are no longer a member of the group \"team\""),
        "{refused}"
    );
    let inbox = ok(&bob, &["inbox"]);
    assert!(inbox.contains("alice removed carol"), "{inbox}");
    ok(&bob, &["group", "send", "team", "just us now"]);
    let inbox = postern(&carol, &["inbox"]);
    assert!(
        !String::from_utf8_lossy(&inbox.stdout).contains("just us now"),
        "a removed member still receives"
    );
    assert!(ok(&alice, &["inbox"]).contains("bob in “team”: just us now"));
    let list = ok(&carol, &["group", "list"]);
    assert!(list.contains("you are no longer a member"), "{list}");

    // Bob leaves: alice is told; her next message goes to nobody else, which she is told.
    ok(&bob, &["group", "leave", "team"]);
    let inbox = ok(&alice, &["inbox"]);
    assert!(inbox.contains("⚙ “team”: bob left"), "{inbox}");
    let alone = fails(&alice, &["group", "send", "team", "hello?"]);
    assert!(alone.contains("nobody else is in the group"), "{alone}");

    // Names that are not there are refused before anything is saved.
    let err = fails(&alice, &["group", "add", "team", "alice"]);
    assert!(err.contains("you are in your groups already"), "{err}");
    let err = fails(&alice, &["group", "send", "no such group", "hi"]);
    assert!(err.contains("no group here is called"), "{err}");
    // Adding carol back: she hears the group again.
    ok(&alice, &["group", "add", "team", "carol"]);
    let inbox = ok(&carol, &["inbox"]);
    assert!(inbox.contains("alice added you"), "{inbox}");
    ok(&carol, &["group", "send", "team", "back again"]);
    assert!(ok(&alice, &["inbox"]).contains("carol in “team”: back again"));
}
