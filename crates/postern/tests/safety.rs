//! Safety numbers through a real server: both people see the same number, and when a
//! contact's identity keys change the conversation says so and the contact is no longer
//! verified.
//!
//! The service has no command to re-register a username (a lost phone keeps its name
//! forever), so a contact's keys change only when the server's operator frees the name —
//! or when someone who holds the server substitutes keys. The tests do what either would
//! (`common::replace_account`): delete the account in the server's database, then the
//! contact registers the name again from a fresh profile, with new keys.

mod common;
use std::path::Path;

use common::*;

const MARKER: &str =
    "⚠ bob's safety number changed (new identity key) — verify with `postern contact verify bob`";

fn safety(home: &Path, contact: &str) -> serde_json::Value {
    let out = ok(home, &["contact", "verify", contact, "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn number(v: &serde_json::Value) -> String {
    let n = v["number"].as_str().expect("number").to_string();
    assert_eq!(n.len(), 60, "{v}");
    n
}

/// Alice and bob talk and alice verifies bob; then bob's account is replaced by one
/// with new keys (registered after `extra` other accounts, so its device id is new when
/// there is one). Returns the server (restarted on the same address) and the number alice
/// verified.
fn bob_is_replaced(tmp: &Path, extra: &[&str]) -> (TestServer, String) {
    let server = TestServer::start(&tmp.join("server"));
    let (alice, bob) = (tmp.join("alice"), tmp.join("bob"));
    account(&alice, "alice", &server);
    account(&bob, "bob", &server);
    for name in extra {
        account(&tmp.join(name), name, &server);
    }
    ok(&alice, &["send", "bob", "hello bob"]);
    assert!(ok(&bob, &["inbox"]).contains("hello bob"));

    // Both see the same 60 digits, in 12 groups of 5 with a QR code.
    let seen_by_alice = safety(&alice, "bob");
    let seen_by_bob = safety(&bob, "alice");
    assert_eq!(number(&seen_by_alice), number(&seen_by_bob));
    assert_eq!(seen_by_alice["verified"], false, "{seen_by_alice}");
    assert_eq!(seen_by_alice["checked_with_server"], true);
    let text = ok(&alice, &["contact", "verify", "bob"]);
    let groups = seen_by_alice["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 12);
    let first_line = groups[..4]
        .iter()
        .map(|g| g.as_str().unwrap())
        .collect::<Vec<_>>()
        .join("  ");
    assert!(text.contains(&first_line), "{text}");
    assert!(
        text.contains('▀') || text.contains('▄'),
        "a QR code: {text}"
    );
    assert!(text.contains("Not verified yet"), "{text}");
    assert!(text.contains("postern contact verify alice"), "{text}");

    let confirmed = ok(&alice, &["contact", "verify", "bob", "--confirm", "--json"]);
    let confirmed: serde_json::Value = serde_json::from_str(&confirmed).unwrap();
    assert_eq!(confirmed["verified"], true, "{confirmed}");
    let verified = number(&confirmed);
    assert!(ok(&alice, &["contact", "verify", "bob"]).contains("✓ Verified"));

    // Bob's account is replaced: he registers the name again from a fresh profile.
    (replace_account(server, &bob, "bob"), verified)
}

fn assert_marked_and_unverified(alice: &Path, bob: &Path, verified: &str, after: &str) {
    let history = ok(alice, &["history", "bob"]);
    let hello = history.find("hello bob").expect("old message kept");
    let marker = history.find(MARKER).unwrap_or_else(|| panic!("{history}"));
    let next = history.find(after).unwrap_or_else(|| panic!("{history}"));
    assert!(
        hello < marker && marker < next,
        "marked where it happened: {history}"
    );
    assert_eq!(history.matches(MARKER).count(), 1, "{history}");
    let json = ok(alice, &["history", "bob", "--json"]);
    assert_eq!(
        json.matches("\"status\":\"key_changed\"").count(),
        1,
        "{json}"
    );

    let now = safety(alice, "bob");
    assert_eq!(now["verified"], false, "{now}");
    assert_eq!(now["changed_since_verified"], true, "{now}");
    assert_ne!(number(&now), verified, "the number changed");
    assert_eq!(
        number(&now),
        number(&safety(bob, "alice")),
        "and both sides agree on the new one"
    );
    let text = ok(alice, &["contact", "verify", "bob"]);
    assert!(
        text.contains("⚠ Not verified: bob's safety number changed"),
        "{text}"
    );
    assert!(text.contains("since you verified it"), "{text}");
}

#[test]
fn a_contact_who_writes_with_new_keys_is_marked_and_no_longer_verified() {
    let tmp = tempfile::tempdir().unwrap();
    // Nobody registered after bob: the server gives the new bob the same device id.
    let (_server, verified) = bob_is_replaced(tmp.path(), &[]);
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));

    // The new bob writes first: alice's client accepts the new key (the conversation goes
    // on) and says so, in the inbox and in the history, before his message.
    ok(&bob, &["send", "alice", "new phone, same bob"]);
    let inbox = ok(&alice, &["inbox"]);
    assert!(inbox.contains(MARKER), "{inbox}");
    assert!(inbox.contains("bob: new phone, same bob"), "{inbox}");
    assert_marked_and_unverified(&alice, &bob, &verified, "new phone, same bob");

    // Alice's reply reaches the new bob.
    ok(&alice, &["send", "bob", "welcome back"]);
    assert!(ok(&bob, &["inbox"]).contains("alice: welcome back"));
    // Verifying again is possible once compared.
    let again = ok(&alice, &["contact", "verify", "bob", "--confirm", "--json"]);
    assert!(again.contains("\"verified\":true"), "{again}");
}

#[test]
fn a_message_to_a_contact_with_a_new_device_marks_the_change_and_reaches_it() {
    let tmp = tempfile::tempdir().unwrap();
    // Carol registered after bob: the new bob gets a new device id.
    let (_server, verified) = bob_is_replaced(tmp.path(), &["carol"]);
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));

    // Alice writes first: the server says bob's devices changed, alice's client reads
    // them again, marks the change, and encrypts to the new device only.
    ok(&alice, &["send", "bob", "are you there?"]);
    assert!(ok(&bob, &["inbox"]).contains("alice: are you there?"));
    assert_marked_and_unverified(&alice, &bob, &verified, "are you there?");
}
