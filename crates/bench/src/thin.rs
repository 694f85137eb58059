//! Server-load mode: thousands of thin clients that speak the wire protocol directly
//! (Noise IK + protobuf frames) with opaque ciphertexts, so the figures are the server's.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use postern_protocol::noise::{self, StaticKeypair};
use postern_protocol::schema::{
    client_frame, server_frame, AckMessage, AckReceipt, ClientFrame, ClientHello, DeviceCiphertext,
    DeviceKeys, Register, SendMessage, ServerFrame,
};
use postern_protocol::PROTOCOL_VERSION;
use rand::Rng;
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};

use crate::server::{cpu_seconds, Endpoint, ServerProcess};
use crate::stats::{latency_cell, mib, Recorder, Summary, Table};
use crate::ThinArgs;

/// Time allowed for one handshake or one request.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Request ids of acknowledgements sent by the reader task carry this bit, so their
/// answers (`Acked`) are not mistaken for answers to the sender's requests.
const ACK_BIT: u64 = 1 << 63;

/// A registered account: its device key, name and device id.
struct Identity {
    keys: StaticKeypair,
    name: String,
    device_id: u64,
}

/// One connected thin client.
struct Connected {
    identity: Arc<Identity>,
    /// Frames to send (the writer task owns the Noise writer).
    out: mpsc::UnboundedSender<ClientFrame>,
    /// Answers to the sender's requests (pushes and ack answers are handled by the reader).
    answers: tokio::sync::Mutex<mpsc::UnboundedReceiver<ServerFrame>>,
    next_request: AtomicU64,
}

/// Counts of things that went wrong, reported in the table.
#[derive(Default)]
struct Failures {
    send_errors: AtomicUsize,
    ack_errors: AtomicUsize,
    disconnects: AtomicUsize,
}

async fn open(
    server: &Endpoint,
    keys: &StaticKeypair,
) -> Result<(
    noise::SecureReader<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    noise::SecureWriter<tokio::net::tcp::OwnedWriteHalf>,
    postern_protocol::schema::ServerHello,
)> {
    let server_key = server
        .network
        .server_key()
        .map_err(|e| anyhow::anyhow!("server key: {e}"))?;
    let mut stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(&server.address))
        .await
        .context("connect timed out")?
        .with_context(|| format!("cannot connect to {}", server.address))?;
    stream.set_nodelay(true)?;
    let hello = ClientHello {
        protocol_version: PROTOCOL_VERSION,
        software: "postern-bench".into(),
        send_only: false,
    };
    let (transport, server_hello) =
        noise::client_handshake(&mut stream, keys, &server_key, &hello, TIMEOUT)
            .await
            .context("handshake")?;
    let (rd, wr) = stream.into_split();
    let (reader, writer) = noise::split(transport, BufReader::new(rd), wr);
    Ok((reader, writer, server_hello))
}

/// Creates an account over a short-lived connection.
async fn register(server: &Endpoint, name: String) -> Result<Identity> {
    let keys = StaticKeypair::generate();
    let (mut reader, mut writer, _) = open(server, &keys).await?;
    let frame = ClientFrame {
        request_id: 1,
        body: Some(client_frame::Body::Register(Register {
            username: name.clone(),
            keys: Some(DeviceKeys {
                curve25519: rand::random::<[u8; 32]>().to_vec(),
                ed25519: rand::random::<[u8; 32]>().to_vec(),
            }),
            one_time_keys: Vec::new(),
            fallback_key: None,
        })),
    };
    writer.send(&frame).await?;
    let answer: ServerFrame = tokio::time::timeout(TIMEOUT, reader.recv())
        .await
        .context("registration timed out")??;
    let device_id = match answer.body {
        Some(server_frame::Body::Registered(r)) => {
            r.device.context("Registered without a device")?.device_id
        }
        other => bail!("registration of {name} refused: {other:?}"),
    };
    let _ = writer.shutdown().await;
    Ok(Identity {
        keys,
        name,
        device_id,
    })
}

/// Connects a registered client and starts its reader and writer tasks.
async fn connect(
    server: &Endpoint,
    identity: Arc<Identity>,
    recorder: Arc<Recorder>,
    failures: Arc<Failures>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
) -> Result<Connected> {
    let (mut reader, mut writer, hello) = open(server, &identity.keys).await?;
    if hello.device.as_ref().map(|d| d.device_id) != Some(identity.device_id) {
        bail!("the server does not recognise device {}", identity.name);
    }
    let (out, mut out_rx) = mpsc::unbounded_channel::<ClientFrame>();
    let (answers_tx, answers) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            if writer.send(&frame).await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    let acks = out.clone();
    tokio::spawn(async move {
        let mut next_ack = 0u64;
        loop {
            let frame: ServerFrame = match reader.recv().await {
                Ok(f) => f,
                Err(_) => {
                    if !stopping.load(Ordering::Relaxed) {
                        failures.disconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
            };
            if frame.request_id & ACK_BIT != 0 {
                if !matches!(frame.body, Some(server_frame::Body::Acked(_))) {
                    failures.ack_errors.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            if frame.request_id != 0 {
                let _ = answers_tx.send(frame);
                continue;
            }
            next_ack += 1;
            let body = match frame.body {
                Some(server_frame::Body::Envelope(e)) => {
                    if let Ok(id) = e.message_id.as_slice().try_into() {
                        recorder.record(&recorder.delivered, id);
                    }
                    client_frame::Body::AckMessage(AckMessage {
                        message_id: e.message_id,
                    })
                }
                Some(server_frame::Body::Receipt(r)) => {
                    if let Ok(id) = r.message_id.as_slice().try_into() {
                        recorder.record(&recorder.receipts, id);
                    }
                    client_frame::Body::AckReceipt(AckReceipt {
                        message_id: r.message_id,
                    })
                }
                _ => continue,
            };
            let ack = ClientFrame {
                request_id: ACK_BIT | next_ack,
                body: Some(body),
            };
            if acks.send(ack).is_err() {
                break;
            }
        }
    });
    Ok(Connected {
        identity,
        out,
        answers: tokio::sync::Mutex::new(answers),
        next_request: AtomicU64::new(1),
    })
}

/// Sends `count` messages one after another (like a real client: the next one once the
/// server has accepted the previous one), each to a random other client.
async fn sender(
    me: Arc<Connected>,
    all: Arc<Vec<Arc<Connected>>>,
    count: usize,
    body_bytes: usize,
    recorder: Arc<Recorder>,
    failures: Arc<Failures>,
) -> Result<()> {
    let mut answers = me.answers.lock().await;
    for _ in 0..count {
        let (to, id, body) = {
            let mut rng = rand::rng();
            let to = loop {
                let c = &all[rng.random_range(0..all.len())];
                if c.identity.device_id != me.identity.device_id {
                    break c.identity.clone();
                }
            };
            let id: [u8; 16] = rng.random();
            let mut body = vec![0u8; body_bytes];
            rng.fill(&mut body[..]);
            (to, id, body)
        };
        let request_id = me.next_request.fetch_add(1, Ordering::Relaxed);
        recorder.record(&recorder.sent, id);
        me.out
            .send(ClientFrame {
                request_id,
                body: Some(client_frame::Body::Send(SendMessage {
                    message_id: id.to_vec(),
                    recipient: to.name.clone(),
                    ciphertexts: vec![DeviceCiphertext {
                        device_id: to.device_id,
                        olm_type: 1,
                        body,
                    }],
                })),
            })
            .ok()
            .context("the connection's writer stopped")?;
        let answer = tokio::time::timeout(TIMEOUT, answers.recv())
            .await
            .context("no answer to a send within 30 s")?
            .context("the connection closed")?;
        match answer.body {
            Some(server_frame::Body::MessageAccepted(_)) => {
                recorder.record(&recorder.accepted, id);
            }
            _ => {
                failures.send_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

/// Runs `jobs` with at most `limit` at a time; fails on the first error.
pub async fn bounded<T, F>(limit: usize, jobs: Vec<F>) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limit.max(1)));
    let mut handles = Vec::with_capacity(jobs.len());
    for job in jobs {
        let permit = permits.clone().acquire_owned().await?;
        handles.push(tokio::spawn(async move {
            let r = job.await;
            drop(permit);
            r
        }));
    }
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await??);
    }
    Ok(out)
}

/// What one thin-client run measured: the printed table and the figures behind it.
pub struct ThinReport {
    pub table: Table,
    pub summary: Summary,
    /// Server CPU (user + system) during messaging, seconds.
    pub server_cpu_s: f64,
    /// This process's CPU during messaging, seconds.
    pub load_cpu_s: f64,
    /// First send to the last delivery and receipt (or the deadline), seconds.
    pub messaging_s: f64,
    /// Server `VmRSS` with every account registered and none connected, KiB.
    pub rss_registered_kib: u64,
    /// Server `VmRSS` with every client connected, KiB.
    pub rss_connected_kib: u64,
    pub clients: usize,
    /// Sends refused, acks refused, connections dropped.
    pub errors: [usize; 3],
}

impl ThinReport {
    /// Fails if an accepted message was not delivered, or not receipted.
    pub fn check_complete(&self) -> Result<()> {
        let s = &self.summary;
        if s.delivered.len() < s.accepted.len() || s.receipts.len() < s.accepted.len() {
            bail!(
                "{} of {} accepted messages were not delivered (or not receipted) within {TIMEOUT:?}",
                s.accepted.len() - s.delivered.len().min(s.receipts.len()),
                s.accepted.len()
            );
        }
        Ok(())
    }
}

pub async fn run(args: &ThinArgs, binary: &std::path::Path, dir: &std::path::Path) -> Result<()> {
    let report = measure(args, binary, dir).await?;
    report.table.print("Server load: thin protocol clients");
    report.check_complete()
}

/// The thin-client load against a fresh server in `dir`: registers `--clients` accounts,
/// connects them all, has `--senders` of them send `--messages`, and waits for every
/// delivery and receipt (at most [`TIMEOUT`] after the last send).
pub async fn measure(
    args: &ThinArgs,
    binary: &std::path::Path,
    dir: &std::path::Path,
) -> Result<ThinReport> {
    if args.clients < 2 || args.senders == 0 || args.senders > args.clients {
        bail!("need at least 2 clients and 1..=clients senders");
    }
    let mut server = ServerProcess::start(binary, dir, args.clients + 1000)?;
    let mut table = Table::default();
    table.row(
        "server",
        format!("{} (pid {})", server.address, server.pid()),
    );
    let rss_fresh = server.rss_kib()?;
    table.row("server RSS, fresh", mib(rss_fresh));

    // 1. Accounts, over short-lived connections.
    let t = Instant::now();
    let jobs = (0..args.clients)
        .map(|i| {
            let name = format!("load{i:05}");
            let server = server.endpoint();
            async move { register(&server, name).await }
        })
        .collect();
    let identities: Vec<Arc<Identity>> = bounded(args.concurrency, jobs)
        .await
        .context("registering accounts")?
        .into_iter()
        .map(Arc::new)
        .collect();
    let reg_secs = t.elapsed().as_secs_f64();
    table.row(
        "accounts registered",
        format!(
            "{} in {:.1} s ({:.0}/s)",
            identities.len(),
            reg_secs,
            identities.len() as f64 / reg_secs
        ),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_registered = server.rss_kib()?;

    // 2. Connect every client and keep it connected.
    let recorder = Arc::new(Recorder::new());
    let failures = Arc::new(Failures::default());
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t = Instant::now();
    let jobs = identities
        .iter()
        .map(|id| {
            let server = server.endpoint();
            let (id, rec, fail, stop) = (
                id.clone(),
                recorder.clone(),
                failures.clone(),
                stopping.clone(),
            );
            async move { connect(&server, id, rec, fail, stop).await.map(Arc::new) }
        })
        .collect();
    let clients: Arc<Vec<Arc<Connected>>> = Arc::new(
        bounded(args.concurrency, jobs)
            .await
            .context("connecting clients")?,
    );
    let conn_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.check_alive()?;
    let rss_connected = server.rss_kib()?;
    table.row(
        "clients connected (held open)",
        format!(
            "{} in {:.1} s ({:.0} handshakes/s)",
            clients.len(),
            conn_secs,
            clients.len() as f64 / conn_secs
        ),
    );
    table.row(
        "server RSS, accounts registered, 0 connected",
        mib(rss_registered),
    );
    table.row(
        format!("server RSS, {} connected", clients.len()),
        mib(rss_connected),
    );
    table.row(
        "server memory per connected client",
        format!(
            "{:.1} KiB",
            rss_connected.saturating_sub(rss_registered) as f64 / clients.len() as f64
        ),
    );

    // 3. Messaging: `senders` clients each send their share, one at a time.
    let per_sender = args.messages.div_ceil(args.senders);
    let cpu_before = server.cpu_seconds()?;
    let cpu_self_before = cpu_seconds("self")?;
    let t = Instant::now();
    let mut handles = Vec::new();
    for c in clients.iter().take(args.senders) {
        handles.push(tokio::spawn(sender(
            c.clone(),
            clients.clone(),
            per_sender,
            args.body_bytes,
            recorder.clone(),
            failures.clone(),
        )));
    }
    for h in handles {
        h.await?.context("a sender failed")?;
    }
    let send_secs = t.elapsed().as_secs_f64();
    // Wait for the last deliveries and receipts.
    recorder.wait_drained(TIMEOUT).await;
    let total_secs = t.elapsed().as_secs_f64();
    let cpu = server.cpu_seconds()? - cpu_before;
    let cpu_self = cpu_seconds("self")? - cpu_self_before;
    server.check_alive()?;
    let rss_after = server.rss_kib()?;
    stopping.store(true, Ordering::Relaxed);

    let s = recorder.summary();
    table.row(
        "messages",
        format!(
            "{} sent by {} senders to random recipients ({} B bodies); {} accepted, {} delivered, {} receipts",
            s.sent,
            args.senders,
            args.body_bytes,
            s.accepted.len(),
            s.delivered.len(),
            s.receipts.len()
        ),
    );
    table.row(
        "throughput, delivered end to end",
        format!("{:.0} messages/s", s.delivered_per_second()),
    );
    table.row(
        "throughput, accepted (sends)",
        format!("{:.0} messages/s", s.accepted.len() as f64 / send_secs),
    );
    table.row(
        "sent ✓ latency (send → MessageAccepted) p50/p99/max",
        latency_cell(&s.accepted),
    );
    table.row(
        "delivery latency (send → recipient has Envelope) p50/p99/max",
        latency_cell(&s.delivered),
    );
    table.row(
        "delivered ✓✓ latency (send → sender has Receipt) p50/p99/max",
        latency_cell(&s.receipts),
    );
    table.row(
        "server CPU during messaging",
        format!(
            "{:.1} s in {:.1} s ({:.0}% of one core)",
            cpu,
            total_secs,
            100.0 * cpu / total_secs
        ),
    );
    table.row(
        "load generator CPU (this process) during messaging",
        format!("{cpu_self:.1} s"),
    );
    table.row(
        format!("server RSS after messaging, {} connected", clients.len()),
        mib(rss_after),
    );
    table.row(
        "errors (send refused / ack refused / dropped connections)",
        format!(
            "{} / {} / {}",
            failures.send_errors.load(Ordering::Relaxed),
            failures.ack_errors.load(Ordering::Relaxed),
            failures.disconnects.load(Ordering::Relaxed)
        ),
    );
    let errors = [
        failures.send_errors.load(Ordering::Relaxed),
        failures.ack_errors.load(Ordering::Relaxed),
        failures.disconnects.load(Ordering::Relaxed),
    ];
    Ok(ThinReport {
        table,
        summary: s,
        server_cpu_s: cpu,
        load_cpu_s: cpu_self,
        messaging_s: total_secs,
        rss_registered_kib: rss_registered,
        rss_connected_kib: rss_connected,
        clients: clients.len(),
        errors,
    })
}

/// One configuration of the scale-out comparison.
struct Setup {
    label: String,
    nodes: usize,
    /// PostgreSQL databases the accounts are sharded across (0: SQLite).
    shards: usize,
}

/// What one configuration measured.
struct ScaleRow {
    label: String,
    delivered_per_s: f64,
    accepted: String,
    delivered: String,
    cpu: String,
    errors: String,
}

/// The same thin-client load against SQLite (one node) and PostgreSQL with 1, 2 and 3
/// nodes (clients spread round-robin over the nodes, so most messages cross nodes), each
/// against fresh servers and a fresh database; one table at the end.
pub async fn scale_out(
    args: &ThinArgs,
    binary: &std::path::Path,
    dir: &std::path::Path,
    max_nodes: usize,
) -> Result<()> {
    if args.clients < 2 || args.senders == 0 || args.senders > args.clients {
        bail!("need at least 2 clients and 1..=clients senders");
    }
    let mut setups = vec![Setup {
        label: "SQLite, 1 node".into(),
        nodes: 1,
        shards: 0,
    }];
    for n in 1..=max_nodes {
        setups.push(Setup {
            label: format!("PostgreSQL, {n} node{}", if n == 1 { "" } else { "s" }),
            nodes: n,
            shards: 1,
        });
    }
    if max_nodes >= 2 {
        // Accounts spread over two databases: most messages and receipts cross shards.
        setups.push(Setup {
            label: "PostgreSQL, 2 nodes, 2 shards".into(),
            nodes: 2,
            shards: 2,
        });
    }
    // One PostgreSQL cluster (Debian's postgresql, started in a temporary directory as an
    // ordinary user), a fresh database for each configuration.
    let pg = postern_test_kit::postgres::Postgres::start();
    let mut rows = Vec::new();
    for (k, setup) in setups.iter().enumerate() {
        let sub = dir.join(format!("setup{k}"));
        std::fs::create_dir_all(&sub)?;
        let extra: Vec<String> = (0..setup.shards)
            .flat_map(|i| {
                [
                    "--database".to_string(),
                    pg.create_database(&format!("bench{k}_{i}")),
                ]
            })
            .collect();
        let mut nodes: Vec<ServerProcess> = Vec::new();
        for i in 0..setup.nodes {
            let key = nodes.first().map(|n| n.data.join("server.key"));
            nodes.push(ServerProcess::start_node(
                binary,
                &sub,
                &format!("node{}", i + 1),
                args.clients + 1000,
                &extra,
                key.as_deref(),
            )?);
        }
        println!("{}: {} node(s) ready", setup.label, nodes.len());
        rows.push(scale_one(args, &setup.label, &mut nodes).await?);
    }
    let mut table = Table::default();
    table.row(
        "load",
        format!(
            "{} thin clients (spread over the nodes), {} senders, {} messages of {} B",
            args.clients, args.senders, args.messages, args.body_bytes
        ),
    );
    for r in &rows {
        table.row(
            format!("{}: delivered end to end", r.label),
            format!("{:.0} messages/s", r.delivered_per_s),
        );
        table.row(
            format!("{}: sent ✓ p50/p99/max", r.label),
            r.accepted.clone(),
        );
        table.row(
            format!("{}: delivery p50/p99/max", r.label),
            r.delivered.clone(),
        );
        table.row(format!("{}: server CPU, all nodes", r.label), r.cpu.clone());
        table.row(
            format!("{}: errors (send / ack / dropped)", r.label),
            r.errors.clone(),
        );
    }
    table.print("Scale-out: the same load on SQLite and on 1..N nodes sharing PostgreSQL");
    Ok(())
}

async fn scale_one(args: &ThinArgs, label: &str, nodes: &mut [ServerProcess]) -> Result<ScaleRow> {
    let endpoints: Vec<Endpoint> = nodes.iter().map(|n| n.endpoint()).collect();
    let at = |i: usize| endpoints[i % endpoints.len()].clone();
    let jobs = (0..args.clients)
        .map(|i| {
            let server = at(i);
            async move { register(&server, format!("load{i:05}")).await }
        })
        .collect();
    let identities: Vec<Arc<Identity>> = bounded(args.concurrency, jobs)
        .await
        .with_context(|| format!("{label}: registering accounts"))?
        .into_iter()
        .map(Arc::new)
        .collect();
    let recorder = Arc::new(Recorder::new());
    let failures = Arc::new(Failures::default());
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let jobs = identities
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let server = at(i);
            let (id, rec, fail, stop) = (
                id.clone(),
                recorder.clone(),
                failures.clone(),
                stopping.clone(),
            );
            async move { connect(&server, id, rec, fail, stop).await.map(Arc::new) }
        })
        .collect();
    let clients: Arc<Vec<Arc<Connected>>> = Arc::new(
        bounded(args.concurrency, jobs)
            .await
            .with_context(|| format!("{label}: connecting clients"))?,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu_all =
        |nodes: &[ServerProcess]| -> Result<f64> { nodes.iter().map(|n| n.cpu_seconds()).sum() };
    let per_sender = args.messages.div_ceil(args.senders);
    let cpu_before = cpu_all(nodes)?;
    let t = Instant::now();
    let mut handles = Vec::new();
    for c in clients.iter().take(args.senders) {
        handles.push(tokio::spawn(sender(
            c.clone(),
            clients.clone(),
            per_sender,
            args.body_bytes,
            recorder.clone(),
            failures.clone(),
        )));
    }
    for h in handles {
        h.await?
            .with_context(|| format!("{label}: a sender failed"))?;
    }
    recorder.wait_drained(TIMEOUT).await;
    let total_secs = t.elapsed().as_secs_f64();
    let cpu = cpu_all(nodes)? - cpu_before;
    for n in nodes.iter_mut() {
        n.check_alive()?;
    }
    stopping.store(true, Ordering::Relaxed);
    let s = recorder.summary();
    if s.delivered.len() < s.accepted.len() {
        bail!(
            "{label}: {} of {} accepted messages were not delivered within {TIMEOUT:?}",
            s.accepted.len() - s.delivered.len(),
            s.accepted.len()
        );
    }
    Ok(ScaleRow {
        label: label.to_string(),
        delivered_per_s: s.delivered_per_second(),
        accepted: latency_cell(&s.accepted),
        delivered: latency_cell(&s.delivered),
        cpu: format!(
            "{cpu:.1} s in {total_secs:.1} s ({:.0}% of one core)",
            100.0 * cpu / total_secs
        ),
        errors: format!(
            "{} / {} / {}",
            failures.send_errors.load(Ordering::Relaxed),
            failures.ack_errors.load(Ordering::Relaxed),
            failures.disconnects.load(Ordering::Relaxed)
        ),
    })
}
