//! `postern relay doctor`: checks a relay from its own machine, without an account — the
//! configuration, DNS, ports, certificate, and a real Noise handshake with the service key
//! through the relay — and says what to fix.

use anyhow::{bail, Context};
use clap::Args;
use postern_client::{check_route_without_profile, ProxyEntry, Route};
use postern_protocol::network::NetworkFile;
use postern_relay::RelayConfig;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::relay::config_host;
use super::relay_setup::{setup_state_dir, CONFIG_FILE, NETWORK_FILE};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Flags of `postern relay doctor`.
#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    /// The relay's configuration (default: relay.toml in the state directory).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The relay's state directory (default as for `postern relay setup`).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// The service's network file, for the handshake check (default: the copy `setup
    /// --network` kept in the state directory).
    #[arg(long, value_name = "FILE")]
    pub network: Option<PathBuf>,

    /// The relay's public name or IP (default: the configuration's ACME domain or tls.names).
    #[arg(long, value_name = "NAME")]
    pub host: Option<String>,

    /// A certificate expiring within this many days fails the check.
    #[arg(long, value_name = "DAYS", default_value_t = 14)]
    pub min_days: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    Warn,
    Fail,
}

struct Report {
    failed: usize,
}

impl Report {
    fn say(&mut self, verdict: Verdict, what: &str, detail: &str, fix: Option<&str>) {
        let mark = match verdict {
            Verdict::Ok => "✓",
            Verdict::Warn => "⚠",
            Verdict::Fail => "✗",
        };
        println!("{mark} {what}: {detail}");
        if let Some(fix) = fix.filter(|_| verdict != Verdict::Ok) {
            println!("    fix: {fix}");
        }
        if verdict == Verdict::Fail {
            self.failed += 1;
        }
    }
}

/// Whether `ip` is an address of this machine (binding to it succeeds only then).
fn is_local(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Where to reach a listener from this machine (a wildcard means loopback).
fn local_target(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(v6) if v6.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// The certificate a TLS listener serves (leaf, DER).
async fn served_certificate(addr: SocketAddr, name: &str) -> anyhow::Result<Vec<u8>> {
    let config = std::sync::Arc::new(postern_protocol::tls::relay_client_config());
    let connector = tokio_rustls::TlsConnector::from(config);
    let server_name =
        rustls::pki_types::ServerName::try_from(name.to_string()).unwrap_or_else(|_| {
            rustls::pki_types::ServerName::try_from("relay.invalid").expect("valid name")
        });
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .context("timed out")??;
    let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(server_name, tcp))
        .await
        .context("TLS handshake timed out")??;
    let (_, session) = tls.get_ref();
    let cert = session
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no certificate sent")?;
    Ok(cert.as_ref().to_vec())
}

struct CertFacts {
    not_after: SystemTime,
    self_signed: bool,
    names: Vec<String>,
    issuer: String,
}

fn cert_facts(der: &[u8]) -> anyhow::Result<CertFacts> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).context("not an X.509 certificate")?;
    let not_after = cert.validity().not_after.timestamp();
    let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64);
    let names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_string()),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => Some(IpAddr::from(<[u8; 4]>::try_from(*b).ok()?).to_string()),
                        16 => Some(IpAddr::from(<[u8; 16]>::try_from(*b).ok()?).to_string()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(CertFacts {
        not_after,
        self_signed: cert.issuer() == cert.subject(),
        names,
        issuer: cert.issuer().to_string(),
    })
}

/// Runs `postern relay doctor`; fails (nonzero exit) if any check failed.
pub async fn run(args: &DoctorArgs) -> anyhow::Result<()> {
    let state_dir = setup_state_dir(args.state_dir.as_ref())?;
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| state_dir.join(CONFIG_FILE));
    let mut r = Report { failed: 0 };

    // 1. The configuration.
    let mut cfg = match RelayConfig::load(&path)
        .map_err(anyhow::Error::from)
        .and_then(|c| {
            c.validate()?;
            Ok(c)
        }) {
        Ok(c) => {
            r.say(
                Verdict::Ok,
                "configuration",
                &format!("{} is valid", path.display()),
                None,
            );
            c
        }
        Err(e) => {
            r.say(
                Verdict::Fail,
                "configuration",
                &format!("{e:#}"),
                Some("write one: sudo postern relay setup --domain NAME --network FILE (or pass --config FILE); if it exists but cannot be read, run the doctor with sudo"),
            );
            bail!("the relay has no usable configuration");
        }
    };
    if cfg.state_dir.is_none() {
        cfg.state_dir = Some(state_dir.clone());
    }
    let host = args.host.clone().or_else(|| config_host(&cfg));

    // 2. DNS: the public name points at this machine.
    match host.as_deref() {
        None => r.say(
            Verdict::Warn,
            "DNS",
            "the configuration names no public host (no ACME domain, no tls.names)",
            Some("pass --host NAME, or rerun postern relay setup --force --domain NAME"),
        ),
        Some(h) => match h.parse::<IpAddr>() {
            Ok(ip) if is_local(ip) => {
                r.say(Verdict::Ok, "address", &format!("{ip} is an address of this machine"), None)
            }
            Ok(ip) => r.say(
                Verdict::Warn,
                "address",
                &format!("{ip} is not an address of this machine"),
                Some("fine if your provider forwards that public IP to this machine (NAT); otherwise rerun setup with --force --host THIS_MACHINES_IP"),
            ),
            Err(_) => match tokio::net::lookup_host((h, 443)).await {
                Err(e) => r.say(
                    Verdict::Fail,
                    "DNS",
                    &format!("{h} does not resolve ({e})"),
                    Some("at your DNS provider, create an A record (and AAAA for IPv6) for the name, pointing at this server's IP; changes can take minutes to an hour"),
                ),
                Ok(addrs) => {
                    let ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
                    let shown = ips.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
                    let local: Vec<&IpAddr> = ips.iter().filter(|i| is_local(**i)).collect();
                    if local.len() == ips.len() {
                        r.say(Verdict::Ok, "DNS", &format!("{h} → {shown} (this machine)"), None)
                    } else if !local.is_empty() {
                        r.say(
                            Verdict::Warn,
                            "DNS",
                            &format!("{h} → {shown}: only some are this machine's"),
                            Some("remove or correct the records that point elsewhere (clients may try them first)"),
                        )
                    } else {
                        r.say(
                            Verdict::Fail,
                            "DNS",
                            &format!("{h} → {shown}, none of which is an address of this machine"),
                            Some("point the name's A/AAAA records at this server (if your provider NATs a public IP to it, check that the record is that IP)"),
                        )
                    }
                }
            },
        },
    }

    // 3. Ports: every client-facing listener accepts connections here.
    let listeners: Vec<_> = cfg
        .listeners
        .iter()
        .filter(|l| l.enabled && !l.accept_proxy)
        .cloned()
        .collect();
    let mut reachable = Vec::new();
    for l in &listeners {
        let target = local_target(l.listen);
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target)).await {
            Ok(Ok(_)) => {
                r.say(
                    Verdict::Ok,
                    &format!("port {}", l.listen.port()),
                    &format!("listener {} ({}) accepts connections on {}", l.name, if l.tls { "TLS" } else { "plain" }, l.listen),
                    None,
                );
                reachable.push(l.clone());
            }
            Ok(Err(e)) if l.listen.is_ipv6() && e.kind() == std::io::ErrorKind::AddrNotAvailable => r.say(
                Verdict::Warn,
                &format!("port {}", l.listen.port()),
                &format!("listener {}: this machine has no IPv6", l.name),
                None,
            ),
            Ok(Err(e)) => r.say(
                Verdict::Fail,
                &format!("port {}", l.listen.port()),
                &format!("listener {} on {}: {e}", l.name, l.listen),
                Some("is the relay running? sudo systemctl start postern-relay; its log: journalctl -u postern-relay -n 50"),
            ),
            Err(_) => r.say(
                Verdict::Fail,
                &format!("port {}", l.listen.port()),
                &format!("listener {} on {}: no answer in {CONNECT_TIMEOUT:?}", l.name, l.listen),
                Some("a local firewall drops the connection: allow the port (e.g. ufw allow PORT/tcp)"),
            ),
        }
    }
    if !reachable.is_empty() {
        println!("  (from this machine; whether the internet reaches these ports depends on your provider's firewall: check from elsewhere with postern proxy check LINK --network FILE)");
    }

    // 4. The certificate of the first TLS listener.
    if let Some(l) = reachable.iter().find(|l| l.tls) {
        let acme = cfg
            .tls
            .acme
            .as_ref()
            .and_then(|a| a.domains.first().cloned());
        let name = acme
            .clone()
            .or_else(|| host.clone())
            .unwrap_or_else(|| "relay.invalid".into());
        match served_certificate(local_target(l.listen), &name)
            .await
            .and_then(|der| cert_facts(&der))
        {
            Err(e) => r.say(
                Verdict::Fail,
                "certificate",
                &format!("cannot get it from {}: {e:#}", l.listen),
                Some("see the relay's log (journalctl -u postern-relay) for TLS errors"),
            ),
            Ok(c) => {
                let left = c
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                let days = left.as_secs() / 86_400;
                let until = humantime::format_rfc3339_seconds(c.not_after);
                match &acme {
                    Some(domain) if c.self_signed => r.say(
                        Verdict::Fail,
                        "certificate",
                        &format!("still the self-signed one: the ACME CA has not issued a certificate for {domain} yet"),
                        Some("the CA must reach this machine on port 443 at the name's address: fix DNS and the firewall above, then watch journalctl -u postern-relay | grep -i acme (a first order takes under a minute)"),
                    ),
                    Some(domain) if !c.names.iter().any(|n| n.eq_ignore_ascii_case(domain)) => r.say(
                        Verdict::Fail,
                        "certificate",
                        &format!("issued for {:?}, not {domain}", c.names),
                        Some("the ACME cache holds another name's certificate: remove <state_dir>/acme and restart the relay"),
                    ),
                    _ if days < args.min_days => r.say(
                        Verdict::Fail,
                        "certificate",
                        &format!("expires {until} ({days} days left)"),
                        Some(if acme.is_some() {
                            "renewal is failing: see journalctl -u postern-relay | grep -i acme"
                        } else {
                            "renew the certificate files, then: sudo systemctl reload postern-relay"
                        }),
                    ),
                    Some(_) => r.say(
                        Verdict::Ok,
                        "certificate",
                        &format!("for {:?} from {}, valid until {until} ({days} days)", c.names, c.issuer),
                        None,
                    ),
                    None => r.say(
                        Verdict::Ok,
                        "certificate",
                        &format!("{} certificate valid until {until} ({days} days); Postern clients do not validate it (the chat protocol authenticates the server)", if c.self_signed { "self-signed" } else { "a" }),
                        None,
                    ),
                }
            }
        }
    }

    // 5. The service answers through the relay and proves the key of its network file.
    let network = args
        .network
        .clone()
        .unwrap_or_else(|| state_dir.join(NETWORK_FILE));
    let key = match NetworkFile::load(&network)
        .map_err(anyhow::Error::from)
        .and_then(|n| n.server_key().map_err(anyhow::Error::msg))
    {
        Ok(k) => Some(k),
        Err(e) => {
            r.say(
                Verdict::Fail,
                "service",
                &format!("no network file to check the service's key: {e:#}"),
                Some("pass --network FILE (the service's network.toml), or rerun setup with --network FILE"),
            );
            None
        }
    };
    if let Some(key) = key {
        let secret = match &cfg.secret {
            None => Ok(None),
            Some(s) => s
                .path(cfg.state_dir.as_deref())
                .map_err(anyhow::Error::from)
                .and_then(|p| {
                    let text = std::fs::read_to_string(&p).with_context(|| {
                        format!("cannot read the relay's secret {}", p.display())
                    })?;
                    text.parse::<postern_protocol::relay_auth::RelaySecret>()
                        .map_err(|e| anyhow::anyhow!("the relay's secret {}: {e}", p.display()))
                })
                .map(Some),
        };
        match secret {
            Err(e) => r.say(
                Verdict::Fail,
                "service",
                &format!("{e:#}"),
                Some("start the relay once (it creates its secret), or rerun postern relay setup"),
            ),
            Ok(secret) => {
                // Through each kind of listener once: plain, TLS, and the media port (a
                // TLS listener of its own, which a firewall or the service may treat apart).
                let mut tried = Vec::new();
                for l in reachable.iter().filter(|l| l.pool.is_some()) {
                    if tried.contains(&(l.tls, l.media)) {
                        continue;
                    }
                    tried.push((l.tls, l.media));
                    let target = local_target(l.listen);
                    let entry = ProxyEntry {
                        host: target.ip().to_string(),
                        port: target.port(),
                        tls: l.tls,
                        secret: secret.clone(),
                        sni: match host.as_deref() {
                            Some(h) if h.parse::<IpAddr>().is_err() => {
                                postern_protocol::link::Sni::Name(h.to_string())
                            }
                            _ => Default::default(),
                        },
                        media: None,
                    };
                    let report = check_route_without_profile(&Route::Relay(entry), &key).await;
                    let what = format!("service via {}", l.name);
                    match &report.failed {
                        None => r.say(
                            Verdict::Ok,
                            &what,
                            &format!(
                                "the server proved the network file's key through the relay ({:.0} ms)",
                                report.total().as_secs_f64() * 1000.0
                            ),
                            None,
                        ),
                        Some((stage, failure)) => {
                            let direct = upstream_direct(&cfg, &key).await;
                            r.say(
                                Verdict::Fail,
                                &what,
                                &format!("{stage}: {failure}"),
                                Some(&match direct {
                                    Some(true) => "the server answers directly from here but not through the relay: check the relay's log (journalctl -u postern-relay)".to_string(),
                                    Some(false) => format!("this machine cannot reach the service at {} either: check the upstream address and that the network file is the service's", cfg.pools.values().flat_map(|p| p.servers.clone()).collect::<Vec<_>>().join(", ")),
                                    None => crate::hints::for_failure(failure).to_string(),
                                }),
                            );
                        }
                    }
                }
            }
        }
    }

    println!();
    if r.failed > 0 {
        bail!(
            "{} check(s) failed: fix them as shown above and run postern relay doctor again",
            r.failed
        );
    }
    println!(
        "All checks passed. Share the link: postern relay link --config {}",
        path.display()
    );
    Ok(())
}

/// Whether the pool's first server answers a handshake directly (None: no server).
async fn upstream_direct(cfg: &RelayConfig, key: &[u8; 32]) -> Option<bool> {
    let server = cfg.pools.values().flat_map(|p| p.servers.first()).next()?;
    let report = check_route_without_profile(
        &Route::Direct {
            address: server.clone(),
        },
        key,
    )
    .await;
    Some(report.failed.is_none())
}
