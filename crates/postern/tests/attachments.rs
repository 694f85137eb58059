//! Attachments (issue 14): files sent end to end through real relays and a real server,
//! resumed when the route dies mid-transfer, and refused clearly when the server cannot
//! take them.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `len` bytes no compressor or pattern-matcher would find in ciphertext by accident.
fn random_file(path: &Path, len: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
    std::fs::write(path, &data).unwrap();
    data
}

/// Every file under `dir` (the server's media store), read whole.
fn stored_files(dir: &Path) -> Vec<Vec<u8>> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_file())
                .map(|e| std::fs::read(e.path()).unwrap())
                .collect()
        })
        .unwrap_or_default()
}

/// The percentages `postern send`/`inbox` printed as transfer progress (not on a terminal:
/// one line per tenth).
fn percentages(stderr: &str, verb: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter(|l| l.starts_with(verb))
        .filter_map(|l| {
            let open = l.rfind('(')?;
            l[open + 1..].strip_suffix(" %)")?.parse().ok()
        })
        .collect()
}

#[test]
fn a_file_goes_end_to_end_through_a_tls_relay_and_the_server_holds_only_ciphertext() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let relay = relay_for(&server);
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    for (home, name) in [(&alice, "alice"), (&bob, "bob")] {
        account(home, name, &server);
        ok(home, &["proxy", "use", "on"]);
        ok(
            home,
            &["proxy", "add", &relay.addr("tls").to_string(), "--tls"],
        );
    }
    let photo = tmp.path().join("boat photo.jpg");
    let data = random_file(&photo, 3_000_000);

    let out = postern(
        &alice,
        &["send", "bob", "--file", photo.to_str().unwrap(), "the boat"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let pct = percentages(&stderr, "uploading boat photo.jpg to bob");
    assert_eq!(pct.last(), Some(&100), "progress is shown: {stderr}");
    // Sent (✓) only once the file is up: the file is already complete on the server.
    let history = ok(&alice, &["history", "bob"]);
    assert!(
        history.contains("✓ the boat 📎 boat photo.jpg (3.0 MB, image/jpeg)"),
        "{history}"
    );

    // The server's media store holds the ciphertext, never the file.
    let stored = stored_files(&server.data.join("media"));
    let blob = stored
        .iter()
        .find(|f| f.len() > data.len())
        .expect("the upload is in the media store");
    assert!(
        !contains(blob, &data[1_000_000..1_000_064]),
        "the media store holds plaintext"
    );

    let saved = tmp.path().join("saved");
    let out = postern(&bob, &["inbox", "--save-to", saved.to_str().unwrap()]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("alice: the boat 📎 boat photo.jpg (3.0 MB, image/jpeg)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("📎 boat photo.jpg from alice saved at"),
        "{stdout}"
    );
    assert_eq!(
        percentages(&stderr, "fetching boat photo.jpg from alice").last(),
        Some(&100),
        "{stderr}"
    );
    assert_eq!(std::fs::read(saved.join("boat photo.jpg")).unwrap(), data);

    // History shows where it is; --save-to copies it again without overwriting.
    let history = ok(&bob, &["history", "alice"]);
    assert!(history.contains("— saved at "), "{history}");
    let out = postern(
        &bob,
        &["history", "alice", "--save-to", saved.to_str().unwrap()],
    );
    assert!(out.status.success());
    assert_eq!(
        std::fs::read(saved.join("boat photo (2).jpg")).unwrap(),
        data
    );
    // The JSON history carries the attachment, never its key.
    let json = ok(&bob, &["history", "alice", "--json"]);
    assert!(
        json.contains("\"attachment\":{\"file_name\":\"boat photo.jpg\""),
        "{json}"
    );
    assert!(!json.contains("\"key\""), "{json}");

    // Alice sees ✓✓ once Bob's device stored the message.
    ok(&alice, &["inbox"]);
    assert!(ok(&alice, &["history", "bob"]).contains("✓✓ the boat"));
}

/// Starts `postern send` in the background and returns it with its stderr lines.
fn spawn_send(
    home: &Path,
    args: &[&str],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .arg("--home")
        .arg(home)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

#[test]
fn an_upload_and_a_download_go_on_from_where_they_were_when_their_relay_is_killed() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    account(&alice, "alice", &server);
    account(&bob, "bob", &server);
    let big = tmp.path().join("video.mp4");
    let data = random_file(&big, 10_000_000);

    // Alice: relay A first, relay B second, relays only.
    let relay_a = relay_for(&server);
    let relay_b = relay_for(&server);
    ok(&alice, &["proxy", "use", "on"]);
    for r in [&relay_a, &relay_b] {
        ok(
            &alice,
            &["proxy", "add", &r.addr("plain").to_string(), "--no-tls"],
        );
    }
    let (mut send, lines) = spawn_send(
        &alice,
        &[
            "send",
            "bob",
            "--file",
            big.to_str().unwrap(),
            "ten megabytes",
        ],
    );
    // Kill relay A once a fifth of the file is up.
    let mut seen = Vec::new();
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no progress past 20 %: {seen:?}"));
        seen.push(line.clone());
        if percentages(&line, "uploading")
            .first()
            .is_some_and(|p| *p >= 20)
        {
            break;
        }
    }
    relay_a.stop();
    let status = loop {
        if let Some(s) = send.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "send did not finish: {seen:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    seen.extend(lines.try_iter());
    let all = seen.join("\n");
    assert!(status.success(), "{all}");
    let pct = percentages(&all, "uploading video.mp4 to bob");
    assert_eq!(pct.last(), Some(&100), "{all}");
    assert!(
        pct.windows(2).all(|w| w[0] <= w[1]),
        "the upload went on where it was, never from the start: {pct:?}\n{all}"
    );
    assert!(
        ok(&alice, &["status"]).contains(&relay_b.addr("plain").to_string()),
        "alice is on relay B now"
    );

    // Bob fetches through relay C, which dies mid-way too; his next inbox goes on.
    let relay_c = relay_for(&server);
    ok(&bob, &["proxy", "use", "on"]);
    ok(
        &bob,
        &[
            "proxy",
            "add",
            &relay_c.addr("plain").to_string(),
            "--no-tls",
        ],
    );
    let saved = tmp.path().join("saved");
    let (mut inbox, lines) = spawn_send(&bob, &["inbox", "--save-to", saved.to_str().unwrap()]);
    let mut seen = Vec::new();
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no download progress past 20 %: {seen:?}"));
        seen.push(line.clone());
        if percentages(&line, "fetching")
            .first()
            .is_some_and(|p| *p >= 20)
        {
            break;
        }
    }
    relay_c.stop();
    let _ = inbox.wait();
    seen.extend(lines.try_iter());
    let before: u64 = percentages(&seen.join("\n"), "fetching")
        .into_iter()
        .max()
        .unwrap_or(0);
    assert!(!saved.join("video.mp4").exists());
    let history = ok(&bob, &["history", "alice"]);
    assert!(history.contains("not fetched yet"), "{history}");

    ok(
        &bob,
        &[
            "proxy",
            "add",
            &relay_b.addr("plain").to_string(),
            "--no-tls",
        ],
    );
    let out = postern(&bob, &["inbox", "--save-to", saved.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let pct = percentages(&stderr, "fetching video.mp4 from alice");
    assert!(
        pct.first().is_some_and(|p| *p >= before),
        "the download went on from {before} %, not from the start: {pct:?}\n{stderr}"
    );
    assert_eq!(std::fs::read(saved.join("video.mp4")).unwrap(), data);
}

#[test]
fn a_server_without_media_or_with_a_smaller_limit_is_named_as_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("scan.pdf");
    random_file(&file, 2_500_000);

    let server = TestServer::start_with(
        &tmp.path().join("small"),
        "127.0.0.1:0".parse().unwrap(),
        &["--media-max-file-mib", "1"],
    );
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    account(&alice, "alice", &server);
    account(&bob, "bob", &server);
    let status = ok(&alice, &["status"]);
    assert!(
        status.contains("Media: available (files up to 1.0 MB, 1.07 GB per account, kept 30 days)"),
        "{status}"
    );
    let err = fails(&alice, &["send", "bob", "--file", file.to_str().unwrap()]);
    assert!(
        err.contains("the file is 2.5 MB and this server takes attachments up to 1.0 MB"),
        "{err}"
    );
    assert!(err.contains("marked ✗"), "{err}");
    let history = ok(&alice, &["history", "bob"]);
    assert!(history.contains("✗"), "{history}");
    // A message that failed is never retried: the next send goes out alone.
    ok(&alice, &["send", "bob", "without the file"]);
    server.terminate();

    let server = TestServer::start_with(
        &tmp.path().join("none"),
        "127.0.0.1:0".parse().unwrap(),
        &["--no-media"],
    );
    let (carol, dave) = (tmp.path().join("carol"), tmp.path().join("dave"));
    account(&carol, "carol", &server);
    account(&dave, "dave", &server);
    let status = ok(&carol, &["status"]);
    assert!(
        status.contains("Media: unavailable (this server keeps no attachments); messages work"),
        "{status}"
    );
    let err = fails(
        &carol,
        &["send", "dave", "--file", file.to_str().unwrap(), "x"],
    );
    assert!(
        err.contains("media: unavailable (this server keeps no attachments)"),
        "{err}"
    );
    let missing = fails(&carol, &["send", "dave", "--file", "/nonexistent/file"]);
    assert!(missing.contains("/nonexistent/file"), "{missing}");
}

#[test]
fn a_download_through_a_path_that_freezes_every_connection_after_40_kib_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    account(&alice, "alice", &server);
    account(&bob, "bob", &server);
    let file = tmp.path().join("notes.pdf");
    let data = random_file(&file, 150_000);
    ok(&alice, &["send", "bob", "--file", file.to_str().unwrap()]);

    // Bob's only route freezes every flow (no FIN, no RST) after 40 KiB to him: no
    // connection carries the whole file, each carries a part of it.
    let freezing = Forwarder::start(server.addr, Tamper::FreezeAfter(40 * 1024));
    ok(&bob, &["proxy", "use", "on"]);
    ok(
        &bob,
        &["proxy", "add", &freezing.addr.to_string(), "--no-tls"],
    );
    let saved = tmp.path().join("saved");
    let out = postern(&bob, &["inbox", "--save-to", saved.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(std::fs::read(saved.join("notes.pdf")).unwrap(), data);
    let connections = freezing
        .connections
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        connections >= 4,
        "the file needed several connections, each going on where the last stopped: {connections}"
    );
}

#[test]
fn a_relays_media_port_carries_the_files_and_when_it_fails_they_go_over_the_chat_port() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("server"));
    let upstream = server.addr.to_string();
    let relay = TestRelay::start(&[
        "--upstream",
        &upstream,
        "--tls",
        "127.0.0.1:0",
        "--media",
        "127.0.0.1:0",
        "--no-stats",
    ]);
    let media = relay
        .listeners
        .iter()
        .find(|(name, _, _)| name == "media")
        .map(|(_, _, a)| *a)
        .expect("a media listener");
    // The media port as clients reach it: through a path we can watch and cut.
    let media_path = Forwarder::start(media, Tamper::None);
    let chat = relay.addr("tls");
    let link = format!(
        "postern://proxy?host=127.0.0.1&port={}&tls=1&media={}",
        chat.port(),
        media_path.addr.port()
    );
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    for (home, name) in [(&alice, "alice"), (&bob, "bob")] {
        account(home, name, &server);
        ok(home, &["proxy", "use", "on"]);
        ok(home, &["proxy", "add", &link]);
    }
    let check = ok(&alice, &["proxy", "check"]);
    assert!(
        check.contains(&format!(
            "Media: available (port {}, TLS",
            media_path.addr.port()
        )),
        "{check}"
    );

    // A file goes up and comes down through the media port.
    let file = tmp.path().join("song.ogg");
    let data = random_file(&file, 600_000);
    ok(&alice, &["send", "bob", "--file", file.to_str().unwrap()]);
    let through_media = media_path.captured.lock().unwrap().len();
    assert!(
        through_media > 600_000,
        "the upload used the media port ({through_media} bytes)"
    );
    let status = ok(&alice, &["status"]);
    assert!(
        status.contains(&format!(
            "Media port: ✓ files go through 127.0.0.1:{}",
            media_path.addr.port()
        )),
        "{status}"
    );
    let saved = tmp.path().join("saved");
    ok(&bob, &["inbox", "--save-to", saved.to_str().unwrap()]);
    assert_eq!(std::fs::read(saved.join("song.ogg")).unwrap(), data);

    // The media port goes down (a censor blocks it): messages and files still go, over
    // the chat port, and status and check say what failed.
    media_path.set_tamper(Tamper::Drop);
    let before = media_path.captured.lock().unwrap().len();
    let second = tmp.path().join("second.ogg");
    let data2 = random_file(&second, 300_000);
    ok(
        &alice,
        &["send", "bob", "--file", second.to_str().unwrap(), "again"],
    );
    assert!(
        media_path.captured.lock().unwrap().len() - before < 300_000,
        "the second file did not go through the dead media port"
    );
    ok(&bob, &["inbox", "--save-to", saved.to_str().unwrap()]);
    assert_eq!(std::fs::read(saved.join("second.ogg")).unwrap(), data2);
    let status = ok(&alice, &["status"]);
    assert!(status.contains("✓ Connected via"), "{status}");
    assert!(
        status.contains("Media port: unavailable (127.0.0.1:")
            && status.contains("files go over the chat connection"),
        "{status}"
    );
    let out = postern(&alice, &["proxy", "check"]);
    let check = String::from_utf8_lossy(&out.stdout);
    assert!(
        check.contains(&format!(
            "Media: unavailable (port {}",
            media_path.addr.port()
        )) && check.contains("files go over the chat port instead"),
        "{check}"
    );
}
