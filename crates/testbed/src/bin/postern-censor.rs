//! `postern-censor`: the testbed's modelled censor. Runs in the censor namespace (the
//! client's only router): installs the profile's nftables rules (drops, and a redirect of
//! flows to inspect to a local transparent interceptor), then inspects each redirected
//! flow's first client data and forwards it to its original destination or black-holes it
//! (or, under `flow-freeze`, forwards every flow until it freezes; see `freeze.rs`).
//! On SIGINT/SIGTERM it removes its nftables table.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use postern_testbed::classify::{self, Verdict};
use postern_testbed::fingerprint::Hello;
use postern_testbed::freeze::{self, Forwarded};
use postern_testbed::profile::{self, Dpi, Network, Profile, PROFILES, TABLE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long the interceptor waits for a flow's first data before passing it uninspected.
const FIRST_DATA_WAIT: Duration = Duration::from_secs(10);
/// How long a black-holed (or frozen) flow is held (silently) before it is dropped.
const BLACK_HOLE_HOLD: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest ClientHello the interceptor reads (a browser's is under 2 KiB).
const MAX_CLIENT_HELLO: usize = 16 * 1024;

#[derive(Debug, Parser)]
#[command(
    name = "postern-censor",
    about = "The Postern testbed's modelled censor"
)]
struct Args {
    /// Profile to apply (`--list` shows them).
    #[arg(long, required_unless_present = "list")]
    profile: Option<String>,
    /// List the profiles and exit.
    #[arg(long)]
    list: bool,
    /// Print the nftables rules and exit without applying them.
    #[arg(long)]
    print_rules: bool,
    /// Interface the client's traffic arrives on.
    #[arg(long, default_value = "cli0")]
    client_if: String,
    /// The server's address.
    #[arg(long, default_value = "10.66.4.2")]
    server: Ipv4Addr,
    /// Relay A's address.
    #[arg(long, default_value = "10.66.2.2")]
    relay_a: Ipv4Addr,
    /// Port of the local transparent interceptor.
    #[arg(long, default_value_t = 15001)]
    intercept_port: u16,
    /// Under `flow-freeze`: bytes a flow delivers to the client before it goes silent.
    #[arg(long, value_name = "BYTES", default_value_t = freeze::FREEZE_AFTER)]
    freeze_after: u64,
}

fn nft(script: &str) -> anyhow::Result<()> {
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .context("running nft (is nftables installed?)")?;
    let mut stdin = child.stdin.take().expect("stdin");
    std::io::Write::write_all(&mut stdin, script.as_bytes())?;
    drop(stdin);
    let status = child.wait()?;
    if !status.success() {
        bail!("nft failed ({status}) on:\n{script}");
    }
    Ok(())
}

/// Removes the censor's table if it exists (`add` first makes the delete unconditional).
fn remove_table() -> anyhow::Result<()> {
    nft(&format!(
        "add table inet {TABLE}\ndelete table inet {TABLE}\n"
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.list {
        for p in PROFILES {
            println!("{:<20} {} [{}]", p.name, p.summary, p.source);
        }
        return Ok(());
    }
    let name = args.profile.as_deref().unwrap_or_default();
    let Some(profile) = profile::find(name) else {
        let names: Vec<_> = PROFILES.iter().map(|p| p.name).collect();
        bail!("unknown profile {name:?}; known: {}", names.join(", "));
    };
    let net = Network {
        client_if: args.client_if.clone(),
        server: args.server,
        relay_a: args.relay_a,
        intercept_port: args.intercept_port,
    };
    let rules = profile.ruleset(&net);
    if args.print_rules {
        print!("{rules}");
        return Ok(());
    }

    // The interceptor listens before any flow is redirected to it.
    let listener = if profile.intercepts() {
        Some(
            TcpListener::bind(("0.0.0.0", net.intercept_port))
                .await
                .context("binding the interceptor")?,
        )
    } else {
        None
    };
    remove_table()?;
    nft(&rules)?;
    let freeze_after = profile.freeze.then_some(args.freeze_after);
    match freeze_after {
        Some(n) => println!(
            "censor ready: profile {} ({}; freeze after {n} bytes)",
            profile.name, profile.summary
        ),
        None => println!(
            "censor ready: profile {} ({})",
            profile.name, profile.summary
        ),
    }
    for line in rules.lines() {
        eprintln!("censor: nft: {line}");
    }

    let serve = async {
        match listener {
            Some(l) => intercept(l, profile, freeze_after).await,
            None => std::future::pending().await,
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        r = serve => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
    };
    remove_table()?;
    eprintln!("censor: profile {} removed", profile.name);
    result
}

static FLOWS: AtomicU64 = AtomicU64::new(0);

async fn intercept(
    listener: TcpListener,
    profile: &'static Profile,
    freeze_after: Option<u64>,
) -> anyhow::Result<()> {
    loop {
        let (client, peer) = listener.accept().await?;
        let id = FLOWS.fetch_add(1, Ordering::Relaxed) + 1;
        tokio::spawn(async move {
            if let Err(e) = flow(id, client, peer, profile, freeze_after).await {
                eprintln!("censor: flow {id}: {e:#}");
            }
        });
    }
}

fn original_destination(s: &TcpStream) -> anyhow::Result<SocketAddr> {
    let a = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::OriginalDst)
        .context("SO_ORIGINAL_DST")?;
    let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
    Ok(SocketAddr::V4(SocketAddrV4::new(
        ip,
        u16::from_be(a.sin_port),
    )))
}

/// Closes with a RST rather than a FIN.
fn reset(s: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &linger);
    drop(s);
}

async fn flow(
    id: u64,
    mut client: TcpStream,
    peer: SocketAddr,
    profile: &Profile,
    freeze_after: Option<u64>,
) -> anyhow::Result<()> {
    let dst = original_destination(&client)?;
    let first = match profile.dpi {
        Some(dpi) => match inspect(id, &mut client, peer, dst, dpi, profile).await? {
            Some(first) => first,
            None => return Ok(()), // black-holed
        },
        None => Vec::new(),
    };
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            // Mirror what the client would have seen: a refused connection is a reset.
            reset(client);
            bail!("connect {dst}: {e}");
        }
        Err(_) => {
            reset(client);
            bail!("connect {dst}: timed out");
        }
    };
    upstream.set_nodelay(true)?;
    client.set_nodelay(true)?;
    upstream.write_all(&first).await?;
    let Some(limit) = freeze_after else {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        return Ok(());
    };
    let name = profile.name;
    let outcome = freeze::freeze_flow(&mut client, &mut upstream, limit, BLACK_HOLE_HOLD, |f| {
        eprintln!(
            "censor: flow {id} {peer} -> {dst}: frozen after {} bytes to the client [{name}]",
            f.to_client()
        )
    })
    .await?;
    if let Forwarded::Ended {
        to_client,
        to_server,
    } = outcome
    {
        eprintln!(
            "censor: flow {id} {peer} -> {dst}: ended before the freeze ({to_client} bytes to the client, {to_server} to the server) [{name}]"
        );
    }
    Ok(())
}

/// Under `sni-block` and `ja4-block`: reads the whole ClientHello (bounded in size and
/// time) and classifies it. What is not TLS, or not a complete hello in time, passes: these
/// censors block listed TLS clients, not everything they cannot read.
async fn read_client_hello(client: &mut TcpStream, dpi: Dpi) -> (Vec<u8>, Verdict) {
    let mut first = Vec::new();
    let read = postern_protocol::client_hello::read(client, MAX_CLIENT_HELLO, &mut first);
    let verdict = match tokio::time::timeout(FIRST_DATA_WAIT, read).await {
        Err(_) => Verdict::Allow("no complete ClientHello in time".into()),
        Ok(Err(e)) => Verdict::Allow(format!("not inspected: {e}")),
        Ok(Ok(message)) => match Hello::parse(&message) {
            Err(e) => Verdict::Allow(format!("not inspected: {e}")),
            Ok(hello) => match dpi {
                Dpi::SniBlock(names) => classify::sni_block(&hello, names),
                Dpi::Ja4Block(list) => classify::ja4_block(&hello, list),
                other => Verdict::Allow(format!("{other:?} does not judge ClientHellos")),
            },
        },
    };
    (first, verdict)
}

/// Reads and classifies the flow's first client data. Returns it when the flow may go on;
/// black-holes the flow (for `BLACK_HOLE_HOLD`) and returns `None` otherwise.
async fn inspect(
    id: u64,
    client: &mut TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    dpi: Dpi,
    profile: &Profile,
) -> anyhow::Result<Option<Vec<u8>>> {
    let (first, verdict) = if dpi.reads_client_hello() {
        read_client_hello(client, dpi).await
    } else {
        let mut first = vec![0u8; 16 * 1024];
        let n = match tokio::time::timeout(FIRST_DATA_WAIT, client.read(&mut first)).await {
            Ok(r) => r?,
            Err(_) => 0,
        };
        first.truncate(n);
        let verdict = match dpi {
            _ if n == 0 => Verdict::Allow("no first data to inspect".into()),
            Dpi::Allowlist(_) => classify::allowlist(&first),
            _ => classify::fully_encrypted(&first),
        };
        (first, verdict)
    };
    let n = first.len();
    eprintln!(
        "censor: flow {id} {peer} -> {dst}: first data {n} bytes: {verdict} [{}]",
        profile.name
    );
    if verdict.is_block() {
        // Black hole: accept whatever comes, never answer, as the measured censors do.
        let hold = async {
            let mut sink = [0u8; 4096];
            while let Ok(k) = client.read(&mut sink).await {
                if k == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(BLACK_HOLE_HOLD, hold).await;
        return Ok(None);
    }
    Ok(Some(first))
}
