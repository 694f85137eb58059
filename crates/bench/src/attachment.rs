//! Attachment mode (issue 14): how fast a file moves end to end through a relay, beside
//! what the same relay carries as raw bytes.
//!
//! A real server process and a real relay process (`postern relay`, TLS listener) on
//! loopback; two real clients in this process (`postern-client`, profiles on disk) with
//! the relay as their only route. Alice sends a file of random bytes (`--file-mib`) with
//! `queue_file` + `send_pending` — encrypted on her side, uploaded in resumable chunks —
//! and Bob fetches it with `receive_all` + `fetch_attachments` (checked against its digest
//! and decrypted). Each phase is timed on its own:
//!
//! * **encrypt**: sealing the file into the profile (XChaCha20-Poly1305 STREAM, SHA-256);
//! * **upload**: from `send_pending` until the server holds the whole ciphertext and
//!   accepted the message;
//! * **download**: from `fetch_attachments` until the file is decrypted and saved;
//! * **raw relay**: the same amount of bytes written through the same relay's TLS listener
//!   (one connection, one way) to a sink that counts them — the ceiling the relay puts on
//!   any transfer on this machine.
//!
//! Upload and download add to the raw path the Noise channel, the chunk round trips
//! (a window of 16 in flight), the server's disk writes and fsyncs, and the client's SQLite
//! bookkeeping; the ratios say what that costs.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use postern_client::{Client, ConnectMode, ProxyEntry, ProxyMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::server::{cpu_seconds, ServerProcess};
use crate::stats::Table;
use crate::AttachmentArgs;

/// A relay process; killed on drop.
struct RelayProcess {
    child: Child,
    tls: SocketAddr,
    /// Its media port, if it was given one.
    media: Option<SocketAddr>,
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RelayProcess {
    fn start(binary: &Path, dir: &Path, upstream: &str, media_port: bool) -> Result<Self> {
        let tls = SocketAddr::from(([127, 0, 0, 1], postern_test_kit::free_port()));
        let media =
            media_port.then(|| SocketAddr::from(([127, 0, 0, 1], postern_test_kit::free_port())));
        let log = std::fs::File::create(dir.join(format!("relay-{}.log", tls.port())))?;
        let media_args = media.map(|m| vec!["--media".to_string(), m.to_string()]);
        let mut child = Command::new(binary)
            .arg("relay")
            .args(["--upstream", upstream])
            .args(["--tls", &tls.to_string()])
            .args(media_args.unwrap_or_default())
            .args([
                "--no-stats",
                "--send-proxy",
                "none",
                "--max-per-source",
                "0",
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting postern relay")?;
        let out = child.stdout.take().context("relay stdout")?;
        if let Err(e) = postern_test_kit::process::wait_ready(
            out,
            |l| (l.trim() == "relay ready").then_some(()),
            postern_test_kit::process::READY_TIMEOUT,
        ) {
            let _ = child.kill();
            bail!("postern relay did not get ready: {e}");
        }
        Ok(Self { child, tls, media })
    }

    fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds(&self.child.id().to_string())
    }
}

fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs.max(1e-9)
}

pub async fn run(args: &AttachmentArgs, binary: &Path, dir: &Path) -> Result<()> {
    let size = args.file_mib.max(1) * 1024 * 1024;
    let server = ServerProcess::start_node(
        binary,
        dir,
        "server",
        1000,
        &[
            "--media-max-file-mib".into(),
            (args.file_mib + 1).to_string(),
        ],
        None,
    )?;
    let relay = RelayProcess::start(binary, dir, &server.address, args.media_port)?;
    let media = relay
        .media
        .map(|m| format!("&media={}", m.port()))
        .unwrap_or_default();
    let via = ProxyEntry::parse(&format!(
        "postern://proxy?host=127.0.0.1&port={}&tls=1{media}",
        relay.tls.port()
    ))
    .context("relay address")?;
    let alice = Client::create_account_via(
        &dir.join("alice"),
        "alice",
        server.network.clone(),
        Some(via.clone()),
    )
    .await
    .context("creating alice")?;
    let bob =
        Client::create_account_via(&dir.join("bob"), "bob", server.network.clone(), Some(via))
            .await
            .context("creating bob")?;
    // The relay only (the default, auto, would race the direct route and win with it).
    for c in [&alice, &bob] {
        c.set_proxy_mode(ProxyMode::On).await?;
    }
    // Olm sessions both ways first, so the measured message is an ordinary one.
    alice
        .connect(ConnectMode::SendOnly)
        .await
        .context("alice connecting")?;
    alice.send("bob", "warm-up").await.context("warm-up")?;
    bob.connect(ConnectMode::Receive)
        .await
        .context("bob connecting")?;
    bob.receive_all().await.context("bob receiving")?;

    let file = dir.join("payload.bin");
    let data: Vec<u8> = (0..size).map(|_| rand::random::<u8>()).collect();
    std::fs::write(&file, &data)?;

    let mut table = Table::default();
    table.row(
        "file",
        format!(
            "{} MiB of random bytes, through the relay's {}",
            args.file_mib,
            if args.media_port {
                "media port (TLS, a connection of its own)"
            } else {
                "TLS listener (the chat connection)"
            }
        ),
    );
    let t = Instant::now();
    let id = alice.queue_file("bob", &file, "benchmark").await?;
    let encrypt = t.elapsed().as_secs_f64();
    let ciphertext = alice
        .history("bob")
        .await?
        .into_iter()
        .find(|e| e.message_id == id)
        .and_then(|e| e.attachment)
        .map(|a| a.ciphertext_size)
        .context("the queued attachment")?;

    let (server_cpu, relay_cpu) = (server.cpu_seconds()?, relay.cpu_seconds()?);
    let t = Instant::now();
    let outcomes = alice.send_pending().await.context("uploading")?;
    let upload = t.elapsed().as_secs_f64();
    if let Some(o) = outcomes.iter().find(|o| o.message_id == id) {
        if let Err(e) = &o.result {
            bail!("the file was not sent: {e}");
        }
    }
    let up_cpu = (
        server.cpu_seconds()? - server_cpu,
        relay.cpu_seconds()? - relay_cpu,
    );
    if args.media_port {
        match alice.media_route().await {
            Some(postern_client::MediaRoute::MediaPort { .. }) => {}
            other => bail!("the upload did not use the relay's media port: {other:?}"),
        }
    }

    bob.receive_all().await?;
    let (server_cpu, relay_cpu) = (server.cpu_seconds()?, relay.cpu_seconds()?);
    let t = Instant::now();
    let saved = bob.fetch_attachments().await.context("downloading")?;
    let download = t.elapsed().as_secs_f64();
    let down_cpu = (
        server.cpu_seconds()? - server_cpu,
        relay.cpu_seconds()? - relay_cpu,
    );
    let path = &saved.first().context("no file arrived")?.path;
    if relay.cpu_seconds()? == 0.0 {
        bail!("the relay carried nothing: the clients did not go through it");
    }
    if std::fs::read(path)? != data {
        bail!("the file that arrived differs from the one sent");
    }
    alice.close().await;
    bob.close().await;

    let raw = raw_through_relay(binary, dir, ciphertext)
        .await
        .context("raw bytes through the relay")?;

    let up = mb_per_s(ciphertext, upload);
    let down = mb_per_s(ciphertext, download);
    table.row(
        "encrypt into the profile (sender)",
        format!("{:.0} MB/s ({encrypt:.2} s)", mb_per_s(size, encrypt)),
    );
    table.row(
        "upload (send_pending: chunks acknowledged, message accepted)",
        format!(
            "{up:.1} MB/s ({upload:.2} s; CPU server {:.2} s, relay {:.2} s)",
            up_cpu.0, up_cpu.1
        ),
    );
    table.row(
        "download (fetch, check SHA-256, decrypt, save)",
        format!(
            "{down:.1} MB/s ({download:.2} s; CPU server {:.2} s, relay {:.2} s)",
            down_cpu.0, down_cpu.1
        ),
    );
    table.row(
        "raw bytes through the same relay (TLS, one connection)",
        format!("{raw:.1} MB/s"),
    );
    table.row(
        "upload ÷ raw, download ÷ raw",
        format!("{:.2}, {:.2}", up / raw, down / raw),
    );
    table.print("Attachments through a relay (MB = 10^6 bytes of ciphertext)");
    Ok(())
}

/// Writes `bytes` through a relay's TLS listener to a sink; returns MB/s.
async fn raw_through_relay(binary: &Path, dir: &Path, bytes: u64) -> Result<f64> {
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sink_addr = sink.local_addr()?;
    // The relay's health checks connect too (and send nothing): the transfer is the
    // connection that carries bytes.
    let received = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let (mut s, _) = sink.accept().await?;
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            if total > 0 {
                return Ok::<_, std::io::Error>(total);
            }
        }
    });
    let relay = RelayProcess::start(binary, dir, &sink_addr.to_string(), false)?;
    let tcp = tokio::net::TcpStream::connect(relay.tls).await?;
    tcp.set_nodelay(true)?;
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(postern_protocol::tls::relay_client_config()));
    let name = rustls::pki_types::ServerName::try_from("relay.invalid")?;
    let mut tls = connector.connect(name, tcp).await?;
    let block = vec![0x5au8; 256 * 1024];
    let t = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        tls.write_all(&block[..n]).await?;
        left -= n as u64;
    }
    tls.shutdown().await?;
    let total = tokio::time::timeout(Duration::from_secs(120), received)
        .await
        .context("the sink never saw the end")???;
    let secs = t.elapsed().as_secs_f64();
    if total != bytes {
        bail!("the sink received {total} of {bytes} bytes");
    }
    Ok(mb_per_s(bytes, secs))
}
