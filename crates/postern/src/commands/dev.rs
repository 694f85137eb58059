//! `postern dev`: a whole local network in one command — a server with embedded storage
//! and a relay in front of it — with instructions to try both paths.

use std::str::FromStr;

use postern_protocol::link::ProxyLink;
use postern_protocol::net::{Cidr, TrustedProxies};
use postern_relay::Relay;
use postern_server::{DataDir, Server, ServerConfig};
use tokio::sync::watch;

use crate::cli::DevArgs;

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let dir = DataDir::new(&args.data);
    let public = if args.listen.ip().is_unspecified() {
        format!("127.0.0.1:{}", args.listen.port())
    } else {
        args.listen.to_string()
    };
    dir.init(&public)?;
    let mut config = ServerConfig::new(&args.data, args.listen);
    // The development relay runs on this machine: believe its PROXY headers.
    config.limits.trusted_proxies =
        TrustedProxies::new(vec![Cidr::from_str("127.0.0.0/8")?, Cidr::from_str("::1")?]);
    let server = Server::bind(config).await?;
    let addr = server.local_addr();
    if addr.port() != args.listen.port() {
        // Port 0 was asked for: tell clients the real one.
        dir.init(&format!("127.0.0.1:{}", addr.port()))?;
    }
    let relay = if args.no_relay {
        None
    } else {
        let config = postern_relay::config::presets::postern_on(
            &[addr.to_string()],
            &[args.relay_plain],
            &[args.relay_tls],
            Some(args.relay_stats),
        )?;
        Some(Relay::start(config).await?)
    };

    // One Ctrl-C (or SIGTERM) stops both, each shutting down cleanly.
    let signal = super::shutdown_signal();
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        signal.await;
        let _ = stop_tx.send(true);
    });

    print_instructions(&args, addr, relay.as_ref(), &dir);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let relay_task = async {
        if let Some(r) = relay {
            r.run_until(stopped(stop_rx.clone())).await;
        }
    };
    let (served, ()) = tokio::join!(server.run_until(stopped(stop_rx.clone())), relay_task);
    served?;
    Ok(())
}

fn print_instructions(
    args: &DevArgs,
    server: std::net::SocketAddr,
    relay: Option<&postern_relay::RunningRelay>,
    dir: &DataDir,
) {
    let exe = std::env::current_exe()
        .ok()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "postern".into());
    let network = dir.network_path();
    let n = network.display();
    let data = args.data.display();
    println!("Postern development network is running.");
    println!("  server   {server}   (embedded SQLite database in {data})");
    println!("  network  {n}");
    let mut link_line = String::new();
    if let Some(relay) = relay {
        for (_, kind, addr) in relay.listeners() {
            let what = if kind.tls {
                "TLS, the port-443 kind"
            } else {
                "plain TCP, the 5222/80 kind"
            };
            println!("  relay    {addr}   ({what})");
            if kind.tls && !kind.proxy_expected && link_line.is_empty() {
                let mut link = ProxyLink::new(addr.ip().to_string());
                link.port = addr.port();
                link_line = link.to_string();
            }
        }
        if let Some(stats) = relay.stats_addr() {
            println!("  status   http://{stats}/   (relay status page; /metrics for Prometheus)");
        }
        if !link_line.is_empty() {
            println!("  link     {link_line}");
        }
    }
    println!(
        "
Try it from another terminal:
  {exe} --home /tmp/postern-alice account create alice --network {n}
  {exe} --home /tmp/postern-bob account create bob --network {n}
  {exe} --home /tmp/postern-alice send bob 'hello bob'
  {exe} --home /tmp/postern-bob inbox
  {exe} --home /tmp/postern-alice inbox               (collects the ✓✓ receipt)
  {exe} --home /tmp/postern-alice history bob
  {exe} --home /tmp/postern-alice send bob --file README.md 'a file, end to end encrypted'
  {exe} --home /tmp/postern-bob inbox --save-to /tmp/postern-bob-files
  {exe} --home /tmp/postern-alice group create friends bob
  {exe} --home /tmp/postern-alice group send friends 'hello everyone'
  {exe} --home /tmp/postern-bob inbox"
    );
    if !link_line.is_empty() {
        println!(
            "
Now as if the network blocked the server — through the relay only:
  {exe} --home /tmp/postern-bob proxy add '{link_line}'
  {exe} --home /tmp/postern-bob proxy use on
  {exe} --home /tmp/postern-bob proxy check            (the green tick, stage by stage)
  {exe} --home /tmp/postern-bob send alice 'hi alice, via the relay'
  {exe} --home /tmp/postern-bob status"
        );
    }
    println!(
        "
Or use the app (a messenger in your browser; onboarding imports {n}):
  {exe} --home /tmp/postern-carol app"
    );
    println!("\nPress Ctrl-C to stop. Data stays in {data} for the next run.");
}
