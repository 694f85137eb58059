//! End-to-end mode: real `postern-client` clients (Olm, per-profile SQLite) in this
//! process, talking to the server process.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use postern_client::{Client, ConnectMode, Event};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::Semaphore;

use crate::server::{cpu_seconds, ServerProcess};
use crate::stats::{latency_cell, mib, Recorder, Table};
use crate::E2eArgs;

/// How long to wait for the last deliveries and receipts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Counters {
    warmups: AtomicUsize,
    lagged: AtomicUsize,
    undecryptable: AtomicUsize,
}

/// Turns one client's events into records (until its event channel closes).
fn collect(client: &Client, recorder: Arc<Recorder>, counters: Arc<Counters>) {
    let mut events = client.subscribe();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(Event::Incoming(m)) => {
                    if m.text.starts_with("warmup") {
                        counters.warmups.fetch_add(1, Ordering::Relaxed);
                    } else {
                        recorder.record(&recorder.delivered, m.message_id.0);
                    }
                }
                Ok(Event::Delivered { message_id, .. }) => {
                    recorder.record(&recorder.receipts, message_id.0);
                }
                Ok(Event::Undecryptable { .. }) => {
                    counters.undecryptable.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => {
                    counters.lagged.fetch_add(n as usize, Ordering::Relaxed);
                }
                Err(RecvError::Closed) => break,
            }
        }
    });
}

async fn wait_until(what: &str, timeout: Duration, done: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Each of `pairs` sends one message from `from` to `to`, all at once.
async fn send_all(clients: &[Client], pairs: &[(usize, usize)], text: &str) -> Result<()> {
    let mut handles = Vec::new();
    for &(from, to) in pairs {
        let c = clients[from].clone();
        let to = clients[to].username().to_string();
        let text = text.to_string();
        handles.push(tokio::spawn(async move { c.send(&to, &text).await }));
    }
    for h in handles {
        h.await?.context("warm-up send")?;
    }
    Ok(())
}

pub async fn run(args: &E2eArgs, binary: &std::path::Path, dir: &std::path::Path) -> Result<()> {
    let n = args.e2e_clients;
    if n < 2 || args.e2e_senders == 0 || args.e2e_senders > n {
        bail!("need at least 2 end-to-end clients and 1..=clients senders");
    }
    let mut server = ServerProcess::start(binary, dir, n + 1000)?;
    let mut table = Table::default();
    let rss_fresh = server.rss_kib()?;

    // Accounts (Olm identity, 100 one-time keys, local database) and connections.
    let t = Instant::now();
    let permits = Arc::new(Semaphore::new(8));
    let mut handles = Vec::new();
    for i in 0..n {
        let home = dir.join(format!("clients/c{i:05}"));
        let network = server.network.clone();
        let permits = permits.clone();
        handles.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let name = format!("user{i:05}");
            Client::create_account(&home, &name, network)
                .await
                .with_context(|| format!("creating account {name}"))
        }));
    }
    let mut clients = Vec::with_capacity(n);
    for h in handles {
        clients.push(h.await??);
    }
    let recorder = Arc::new(Recorder::new());
    let counters = Arc::new(Counters::default());
    for c in &clients {
        collect(c, recorder.clone(), counters.clone());
        c.connect(ConnectMode::Receive)
            .await
            .with_context(|| format!("connecting {}", c.username()))?;
    }
    let setup_secs = t.elapsed().as_secs_f64();
    table.row(
        "clients (accounts created and connected)",
        format!("{n} in {setup_secs:.1} s"),
    );

    // Sender i talks to client i + n/2: the pairs are distinct, and each sender sends to
    // one contact, as a person in a conversation does.
    let senders = args.e2e_senders;
    let pairs: Vec<(usize, usize)> = (0..senders).map(|i| (i, (i + n / 2) % n)).collect();
    // Warm-up (not measured): establish the Olm sessions both ways, so the measured
    // messages are ordinary (not pre-key) messages.
    send_all(&clients, &pairs, "warmup").await?;
    wait_until("warm-up messages", DRAIN_TIMEOUT, || {
        counters.warmups.load(Ordering::Relaxed) >= senders
    })
    .await?;
    let back: Vec<(usize, usize)> = pairs.iter().map(|&(a, b)| (b, a)).collect();
    send_all(&clients, &back, "warmup").await?;
    wait_until("warm-up replies and receipts", DRAIN_TIMEOUT, || {
        counters.warmups.load(Ordering::Relaxed) >= 2 * senders
            && Recorder::count(&recorder.receipts) >= 2 * senders
    })
    .await?;
    recorder.clear();

    let per_sender = args.e2e_messages.div_ceil(senders);
    let cpu_server = server.cpu_seconds()?;
    let cpu_self = cpu_seconds("self")?;
    let t = Instant::now();
    let mut handles = Vec::new();
    for &(from, to) in &pairs {
        let c = clients[from].clone();
        let to = clients[to].username().to_string();
        let recorder = recorder.clone();
        handles.push(tokio::spawn(async move {
            for k in 0..per_sender {
                let start = recorder.now_us();
                let id = c
                    .send(&to, &format!("bench message {k}"))
                    .await
                    .with_context(|| format!("{} sending to {to}", c.username()))?;
                recorder.record_at(&recorder.sent, id.0, start);
                recorder.record(&recorder.accepted, id.0);
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let send_secs = t.elapsed().as_secs_f64();
    let total = Recorder::count(&recorder.sent);
    let drained = wait_until("deliveries and receipts", DRAIN_TIMEOUT, || {
        Recorder::count(&recorder.delivered) >= total
            && Recorder::count(&recorder.receipts) >= total
    })
    .await;
    let total_secs = t.elapsed().as_secs_f64();
    let cpu_server = server.cpu_seconds()? - cpu_server;
    let cpu_self = cpu_seconds("self")? - cpu_self;
    server.check_alive()?;
    let rss = server.rss_kib()?;

    let s = recorder.summary();
    table.row(
        "messages",
        format!(
            "{} sent by {senders} senders (one contact each, Olm-encrypted); {} delivered, {} receipts",
            s.sent,
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
        "sent ✓ latency (send() call → returns) p50/p99/max",
        latency_cell(&s.accepted),
    );
    table.row(
        "delivery latency (send() call → recipient's Event::Incoming) p50/p99/max",
        latency_cell(&s.delivered),
    );
    table.row(
        "delivered ✓✓ latency (send() call → sender's Event::Delivered) p50/p99/max",
        latency_cell(&s.receipts),
    );
    table.row(
        "CPU during messaging: server / clients (this process)",
        format!(
            "{:.1} s / {:.1} s in {:.1} s",
            cpu_server, cpu_self, total_secs
        ),
    );
    table.row(
        format!("server RSS: fresh / {n} connected after messaging"),
        format!("{} / {}", mib(rss_fresh), mib(rss)),
    );
    table.row(
        "errors (undecryptable / events lost to lag)",
        format!(
            "{} / {}",
            counters.undecryptable.load(Ordering::Relaxed),
            counters.lagged.load(Ordering::Relaxed)
        ),
    );
    table.print("End to end: postern-client clients (Olm + SQLite)");
    for c in &clients {
        c.close().await;
    }
    drained
}
