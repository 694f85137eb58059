//! `postern relay setup`: the volunteer guide's second command. Writes a complete relay
//! configuration (standard ports, ACME when a domain is given, a fresh secret) and prints
//! the link and QR code to share.

use anyhow::{bail, Context};
use clap::Args;
use postern_protocol::network::NetworkFile;
use postern_relay::config::{split_host_port, SecretSettings, LETS_ENCRYPT_DIRECTORY};
use postern_relay::{ProxyLink, RelayConfig};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use super::relay::{default_state_dir, links_for, numbered_name, qr, relay_secret};

/// The state directory deploy/install.sh creates and the systemd unit uses.
pub const SYSTEM_STATE_DIR: &str = "/var/lib/postern-relay";
/// The configuration file's name in the state directory.
pub const CONFIG_FILE: &str = "relay.toml";
/// The copy of the network file `setup --network` keeps (for `relay doctor`).
pub const NETWORK_FILE: &str = "network.toml";

/// Flags of `postern relay setup`.
#[derive(Debug, Clone, Args)]
pub struct SetupArgs {
    /// The relay's DNS name (it must point at this machine). The relay then gets its TLS
    /// certificate from Let's Encrypt and links use the name. Without it the relay is
    /// reached by IP address with a self-signed certificate (Postern clients accept both:
    /// the chat protocol authenticates the server end to end).
    #[arg(long, value_name = "NAME")]
    pub domain: Option<String>,

    /// The network file of the Postern service this relay serves (from its operator). Its
    /// server address becomes the upstream, and a copy is kept in the state directory so
    /// `postern relay doctor` can check that the service proves its key through the relay.
    #[arg(long, value_name = "FILE", required_unless_present = "upstream")]
    pub network: Option<PathBuf>,

    /// The Postern server's HOST:PORT, instead of (or overriding the address of) --network.
    #[arg(long, value_name = "HOST:PORT")]
    pub upstream: Option<String>,

    /// Name or IP address put into the links (default: --domain, else this machine's
    /// outgoing IP address).
    #[arg(long, value_name = "NAME")]
    pub host: Option<String>,

    /// Contact for the ACME account (where Let's Encrypt writes about expiring certificates).
    /// Example: --contact mailto:you@example.org
    #[arg(long, value_name = "MAILTO", requires = "domain")]
    pub contact: Vec<String>,

    /// ACME directory (default Let's Encrypt; its staging CA to try things out).
    #[arg(long, value_name = "URL", requires = "domain")]
    pub acme_directory: Option<String>,

    /// Extra root certificates for the ACME directory's HTTPS (a test CA).
    #[arg(long, value_name = "FILE", requires = "domain")]
    pub acme_ca_roots: Option<PathBuf>,

    /// Where to write the configuration (default: relay.toml in the state directory).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The relay's state directory (default: /var/lib/postern-relay if it exists, as
    /// deploy/install.sh creates it; else $STATE_DIRECTORY, $XDG_STATE_HOME/postern-relay or
    /// ~/.local/state/postern-relay).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Replace an existing configuration (the secret is kept, so links already shared go on
    /// working; delete the secret file to rotate it).
    #[arg(long)]
    pub force: bool,

    /// No secret: every client is forwarded and anyone probing sees a relay (not
    /// recommended where the service is blocked).
    #[arg(long)]
    pub no_secret: bool,

    /// Plain TCP listen addresses instead of the standard ones (repeatable; with --tls, the
    /// whole client-facing set). Example: --plain 0.0.0.0:15222
    #[arg(long, value_name = "ADDR")]
    pub plain: Vec<SocketAddr>,

    /// TLS listen addresses instead of the standard ones (repeatable).
    #[arg(long, value_name = "ADDR")]
    pub tls: Vec<SocketAddr>,

    /// Also offer a media port on ADDR (TLS, to the same Postern server; repeatable, e.g.
    /// IPv4 and IPv6): links carry `media=PORT` and clients send and fetch files through
    /// it on a connection of their own, so a big upload never queues in front of chat and
    /// media can be limited or blocked apart from it. Open the port in the firewall too.
    /// Example: --media 0.0.0.0:587
    #[arg(long, value_name = "ADDR")]
    pub media: Vec<SocketAddr>,

    /// Status page address (default 127.0.0.1:8199).
    #[arg(long, value_name = "ADDR")]
    pub stats: Option<SocketAddr>,

    /// Do not draw the QR code.
    #[arg(long)]
    pub no_qr: bool,
}

/// One client-facing listener the configuration will have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedListener {
    pub name: String,
    pub addr: SocketAddr,
    pub tls: bool,
    /// A media port (always TLS): links name it as `media=PORT`.
    pub media: bool,
}

impl PlannedListener {
    fn new(name: impl Into<String>, addr: SocketAddr, tls: bool) -> Self {
        Self {
            name: name.into(),
            addr,
            tls,
            media: false,
        }
    }
}

/// The standard client-facing listeners. IPv6 beside IPv4.
fn standard_listeners() -> Vec<PlannedListener> {
    let mut v = Vec::new();
    for (name, port, tls) in [
        ("http", 80, false),
        ("https", 443, true),
        ("chat", 5222, false),
    ] {
        v.push(PlannedListener::new(
            name,
            SocketAddr::from(([0, 0, 0, 0], port)),
            tls,
        ));
        v.push(PlannedListener::new(
            format!("{name}-v6"),
            SocketAddr::from(([0u16; 8], port)),
            tls,
        ));
    }
    v
}

/// `--media ADDR…`: TLS media listeners, named like `postern relay --media` names them.
fn media_listeners(addrs: &[SocketAddr]) -> Vec<PlannedListener> {
    addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| PlannedListener {
            name: numbered_name("media", i),
            addr: *addr,
            tls: true,
            media: true,
        })
        .collect()
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn toml_list(items: &[String]) -> String {
    let v: Vec<String> = items.iter().map(|s| toml_str(s)).collect();
    format!("[{}]", v.join(", "))
}

/// What `setup` decided, written as commented TOML.
pub struct Plan {
    pub state_dir: PathBuf,
    pub upstream: String,
    pub host: String,
    pub domain: Option<String>,
    pub contact: Vec<String>,
    pub acme_directory: Option<String>,
    pub acme_ca_roots: Option<PathBuf>,
    pub secret: bool,
    pub listeners: Vec<PlannedListener>,
    pub stats: SocketAddr,
}

impl Plan {
    /// The configuration file's text.
    pub fn to_toml(&self) -> String {
        let mut t = String::new();
        t.push_str(
            "# Postern relay configuration, written by `postern relay setup`.\n\
             # Reference: docs/relay.md and deploy/relay.example.toml. After editing, reload:\n\
             #   sudo systemctl reload postern-relay     (or: kill -HUP <relay pid>)\n\
             # and check: postern relay doctor\n\n",
        );
        t.push_str(&format!(
            "# Secret, ACME account and certificates live here.\nstate_dir = {}\n\n",
            toml_str(&self.state_dir.to_string_lossy())
        ));
        t.push_str("[tls]\n# Names in the self-signed certificate (served until ACME delivers, or always without it).\n");
        t.push_str(&format!(
            "names = {}\n",
            toml_list(std::slice::from_ref(&self.host))
        ));
        if let Some(d) = &self.domain {
            t.push_str(
                "\n# A real certificate for the domain, from the ACME CA, renewed automatically.\n[tls.acme]\n",
            );
            t.push_str(&format!(
                "domains = {}\n",
                toml_list(std::slice::from_ref(d))
            ));
            t.push_str(&format!("contact = {}\n", toml_list(&self.contact)));
            t.push_str(&format!(
                "directory = {}\n",
                toml_str(
                    self.acme_directory
                        .as_deref()
                        .unwrap_or(LETS_ENCRYPT_DIRECTORY)
                )
            ));
            if let Some(r) = &self.acme_ca_roots {
                t.push_str(&format!("ca_roots = {}\n", toml_str(&r.to_string_lossy())));
            }
        }
        if self.secret {
            t.push_str(
                "\n# Only clients whose link carries the secret (<state_dir>/secret) are forwarded;\n\
                 # everyone else - browsers, scanners, censors' probes - sees an ordinary web site.\n\
                 [secret]\n",
            );
        }
        t.push_str(&format!(
            "\n# Status page, /metrics, /healthz: this machine only (ssh -L 8199:127.0.0.1:8199 ...).\n\
             [stats]\nlisten = {}\n",
            toml_str(&self.stats.to_string())
        ));
        t.push_str(&format!(
            "\n# The Postern server; it reads the PROXY v2 header (client address, for its limits).\n\
             [pool.chat]\nservers = {}\nsend_proxy = \"v2\"\nhealth_check_interval = \"60s\"\n",
            toml_list(std::slice::from_ref(&self.upstream))
        ));
        for l in &self.listeners {
            if l.media {
                t.push_str("\n# A media port: clients send and fetch files here, apart from chat.");
            }
            t.push_str(&format!(
                "\n[[listener]]\nname = {}\nlisten = {}\n{}pool = \"chat\"\n{}",
                toml_str(&l.name),
                toml_str(&l.addr.to_string()),
                if l.tls { "tls = true\n" } else { "" },
                if l.media { "media = true\n" } else { "" }
            ));
        }
        t
    }
}

/// This machine's address for outgoing traffic (a UDP "connect" sends no packet).
fn outgoing_ip() -> Option<IpAddr> {
    let probe = |bind: &str, to: &str| {
        let s = std::net::UdpSocket::bind(bind).ok()?;
        s.connect(to).ok()?;
        s.local_addr().ok().map(|a| a.ip())
    };
    // Documentation addresses (RFC 5737 / 3849): only the route is looked up.
    probe("0.0.0.0:0", "192.0.2.1:443").or_else(|| probe("[::]:0", "[2001:db8::1]:443"))
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_loopback() || v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// `--state-dir`, else the system directory install.sh made, else the user's.
pub fn setup_state_dir(flag: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(d) = flag {
        return Ok(d.clone());
    }
    if Path::new(SYSTEM_STATE_DIR).is_dir() {
        return Ok(PathBuf::from(SYSTEM_STATE_DIR));
    }
    default_state_dir().context("no state directory: pass --state-dir DIR")
}

/// Files written into a state directory owned by someone else (root running setup for the
/// `postern` user) are given to that owner, so the relay can read them.
fn give_to_owner_of(dir: &Path, file: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir)?;
        let me = std::fs::metadata(file)?;
        if me.uid() != meta.uid() || me.gid() != meta.gid() {
            std::os::unix::fs::chown(file, Some(meta.uid()), Some(meta.gid())).with_context(
                || {
                    format!(
                        "cannot give {} to the owner of {} (run setup as root or as that user)",
                        file.display(),
                        dir.display()
                    )
                },
            )?;
        }
    }
    Ok(())
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("toml.new");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Runs `postern relay setup`.
pub fn run(args: &SetupArgs) -> anyhow::Result<()> {
    let state_dir = setup_state_dir(args.state_dir.as_ref())?;
    let config_path = args
        .config
        .clone()
        .unwrap_or_else(|| state_dir.join(CONFIG_FILE));
    if config_path.exists() && !args.force {
        bail!(
            "{} already exists: keep it (postern relay link --config {} prints its links), or \
             pass --force to replace it (the secret is kept)",
            config_path.display(),
            config_path.display()
        );
    }

    let network = match &args.network {
        Some(path) => {
            Some(NetworkFile::load(path).with_context(|| format!("--network {}", path.display()))?)
        }
        None => None,
    };
    let upstream = match (&args.upstream, &network) {
        (Some(u), _) => u.clone(),
        (None, Some(n)) => n.server.address.clone(),
        (None, None) => bail!("give the Postern service: --network FILE (or --upstream HOST:PORT)"),
    };
    split_host_port(&upstream).map_err(|e| anyhow::anyhow!("upstream {e}"))?;

    let domain = match &args.domain {
        Some(d) => {
            let link: ProxyLink = ProxyLink::new(d.clone())
                .to_string()
                .parse()
                .with_context(|| format!("--domain {d:?}"))?;
            if link.host.parse::<IpAddr>().is_ok() {
                bail!("--domain needs a DNS name; for an IP address leave --domain out (or use --host)");
            }
            Some(link.host)
        }
        None => None,
    };
    let host = match (&args.host, &domain) {
        (Some(h), _) => h.clone(),
        (None, Some(d)) => d.clone(),
        (None, None) => {
            let ip = outgoing_ip().context(
                "cannot tell this machine's IP address (no route out): pass --host PUBLIC_IP or --domain NAME",
            )?;
            if is_private(ip) {
                eprintln!(
                    "note: {ip} is a private address; if this machine is behind NAT, run again with \
                     --force --host PUBLIC_IP so the links carry the address users can reach"
                );
            }
            ip.to_string()
        }
    };
    let host: String = ProxyLink::new(host.clone())
        .to_string()
        .parse::<ProxyLink>()
        .with_context(|| format!("--host {host:?}"))?
        .host;

    let mut listeners = if args.plain.is_empty() && args.tls.is_empty() {
        standard_listeners()
    } else {
        let mut v = Vec::new();
        for (i, a) in args.plain.iter().enumerate() {
            v.push(PlannedListener::new(numbered_name("chat", i), *a, false));
        }
        for (i, a) in args.tls.iter().enumerate() {
            v.push(PlannedListener::new(numbered_name("https", i), *a, true));
        }
        v
    };
    if let Some(taken) = args
        .media
        .iter()
        .find(|m| listeners.iter().any(|l| l.addr.port() == m.port()))
    {
        bail!(
            "--media {taken}: that port is already one of the chat listeners; give the media \
             port a port of its own (e.g. 587)"
        );
    }
    listeners.extend(media_listeners(&args.media));
    let plan = Plan {
        state_dir: state_dir.clone(),
        upstream,
        host: host.clone(),
        domain: domain.clone(),
        contact: args.contact.clone(),
        acme_directory: args.acme_directory.clone(),
        acme_ca_roots: args.acme_ca_roots.clone(),
        secret: !args.no_secret,
        listeners,
        stats: args
            .stats
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8199))),
    };
    let text = plan.to_toml();
    let cfg = RelayConfig::from_toml_str(&text)
        .context("setup produced an invalid configuration (a bug)")?;
    cfg.validate()?;

    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("cannot create the state directory {}", state_dir.display()))?;
    if let Some(parent) = config_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    write_private(&config_path, &text)?;
    give_to_owner_of(&state_dir, &config_path)?;
    if let (Some(path), Some(_)) = (&args.network, &network) {
        let copy = state_dir.join(NETWORK_FILE);
        if std::fs::canonicalize(path).ok() != std::fs::canonicalize(&copy).ok() {
            std::fs::copy(path, &copy)
                .with_context(|| format!("cannot copy the network file to {}", copy.display()))?;
        }
        give_to_owner_of(&state_dir, &copy)?;
    }
    let secret = relay_secret(
        plan.secret
            .then_some(SecretSettings { file: None })
            .as_ref(),
        Some(&state_dir),
    )?;
    if secret.is_some() {
        give_to_owner_of(&state_dir, &state_dir.join("secret"))?;
    }

    println!("Wrote {}", config_path.display());
    println!(
        "  upstream {}; ports {}; {}; {}",
        plan.upstream,
        {
            let mut ports: Vec<String> = Vec::new();
            for l in &plan.listeners {
                let port = if l.media {
                    format!("{} (media)", l.addr.port())
                } else {
                    l.addr.port().to_string()
                };
                if !ports.contains(&port) {
                    ports.push(port);
                }
            }
            ports.join("/")
        },
        match &domain {
            Some(d) => format!("certificate for {d} from ACME"),
            None => "self-signed certificate".to_string(),
        },
        if plan.secret {
            "secret links (probes see a web site)"
        } else {
            "no secret"
        }
    );
    println!();
    println!("Share one of these links (or its QR code) with the people who need it:");
    let links = links_for(&cfg, &host, secret.as_ref());
    // One QR code: for the TLS link (443 in the standard set), which passes most networks.
    let qr_for = links.iter().position(|(_, l)| l.tls).unwrap_or(0);
    for (i, (name, link)) in links.iter().enumerate() {
        println!("# listener {name}");
        println!("{link}");
        if i == qr_for && !args.no_qr {
            println!("{}", qr(&link.to_string())?);
        }
    }
    println!();
    let config_arg = format!("--config {}", config_path.display());
    if Path::new("/etc/systemd/system/postern-relay.service").exists() {
        println!("Start it:  sudo systemctl restart postern-relay");
    } else {
        println!("Start it:  postern relay {config_arg}");
    }
    println!("Check it:  postern relay doctor {config_arg}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(domain: Option<&str>, secret: bool) -> Plan {
        Plan {
            state_dir: "/var/lib/postern-relay".into(),
            upstream: "chat.example.org:5222".into(),
            host: domain.unwrap_or("203.0.113.7").into(),
            domain: domain.map(Into::into),
            contact: vec!["mailto:me@example.org".into()],
            acme_directory: None,
            acme_ca_roots: None,
            secret,
            listeners: standard_listeners(),
            stats: "127.0.0.1:8199".parse().unwrap(),
        }
    }

    #[test]
    fn written_config_is_valid_and_complete() {
        let cfg =
            RelayConfig::from_toml_str(&plan(Some("relay.example.org"), true).to_toml()).unwrap();
        cfg.validate().unwrap();
        let acme = cfg.tls.acme.as_ref().unwrap();
        assert_eq!(acme.domains, ["relay.example.org"]);
        assert_eq!(acme.directory, LETS_ENCRYPT_DIRECTORY);
        assert!(cfg.secret.is_some());
        let ports: Vec<(u16, bool, bool)> = cfg
            .listeners
            .iter()
            .map(|l| (l.listen.port(), l.tls, l.listen.is_ipv6()))
            .collect();
        for p in [80, 443, 5222] {
            assert!(ports.contains(&(p, p == 443, false)), "{ports:?}");
            assert!(ports.contains(&(p, p == 443, true)), "{ports:?}");
        }
        assert_eq!(cfg.pools["chat"].servers, ["chat.example.org:5222"]);

        let cfg = RelayConfig::from_toml_str(&plan(None, false).to_toml()).unwrap();
        cfg.validate().unwrap();
        assert!(cfg.tls.acme.is_none() && cfg.secret.is_none());
        assert_eq!(cfg.tls.names, ["203.0.113.7"]);
    }

    #[test]
    fn a_media_port_is_a_tls_listener_that_every_link_names() {
        let mut p = plan(Some("relay.example.org"), true);
        p.listeners.extend(media_listeners(&[
            "0.0.0.0:587".parse().unwrap(),
            "[::]:587".parse().unwrap(),
        ]));
        let cfg = RelayConfig::from_toml_str(&p.to_toml()).unwrap();
        cfg.validate().unwrap();
        let media: Vec<_> = cfg.listeners.iter().filter(|l| l.media).collect();
        assert_eq!(media.len(), 2);
        assert!(media
            .iter()
            .all(|l| l.tls && l.listen.port() == 587 && l.pool.as_deref() == Some("chat")));
        assert_eq!(media[0].name, "media");
        assert_eq!(media[1].name, "media-2");
        let links = links_for(&cfg, "relay.example.org", None);
        // 80, 443 and 5222: the media port is not a chat link of its own.
        assert_eq!(links.len(), 3, "{links:?}");
        assert!(links.iter().all(|(_, l)| l.media == Some(587)), "{links:?}");
    }

    #[test]
    fn private_addresses() {
        assert!(is_private("10.1.2.3".parse().unwrap()));
        assert!(is_private("fd00::1".parse().unwrap()));
        assert!(!is_private("203.0.113.7".parse().unwrap()));
        assert!(!is_private("2001:db8::1".parse().unwrap()));
    }
}
