//! `postern proxy ...` and `postern status`.

use std::path::PathBuf;

use anyhow::bail;
use postern_client::{
    route, Client, ClientError, ConnectMode, DialReport, MediaRoute, ProxyEntry, ProxyMode, Route,
};
use postern_protocol::link::Sni;

use crate::cli::ProxyCommand;
use crate::hints;

pub async fn run(home: PathBuf, cmd: ProxyCommand) -> anyhow::Result<()> {
    if let ProxyCommand::Check {
        address: Some(address),
        tls,
        no_tls,
        sni,
        no_sni,
        json,
        network: Some(network),
    } = &cmd
    {
        return check_without_profile(
            address,
            *tls,
            *no_tls,
            sni.as_deref(),
            *no_sni,
            *json,
            network,
        )
        .await;
    }
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
            sni,
            no_sni,
        } => {
            let mut entry = ProxyEntry::parse(&address)?;
            apply_tls_flags(&mut entry, tls, no_tls);
            apply_sni_flags(&mut entry, sni.as_deref(), no_sni)?;
            if media.is_some() {
                entry.media = media;
            }
            println!("Understood: {}.", entry.describe());
            // Saved even if it does not resolve now (it may later, or only on another
            // network), but a typo should not go unnoticed.
            if let Err(failure) = route::resolve(&entry.address()).await {
                println!(
                    "⚠ {} does not resolve right now ({failure}); saved anyway — check the spelling.",
                    entry.host
                );
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
            let mode: ProxyMode = mode.parse()?;
            client.set_proxy_mode(mode).await?;
            println!("Proxy mode: {mode} ({})", mode_meaning(mode));
            if mode == ProxyMode::On && client.proxies().await?.is_empty() {
                println!("No proxy is saved yet: add one with `postern proxy add ADDRESS|LINK`.");
            }
        }
        ProxyCommand::Check {
            address,
            tls,
            no_tls,
            sni,
            no_sni,
            json,
            network: _,
        } => {
            let mut targets = match address {
                Some(a) => vec![ProxyEntry::parse(&a)?],
                None => client.proxies().await?,
            };
            if targets.is_empty() {
                bail!("no proxies saved: give an address (`postern proxy check HOST`) or add one");
            }
            for p in &mut targets {
                apply_tls_flags(p, tls, no_tls);
                apply_sni_flags(p, sni.as_deref(), no_sni)?;
            }
            let mut failed = 0;
            for p in targets {
                let report = client.check_route(&Route::Relay(p.clone())).await?;
                let media = client.check_media(&p).await;
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

/// `postern proxy check LINK --network FILE`: no profile, a throwaway client key.
async fn check_without_profile(
    address: &str,
    tls: bool,
    no_tls: bool,
    sni: Option<&str>,
    no_sni: bool,
    json: bool,
    network: &std::path::Path,
) -> anyhow::Result<()> {
    let file = postern_protocol::network::NetworkFile::load(network)?;
    let key = file
        .server_key()
        .map_err(|e| anyhow::anyhow!("{}: {e}", network.display()))?;
    let mut p = ProxyEntry::parse(address)?;
    apply_tls_flags(&mut p, tls, no_tls);
    apply_sni_flags(&mut p, sni, no_sni)?;
    let report = postern_client::check_route_without_profile(&Route::Relay(p.clone()), &key).await;
    if json {
        println!("{}", serde_json::json!({ "proxy": p, "check": report }));
    } else {
        print_check(&p, &report, None);
    }
    if report.failed.is_some() {
        bail!("the proxy check failed");
    }
    Ok(())
}

/// `--tls` / `--no-tls` override what the address or link implies (clap makes them
/// exclusive).
fn apply_tls_flags(entry: &mut ProxyEntry, tls: bool, no_tls: bool) {
    if tls {
        entry.tls = true;
    }
    if no_tls {
        entry.tls = false;
    }
}

/// `--sni NAME` / `--no-sni` override the link's `sni=` (clap makes them exclusive).
fn apply_sni_flags(entry: &mut ProxyEntry, sni: Option<&str>, no_sni: bool) -> anyhow::Result<()> {
    if let Some(chosen) = sni_from_flags(sni, no_sni)? {
        entry.sni = chosen;
    }
    Ok(())
}

/// The server name `--sni NAME` / `--no-sni` choose, if either is given (`proxy add`,
/// `proxy check` and `relay link` take the same pair).
pub fn sni_from_flags(sni: Option<&str>, no_sni: bool) -> anyhow::Result<Option<Sni>> {
    if no_sni {
        return Ok(Some(Sni::Omit));
    }
    match sni {
        None => Ok(None),
        Some(name) => match Sni::parse(name)? {
            // `--sni ''` would mean "none"; say it the explicit way.
            Sni::Omit => bail!("--sni needs a name; use --no-sni to send none"),
            s => Ok(Some(s)),
        },
    }
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
            println!("  {}", hints::for_failure(failure));
        }
    }
    if let (Some(m), Some(port)) = (media, p.media) {
        match &m.failed {
            None => println!(
                "  Media: available (port {port}, TLS, the server's handshake through it in {:.0} ms)",
                m.total().as_secs_f64() * 1000.0
            ),
            Some((stage, f)) => println!(
                "  Media: unavailable (port {port}: {stage}: {f}); files go over the chat port instead"
            ),
        }
    }
}

/// Why files cannot be sent when the server has no media store.
const NO_MEDIA: &str = "this server keeps no attachments";

pub async fn status(home: PathBuf, json: bool) -> anyhow::Result<()> {
    let client = Client::open(&home).await?;
    let mode = client.proxy_mode().await?;
    let saved = client.proxies().await?.len();
    let result = client.connect(ConnectMode::SendOnly).await;
    // Connected: what is pending goes out now.
    let pending = match &result {
        Ok(_) => Some(client.send_pending().await),
        Err(_) => None,
    };
    let hostile = client.hostile_routes().await?;
    // Files travel over the chat route, or a relay's media port when it has one (which
    // may fail on its own); and the server's media store may be turned off.
    let media = client.media_limits().await;
    let media_route = client.media_route().await;
    client.close().await;
    if json {
        let sent = match &pending {
            Some(Ok(outcomes)) => outcomes.iter().filter(|o| o.result.is_ok()).count(),
            _ => 0,
        };
        let value = match &result {
            Ok(r) => {
                let media = match &media {
                    Some(m) => {
                        serde_json::json!({ "available": true, "max_file_bytes": m.max_file_bytes, "quota_bytes": m.quota_bytes, "ttl_seconds": m.ttl_seconds })
                    }
                    None => serde_json::json!({ "available": false, "reason": NO_MEDIA }),
                };
                serde_json::json!({ "connected": true, "mode": mode, "report": r, "hostile": hostile, "pending_sent": sent, "media": media, "media_route": media_route })
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
        println!("⚠ {r} failed the server's authentication: possible interception; not used until a check through it succeeds");
    }
    let attempts = match &result {
        Ok(report) => &report.attempts[..],
        Err(ClientError::NoRoute { attempts, .. }) => &attempts[..],
        Err(_) => &[],
    };
    if attempts.len() > 1 || result.is_err() {
        println!("Routes tried at once (the one that worked last first, then every 250 ms):");
        for a in attempts {
            print_attempt(a);
        }
    }
    match result {
        Ok(report) => {
            println!(
                "✓ Connected via {}, {:.0} ms",
                report.route,
                report.latency().as_secs_f64() * 1000.0
            );
            match &media {
                Some(m) => println!(
                    "  Media: available (files up to {}, {} per account, kept {} days)",
                    postern_client::human_bytes(m.max_file_bytes),
                    postern_client::human_bytes(m.quota_bytes),
                    m.ttl_seconds / 86_400
                ),
                None => println!("  Media: unavailable ({NO_MEDIA}); messages work"),
            }
            match &media_route {
                Some(MediaRoute::MediaPort { route }) => {
                    println!("  Media port: ✓ files go through {route}")
                }
                Some(MediaRoute::MediaPortFailed { route, reason }) => println!(
                    "  Media port: unavailable ({route} — {reason}); files go over the chat connection"
                ),
                Some(MediaRoute::Chat) | None => {}
            }
            if let Some(outcomes) = pending {
                match outcomes {
                    Ok(outcomes) => {
                        for line in super::messaging::pending_lines(&outcomes, None) {
                            println!("{line}");
                        }
                    }
                    Err(e) => println!("  pending messages not sent yet: {e}"),
                }
            }
            Ok(())
        }
        Err(e) => {
            println!("✗ Not connected");
            Err(e.into())
        }
    }
}

/// One raced attempt: ✓ won, ✗ failed at a stage, or · given up when another route won.
fn print_attempt(a: &DialReport) {
    let at = format!("+{:.2} s", a.started.as_secs_f64());
    match (&a.failed, a.abandoned) {
        (Some((stage, f)), _) => println!("  ✗ {at} {} — {stage}: {f}", a.route),
        (None, Some(stage)) => println!(
            "  · {at} {} — {stage}: no answer yet, stopped (another route won)",
            a.route
        ),
        (None, None) => println!(
            "  ✓ {at} {} ({:.0} ms)",
            a.route,
            a.total().as_secs_f64() * 1000.0
        ),
    }
}
