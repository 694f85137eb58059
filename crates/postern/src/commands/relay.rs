//! `postern relay` and `postern relay link`: command-line flags, turning them into a
//! [`RelayConfig`], and running until SIGINT/SIGTERM.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use postern_protocol::relay_auth::RelaySecret;
use postern_relay::config::{
    AcmeSettings, ListenerConfig, RelayConfig, SecretSettings, SendProxy, StatsSettings,
    LETS_ENCRYPT_DIRECTORY,
};
use postern_relay::{ProxyLink, Relay};
use std::net::SocketAddr;
use std::path::PathBuf;

const RELAY_AFTER: &str = "What it does:
  The relay moves bytes and never holds a key: messages are end-to-end encrypted and the chat
  protocol authenticates the server through the relay. With no --config/--preset it uses the
  \"postern\" preset: plain TCP on 80 and 5222, TLS on 443, each on IPv4 and IPv6 (self-signed
  certificate, random subject, regenerated at every start), status page on 127.0.0.1:8199
  (this machine only), PROXY v2 header sent upstream.

Examples:
  # A volunteer's relay in two commands (docs/volunteer-guide.md), then check it:
  sudo deploy/install.sh
  sudo postern relay setup --domain relay.example.org --network network.toml
  sudo postern relay doctor

  # Standard ports in front of a Postern server (needs root or CAP_NET_BIND_SERVICE for 80/443):
  postern relay --upstream chat.example.org:5222

  # Unprivileged, on high ports, with the status page on localhost only:
  postern relay --upstream chat.example.org:5222 --plain 0.0.0.0:5222 \\
      --tls 0.0.0.0:8443 --stats 127.0.0.1:8199

  # Front the reference messenger's real servers (its proxy's port layout):
  postern relay --preset whatsapp

  # A real certificate from Let's Encrypt, renewed automatically (relay.example.org must
  # point at this machine and port 443 must be reachable; see docs/relay.md):
  postern relay --upstream chat.example.org:5222 --acme-domain relay.example.org \\
      --acme-contact mailto:you@example.org

  # Everything from a file (see deploy/relay.example.toml):
  postern relay --config /etc/postern/relay.toml

  # Print the link (and QR code) users import:
  postern relay link --host relay.example.org

  # Probe-resistant: only holders of the link get through; everyone else sees a web site
  # (the built-in page, --cover-dir DIR, or --cover-upstream HOST:PORT of a real site):
  postern relay --upstream chat.example.org:5222 --secret --cover-dir /var/www/html
  postern relay link --host relay.example.org --secret

Signals: SIGHUP reloads the configuration file and certificates (established connections
stay); SIGTERM/Ctrl-C stops accepting, lets connections finish for limits.shutdown_grace (5 s),
then closes.

On the relay's machine, open http://127.0.0.1:8199/ (or tunnel it: ssh -L 8199:127.0.0.1:8199
relay) to see whether the relay works. To read it from elsewhere, publish it with a token:
  postern relay --upstream chat.example.org:5222 --stats 0.0.0.0:8199 --stats-token $(openssl rand -hex 16)
then open http://<relay>:8199/?token=TOKEN.";

/// Flags of `postern relay`.
#[derive(Debug, Clone, Args)]
#[command(about = "Run a relay (volunteer proxy) in front of the Postern service", after_help = RELAY_AFTER)]
pub struct RelayCli {
    /// Print proxy links instead of running (see `postern relay link --help`).
    #[command(subcommand)]
    pub command: Option<RelayCommand>,

    /// Read the whole configuration from this TOML file (see deploy/relay.example.toml).
    /// Other flags override parts of it.
    #[arg(long, value_name = "FILE", conflicts_with = "preset")]
    pub config: Option<PathBuf>,

    /// Start from a built-in preset: postern (default), whatsapp, signal.
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,

    /// Upstream server HOST:PORT (repeat for several; they are load-balanced and
    /// health-checked). Replaces the servers of every pool. Example: chat.example.org:5222
    #[arg(long, value_name = "HOST:PORT")]
    pub upstream: Vec<String>,

    /// Listen for plain TCP clients on ADDR (repeatable). With --plain and/or --tls, the
    /// addresses given are the whole client-facing set: the standard 80/443/5222 are not
    /// opened (so a relay can run unprivileged). Example: --plain 0.0.0.0:15222
    #[arg(long, value_name = "ADDR")]
    pub plain: Vec<SocketAddr>,

    /// Listen for TLS clients on ADDR (repeatable); see --plain. Example: --tls 0.0.0.0:8443
    #[arg(long, value_name = "ADDR")]
    pub tls: Vec<SocketAddr>,

    /// Listen on ADDR for plain TCP from a load balancer that sends a PROXY v1/v2 header
    /// (repeatable). Replaces and enables the standard 0.0.0.0:8080 and 0.0.0.0:8222.
    #[arg(long, value_name = "ADDR")]
    pub proxy_plain: Vec<SocketAddr>,

    /// Also offer a media port on ADDR (TLS, to the same servers; repeatable): links carry
    /// `media=PORT` and clients send files through it on a connection of their own, so
    /// media can be blocked, limited or moved apart from chat. Example: --media 0.0.0.0:587
    #[arg(long, value_name = "ADDR")]
    pub media: Vec<SocketAddr>,

    /// Listen on ADDR for TLS from a load balancer that sends a PROXY v1/v2 header first
    /// (repeatable). Replaces and enables the standard 0.0.0.0:8443.
    #[arg(long, value_name = "ADDR")]
    pub proxy_tls: Vec<SocketAddr>,

    /// Serve the status page, /metrics and /healthz on ADDR (default 127.0.0.1:8199: this
    /// machine only). An address other machines can reach needs --stats-token.
    #[arg(long, value_name = "ADDR")]
    pub stats: Option<SocketAddr>,

    /// Token every stats request must carry (`?token=TOKEN` or `Authorization: Bearer
    /// TOKEN`); without it the stats listener answers 404 like any web server. At least 16
    /// letters, digits or `-._~` (it is sent in the URL), e.g. from `openssl rand -hex 16`.
    #[arg(
        long,
        value_name = "TOKEN",
        conflicts_with = "no_stats",
        allow_hyphen_values = true
    )]
    pub stats_token: Option<String>,

    /// Run without the stats listener.
    #[arg(long, conflicts_with = "stats")]
    pub no_stats: bool,

    /// Enable the listeners that expect a PROXY v1/v2 header from a load balancer in front
    /// (8080, 8443, 8222 in the standard set).
    #[arg(long)]
    pub accept_proxy: bool,

    /// PROXY header sent to upstream servers: none, v1 or v2 (postern preset: v2).
    #[arg(long, value_name = "VERSION", value_parser = ["none", "v1", "v2"])]
    pub send_proxy: Option<String>,

    /// PEM certificate chain for TLS listeners (with --tls-key). Default: a self-signed
    /// certificate with a random subject, generated in memory at every start.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Extra DNS name or IP address for the generated certificate (repeatable).
    /// Example: --tls-name relay.example.org
    #[arg(long, value_name = "NAME")]
    pub tls_name: Vec<String>,

    /// Get the TLS certificate for NAME from an ACME CA (Let's Encrypt unless
    /// --acme-directory says otherwise) and renew it automatically; repeat for more names.
    /// NAME must resolve to this machine, and the CA must reach a TLS listener here on port
    /// 443 (it checks by connecting, TLS-ALPN-01). Until the first certificate arrives the
    /// self-signed one is served. Example: --acme-domain relay.example.org
    #[arg(long, value_name = "NAME", conflicts_with = "tls_cert")]
    pub acme_domain: Vec<String>,

    /// ACME directory URL of the CA (default: Let's Encrypt,
    /// https://acme-v02.api.letsencrypt.org/directory). To try things out without hitting
    /// Let's Encrypt's rate limits, use its staging CA:
    /// https://acme-staging-v02.api.letsencrypt.org/directory
    #[arg(long, value_name = "URL")]
    pub acme_directory: Option<String>,

    /// Contact for the ACME account (repeatable), where the CA writes about problems and
    /// expiring certificates. Example: --acme-contact mailto:you@example.org
    #[arg(long, value_name = "MAILTO")]
    pub acme_contact: Vec<String>,

    /// Directory keeping the ACME account key and certificates across restarts (default:
    /// the acme folder in --state-dir). Keep it: without it every start orders a new
    /// certificate and soon hits the CA's rate limits.
    #[arg(long, value_name = "DIR")]
    pub acme_cache: Option<PathBuf>,

    /// PEM file of extra root certificates trusted when talking to the ACME directory
    /// (for a private or test CA such as Pebble; not needed for Let's Encrypt).
    #[arg(long, value_name = "FILE")]
    pub acme_ca_roots: Option<PathBuf>,

    /// Where the relay keeps its state (its secret; with ACME, its account and
    /// certificates). Default: $STATE_DIRECTORY (set by systemd), else
    /// $XDG_STATE_HOME/postern-relay, else ~/.local/state/postern-relay.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Give the relay a secret (created in the state directory at the first start): only
    /// clients whose link carries it are forwarded, and everyone else — browsers,
    /// scanners, censors' probes — sees an ordinary web site (the cover site). Links from
    /// `postern relay link` then include `secret=`; links without it stop working.
    #[arg(long)]
    pub secret: bool,

    /// Keep the secret in FILE instead of the state directory (implies --secret).
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,

    /// Turn the secret off even if the --config file sets one (every client is forwarded,
    /// as the reference relay does).
    #[arg(long, conflicts_with_all = ["secret", "secret_file"])]
    pub no_secret: bool,

    /// Cover site: serve the static files of DIR to everyone without the secret (default:
    /// a small neutral built-in page).
    #[arg(long, value_name = "DIR", conflicts_with = "cover_upstream")]
    pub cover_dir: Option<PathBuf>,

    /// Cover site: forward everyone without the secret, byte for byte, to this plain-HTTP
    /// web server, so the relay answers exactly as that site does. Example:
    /// --cover-upstream 127.0.0.1:8080
    #[arg(long, value_name = "HOST:PORT")]
    pub cover_upstream: Option<String>,

    /// Maximum concurrent connections (default 27500); past it clients are turned away at
    /// once so they try another relay.
    #[arg(long, value_name = "N")]
    pub maxconn: Option<usize>,

    /// Maximum concurrent connections from one IP address (IPv6: one /64); 0 = no limit.
    #[arg(long, value_name = "N")]
    pub max_per_source: Option<usize>,

    /// Write client IP addresses into logs. Off by default to protect users.
    #[arg(long)]
    pub log_client_addresses: bool,

    /// A load balancer (address or CIDR block, repeatable) whose PROXY headers are
    /// believed on the --accept-proxy listeners. From anyone else a header is ignored and
    /// the connection counts as the peer's own address. Default: trust no one.
    /// Example: --trusted-proxy 10.0.0.0/8
    #[arg(long, value_name = "CIDR")]
    pub trusted_proxy: Vec<String>,
}

/// Subcommands of `postern relay`.
#[derive(Debug, Clone, Subcommand)]
pub enum RelayCommand {
    /// Print the proxy link users import, with a QR code.
    #[command(after_help = "Examples:
  postern relay link --host relay.example.org            # port 443, TLS
  postern relay link --host 203.0.113.7 --port 5222 --no-tls
  postern relay link --host relay.example.org --config relay.toml   # one link per port

  postern relay link --host relay.example.org --secret   # a relay run with --secret

Link format: postern://proxy?host=H&port=P&tls=1[&secret=S][&media=M] (see docs/relay.md).")]
    Link(LinkArgs),
    /// Write this relay's configuration (standard ports, ACME with --domain, a fresh
    /// secret) and print the link and QR code to share: the volunteer guide's second command.
    #[command(after_help = "Examples:
  sudo postern relay setup --domain relay.example.org --network network.toml
  sudo postern relay setup --network network.toml            # by IP, self-signed certificate
  postern relay setup --upstream chat.example.org:5222 --state-dir ~/relay \\
      --plain 0.0.0.0:15222 --tls 0.0.0.0:8443                 # unprivileged, high ports

It writes relay.toml into the state directory (/var/lib/postern-relay after deploy/install.sh)
and never replaces an existing one without --force. Then start the relay (sudo systemctl
restart postern-relay, or postern relay --config FILE) and check it: postern relay doctor.")]
    Setup(super::relay_setup::SetupArgs),
    /// Check this relay from its own machine, no account needed: configuration, DNS,
    /// ports, certificate, and a real handshake with the service through the relay; says
    /// what to fix, exits nonzero if a check failed.
    #[command(after_help = "Examples:
  sudo postern relay doctor                     # the relay set up by postern relay setup
  postern relay doctor --config relay.toml --network network.toml

From another machine, anyone with the link and the network file can check it too:
  postern proxy check LINK --network network.toml")]
    Doctor(super::relay_doctor::DoctorArgs),
}

/// Flags of `postern relay link`.
#[derive(Debug, Clone, Args)]
pub struct LinkArgs {
    /// The relay's public DNS name or IP address (the name users' phones will connect to).
    /// With --config it defaults to the file's ACME domain, else its first tls.names entry
    /// (what `postern relay setup` writes).
    #[arg(long, value_name = "NAME", required_unless_present = "config")]
    pub host: Option<String>,

    /// The relay's --plain addresses: one link per address, with its port (repeatable).
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["config", "port", "no_tls"])]
    pub plain: Vec<SocketAddr>,

    /// The relay's --tls addresses: one link per address (repeatable).
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["config", "port", "no_tls"])]
    pub tls: Vec<SocketAddr>,

    /// Chat port users connect to (default 443).
    #[arg(long, value_name = "PORT", conflicts_with = "config")]
    pub port: Option<u16>,

    /// The port is plain TCP (default: TLS).
    #[arg(long, conflicts_with = "config")]
    pub no_tls: bool,

    /// Media port (an SNI listener), if the relay has one.
    #[arg(long, value_name = "PORT", conflicts_with = "config")]
    pub media: Option<u16>,

    /// Print one link per client-facing listener of this relay config file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The relay runs with --secret: put its secret into the link (read from the state
    /// directory, or created there if the relay has not started yet). With --config the
    /// file's [secret] table decides.
    #[arg(long, conflicts_with = "config")]
    pub secret: bool,

    /// The relay's --secret-file.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    pub secret_file: Option<PathBuf>,

    /// The relay's --state-dir (where its secret is).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Server name the links tell clients to put in their TLS ClientHello instead of the
    /// host (`sni=NAME`), e.g. a name of this server that is not on a block list. The relay
    /// accepts any name.
    #[arg(long, value_name = "NAME", conflicts_with = "no_sni")]
    pub sni: Option<String>,

    /// The links tell clients to send no server name at all (`sni=`).
    #[arg(long)]
    pub no_sni: bool,

    /// Do not draw the QR code.
    #[arg(long)]
    pub no_qr: bool,
}

fn replace_listeners(
    cfg: &mut RelayConfig,
    tls: bool,
    proxy: bool,
    addrs: &[SocketAddr],
) -> anyhow::Result<()> {
    let matches = |l: &ListenerConfig| {
        l.tls == tls && l.accept_proxy == proxy && l.pool.is_some() && !l.media
    };
    let old: Vec<ListenerConfig> = cfg
        .listeners
        .iter()
        .filter(|l| matches(l))
        .cloned()
        .collect();
    let Some(template) = old.first().cloned() else {
        bail!(
            "this configuration has no {}{} listener to move; use --config to define one",
            if tls { "TLS" } else { "plain" },
            if proxy { " PROXY-header" } else { "" }
        );
    };
    cfg.listeners.retain(|l| !matches(l));
    let kind = match (tls, proxy) {
        (false, false) => "plain",
        (true, false) => "tls",
        (false, true) => "plain-lb",
        (true, true) => "tls-lb",
    };
    for (i, addr) in addrs.iter().enumerate() {
        let base = old.get(i).unwrap_or(&template);
        let mut l = base.clone();
        l.listen = *addr;
        l.enabled = true;
        // Keep a standard name only for the same address family (`--tls A --tls B` must
        // not call an IPv4 address "https-v6").
        l.name = if i < old.len() && base.listen.is_ipv6() == addr.is_ipv6() {
            base.name.clone()
        } else {
            format!("{kind}-{}", i + 1)
        };
        cfg.listeners.push(l);
    }
    Ok(())
}

/// The name of the `index`-th (from 0) listener a repeated flag adds: `base`, then
/// `base-2`, `base-3`, …
pub fn numbered_name(base: &str, index: usize) -> String {
    if index == 0 {
        base.to_string()
    } else {
        format!("{base}-{}", index + 1)
    }
}

/// `--media ADDR…`: TLS listeners to the first pool, marked as media ports.
fn add_media_listeners(cfg: &mut RelayConfig, addrs: &[SocketAddr]) -> anyhow::Result<()> {
    if addrs.is_empty() {
        return Ok(());
    }
    let Some(pool) = cfg
        .listeners
        .iter()
        .find_map(|l| l.pool.clone().filter(|_| !l.accept_proxy))
    else {
        bail!("--media: this configuration has no upstream pool to send media to");
    };
    for (i, addr) in addrs.iter().enumerate() {
        cfg.listeners.push(ListenerConfig {
            name: numbered_name("media", i),
            listen: *addr,
            tls: true,
            accept_proxy: false,
            enabled: true,
            pool: Some(pool.clone()),
            sni: None,
            media: true,
        });
    }
    Ok(())
}

/// Builds the effective configuration from the flags.
pub fn build_config(cli: &RelayCli) -> anyhow::Result<RelayConfig> {
    let preset_name = cli.preset.as_deref().unwrap_or("postern");
    let mut cfg = match &cli.config {
        Some(path) => RelayConfig::load(path)?,
        None => postern_relay::config::presets::preset(preset_name)?,
    };
    if !cli.upstream.is_empty() {
        for u in &cli.upstream {
            postern_relay::config::split_host_port(u)
                .map_err(|e| anyhow::anyhow!("--upstream {e}"))?;
        }
        if cfg.pools.is_empty() {
            bail!("--upstream: this configuration has no upstream pool (it only routes by SNI)");
        }
        cfg.set_upstreams(&cli.upstream);
    } else if cli.config.is_none() && preset_name == "postern" {
        bail!("the postern preset needs the Postern server's address: --upstream HOST:PORT (e.g. --upstream chat.example.org:5222)");
    }
    for (tls, proxy, addrs) in [
        (false, false, &cli.plain),
        (true, false, &cli.tls),
        (false, true, &cli.proxy_plain),
        (true, true, &cli.proxy_tls),
    ] {
        if !addrs.is_empty() {
            replace_listeners(&mut cfg, tls, proxy, addrs)?;
        }
    }
    // --plain/--tls name the whole direct client-facing set: a kind not given is not
    // opened (otherwise `--plain 0.0.0.0:15222` alone would still try port 443).
    if !cli.plain.is_empty() || !cli.tls.is_empty() {
        for (tls, given) in [(false, &cli.plain), (true, &cli.tls)] {
            if given.is_empty() {
                cfg.listeners
                    .retain(|l| l.tls != tls || l.accept_proxy || l.pool.is_none() || l.media);
            }
        }
    }
    add_media_listeners(&mut cfg, &cli.media)?;
    if cli.no_stats {
        cfg.stats = None;
    } else if let Some(addr) = cli.stats {
        let token = cfg.stats.as_ref().and_then(|s| s.token.clone());
        cfg.stats = Some(StatsSettings {
            listen: addr,
            token,
        });
    }
    if let Some(token) = &cli.stats_token {
        match &mut cfg.stats {
            Some(s) => s.token = Some(token.clone()),
            None => bail!("--stats-token: this configuration has no stats listener"),
        }
    }
    if cli.accept_proxy {
        for l in cfg.listeners.iter_mut().filter(|l| l.accept_proxy) {
            l.enabled = true;
        }
    }
    if let Some(v) = &cli.send_proxy {
        let sp = match v.as_str() {
            "v1" => SendProxy::V1,
            "v2" => SendProxy::V2,
            _ => SendProxy::None,
        };
        for p in cfg.pools.values_mut() {
            p.send_proxy = sp;
        }
    }
    if let (Some(c), Some(k)) = (&cli.tls_cert, &cli.tls_key) {
        cfg.tls.cert = Some(c.clone());
        cfg.tls.key = Some(k.clone());
        // Certificate files replace a config file's [tls.acme].
        cfg.tls.acme = None;
    }
    apply_acme_flags(cli, &mut cfg)?;
    cfg.tls.names.extend(cli.tls_name.iter().cloned());
    if let Some(n) = cli.maxconn {
        cfg.limits.maxconn = n;
    }
    if let Some(n) = cli.max_per_source {
        cfg.limits.max_per_source = n;
    }
    if cli.log_client_addresses {
        cfg.log_client_addresses = true;
    }
    cfg.trusted_proxies
        .extend(cli.trusted_proxy.iter().cloned());
    set_state_dir(&mut cfg, cli.state_dir.as_ref());
    if cli.no_secret {
        cfg.secret = None;
    } else if cli.secret || cli.secret_file.is_some() {
        let mut secret = cfg.secret.take().unwrap_or_default();
        if let Some(f) = &cli.secret_file {
            secret.file = Some(f.clone());
        }
        cfg.secret = Some(secret);
    }
    if let Some(dir) = &cli.cover_dir {
        cfg.cover.dir = Some(dir.clone());
        cfg.cover.upstream = None;
    }
    if let Some(up) = &cli.cover_upstream {
        cfg.cover.upstream = Some(up.clone());
        cfg.cover.dir = None;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The --acme-* flags (see their help).
fn apply_acme_flags(cli: &RelayCli, cfg: &mut RelayConfig) -> anyhow::Result<()> {
    if !cli.acme_domain.is_empty() {
        // ACME replaces a config file's certificate files.
        cfg.tls.cert = None;
        cfg.tls.key = None;
        let acme = cfg.tls.acme.get_or_insert_with(|| AcmeSettings {
            domains: Vec::new(),
            directory: LETS_ENCRYPT_DIRECTORY.to_string(),
            contact: Vec::new(),
            cache: None,
            ca_roots: None,
        });
        acme.domains = cli.acme_domain.clone();
    }
    let others = [
        ("--acme-directory", cli.acme_directory.is_some()),
        ("--acme-contact", !cli.acme_contact.is_empty()),
        ("--acme-cache", cli.acme_cache.is_some()),
        ("--acme-ca-roots", cli.acme_ca_roots.is_some()),
    ];
    let Some(acme) = cfg.tls.acme.as_mut() else {
        if let Some((flag, _)) = others.iter().find(|(_, given)| *given) {
            bail!("{flag} needs --acme-domain NAME (or a [tls.acme] table in --config)");
        }
        return Ok(());
    };
    if let Some(d) = &cli.acme_directory {
        acme.directory = d.clone();
    }
    if !cli.acme_contact.is_empty() {
        acme.contact = cli.acme_contact.clone();
    }
    if let Some(c) = &cli.acme_cache {
        acme.cache = Some(c.clone());
    }
    if let Some(r) = &cli.acme_ca_roots {
        acme.ca_roots = Some(r.clone());
    }
    Ok(())
}

/// Where a relay keeps its state when neither `--state-dir` nor the config says:
/// systemd's `StateDirectory=` (`$STATE_DIRECTORY`, first entry), else the XDG state
/// directory of the user running it.
pub fn default_state_dir() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(v) = env("STATE_DIRECTORY") {
        let first = v
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        if !first.is_empty() {
            return Some(PathBuf::from(first));
        }
    }
    if let Some(v) = env("XDG_STATE_HOME") {
        return Some(PathBuf::from(v).join("postern-relay"));
    }
    env("HOME").map(|h| PathBuf::from(h).join(".local/state/postern-relay"))
}

/// `--state-dir` if given, else the configuration's, else [`default_state_dir`].
fn set_state_dir(cfg: &mut RelayConfig, flag: Option<&PathBuf>) {
    if let Some(dir) = flag {
        cfg.state_dir = Some(dir.clone());
    }
    if cfg.state_dir.is_none() {
        cfg.state_dir = default_state_dir();
    }
}

/// The secret `settings` describe (`None`: the relay has none), created if it does not exist
/// yet, so that a link printed before the relay's first start stays valid.
pub fn relay_secret(
    settings: Option<&SecretSettings>,
    state_dir: Option<&std::path::Path>,
) -> anyhow::Result<Option<RelaySecret>> {
    let Some(settings) = settings else {
        return Ok(None);
    };
    let path = settings.path(state_dir)?;
    let (secret, created) = RelaySecret::load_or_create(&path)?;
    if created {
        eprintln!("created the relay's secret in {}", path.display());
    }
    Ok(Some(secret))
}

/// Links for every client-facing listener of `cfg` (pool routes without a PROXY header;
/// the first media listener — else the first SNI listener — becomes the media port).
pub fn links_for(
    cfg: &RelayConfig,
    host: &str,
    secret: Option<&RelaySecret>,
) -> Vec<(String, ProxyLink)> {
    let media = cfg
        .listeners
        .iter()
        .find(|l| l.enabled && l.media && !l.accept_proxy)
        .or_else(|| {
            cfg.listeners
                .iter()
                .find(|l| l.enabled && l.sni.is_some() && !l.tls && !l.accept_proxy)
        })
        .map(|l| l.listen.port());
    let mut ports = std::collections::BTreeSet::new();
    cfg.listeners
        .iter()
        .filter(|l| l.enabled && l.pool.is_some() && !l.accept_proxy && !l.media)
        // One link per port: `[::]:443` beside `0.0.0.0:443` is the same link.
        .filter(|l| ports.insert(l.listen.port()))
        .map(|l| {
            (
                l.name.clone(),
                ProxyLink {
                    host: host.to_string(),
                    port: l.listen.port(),
                    tls: l.tls,
                    secret: secret.cloned(),
                    sni: Default::default(),
                    media,
                },
            )
        })
        .collect()
}

/// The public name a configuration carries: its first ACME domain, else its first
/// `tls.names` entry (`postern relay setup` writes both).
pub fn config_host(cfg: &RelayConfig) -> Option<String> {
    cfg.tls
        .acme
        .as_ref()
        .and_then(|a| a.domains.first().cloned())
        .or_else(|| cfg.tls.names.first().cloned())
}

/// Terminal QR code (two rows per character) for `data`.
pub fn qr(data: &str) -> anyhow::Result<String> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::new(data.as_bytes()).context("cannot encode QR code")?;
    Ok(code
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

fn print_links(args: &LinkArgs) -> anyhow::Result<()> {
    let loaded = match &args.config {
        Some(path) => Some(RelayConfig::load(path)?),
        None => None,
    };
    let host =
        match (&args.host, &loaded) {
            (Some(h), _) => h.clone(),
            (None, Some(cfg)) => config_host(cfg).with_context(|| {
                format!(
                "{} names no public host (no [tls.acme] domain, no tls.names): pass --host NAME",
                args.config.as_deref().unwrap_or(std::path::Path::new("")).display()
            )
            })?,
            (None, None) => bail!("--host NAME is needed (or --config FILE)"),
        };
    // Validate the host the same way clients will.
    let check: ProxyLink = ProxyLink::new(host.clone())
        .to_string()
        .parse()
        .with_context(|| format!("--host {host:?}"))?;
    let host = check.host;
    let links = match (&args.config, loaded) {
        (Some(path), Some(mut cfg)) => {
            set_state_dir(&mut cfg, args.state_dir.as_ref());
            let secret = relay_secret(cfg.secret.as_ref(), cfg.state_dir.as_deref())?;
            let l = links_for(&cfg, &host, secret.as_ref());
            if l.is_empty() {
                bail!("{} has no client-facing listener", path.display());
            }
            l
        }
        _ => {
            let port = args.port.unwrap_or(443);
            if port == 0 {
                bail!("--port must be 1-65535");
            }
            let settings = (args.secret || args.secret_file.is_some()).then(|| SecretSettings {
                file: args.secret_file.clone(),
            });
            let state_dir = args.state_dir.clone().or_else(default_state_dir);
            let secret = relay_secret(settings.as_ref(), state_dir.as_deref())?;
            let link = |port: u16, tls: bool| ProxyLink {
                host: host.clone(),
                port,
                tls,
                secret: secret.clone(),
                sni: Default::default(),
                media: args.media,
            };
            if args.plain.is_empty() && args.tls.is_empty() {
                vec![("relay".to_string(), link(port, !args.no_tls))]
            } else {
                // The same addresses as the relay's flags, one link each (a port once).
                let mut v: Vec<(String, ProxyLink)> = Vec::new();
                for (tls, addrs) in [(true, &args.tls), (false, &args.plain)] {
                    for a in addrs {
                        if a.port() == 0 {
                            bail!("--plain/--tls {a}: a link needs a real port");
                        }
                        if !v.iter().any(|(_, l)| l.port == a.port()) {
                            v.push((a.to_string(), link(a.port(), tls)));
                        }
                    }
                }
                v
            }
        }
    };
    let sni = super::proxy::sni_from_flags(args.sni.as_deref(), args.no_sni)?;
    let mut text = String::new();
    for (name, mut link) in links {
        if let Some(sni) = &sni {
            link.sni = sni.clone();
        }
        if args.config.is_some() || !args.plain.is_empty() || !args.tls.is_empty() {
            text.push_str(&format!("# listener {name}\n"));
        }
        text.push_str(&format!("{link}\n"));
        if !args.no_qr {
            text.push_str(&qr(&link.to_string())?);
            text.push('\n');
        }
    }
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        // `postern relay link | head` is fine.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r.context("cannot write to stdout")?,
    }
    Ok(())
}

/// Runs `postern relay` (or `postern relay link`) until SIGINT/SIGTERM.
pub async fn run(cli: RelayCli) -> anyhow::Result<()> {
    match &cli.command {
        Some(RelayCommand::Link(args)) => return print_links(args),
        Some(RelayCommand::Setup(args)) => return super::relay_setup::run(args),
        Some(RelayCommand::Doctor(args)) => return super::relay_doctor::run(args).await,
        None => {}
    }
    let cfg = build_config(&cli)?;
    let mut relay = Relay::start(cfg.clone()).await?;
    let mut current = cfg;
    // Handlers first: a SIGTERM sent as soon as "relay ready" appears must stop the relay
    // gracefully, not kill it with the default action; a SIGHUP must reload, not kill.
    let stop = super::shutdown_signal();
    tokio::pin!(stop);
    let mut hup = reload_signal()?;
    print_ready(&relay);
    // Scripts (and tests) wait for this line: every listener above is accepting.
    println!("relay ready");
    // Relays replaced by a reload: no longer accepting, their connections left to finish.
    let mut retired: Vec<postern_relay::RunningRelay> = Vec::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = hup.recv() => {}
        }
        retired.retain(|r| r.tasks() > 0);
        match reload(&cli, &mut relay, &current).await {
            Ok((old, cfg)) => {
                retired.push(old);
                current = cfg;
                print_ready(&relay);
                println!("relay reloaded");
            }
            Err(Reload::Failed(e)) => {
                tracing::error!("reload failed, still running the previous configuration: {e:#}");
                println!("relay reload failed: {e:#}");
            }
            Err(Reload::Fatal(e)) => {
                // Not listening any more: exit so the service manager restarts the relay.
                let all = std::iter::once(relay).chain(retired).map(|r| r.shutdown());
                futures::future::join_all(all).await;
                return Err(e);
            }
        }
    }
    tracing::info!("shutting down");
    // Every relay stops accepting now; open connections get the grace period, together.
    let all = std::iter::once(relay).chain(retired).map(|r| r.shutdown());
    futures::future::join_all(all).await;
    Ok(())
}

fn print_ready(relay: &postern_relay::RunningRelay) {
    for (name, kind, addr) in relay.listeners() {
        println!("listening: {name} {kind} {addr}");
    }
    if let Some(a) = relay.stats_addr() {
        println!("status page: http://{a}/");
    }
}

/// SIGHUP (systemd's `ExecReload`). Elsewhere: a stream that never fires.
struct ReloadSignal {
    #[cfg(unix)]
    inner: tokio::signal::unix::Signal,
}

impl ReloadSignal {
    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            if self.inner.recv().await.is_none() {
                std::future::pending::<()>().await
            }
        }
        #[cfg(not(unix))]
        std::future::pending::<()>().await
    }
}

fn reload_signal() -> anyhow::Result<ReloadSignal> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(ReloadSignal {
            inner: signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
        })
    }
    #[cfg(not(unix))]
    Ok(ReloadSignal {})
}

/// Re-reads the configuration (file and certificates; the flags stay) and replaces the
/// running relay's listeners, leaving established connections on the old one. On failure the
/// relay keeps (or gets back) the configuration it had.
enum Reload {
    /// Nothing changed: the previous configuration runs.
    Failed(anyhow::Error),
    /// Neither the new nor the previous configuration could listen again.
    Fatal(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Reload {
    fn from(e: E) -> Self {
        Reload::Failed(e.into())
    }
}

async fn reload(
    cli: &RelayCli,
    relay: &mut postern_relay::RunningRelay,
    current: &RelayConfig,
) -> Result<(postern_relay::RunningRelay, RelayConfig), Reload> {
    let cfg = build_config(cli).context("the new configuration is invalid")?;
    // The certificate files must load before the old listeners close.
    if cfg.listeners.iter().any(|l| l.enabled && l.tls) && cfg.tls.cert.is_some() {
        postern_relay::accept::tls::acceptor(&cfg.tls)
            .map_err(|e| anyhow::anyhow!("the new certificate cannot be used: {e}"))?;
    }
    relay.stop_accepting().await;
    let new = match Relay::start(cfg.clone()).await {
        Ok(new) => new,
        Err(e) => {
            // Back to what ran before (its ports were just freed).
            let back = match Relay::start(current.clone()).await {
                Ok(b) => b,
                Err(again) => {
                    return Err(Reload::Fatal(anyhow::anyhow!(
                        "reload failed ({e}) and the previous configuration could not listen again ({again})"
                    )))
                }
            };
            let _ = std::mem::replace(relay, back);
            return Err(Reload::Failed(e.into()));
        }
    };
    let old = std::mem::replace(relay, new);
    tracing::info!("configuration reloaded");
    Ok((old, cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Top {
        #[command(flatten)]
        relay: RelayCli,
    }

    fn cfg(args: &[&str]) -> anyhow::Result<RelayConfig> {
        let mut v = vec!["postern-relay"];
        v.extend_from_slice(args);
        build_config(&Top::try_parse_from(v)?.relay)
    }

    fn enabled(c: &RelayConfig) -> Vec<(String, u16, bool, bool)> {
        c.listeners
            .iter()
            .filter(|l| l.enabled)
            .map(|l| (l.name.clone(), l.listen.port(), l.tls, l.accept_proxy))
            .collect()
    }

    #[test]
    fn secret_and_cover_flags() {
        let base = ["--upstream", "a.example:1", "--state-dir", "/var/lib/pr"];
        let with = |more: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(more);
            cfg(&v)
        };
        assert!(
            with(&[]).unwrap().secret.is_none(),
            "no secret unless asked"
        );
        let c = with(&["--secret", "--cover-upstream", "127.0.0.1:8080"]).unwrap();
        assert_eq!(
            c.secret
                .as_ref()
                .unwrap()
                .path(c.state_dir.as_deref())
                .unwrap(),
            PathBuf::from("/var/lib/pr/secret")
        );
        assert_eq!(c.cover.upstream.as_deref(), Some("127.0.0.1:8080"));
        let c = with(&["--secret-file", "/etc/s"]).unwrap();
        assert_eq!(c.secret.unwrap().file, Some(PathBuf::from("/etc/s")));
        assert!(with(&["--secret", "--no-secret"]).is_err());
        assert!(with(&["--cover-dir", "/", "--cover-upstream", "127.0.0.1:80"]).is_err());
    }

    #[test]
    fn only_the_listed_client_facing_listeners_open() {
        let c = cfg(&["--upstream", "a.example:1", "--plain", "127.0.0.1:15222"]).unwrap();
        assert_eq!(enabled(&c), [("http".into(), 15222, false, false)]);
        let c = cfg(&["--upstream", "a.example:1", "--tls", "127.0.0.1:18443"]).unwrap();
        assert_eq!(enabled(&c), [("https".into(), 18443, true, false)]);
    }

    #[test]
    fn standard_set_and_replacements() {
        let c = cfg(&["--upstream", "chat.example.org:5222"]).unwrap();
        assert_eq!(
            enabled(&c),
            [
                ("http".into(), 80, false, false),
                ("https".into(), 443, true, false),
                ("chat".into(), 5222, false, false),
                ("http-v6".into(), 80, false, false),
                ("https-v6".into(), 443, true, false),
                ("chat-v6".into(), 5222, false, false)
            ]
        );
        assert_eq!(c.pools["chat"].servers, ["chat.example.org:5222"]);
        assert_eq!(c.pools["chat"].send_proxy, SendProxy::V2);
        let c = cfg(&[
            "--upstream",
            "a.example:1",
            "--upstream",
            "b.example:2",
            "--plain",
            "127.0.0.1:15222",
            "--tls",
            "127.0.0.1:18443",
            "--tls",
            "127.0.0.1:18444",
            "--proxy-plain",
            "127.0.0.1:18222",
            "--stats",
            "127.0.0.1:18199",
            "--send-proxy",
            "v1",
            "--tls-name",
            "relay.example.org",
            "--maxconn",
            "10",
            "--log-client-addresses",
        ])
        .unwrap();
        let mut e = enabled(&c);
        e.sort_by_key(|x| x.1);
        assert_eq!(
            e,
            [
                ("http".into(), 15222, false, false),
                ("http-lb".into(), 18222, false, true),
                ("https".into(), 18443, true, false),
                ("tls-2".into(), 18444, true, false)
            ]
        );
        assert_eq!(c.pools["chat"].servers.len(), 2);
        assert_eq!(c.pools["chat"].send_proxy, SendProxy::V1);
        assert_eq!(c.stats.as_ref().unwrap().listen.port(), 18199);
        assert_eq!(c.tls.names, ["relay.example.org"]);
        assert_eq!(c.limits.maxconn, 10);
        assert!(c.log_client_addresses);
        let c = cfg(&["--upstream", "a.example:1", "--accept-proxy", "--no-stats"]).unwrap();
        assert_eq!(enabled(&c).len(), 9);
        assert!(c.stats.is_none());
    }

    #[test]
    fn flag_errors() {
        assert!(cfg(&[]).unwrap_err().to_string().contains("--upstream"));
        assert!(cfg(&["--upstream", "nope"]).is_err());
        assert!(cfg(&["--preset", "signal", "--upstream", "a.example:1"])
            .unwrap_err()
            .to_string()
            .contains("no upstream pool"));
        assert!(cfg(&["--preset", "signal", "--plain", "127.0.0.1:1"]).is_err());
        assert!(cfg(&["--preset", "whatsapp"]).is_ok());
        assert!(
            cfg(&["--tls-cert", "x.pem"]).is_err(),
            "--tls-cert requires --tls-key"
        );
    }

    #[test]
    fn acme_flags() {
        let up = ["--upstream", "a.example:1"];
        let c = cfg(&[
            &up[..],
            &[
                "--acme-domain",
                "relay.example.org",
                "--acme-domain",
                "r2.example.org",
                "--acme-contact",
                "mailto:me@example.org",
                "--state-dir",
                "/var/lib/pr",
            ],
        ]
        .concat())
        .unwrap();
        let acme = c.tls.acme.as_ref().unwrap();
        assert_eq!(acme.domains, ["relay.example.org", "r2.example.org"]);
        assert_eq!(acme.directory, LETS_ENCRYPT_DIRECTORY);
        assert_eq!(acme.contact, ["mailto:me@example.org"]);
        assert_eq!(
            c.acme_cache_dir().unwrap(),
            Some(PathBuf::from("/var/lib/pr/acme"))
        );
        let c = cfg(&[
            &up[..],
            &[
                "--acme-domain",
                "relay.example.org",
                "--acme-directory",
                "https://acme-staging-v02.api.letsencrypt.org/directory",
                "--acme-cache",
                "/tmp/acme",
                "--acme-ca-roots",
                "/tmp/roots.pem",
            ],
        ]
        .concat())
        .unwrap();
        let acme = c.tls.acme.as_ref().unwrap();
        assert!(acme.directory.contains("staging"));
        assert_eq!(
            acme.cache.as_deref(),
            Some(std::path::Path::new("/tmp/acme"))
        );
        assert_eq!(
            acme.ca_roots.as_deref(),
            Some(std::path::Path::new("/tmp/roots.pem"))
        );
        assert!(
            cfg(&[&up[..], &["--acme-contact", "mailto:me@example.org"]].concat())
                .unwrap_err()
                .to_string()
                .contains("needs --acme-domain")
        );
        assert!(
            cfg(&[
                &up[..],
                &[
                    "--acme-domain",
                    "a.example.org",
                    "--tls-cert",
                    "c.pem",
                    "--tls-key",
                    "k.pem"
                ]
            ]
            .concat())
            .is_err(),
            "--acme-domain conflicts with --tls-cert"
        );
    }
}
