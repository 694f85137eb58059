//! Helpers for integration tests: real `postern` processes on loopback, and a TCP
//! forwarder that records (and can tamper with) what crosses it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use postern_test_kit::process::ReadyProcess;

pub const BIN: &str = env!("CARGO_BIN_EXE_postern");
/// Upper bound for any single command; generous for a loaded CI machine.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `postern --home HOME ARGS...` to completion.
pub fn postern(home: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("--home").arg(home).args(args);
    run(cmd)
}

pub fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.env_remove("POSTERN_HOME");
    let mut child = cmd.spawn().expect("spawn postern");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if started.elapsed() > COMMAND_TIMEOUT {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "command timed out: {cmd:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(home: &Path, args: &[&str]) -> String {
    let out = postern(home, args);
    assert!(
        out.status.success(),
        "postern {args:?} failed\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail; returns its stderr.
pub fn fails(home: &Path, args: &[&str]) -> String {
    let out = postern(home, args);
    assert!(
        !out.status.success(),
        "postern {args:?} should have failed\nstdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A `postern server run` process.
pub struct TestServer {
    process: ReadyProcess,
    pub addr: SocketAddr,
    pub data: PathBuf,
    /// Everything the server wrote to stderr (its logs), line by line.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl TestServer {
    /// Initialises `data` (if needed) and serves on a random loopback port; the network
    /// file is rewritten with the real address.
    pub fn start(data: &Path) -> Self {
        Self::start_on(data, "127.0.0.1:0".parse().unwrap())
    }

    pub fn start_on(data: &Path, listen: SocketAddr) -> Self {
        Self::start_with(data, listen, &[])
    }

    /// Like [`TestServer::start_on`], with extra `server run` flags.
    pub fn start_with(data: &Path, listen: SocketAddr, extra: &[&str]) -> Self {
        Self::start_with_env(data, listen, extra, &[])
    }

    /// [`TestServer::start_with`], with environment variables (credentials, say).
    pub fn start_with_env(
        data: &Path,
        listen: SocketAddr,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut init = Command::new(BIN);
        init.args(["server", "init", "--data"]).arg(data);
        assert!(run(init).status.success());
        let mut cmd = Command::new(BIN);
        cmd.args(["server", "run", "--data"])
            .arg(data)
            .args(["--listen", &listen.to_string()])
            .args(extra)
            .envs(env.iter().copied())
            .env("POSTERN_LOG", "info,postern_server=debug");
        let process = ReadyProcess::start(cmd, "postern server listening on ");
        let addr: SocketAddr = process.ready.parse().expect("address");
        let mut init = Command::new(BIN);
        init.args(["server", "init", "--data"])
            .arg(data)
            .args(["--public-address", &addr.to_string()]);
        assert!(run(init).status.success());
        Self {
            log: process.stderr.clone(),
            process,
            addr,
            data: data.to_path_buf(),
        }
    }

    /// Log lines containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.process.stderr_lines(needle)
    }

    pub fn network_file(&self) -> PathBuf {
        self.data.join("network.toml")
    }

    pub fn pid(&self) -> i32 {
        self.process.pid() as i32
    }

    /// SIGKILL: the process gets no chance to flush anything.
    pub fn kill(self) {
        self.process.kill()
    }

    /// SIGTERM, then waits for a clean exit; returns whether it exited successfully.
    pub fn terminate(self) -> bool {
        self.process.terminate()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }
}

/// Writes a network file naming `address` and the key of the server in `data`.
pub fn network_file_via(data: &Path, address: SocketAddr, out: &Path) {
    let text = std::fs::read_to_string(data.join("network.toml")).expect("network file");
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("public_key = "))
        .expect("public_key line");
    std::fs::write(
        out,
        format!("[server]\naddress = \"{address}\"\npublic_key = {key}\n"),
    )
    .expect("write network file");
}

/// A relay in front of `server` with a plain, a TLS, a PROXY-header plain listener and a
/// stats page, all on random loopback ports (`TestRelay::addr("plain")`, `"tls"`, ...).
pub fn relay_for(server: &TestServer) -> TestRelay {
    let upstream = server.addr.to_string();
    TestRelay::start(&[
        "--upstream",
        &upstream,
        "--plain",
        "127.0.0.1:0",
        "--tls",
        "127.0.0.1:0",
        "--proxy-plain",
        "127.0.0.1:0",
        "--stats",
        "127.0.0.1:0",
        // The tests' load balancer (`proxy_header_forwarder`) runs on loopback.
        "--trusted-proxy",
        "127.0.0.1",
    ])
}

/// Registers NAME in the profile at `home` on `server`.
pub fn account(home: &Path, name: &str, server: &TestServer) {
    account_with(home, name, &server.network_file());
}

/// Registers NAME in the profile at `home` with the network file `network`.
pub fn account_with(home: &Path, name: &str, network: &Path) {
    ok(
        home,
        &[
            "account",
            "create",
            name,
            "--network",
            network.to_str().unwrap(),
        ],
    );
}

/// Deletes `name`'s account (devices, keys, queues) from a stopped server's database: what
/// an operator who frees a username — or someone who holds the server — would do (no
/// command does). Then the name can be registered again, with new keys.
pub fn delete_account(data: &Path, name: &str) {
    // On a thread of its own: callers may be inside a runtime already.
    std::thread::scope(|s| {
        s.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                use sqlx::ConnectOptions;
                let mut db = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(data.join("postern.db"))
                    .foreign_keys(true)
                    .connect()
                    .await
                    .unwrap();
                let deleted = sqlx::query("DELETE FROM accounts WHERE username = ?")
                    .bind(name)
                    .execute(&mut db)
                    .await
                    .unwrap();
                assert_eq!(deleted.rows_affected(), 1, "no account {name}");
            });
        })
        .join()
        .unwrap();
    });
}

/// Stops `server`, deletes `name`'s account ([`delete_account`]), starts the server again
/// on the same address, and registers `name` again from a fresh profile at `home`.
pub fn replace_account(server: TestServer, home: &Path, name: &str) -> TestServer {
    let (data, addr) = (server.data.clone(), server.addr);
    assert!(server.terminate());
    delete_account(&data, name);
    let server = TestServer::start_on(&data, addr);
    std::fs::remove_dir_all(home).unwrap();
    account(home, name, &server);
    server
}

/// A long-running `postern inbox --follow --json` whose lines arrive on a channel.
pub struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
}

/// Starts `postern inbox --follow --json` for `home`; returns it with its stdout (one JSON
/// object per line).
pub fn spawn_follower(home: &Path) -> (Child, std::process::ChildStdout) {
    let mut child = Command::new(BIN)
        .arg("--home")
        .arg(home)
        .args(["inbox", "--follow", "--json"])
        .env_remove("POSTERN_HOME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn follower");
    let stdout = child.stdout.take().expect("stdout");
    (child, stdout)
}

impl Follower {
    pub fn start(home: &Path) -> Self {
        let (child, stdout) = spawn_follower(home);
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Collects `incoming` lines until `count` distinct message ids arrived or `within`
    /// passed; returns every id seen, in order, duplicates included.
    pub fn incoming_ids(&self, count: usize, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut ids: Vec<String> = Vec::new();
        let distinct = |ids: &Vec<String>| {
            let mut d = ids.clone();
            d.sort();
            d.dedup();
            d.len()
        };
        while distinct(&ids) < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                        continue;
                    };
                    if v["type"] == "incoming" {
                        ids.push(v["message_id"].as_str().unwrap_or_default().to_string());
                    }
                }
                Err(_) => break,
            }
        }
        ids
    }

    /// Waits for a JSON line containing every one of `needles`.
    pub fn expect(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if needles.iter().all(|n| line.contains(n)) => return line,
                Ok(_) => continue,
                Err(_) => panic!("no line with {needles:?} within {COMMAND_TIMEOUT:?}"),
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a forwarder does to the bytes it carries.
#[derive(Clone, Copy, Debug)]
pub enum Tamper {
    None,
    /// Accept and close at once: the path is down (the forwarder keeps its port).
    Drop,
    /// Flip one bit of the byte at this offset of the server→client stream.
    FlipServerByte(usize),
    /// Flip one bit of the byte at this offset of the client→server stream.
    FlipClientByte(usize),
    /// Forward this many bytes server→client, then nothing more in either direction,
    /// closing neither side (a censor freezing the flow: no FIN, no RST).
    FreezeAfter(usize),
}

/// A TCP forwarder on loopback that records every byte in both directions.
pub struct Forwarder {
    pub addr: SocketAddr,
    tamper: Arc<Mutex<Tamper>>,
    target: Arc<Mutex<SocketAddr>>,
    pub captured: Arc<Mutex<Vec<u8>>>,
    pub connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// Sockets of frozen flows, held open until the forwarder is dropped.
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl Forwarder {
    pub fn start(target: SocketAddr, tamper: Tamper) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind forwarder");
        let addr = listener.local_addr().expect("addr");
        let captured = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let tamper = Arc::new(Mutex::new(tamper));
        let target = Arc::new(Mutex::new(target));
        let held = Arc::new(Mutex::new(Vec::new()));
        let (cap, conns, stopping, mode, to, hold) = (
            captured.clone(),
            connections.clone(),
            stop.clone(),
            tamper.clone(),
            target.clone(),
            held.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                let current = *mode.lock().unwrap();
                if matches!(current, Tamper::Drop) {
                    drop(client);
                    continue;
                }
                let target = *to.lock().unwrap();
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                conns.fetch_add(1, Ordering::Relaxed);
                if let Tamper::FreezeAfter(limit) = current {
                    freeze_after(client, server, limit, hold.clone());
                    continue;
                }
                let (flip_up, flip_down) = match current {
                    Tamper::None | Tamper::Drop | Tamper::FreezeAfter(_) => (None, None),
                    Tamper::FlipClientByte(n) => (Some(n), None),
                    Tamper::FlipServerByte(n) => (None, Some(n)),
                };
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    cap.clone(),
                    flip_up,
                );
                pipe(server, client, cap.clone(), flip_down);
            }
        });
        Self {
            addr,
            tamper,
            target,
            captured,
            connections,
            stop,
            held,
        }
    }

    /// Forwards connections opened from now on to `target`.
    pub fn set_target(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = target;
    }

    /// Changes what happens to connections opened from now on.
    pub fn set_tamper(&self, tamper: Tamper) {
        *self.tamper.lock().unwrap() = tamper;
    }

    pub fn captured(&self) -> Vec<u8> {
        self.captured.lock().unwrap().clone()
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Forwards `limit` bytes server→client, then freezes the flow: the server is not read
/// any more (its writes block once the buffers fill), the client's bytes are swallowed,
/// and both sockets stay open.
fn freeze_after(
    client: TcpStream,
    server: TcpStream,
    limit: usize,
    held: Arc<Mutex<Vec<TcpStream>>>,
) {
    let frozen = Arc::new(AtomicBool::new(false));
    let (mut up_from, mut up_to) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let up_frozen = frozen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = up_from.read(&mut buf) {
            if n == 0 {
                break;
            }
            if !up_frozen.load(Ordering::SeqCst) && up_to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let (mut down_from, mut down_to) = (server, client);
    std::thread::spawn(move || {
        let mut sent = 0;
        let mut buf = [0u8; 1024];
        while sent < limit {
            let want = buf.len().min(limit - sent);
            let n = match down_from.read(&mut buf[..want]) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if sent + n >= limit {
                frozen.store(true, Ordering::SeqCst);
            }
            if down_to.write_all(&buf[..n]).is_err() {
                return;
            }
            sent += n;
        }
        held.lock().unwrap().extend([down_from, down_to]);
    });
}

fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    captured: Arc<Mutex<Vec<u8>>>,
    flip: Option<usize>,
) {
    std::thread::spawn(move || {
        let mut offset = 0usize;
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(at) = flip {
                if at >= offset && at < offset + n {
                    buf[at - offset] ^= 0x01;
                }
            }
            offset += n;
            captured.lock().unwrap().extend_from_slice(&buf[..n]);
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

/// True if `needle` occurs anywhere in `haystack`.
/// Every file under `dir`, subdirectories included, read whole (a stopped server's data
/// directory, to check that no plaintext reached it).
pub fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut dirs = vec![dir.to_path_buf()];
    let mut files = Vec::new();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                files.push((path, bytes));
            }
        }
    }
    files
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A `postern relay` process.
pub struct TestRelay {
    process: ReadyProcess,
    /// (name, kind, address) of each listener, as the relay printed them.
    pub listeners: Vec<(String, String, SocketAddr)>,
    /// The stats listener's address, if it has one.
    pub stats: Option<SocketAddr>,
}

impl TestRelay {
    /// Starts `postern relay ARGS...` and waits until it has printed its listeners.
    pub fn start(args: &[&str]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.arg("relay").args(args);
        let process = ReadyProcess::start(cmd, "relay ready");
        let listeners = process
            .before
            .iter()
            .filter_map(|line| {
                let rest = line.strip_prefix("listening: ")?;
                let parts: Vec<&str> = rest.split_whitespace().collect();
                match parts[..] {
                    [name, kind, addr] => Some((
                        name.to_string(),
                        kind.to_string(),
                        addr.parse().expect("address"),
                    )),
                    _ => None,
                }
            })
            .collect();
        let stats = process.before.iter().find_map(|line| {
            line.strip_prefix("status page: http://")?
                .trim_end_matches('/')
                .parse()
                .ok()
        });
        Self {
            process,
            listeners,
            stats,
        }
    }

    /// The first listener of this kind (`plain`, `tls`, `plain+proxy`, `tls+proxy`).
    pub fn addr(&self, kind: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(_, k, _)| k == kind)
            .map(|(_, _, a)| *a)
            .unwrap_or_else(|| panic!("no {kind} listener in {:?}", self.listeners))
    }

    pub fn stop(self) {
        self.process.kill()
    }
}

/// A port on loopback that nothing listens on (bound, then released).
pub fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Accepts connections and never answers: a relay the network black-holes.
pub struct BlackHole {
    pub addr: SocketAddr,
    _held: Arc<Mutex<Vec<TcpStream>>>,
}

impl BlackHole {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let held = Arc::new(Mutex::new(Vec::new()));
        let keep = held.clone();
        std::thread::spawn(move || {
            for s in listener.incoming().map_while(Result::ok) {
                keep.lock().unwrap().push(s);
            }
        });
        Self { addr, _held: held }
    }
}

/// A load balancer in front of a PROXY-expecting listener: it prepends a PROXY v1
/// header naming `client` to every connection.
pub fn proxy_header_forwarder(target: SocketAddr, client: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let header = format!("PROXY TCP4 {client} 127.0.0.1 40000 {}\r\n", target.port());
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            let Ok(mut server) = TcpStream::connect(target) else {
                continue;
            };
            if server.write_all(header.as_bytes()).is_err() {
                continue;
            }
            let captured = Arc::new(Mutex::new(Vec::new()));
            pipe(
                client.try_clone().unwrap(),
                server.try_clone().unwrap(),
                captured.clone(),
                None,
            );
            pipe(server, client, captured, None);
        }
    });
    addr
}

/// A raw protocol channel to a server (for tests that speak frames themselves).
pub type RawChannel = (
    postern_protocol::noise::SecureReader<tokio::net::tcp::OwnedReadHalf>,
    postern_protocol::noise::SecureWriter<tokio::net::tcp::OwnedWriteHalf>,
);

/// The pinned key of the server in `data`.
pub fn server_key(server: &TestServer) -> [u8; 32] {
    postern_protocol::network::NetworkFile::load(&server.network_file())
        .expect("network file")
        .server_key()
        .expect("server key")
}

/// Connects to `server` (from `from`, a loopback address, when given), sends `proxy`
/// first if given, and completes a Noise handshake with a fresh device key. `None` when
/// the server closed instead of answering.
pub async fn raw_handshake(
    server: SocketAddr,
    key: &[u8; 32],
    proxy: Option<Vec<u8>>,
    from: Option<std::net::IpAddr>,
) -> Option<RawChannel> {
    use postern_protocol::noise::{self, StaticKeypair};
    use tokio::io::AsyncWriteExt;
    let mut s = match from {
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(ip, 0)).unwrap();
            socket.connect(server).await.unwrap()
        }
        None => tokio::net::TcpStream::connect(server).await.unwrap(),
    };
    if let Some(h) = proxy {
        s.write_all(&h).await.ok()?;
    }
    let me = StaticKeypair::generate();
    let hello = postern_protocol::schema::ClientHello {
        protocol_version: 1,
        software: "raw-test".into(),
        send_only: false,
    };
    let (t, _) = noise::client_handshake(&mut s, &me, key, &hello, Duration::from_secs(10))
        .await
        .ok()?;
    let (r, w) = s.into_split();
    Some(noise::split(t, r, w))
}

/// Sends one request on a raw channel and returns the answer's body.
pub async fn raw_request(
    channel: &mut RawChannel,
    request_id: u64,
    body: postern_protocol::schema::client_frame::Body,
) -> postern_protocol::schema::server_frame::Body {
    use postern_protocol::schema::{ClientFrame, ServerFrame};
    channel
        .1
        .send(&ClientFrame {
            request_id,
            body: Some(body),
        })
        .await
        .expect("send request");
    loop {
        let f: ServerFrame = tokio::time::timeout(Duration::from_secs(10), channel.0.recv())
            .await
            .expect("answer in time")
            .expect("answer");
        if f.request_id == request_id {
            return f.body.expect("a body");
        }
    }
}

/// The whole answer to `GET path` on `addr` (plain HTTP/1.1, `Connection: close`).
pub fn http_answer(addr: SocketAddr, path: &str, within: Duration) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, within).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(within))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}
