//! `postern proxy ...` and `postern status`.

use std::path::PathBuf;

use anyhow::bail;
use postern_client::{Client, ClientError, ConnectMode, DialReport, ProxyEntry, ProxyMode, Route};

use crate::cli::ProxyCommand;

pub async fn run(home: PathBuf, cmd: ProxyCommand) -> anyhow::Result<()> {
    let client = Client::open(&home).await?;
    let result = proxy_command(&client, cmd).await;
    client.close().await;
    result
}

async fn proxy_command(client: &Client, cmd: ProxyCommand) -> anyhow::Result<()> {
    match cmd {
        ProxyCommand::Add {
            address,
            tls,
            no_tls,
            media,
        } => {
            let mut entry = ProxyEntry::parse(&address).map_err(anyhow::Error::msg)?;
            if tls {
                entry.tls = true;
            }
            if no_tls {
                entry.tls = false;
            }
            if media.is_some() {
                entry.media = media;
            }
            if client.add_proxy(&entry).await? {
                println!("Saved proxy {entry}.");
            } else {
                println!("Updated proxy {entry}.");
            }
            let mode = client.proxy_mode().await?;
            if mode == ProxyMode::Off {
                println!("Proxy mode is off, so it is not used: `postern proxy use auto` or `on`.");
            }
            println!("Test it with: postern proxy check {}", entry.address());
        }
        ProxyCommand::List { json } => {
            let mode = client.proxy_mode().await?;
            let proxies = client.proxies().await?;
            let last = client.last_route().await?;
            if json {
                let value = serde_json::json!({
                    "mode": mode,
                    "proxies": proxies,
                    "last_route": last,
                });
                println!("{value}");
                return Ok(());
            }
            println!("Proxy mode: {mode} ({})", mode_meaning(mode));
            if proxies.is_empty() {
                println!("No proxies saved. Add one with `postern proxy add ADDRESS|LINK`.");
            }
            for (i, p) in proxies.iter().enumerate() {
                let marker = if last.as_ref() == Some(&Route::Relay(p.clone())) {
                    "  (worked last)"
                } else {
                    ""
                };
                println!("{:>3}. {p}{marker}", i + 1);
                println!("     {}", p.to_link());
            }
        }
        ProxyCommand::Remove { which } => {
            for p in client.remove_proxy(&which).await? {
                println!("Removed proxy {p}.");
            }
        }
        ProxyCommand::Use { mode } => {
            let mode: ProxyMode = mode.parse().map_err(anyhow::Error::msg)?;
            client.set_proxy_mode(mode).await?;
            println!("Proxy mode: {mode} ({})", mode_meaning(mode));
            if mode == ProxyMode::On && client.proxies().await?.is_empty() {
                println!("No proxy is saved yet: add one with `postern proxy add ADDRESS|LINK`.");
            }
        }
        ProxyCommand::Check { address, json } => {
            let targets = match address {
                Some(a) => vec![ProxyEntry::parse(&a).map_err(anyhow::Error::msg)?],
                None => client.proxies().await?,
            };
            if targets.is_empty() {
                bail!("no proxies saved: give an address (`postern proxy check HOST`) or add one");
            }
            let mut failed = 0;
            for p in targets {
                let report = client.check_route(&Route::Relay(p.clone())).await;
                let media = match p.media {
                    Some(port) => Some(client.check_media(&p.host, port).await),
                    None => None,
                };
                if report.failed.is_some() {
                    failed += 1;
                }
                if json {
                    println!(
                        "{}",
                        serde_json::json!({ "proxy": p, "check": report, "media": media })
                    );
                } else {
                    print_check(&p, &report, media.as_ref());
                }
            }
            if failed > 0 {
                bail!("{failed} proxy check(s) failed");
            }
        }
    }
    Ok(())
}

fn mode_meaning(mode: ProxyMode) -> &'static str {
    match mode {
        ProxyMode::Off => "direct connections only",
        ProxyMode::On => "relays only, never a direct connection",
        ProxyMode::Auto => "direct first, then the saved relays",
    }
}

fn print_check(p: &ProxyEntry, report: &DialReport, media: Option<&DialReport>) {
    println!("Checking {p}");
    for s in &report.stages {
        println!(
            "  ✓ {:<17} {:>6.1} ms",
            s.stage.to_string(),
            s.took.as_secs_f64() * 1000.0
        );
    }
    match &report.failed {
        None => println!(
            "✓ {} works: the server proved its identity through it ({:.0} ms)",
            p.address(),
            report.total().as_secs_f64() * 1000.0
        ),
        Some((stage, failure)) => {
            println!("  ✗ {:<17} {failure}", stage.to_string());
            println!("✗ {} does not work: {failure}", p.address());
            println!("  {}", hint(failure));
        }
    }
    if let (Some(m), Some(port)) = (media, p.media) {
        match &m.failed {
            None => println!(
                "  Media: available (port {port}, {:.0} ms)",
                m.total().as_secs_f64() * 1000.0
            ),
            Some((_, f)) => println!("  Media: unavailable (port {port}: {f})"),
        }
    }
}

fn hint(failure: &postern_client::Failure) -> &'static str {
    use postern_client::Failure::*;
    match failure {
        NameNotResolved(_) => "Hint: check the spelling of the host; your DNS may also be filtered — try the relay's IP address.",
        Refused => "Hint: nothing listens there; the relay may be down or on another port.",
        TimedOut => "Hint: the network may be blocking this relay; try another proxy address.",
        Unreachable(_) => "Hint: your network cannot reach that address; try another proxy.",
        TlsFailed(_) => "Hint: TLS to the relay failed; it may be blocked or not a TLS port (try --no-tls).",
        ServiceDidNotAnswer => "Hint: the relay works but cannot reach the service; tell its operator or try another proxy.",
        ServerIdentity => "Warning: something on this path pretends to be the service; do not use this proxy.",
        Other(_) => "Hint: try another proxy.",
    }
}

pub async fn status(home: PathBuf, json: bool) -> anyhow::Result<()> {
    let client = Client::open(&home).await?;
    let mode = client.proxy_mode().await?;
    let saved = client.proxies().await?.len();
    let result = client.connect(ConnectMode::SendOnly).await;
    let hostile = client.hostile_routes();
    client.close().await;
    if json {
        let value = match &result {
            Ok(r) => {
                serde_json::json!({ "connected": true, "mode": mode, "report": r, "hostile": hostile })
            }
            Err(ClientError::NoRoute { attempts, .. }) => {
                serde_json::json!({ "connected": false, "mode": mode, "attempts": attempts, "hostile": hostile })
            }
            Err(e) => {
                serde_json::json!({ "connected": false, "mode": mode, "error": e.to_string() })
            }
        };
        println!("{value}");
        return result.map(|_| ()).map_err(Into::into);
    }
    println!(
        "Proxy mode: {mode} ({}), {saved} saved prox{}",
        mode_meaning(mode),
        if saved == 1 { "y" } else { "ies" }
    );
    for r in &hostile {
        println!("⚠ {r} failed the server's authentication: possible interception; not used again");
    }
    match result {
        Ok(report) => {
            for a in &report.attempts {
                if let Some((stage, f)) = &a.failed {
                    println!("  ✗ {} — {stage}: {f}", a.route);
                }
            }
            println!(
                "✓ Connected via {}, {:.0} ms",
                report.route,
                report.latency().as_secs_f64() * 1000.0
            );
            Ok(())
        }
        Err(e) => {
            println!("✗ Not connected");
            Err(e.into())
        }
    }
}
