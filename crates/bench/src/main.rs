//! `postern-bench`: how many clients one Postern server holds, and how many messages per
//! second it delivers, end to end and at the server (issue 2, "Performance").
//!
//! `postern-bench messaging` starts a **real server process** (`postern server init` and
//! `postern server run` from `target/release/postern`, built with
//! `cargo build --release -p postern`) in a temporary data directory on loopback, and
//! kills it when done (a drop guard, so also on errors). Nothing is written outside that
//! temporary directory. Then it runs two measurements, each against a fresh server:
//!
//! 1. **Server load** (`thin`): thousands of thin clients that speak the wire protocol
//!    directly: Noise IK handshake, `Register` with random keys (the server does not check
//!    key signatures), then `SendMessage` with an opaque body, `AckMessage` for every pushed
//!    `Envelope` and `AckReceipt` for every pushed `Receipt`, exactly as the real client
//!    does, but without Olm and without a local database. This isolates the server:
//!    * memory per connected client: the server's `VmRSS` (`/proc/PID/status`) with every
//!      account registered and no client connected, then with all of them connected,
//!      divided by the number of clients;
//!    * messages per second: `--senders` of the connected clients each send their share
//!      of `--messages`, one at a time (the next once the server accepted the previous,
//!      like the real client), each to a random other connected client;
//!    * latencies, p50/p99/max, all measured from the moment the sender sends:
//!      `MessageAccepted` back at the sender (sent ✓, the message is durable), the
//!      `Envelope` pushed to the recipient (delivery), and the `Receipt` pushed back to the
//!      sender after the recipient acknowledged (delivered ✓✓);
//!    * server CPU time during the messaging phase (`/proc/PID/stat`).
//! 2. **End to end** (`e2e`): real `postern-client` clients in this process, each with its
//!    own profile directory (Olm account, SQLite history). `--e2e-senders` clients each
//!    send `--e2e-messages / --e2e-senders` messages, one at a time, to one contact, after
//!    a warm-up exchange that sets up the Olm sessions both ways. Latency runs from the
//!    `Client::send` call to the recipient's `Event::Incoming` (decrypted and stored), and
//!    to the sender's `Event::Delivered`. Real clients are expensive (Olm, one SQLite
//!    database each), so this mode uses fewer clients; on a 2-core machine they compete
//!    with the server for CPU, which the table reports.
//!
//! 3. **Scale-out** (`--mode scale-out`, run on its own): the thin-client load of 1.
//!    against one node on SQLite, then against 1, 2 and 3 (`--max-nodes`) nodes sharing one
//!    PostgreSQL database (a cluster the benchmark starts in a temporary directory, as in
//!    the tests), clients spread round-robin over the nodes so that most messages cross
//!    nodes (pushed through `LISTEN/NOTIFY`), and 2 nodes with accounts sharded across two
//!    databases of that cluster. One table compares throughput, latencies and the CPU of
//!    all nodes together.
//!
//! 4. **Side by side with ejabberd and Prosody** (`--mode peers`, run on its own): the
//!    thin-client load of 1. (same `--clients`, `--senders`, `--messages`, `--body-bytes`)
//!    against a fresh Postern server, a fresh **ejabberd** and a fresh **Prosody** (Debian's
//!    packages, installed with `apt-get` when missing and running as root; their system
//!    services disabled; `--peers` picks some), each `--rounds` times, taking turns.
//!    Prosody runs as `prosody -F --config FILE` with a generated configuration like
//!    ejabberd's (`prosody.rs`). ejabberd runs in a temporary directory with a
//!    generated `ejabberd.yml` (loopback, a random port, plain TCP, in-band registration,
//!    offline storage, XEP-0198 stream management, no shapers), started with `erl` as the
//!    current user without Erlang distribution (no node name, cookie or `epmd`) and killed
//!    when done. The XMPP load generator (`xmpp_load.rs`, raw stanzas over tokio, parsed
//!    with quick-xml in `xmpp.rs`) logs in with SASL PLAIN, binds, enables stream
//!    management and sends presence; a sender writes each message followed by `<r/>` and
//!    counts it acknowledged when the server's `<a h=…/>` covers it; recipients answer the
//!    server's `<r/>` with `<a/>` and send the XEP-0184 receipt the message asks for. One
//!    table gives each figure's median over the rounds for every server, the ratios
//!    postern ÷ ejabberd and postern ÷ prosody, and the range: messages/s delivered,
//!    p50/p99 of the sender's acknowledgement, of the delivery and of the receipt, server
//!    CPU (`/proc/PID/stat`; ejabberd's `beam.smp`, Prosody's `lua5.4`) and server memory
//!    per connected client (`VmRSS`). What each server's acknowledgement guarantees
//!    differs: see docs/benchmarks.md.
//! 5. **Attachments** (`--mode attachment`, run on its own): a file (`--file-mib`) from
//!    one real client to another through a real relay's TLS listener — encrypt, upload,
//!    download — beside the raw bytes the same relay carries (see `attachment.rs`).
//!
//! Timestamps are taken in this process with one monotonic clock and joined by message id
//! at the end, so no clock is shared with the server. Throughput is messages delivered
//! divided by the time from the first send to the last delivery.
//!
//! The benchmark and the server share the machine: on few cores the load generator's own
//! CPU use lowers the figures, so they are a floor for what the server does alone.

mod attachment;
mod e2e;
mod ejabberd;
mod peers;
mod prosody;
mod server;
mod stats;
mod thin;
mod xmpp;
mod xmpp_load;
mod xmpp_server;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "postern-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Messaging through one server: clients held, memory per client, messages/s, latency.
    Messaging(MessagingArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Thin protocol clients: the server's own capacity.
    Thin,
    /// Real postern-client clients: what users see.
    E2e,
    /// Both, one after the other (each with a fresh server).
    Both,
    /// The thin-client load against SQLite and against 1, 2 and 3 nodes sharing one
    /// PostgreSQL (started by the benchmark; Debian's postgresql, installed when root).
    ScaleOut,
    /// The thin-client load against the Postern server, ejabberd and Prosody (Debian's
    /// packages, started by the benchmark; installed when root), `--rounds` times each; one
    /// table of medians and ratios.
    Peers,
    /// A file end to end through a relay (upload, download), beside the raw bytes the same
    /// relay carries.
    Attachment,
}

#[derive(Debug, Args)]
struct MessagingArgs {
    /// Which measurement to run.
    #[arg(long, value_enum, default_value_t = Mode::Both)]
    mode: Mode,
    /// The postern binary [default: `postern` next to this executable, i.e.
    /// target/release/postern].
    #[arg(long, value_name = "PATH")]
    postern: Option<PathBuf>,
    /// Parent of the temporary directory (server data, client profiles). Use a directory on
    /// the disk you want to measure: the server fsyncs every acknowledged write.
    #[arg(long, value_name = "DIR")]
    tmp: Option<PathBuf>,
    /// Most nodes on PostgreSQL in `--mode scale-out` (1, 2, … up to this).
    #[arg(long, default_value_t = 3)]
    max_nodes: usize,
    /// Rounds in `--mode peers`: each peer is measured this many times (fresh server and
    /// accounts each time); the table gives the median and the range.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The servers `--mode peers` compares, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "postern,ejabberd,prosody"
    )]
    peers: Vec<peers::Peer>,
    #[command(flatten)]
    thin: ThinArgs,
    #[command(flatten)]
    e2e: E2eArgs,
    #[command(flatten)]
    attachment: AttachmentArgs,
}

#[derive(Debug, Args)]
pub struct AttachmentArgs {
    /// Size of the file sent in `--mode attachment`, MiB.
    #[arg(long, default_value_t = 50)]
    file_mib: u64,
    /// Give the relay a media port (`postern relay --media`) and the clients a link with
    /// `media=PORT`, so the file goes over a connection of its own through that port.
    #[arg(long)]
    media_port: bool,
}

#[derive(Debug, Args)]
pub struct ThinArgs {
    /// Thin clients to register and keep connected.
    #[arg(long, default_value_t = 2000)]
    clients: usize,
    /// How many of them send (concurrently, one message at a time each).
    #[arg(long, default_value_t = 200)]
    senders: usize,
    /// Messages to send in total.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Size of each (opaque) message body, bytes.
    #[arg(long, default_value_t = 256)]
    body_bytes: usize,
    /// Registrations and handshakes in flight at once while setting up.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

#[derive(Debug, Args)]
pub struct E2eArgs {
    /// Real clients (postern-client, Olm + SQLite each).
    #[arg(long, default_value_t = 100)]
    e2e_clients: usize,
    /// How many of them send, each to its own contact.
    #[arg(long, default_value_t = 50)]
    e2e_senders: usize,
    /// Messages to send in total.
    #[arg(long, default_value_t = 2000)]
    e2e_messages: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Messaging(args) => messaging(args).await,
    }
}

async fn messaging(args: MessagingArgs) -> Result<()> {
    let binary = server::locate_binary(args.postern.as_deref())?;
    let parent = args.tmp.clone().unwrap_or_else(std::env::temp_dir);
    println!(
        "postern-bench messaging: server {}, {} cores",
        binary.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if matches!(args.mode, Mode::Thin | Mode::Both) {
        let dir = tempfile::Builder::new()
            .prefix("postern-bench-")
            .tempdir_in(&parent)
            .with_context(|| format!("cannot create a directory in {}", parent.display()))?;
        thin::run(&args.thin, &binary, dir.path()).await?;
    }
    if args.mode == Mode::ScaleOut {
        let dir = tempfile::Builder::new()
            .prefix("postern-bench-")
            .tempdir_in(&parent)
            .with_context(|| format!("cannot create a directory in {}", parent.display()))?;
        thin::scale_out(&args.thin, &binary, dir.path(), args.max_nodes.max(1)).await?;
    }
    if args.mode == Mode::Attachment {
        let dir = tempfile::Builder::new()
            .prefix("postern-bench-")
            .tempdir_in(&parent)
            .with_context(|| format!("cannot create a directory in {}", parent.display()))?;
        attachment::run(&args.attachment, &binary, dir.path()).await?;
    }
    if args.mode == Mode::Peers {
        peers::run(&args.thin, args.rounds, &args.peers, &binary, &parent).await?;
    }
    if matches!(args.mode, Mode::E2e | Mode::Both) {
        let dir = tempfile::Builder::new()
            .prefix("postern-bench-")
            .tempdir_in(&parent)
            .with_context(|| format!("cannot create a directory in {}", parent.display()))?;
        e2e::run(&args.e2e, &binary, dir.path()).await?;
    }
    Ok(())
}
