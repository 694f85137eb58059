//! Several `postern server` nodes sharing PostgreSQL (a real one, started by
//! `postern_test_kit::postgres`): any node serves any client, a message to a device
//! connected to another node is pushed at once (LISTEN/NOTIFY), also when sender and
//! recipient live in different databases (shards), and when a node is killed
//! (-9) under load its clients move to another node listed in their network file within
//! 10 s, with no acknowledged message lost and none delivered twice. With a shared
//! S3-compatible bucket for media, a file uploaded through one node is fetched through
//! another.

mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postern_test_kit::postgres::Postgres;

/// Starts `n` nodes on the databases `urls` (shards, in order), all holding the first
/// node's key.
fn start_nodes(tmp: &Path, urls: &[String], n: usize) -> Vec<TestServer> {
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let args: Vec<&str> = urls
        .iter()
        .flat_map(|u| ["--database", u.as_str()])
        .collect();
    let first = TestServer::start_with(&tmp.join("node1"), listen, &args);
    let mut nodes = vec![first];
    for i in 2..=n {
        let data = tmp.join(format!("node{i}"));
        std::fs::create_dir_all(&data).unwrap();
        std::fs::copy(nodes[0].data.join("server.key"), data.join("server.key")).unwrap();
        nodes.push(TestServer::start_with(&data, listen, &args));
    }
    nodes
}

/// A network file naming `addrs` (the first as `address`) and the nodes' key.
fn network(node: &TestServer, addrs: &[SocketAddr], out: &Path) -> PathBuf {
    let text = std::fs::read_to_string(node.network_file()).unwrap();
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("public_key = "))
        .expect("public_key line");
    let more: Vec<String> = addrs[1..].iter().map(|a| format!("\"{a}\"")).collect();
    std::fs::write(
        out,
        format!(
            "[server]\naddress = \"{}\"\npublic_key = {key}\naddresses = [{}]\n",
            addrs[0],
            more.join(", ")
        ),
    )
    .unwrap();
    out.to_path_buf()
}

/// `postern inbox --follow --json`, recording when each incoming message id arrived.
struct TimedFollower {
    child: Child,
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl TimedFollower {
    fn start(home: &Path) -> Self {
        let (child, stdout) = spawn_follower(home);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if v["type"] == "incoming" {
                    let id = v["message_id"].as_str().unwrap_or_default().to_string();
                    sink.lock().unwrap().push((Instant::now(), id));
                }
            }
        });
        Self { child, seen }
    }

    /// When `id` arrived, waiting up to `within`.
    fn arrival(&self, id: &str, within: Duration) -> Option<Instant> {
        let deadline = Instant::now() + within;
        loop {
            if let Some((t, _)) = self.seen.lock().unwrap().iter().find(|(_, i)| i == id) {
                return Some(*t);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn ids(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, i)| i.clone())
            .collect()
    }
}

impl Drop for TimedFollower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends and returns the id and when the server acknowledged it (✓), or `None` if the
/// send did not get an acknowledgement.
fn send(home: &Path, to: &str, text: &str) -> Option<(String, Instant)> {
    let out = postern(home, &["send", to, text]);
    let at = Instant::now();
    out.status
        .success()
        .then(|| (String::from_utf8_lossy(&out.stdout).trim().to_string(), at))
}

#[test]
fn messages_to_devices_on_other_nodes_and_shards_are_pushed_at_once_with_two_and_three_nodes() {
    let pg = Postgres::start();
    // Two shards: alice and carol live in the second database, bob in the first, so
    // every message and receipt below crosses databases as well as nodes.
    let urls = [pg.create_database("shard_a"), pg.create_database("shard_b")];
    let tmp = tempfile::tempdir().unwrap();
    let nodes = start_nodes(tmp.path(), &urls, 3);
    let homes: Vec<PathBuf> = ["alice", "bob", "carol"]
        .iter()
        .map(|n| tmp.path().join(n))
        .collect();
    // Each user knows one node only: every message crosses nodes.
    for (i, name) in ["alice", "bob", "carol"].iter().enumerate() {
        let net = network(
            &nodes[0],
            &[nodes[i].addr],
            &tmp.path().join(format!("{name}.toml")),
        );
        account_with(&homes[i], name, &net);
    }
    let bob = TimedFollower::start(&homes[1]);
    let carol = TimedFollower::start(&homes[2]);
    let mut latencies = Vec::new();
    // Two nodes: node 1 → node 2, then node 2 → node 1 (after three: → node 3).
    for (from, to, follower) in [(0, "bob", &bob), (2, "bob", &bob), (1, "carol", &carol)] {
        // The follower may still be connecting: resend until one arrives, then time one.
        let mut warm = 0;
        loop {
            let (id, _) = send(&homes[from], to, "warm-up").expect("acknowledged");
            if follower.arrival(&id, Duration::from_secs(5)).is_some() {
                break;
            }
            warm += 1;
            assert!(warm < 6, "{to} never received a message across nodes");
        }
        for k in 0..3 {
            let (id, acked) = send(&homes[from], to, &format!("cross-node {k}")).unwrap();
            let arrived = follower
                .arrival(&id, Duration::from_secs(10))
                .unwrap_or_else(|| panic!("{id} not pushed to {to}"));
            latencies.push(arrived.saturating_duration_since(acked));
        }
    }
    eprintln!("cross-node push after ✓: {latencies:?}");
    for l in &latencies {
        assert!(
            *l < Duration::from_secs(2),
            "pushed promptly: {latencies:?}"
        );
    }
    // Receipts cross nodes too.
    ok(&homes[0], &["inbox"]);
    assert!(ok(&homes[0], &["history", "bob"]).contains("✓✓ cross-node 2"));
    let ids = bob.ids();
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        ids.len(),
        "nothing delivered twice: {ids:?}"
    );
}

#[test]
fn a_file_uploaded_through_one_node_is_fetched_through_another_from_the_shared_bucket() {
    let pg = Postgres::start();
    let url = pg.create_database("media_nodes");
    let s3 = postern_test_kit::s3::S3Server::start("postern-media");
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = s3.endpoint();
    let args = [
        "--database",
        url.as_str(),
        "--media-s3-bucket",
        s3.bucket.as_str(),
        "--media-s3-endpoint",
        endpoint.as_str(),
    ];
    let env = [
        ("AWS_ACCESS_KEY_ID", s3.access_key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key.as_str()),
    ];
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let a = TestServer::start_with_env(&tmp.path().join("node1"), listen, &args, &env);
    let b_data = tmp.path().join("node2");
    std::fs::create_dir_all(&b_data).unwrap();
    std::fs::copy(a.data.join("server.key"), b_data.join("server.key")).unwrap();
    let b = TestServer::start_with_env(&b_data, listen, &args, &env);

    // Alice knows node 1 only, bob node 2 only.
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    for (home, name, node) in [(&alice, "alice", &a), (&bob, "bob", &b)] {
        let net = network(&a, &[node.addr], &tmp.path().join(format!("{name}.toml")));
        account_with(home, name, &net);
    }
    let file = tmp.path().join("plan.bin");
    let data: Vec<u8> = (0..700_000).map(|_| rand::random::<u8>()).collect();
    std::fs::write(&file, &data).unwrap();
    ok(
        &alice,
        &["send", "bob", "--file", file.to_str().unwrap(), "the plan"],
    );
    let saved = tmp.path().join("saved");
    let inbox = ok(&bob, &["inbox", "--save-to", saved.to_str().unwrap()]);
    assert!(inbox.contains("📎 plan.bin from alice saved at"), "{inbox}");
    assert_eq!(std::fs::read(saved.join("plan.bin")).unwrap(), data);

    // The bucket holds the upload (ciphertext: a run of the file is not in it), and node 1
    // keeps no copy of the complete file once it is there.
    let keys = s3.object_keys();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].starts_with("media/"), "{keys:?}");
    let stored = std::fs::read(s3.bucket_dir().join(&keys[0])).unwrap();
    assert!(stored.len() > data.len());
    assert!(!contains(&stored, &data[1000..1064]));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let local: Vec<_> = std::fs::read_dir(a.data.join("media"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| !e.file_name().to_string_lossy().contains('.'))
            .collect();
        if local.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "node 1 still holds {local:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kill_9_of_a_node_under_load_loses_nothing_acknowledged_and_clients_move_within_10s() {
    let pg = Postgres::start();
    let url = pg.create_database("failover");
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = start_nodes(tmp.path(), &[url], 2);
    let addrs = [nodes[0].addr, nodes[1].addr];
    let net = network(&nodes[0], &addrs, &tmp.path().join("network.toml"));
    let net = net.to_str().unwrap();
    let names = ["alice", "carol", "bob"];
    let homes: Vec<PathBuf> = names.iter().map(|n| tmp.path().join(n)).collect();
    for (home, name) in homes.iter().zip(names) {
        ok(home, &["account", "create", name, "--network", net]);
    }
    let bob = TimedFollower::start(&homes[2]);
    // Both senders warm up (sessions made) and bob is online on node 1 (listed first).
    for h in &homes[..2] {
        let mut tries = 0;
        loop {
            let (id, _) = send(h, "bob", "warm-up").expect("acknowledged");
            if bob.arrival(&id, Duration::from_secs(5)).is_some() {
                break;
            }
            tries += 1;
            assert!(tries < 6, "bob is not receiving");
        }
    }

    // Load: two senders in a loop; node 1 is killed while they send.
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let senders: Vec<_> = homes[..2]
        .iter()
        .cloned()
        .map(|home| {
            let killed_at = killed_at.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut failed = 0;
                let mut k = 0;
                loop {
                    let after_kill = killed_at.lock().unwrap().map(|t| t.elapsed());
                    // Keep sending until well after the kill.
                    if after_kill.is_some_and(|e| e > Duration::from_secs(12)) && k > 20 {
                        break;
                    }
                    match send(&home, "bob", &format!("load {k}")) {
                        Some(a) => acked.push(a),
                        None => failed += 1,
                    }
                    k += 1;
                }
                (acked, failed)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let victim = nodes.remove(0);
    victim.kill();
    let kill = Instant::now();
    *killed_at.lock().unwrap() = Some(kill);

    let mut acked = Vec::new();
    let mut failed = 0;
    for s in senders {
        let (a, f) = s.join().unwrap();
        acked.extend(a);
        failed += f;
    }
    // Messages typed while no node answered were saved and go out with the next command.
    for h in &homes[..2] {
        ok(h, &["inbox"]);
    }
    let first_after_kill = acked
        .iter()
        .filter(|(_, at)| *at > kill)
        .map(|(_, at)| *at)
        .min()
        .expect("messages acknowledged after the kill");
    let senders_back = first_after_kill - kill;
    let mut bob_back = None;
    for (id, at) in &acked {
        let arrived = bob
            .arrival(id, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("acknowledged message {id} lost"));
        if *at > kill {
            let back = arrived - kill;
            bob_back = Some(bob_back.map_or(back, |b: Duration| b.min(back)));
        }
    }
    let bob_back = bob_back.unwrap();
    let ids = bob.ids();
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    eprintln!(
        "acknowledged {} (sends without ✓: {failed}); senders back on node 2 after {senders_back:?}, \
         bob receiving again after {bob_back:?}; bob got {} messages, {} distinct",
        acked.len(),
        ids.len(),
        distinct.len()
    );
    assert_eq!(distinct.len(), ids.len(), "nothing delivered twice");
    assert!(senders_back < Duration::from_secs(10), "{senders_back:?}");
    assert!(bob_back < Duration::from_secs(10), "{bob_back:?}");
    assert!(nodes[0].is_running());
}

/// `postern server reshard`: a service on one database grows to two while a message
/// waits for its recipient; after the move the old list is refused, and nodes on the new
/// list deliver the message and its receipt, and carry on.
#[test]
fn reshard_grows_a_service_to_two_databases_and_nothing_waiting_is_lost() {
    let pg = Postgres::start();
    let (first, second) = (pg.create_database("grow_a"), pg.create_database("grow_b"));
    let tmp = tempfile::tempdir().unwrap();
    let node = start_nodes(tmp.path(), std::slice::from_ref(&first), 1).remove(0);
    let (addr, data) = (node.addr, node.data.clone());
    let net = network(&node, &[addr], &tmp.path().join("network.toml"));
    let net = net.to_str().unwrap();
    // With two shards alice lives in the second database, bob stays in the first.
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    ok(&alice, &["account", "create", "alice", "--network", net]);
    ok(&bob, &["account", "create", "bob", "--network", net]);
    ok(&alice, &["send", "bob", "sent before the move"]);
    assert!(node.terminate(), "the node stops cleanly");

    let mut reshard = std::process::Command::new(BIN);
    reshard.args([
        "server",
        "reshard",
        "--database",
        &first,
        "--to",
        &first,
        "--to",
        &second,
    ]);
    let out = run(reshard);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Moved 1 account(s)"), "{stdout}");

    let mut old_list = std::process::Command::new(BIN);
    old_list.args(["server", "run", "--data"]).arg(&data).args([
        "--listen",
        "127.0.0.1:0",
        "--database",
        &first,
    ]);
    let out = run(old_list);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("set up as 2 shard(s)"), "{stderr}");

    // The same address as before: the clients' network files name it.
    let _node = TestServer::start_with(&data, addr, &["--database", &first, "--database", &second]);
    assert!(ok(&bob, &["inbox"]).contains("sent before the move"));
    ok(&alice, &["inbox"]);
    assert!(ok(&alice, &["history", "bob"]).contains("✓✓ sent before the move"));
    ok(&bob, &["send", "alice", "and after it"]);
    assert!(ok(&alice, &["inbox"]).contains("and after it"));
}
