//! The relay's configuration: *listeners* → *routes* → *upstream pools*, read from TOML.
//!
//! See `deploy/relay.example.toml` for a commented example and `docs/relay.md` for the
//! full reference. Every value that has a sensible default may be omitted.

pub mod presets;

use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Problems found while reading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file that was read.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The TOML could not be parsed into a configuration.
    #[error("invalid relay config: {0}")]
    Parse(#[from] toml::de::Error),
    /// The configuration parsed but is inconsistent.
    #[error("invalid relay config: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// A whole relay: listeners, upstream pools, TLS settings, limits and the stats listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Write client IP addresses into logs (off by default, for the users' privacy).
    #[serde(default)]
    pub log_client_addresses: bool,
    /// Timeouts and connection limits.
    #[serde(default)]
    pub limits: Limits,
    /// Certificate used by every TLS-terminating listener.
    #[serde(default)]
    pub tls: TlsSettings,
    /// The stats/metrics/health HTTP listener; absent = no stats listener.
    #[serde(default)]
    pub stats: Option<StatsSettings>,
    /// Client-facing listeners (`[[listener]]` tables).
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// Named upstream pools (`[pool.NAME]` tables).
    #[serde(default, rename = "pool")]
    pub pools: BTreeMap<String, PoolConfig>,
    /// Fixed name resolution: `"host:port" = "ip:port"`. Consulted before DNS for pool servers
    /// and SNI-routed targets. Useful to pin addresses or to point a preset at test stand-ins.
    #[serde(default)]
    pub resolve: BTreeMap<String, SocketAddr>,
    /// Where the relay keeps its state: its secret (`<state_dir>/secret`) and, with ACME,
    /// its account and certificates. `postern relay` sets it from `--state-dir` (default
    /// `$STATE_DIRECTORY`, else `$XDG_STATE_HOME/postern-relay`, else
    /// `~/.local/state/postern-relay`).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Secret links (`[secret]`): when present, a client must prove it holds the relay's
    /// link before anything is forwarded; everyone else gets the [`RelayConfig::cover`]
    /// site. Absent: every client is forwarded, as the reference relay does.
    #[serde(default)]
    pub secret: Option<SecretSettings>,
    /// The web site shown to everyone without the secret (`[cover]`).
    #[serde(default)]
    pub cover: CoverSettings,
    /// Load balancers whose PROXY headers are believed on `accept_proxy` listeners
    /// (addresses or CIDR blocks). From any other peer a header is ignored and the peer's
    /// own address is used for limits and logs. Empty by default: trust no one.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

/// Timeouts and limits. Defaults follow the reference HAProxy relay.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Time allowed to open a TCP connection to an upstream (default 5s).
    #[serde(deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// A connection with no traffic in either direction for this long is closed (default 200s).
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// After one side has closed its sending direction, the other direction is closed after
    /// this much inactivity (default 1s).
    #[serde(deserialize_with = "de_duration")]
    pub half_close_timeout: Duration,
    /// Deadline for everything that happens before relaying starts: PROXY header, TLS
    /// handshake, reading the ClientHello (default 10s). Cuts slowloris clients.
    #[serde(deserialize_with = "de_duration")]
    pub handshake_timeout: Duration,
    /// Maximum concurrent client connections over all listeners (default 27500). Past it new
    /// connections are closed at once so clients move on to another relay.
    pub maxconn: usize,
    /// Maximum concurrent connections from one source address (IPv4 address or IPv6 /64);
    /// 0 disables the limit (default 512: many users can share one carrier-grade NAT address).
    pub max_per_source: usize,
    /// Largest read per direction, and the most a connection holds per direction while its
    /// writer is slower than its reader, in bytes (default 65536). Idle connections hold no
    /// copy buffer whatever this is (reads go to a per-thread scratch buffer; see [`crate::forward::copy`]).
    pub buffer_size: usize,
    /// Between plain TCP sockets, move bytes with `splice(2)` instead of copying them through
    /// the relay's memory (default true; Linux only, elsewhere the relay always copies).
    pub splice: bool,
    /// Largest TLS ClientHello accepted for SNI routing, in bytes (default 16384).
    pub max_client_hello: usize,
    /// On shutdown, connections get this long to finish before they are cut (default 5s).
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
    /// A connection with no traffic for this long, and nothing buffered, is parked: its
    /// sockets wait in one shared epoll set until bytes come, instead of holding a task and
    /// two I/O registrations (about 1 KiB). Its first bytes after that wait a few tens of
    /// microseconds more. `"0s"` never parks (default 1s; see [`crate::forward::park`]).
    #[serde(deserialize_with = "de_duration")]
    pub park_after: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(200),
            half_close_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(10),
            maxconn: 27_500,
            max_per_source: 512,
            buffer_size: 64 * 1024,
            splice: true,
            max_client_hello: 16 * 1024,
            shutdown_grace: Duration::from_secs(5),
            park_after: Duration::from_secs(1),
        }
    }
}

/// Certificate for TLS-terminating listeners.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain. Without `cert`/`key` a self-signed certificate with a random
    /// subject is generated at every start (kept in memory only).
    pub cert: Option<PathBuf>,
    /// PEM private key matching `cert`.
    pub key: Option<PathBuf>,
    /// Extra DNS names / IP addresses put into the generated certificate.
    #[serde(default)]
    pub names: Vec<String>,
    /// Certificates from an ACME CA such as Let's Encrypt (`[tls.acme]`); excludes
    /// `cert`/`key`. Until the first certificate arrives the self-signed one is served.
    #[serde(default)]
    pub acme: Option<AcmeSettings>,
}

/// Let's Encrypt's production directory, the default `[tls.acme] directory`.
pub const LETS_ENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// `[tls.acme]`: certificates obtained and renewed automatically from an ACME CA, validated
/// with the TLS-ALPN-01 challenge on the relay's own TLS listeners (see [`crate::accept::acme`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeSettings {
    /// DNS names the certificate is for; each must resolve to this relay, and the CA must
    /// reach a TLS listener on port 443 under that name.
    pub domains: Vec<String>,
    /// The CA's ACME directory URL (default: Let's Encrypt production,
    /// [`LETS_ENCRYPT_DIRECTORY`]).
    #[serde(default = "default_acme_directory")]
    pub directory: String,
    /// Account contacts, e.g. `"mailto:admin@example.org"` (optional; the CA writes there
    /// about expiring certificates or problems).
    #[serde(default)]
    pub contact: Vec<String>,
    /// Directory keeping the ACME account key and the certificates across restarts
    /// (default: `<state_dir>/acme`).
    #[serde(default)]
    pub cache: Option<PathBuf>,
    /// PEM file of extra root certificates trusted for the connection to `directory`
    /// (for a private or test CA such as Pebble).
    #[serde(default)]
    pub ca_roots: Option<PathBuf>,
}

fn default_acme_directory() -> String {
    LETS_ENCRYPT_DIRECTORY.to_string()
}

/// Secret links.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSettings {
    /// The secret's file, created with a fresh secret at the first start (default
    /// `<state_dir>/secret`).
    #[serde(default)]
    pub file: Option<PathBuf>,
}

impl SecretSettings {
    /// The file the secret lives in, from `file` or the state directory.
    pub fn path(&self, state_dir: Option<&Path>) -> Result<PathBuf, ConfigError> {
        match (&self.file, state_dir) {
            (Some(f), _) => Ok(f.clone()),
            (None, Some(dir)) => Ok(dir.join("secret")),
            (None, None) => Err(invalid(
                "[secret] needs a place for the secret: set state_dir (--state-dir) or secret.file",
            )),
        }
    }
}

/// The cover site: what a relay with a secret shows everyone who does not prove it holds
/// the link — browsers, scanners, censors' probes. At most one of `dir` and `upstream`;
/// neither = a small neutral built-in page.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoverSettings {
    /// Serve the static files of this directory (`index.html` for directories).
    pub dir: Option<PathBuf>,
    /// Forward, byte for byte, to this plain-HTTP web server (`"host:port"`), e.g. a real
    /// site on the same machine: the relay then answers exactly as that site does.
    pub upstream: Option<String>,
    /// How long a connection may stay silent after its TLS handshake before it is handed
    /// to the cover site (default 5s; a Postern client proves itself at once).
    #[serde(deserialize_with = "de_duration")]
    pub wait: Duration,
    /// The built-in and directory sites close a connection that has not sent a complete
    /// request head for this long (default 30s, as common web servers do).
    #[serde(deserialize_with = "de_duration")]
    pub header_timeout: Duration,
}

impl Default for CoverSettings {
    fn default() -> Self {
        CoverSettings {
            dir: None,
            upstream: None,
            wait: Duration::from_secs(5),
            header_timeout: Duration::from_secs(30),
        }
    }
}

/// The stats HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsSettings {
    /// Address to listen on (presets: `"127.0.0.1:8199"`, this machine only).
    pub listen: SocketAddr,
    /// Required when `listen` is reachable from other machines: every request must carry
    /// it (`?token=…` or `Authorization: Bearer …`); anything else gets a plain 404, so a
    /// prober cannot tell a relay by its stats port.
    #[serde(default)]
    pub token: Option<String>,
}

/// Shortest stats token accepted (it guards a page on the open Internet).
pub const MIN_STATS_TOKEN: usize = 16;

impl StatsSettings {
    /// A stats listener on `listen` without a token (valid only on loopback).
    pub fn on(listen: SocketAddr) -> Self {
        StatsSettings {
            listen,
            token: None,
        }
    }
}

/// One client-facing listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Name used in logs, metrics and links.
    pub name: String,
    /// Address to listen on, e.g. `"0.0.0.0:443"`.
    pub listen: SocketAddr,
    /// Terminate TLS on this listener.
    #[serde(default)]
    pub tls: bool,
    /// Expect a PROXY protocol v1/v2 header (from a load balancer in front) first.
    #[serde(default)]
    pub accept_proxy: bool,
    /// Disabled listeners are ignored (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Route: forward to this upstream pool ...
    #[serde(default)]
    pub pool: Option<String>,
    /// ... or route by the TLS ClientHello's SNI against an allow-list.
    #[serde(default)]
    pub sni: Option<SniRoute>,
    /// A media listener: links name its port as `media=PORT`, and clients send
    /// attachments through it on a connection of their own (the reference's 587/7777).
    /// For Postern clients it is a TLS listener with a pool like the chat ones.
    #[serde(default)]
    pub media: bool,
}

fn yes() -> bool {
    true
}

/// SNI routing: the first bytes must be a TLS ClientHello whose server name is allowed;
/// the untouched stream is then forwarded to `<server name>:<port>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniRoute {
    /// Allowed names: `"host.example"` (exactly that name), `"*.example"` (any name below
    /// example, not example itself) or `".example"` (example and any name below it).
    pub allow: Vec<String>,
    /// Port to connect to on the named host.
    pub port: u16,
}

/// How a PROXY header is sent to upstream servers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendProxy {
    /// Send nothing (default).
    #[default]
    None,
    /// PROXY protocol v1 (text).
    V1,
    /// PROXY protocol v2 (binary).
    V2,
}

/// Load-balancing algorithm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Rotate over healthy servers (default).
    #[default]
    RoundRobin,
    /// Pick the healthy server with the fewest active connections.
    LeastConn,
}

/// A pool of interchangeable upstream servers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// `"host:port"` entries (names or IP addresses; IPv6 in brackets).
    pub servers: Vec<String>,
    /// PROXY header sent to the servers, carrying the client's address.
    #[serde(default)]
    pub send_proxy: SendProxy,
    /// Load-balancing algorithm.
    #[serde(default)]
    pub balance: Balance,
    /// Interval of the active TCP health check (default 60s).
    #[serde(default = "default_check", deserialize_with = "de_duration")]
    pub health_check_interval: Duration,
    /// Consecutive failed connection attempts (by clients or checks) that take a server out of
    /// rotation (default 3). A successful health check puts it back.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_check() -> Duration {
    Duration::from_secs(60)
}
fn default_fall() -> u32 {
    3
}

/// The longest duration a configuration may set: the relay adds them to the clock for
/// deadlines, which would overflow (and panic) for absurd values such as `"99999999999999h"`.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses durations such as `"5s"`, `"200ms"`, `"2m"`, `"1h"`; a bare number means seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (examples: \"5s\", \"200ms\", \"2m\")"))?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => return Err(format!("unknown duration unit {other:?} in {s:?}")),
    };
    Ok(d)
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(n) => Ok(Duration::from_secs(n)),
        Raw::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
    }
}

/// Splits `"host:port"` / `"[v6]:port"` into host and port (the shared splitter, plus the
/// relay's rule that a port is required and the host is an address or a DNS name).
pub fn split_host_port(s: &str) -> Result<(String, u16), String> {
    use postern_protocol::net::{parse_port, split_host_port as split, HostPortError};
    let (host, port) = split(s).map_err(|e| match e {
        HostPortError::UnbracketedIpv6(_) => format!("{s:?}: IPv6 addresses must be in brackets"),
        other => other.to_string(),
    })?;
    let port = port.ok_or_else(|| format!("{s:?} must be HOST:PORT"))?;
    let port = parse_port(port).ok_or_else(|| format!("{s:?}: port must be 1-65535"))?;
    if host.is_empty() {
        return Err(format!("{s:?}: empty host"));
    }
    if host.contains(':') && host.parse::<std::net::Ipv6Addr>().is_err() {
        return Err(format!("{s:?}: invalid IPv6 address"));
    }
    if host.parse::<IpAddr>().is_err() && !crate::accept::sni::is_valid_dns_name(host) {
        return Err(format!("{s:?}: invalid host name"));
    }
    Ok((host.to_string(), port))
}

impl RelayConfig {
    /// Parses a TOML configuration (does not validate; see [`RelayConfig::validate`]).
    pub fn from_toml_str(s: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(s)?)
    }

    /// Reads, parses and validates a configuration file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg = Self::from_toml_str(&text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The parsed `trusted_proxies` list.
    pub fn trusted(&self) -> Result<postern_protocol::net::TrustedProxies, ConfigError> {
        let blocks = self
            .trusted_proxies
            .iter()
            .map(|c| {
                c.parse()
                    .map_err(|e| invalid(format!("trusted_proxies: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(postern_protocol::net::TrustedProxies::new(blocks))
    }

    /// Checks references, addresses and limits for consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.trusted()?;
        let l = &self.limits;
        if l.maxconn == 0 {
            return Err(invalid("limits.maxconn must be at least 1"));
        }
        if !(512..=1 << 20).contains(&l.buffer_size) {
            return Err(invalid(
                "limits.buffer_size must be between 512 and 1048576",
            ));
        }
        if !(512..=64 * 1024).contains(&l.max_client_hello) {
            return Err(invalid(
                "limits.max_client_hello must be between 512 and 65536",
            ));
        }
        for (name, d) in [
            ("connect_timeout", l.connect_timeout),
            ("idle_timeout", l.idle_timeout),
            ("half_close_timeout", l.half_close_timeout),
            ("handshake_timeout", l.handshake_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(format!("limits.{name} must be greater than zero")));
            }
        }
        let checks = self.pools.iter().map(|(name, p)| {
            (
                format!("pool {name:?}: health_check_interval"),
                p.health_check_interval,
            )
        });
        for (name, d) in [
            ("limits.connect_timeout".to_string(), l.connect_timeout),
            ("limits.idle_timeout".to_string(), l.idle_timeout),
            (
                "limits.half_close_timeout".to_string(),
                l.half_close_timeout,
            ),
            ("limits.handshake_timeout".to_string(), l.handshake_timeout),
            ("limits.shutdown_grace".to_string(), l.shutdown_grace),
            ("limits.park_after".to_string(), l.park_after),
        ]
        .into_iter()
        .chain(checks)
        {
            if d > MAX_DURATION {
                return Err(invalid(format!("{name} must be at most 365 days")));
            }
        }
        if let Some(secret) = &self.secret {
            secret.path(self.state_dir.as_deref())?;
        }
        let c = &self.cover;
        if c.dir.is_some() && c.upstream.is_some() {
            return Err(invalid(
                "cover.dir and cover.upstream exclude each other: serve files or forward to a site",
            ));
        }
        if let Some(up) = &c.upstream {
            split_host_port(up).map_err(|e| invalid(format!("cover.upstream: {e}")))?;
        }
        if let Some(dir) = &c.dir {
            if !dir.is_dir() {
                return Err(invalid(format!(
                    "cover.dir {} is not a directory",
                    dir.display()
                )));
            }
        }
        for (name, d) in [
            ("cover.wait", c.wait),
            ("cover.header_timeout", c.header_timeout),
        ] {
            if d.is_zero() || d > MAX_DURATION {
                return Err(invalid(format!(
                    "{name} must be greater than zero and at most 365 days"
                )));
            }
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(invalid("tls.cert and tls.key must be given together"));
        }
        if let Some(acme) = &self.tls.acme {
            self.validate_acme(acme)?;
        }
        let enabled: Vec<_> = self.listeners.iter().filter(|x| x.enabled).collect();
        if enabled.is_empty() {
            return Err(invalid("no enabled [[listener]]"));
        }
        let mut names = std::collections::HashSet::new();
        let mut addrs = std::collections::HashSet::new();
        for li in &self.listeners {
            if li.name.is_empty() {
                return Err(invalid("a listener has an empty name"));
            }
            if !names.insert(li.name.as_str()) {
                return Err(invalid(format!("duplicate listener name {:?}", li.name)));
            }
            if !li.enabled {
                continue;
            }
            if li.listen.port() != 0 && !addrs.insert(li.listen) {
                return Err(invalid(format!(
                    "listener {:?}: address {} used twice",
                    li.name, li.listen
                )));
            }
            match (&li.pool, &li.sni) {
                (Some(p), None) => {
                    if !self.pools.contains_key(p) {
                        return Err(invalid(format!(
                            "listener {:?} uses unknown pool {p:?}",
                            li.name
                        )));
                    }
                }
                (None, Some(sni)) => {
                    if sni.allow.is_empty() {
                        return Err(invalid(format!(
                            "listener {:?}: sni.allow is empty",
                            li.name
                        )));
                    }
                    if sni.port == 0 {
                        return Err(invalid(format!("listener {:?}: sni.port is 0", li.name)));
                    }
                    for a in &sni.allow {
                        crate::accept::sni::AllowList::check_entry(a).map_err(|e| {
                            invalid(format!("listener {:?}: sni.allow {a:?}: {e}", li.name))
                        })?;
                    }
                }
                _ => {
                    return Err(invalid(format!(
                        "listener {:?} needs exactly one of `pool` or `sni`",
                        li.name
                    )))
                }
            }
        }
        if let Some(stats) = &self.stats {
            match &stats.token {
                None if !stats.listen.ip().is_loopback() => {
                    return Err(invalid(format!(
                        "the stats listener on {} is reachable from other machines, so it needs \
                         a token: set [stats] token (or --stats-token) to a random string of at \
                         least {MIN_STATS_TOKEN} characters, or listen on 127.0.0.1",
                        stats.listen
                    )))
                }
                // Only URL-unreserved characters: the token travels as `?token=…` unencoded,
                // so `&`, `#`, `%` or `+` would never match what a browser sends.
                Some(t)
                    if t.len() < MIN_STATS_TOKEN
                        || !t
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b)) =>
                {
                    return Err(invalid(format!(
                        "[stats] token must be at least {MIN_STATS_TOKEN} characters of letters, \
                         digits and - . _ ~ (it is sent in the URL; e.g. the output of \
                         `openssl rand -hex 16`)"
                    )))
                }
                _ => {}
            }
            if stats.listen.port() != 0 && addrs.contains(&stats.listen) {
                return Err(invalid(format!(
                    "stats address {} is also used by a listener",
                    stats.listen
                )));
            }
        }
        for (name, pool) in &self.pools {
            if pool.servers.is_empty() {
                return Err(invalid(format!("pool {name:?} has no servers")));
            }
            for s in &pool.servers {
                split_host_port(s).map_err(|e| invalid(format!("pool {name:?}: {e}")))?;
            }
            if pool.health_check_interval < Duration::from_millis(10) {
                return Err(invalid(format!(
                    "pool {name:?}: health_check_interval must be at least 10ms"
                )));
            }
            if pool.fall == 0 {
                return Err(invalid(format!("pool {name:?}: fall must be at least 1")));
            }
        }
        for key in self.resolve.keys() {
            split_host_port(key).map_err(|e| invalid(format!("resolve: {e}")))?;
        }
        Ok(())
    }

    fn validate_acme(&self, acme: &AcmeSettings) -> Result<(), ConfigError> {
        if self.tls.cert.is_some() {
            return Err(invalid(
                "[tls.acme] and tls.cert/tls.key are mutually exclusive: either the relay gets \
                 its certificate from an ACME CA, or it uses your PEM files; remove one",
            ));
        }
        if acme.domains.is_empty() {
            return Err(invalid(
                "[tls.acme] domains is empty: name the DNS name(s) pointing at this relay, \
                 e.g. domains = [\"relay.example.org\"]",
            ));
        }
        for d in &acme.domains {
            if d.starts_with("*.") {
                return Err(invalid(format!(
                    "[tls.acme] domains: {d:?}: wildcard certificates need the DNS-01 \
                     challenge, which the relay does not do; list each name"
                )));
            }
            if d.parse::<IpAddr>().is_ok() || !crate::accept::sni::is_valid_dns_name(d) {
                return Err(invalid(format!(
                    "[tls.acme] domains: {d:?} is not a DNS name"
                )));
            }
        }
        if !acme.directory.starts_with("https://") {
            return Err(invalid(format!(
                "[tls.acme] directory {:?} must be an https:// URL (default: {LETS_ENCRYPT_DIRECTORY})",
                acme.directory
            )));
        }
        for c in &acme.contact {
            if !c.starts_with("mailto:") || c.len() <= "mailto:".len() {
                return Err(invalid(format!(
                    "[tls.acme] contact {c:?} must look like \"mailto:admin@example.org\""
                )));
            }
        }
        self.acme_cache_dir()?;
        if !self.listeners.iter().any(|l| l.enabled && l.tls) {
            return Err(invalid(
                "[tls.acme] needs a TLS listener (tls = true, reachable on port 443): the CA \
                 checks the domain by connecting to it there (TLS-ALPN-01)",
            ));
        }
        Ok(())
    }

    /// Where `[tls.acme]` keeps its account key and certificates: its `cache`, else
    /// `<state_dir>/acme`. An error when ACME is on and neither is set; `None` without ACME.
    pub fn acme_cache_dir(&self) -> Result<Option<PathBuf>, ConfigError> {
        let Some(acme) = &self.tls.acme else {
            return Ok(None);
        };
        match (&acme.cache, &self.state_dir) {
            (Some(c), _) => Ok(Some(c.clone())),
            (None, Some(s)) => Ok(Some(s.join("acme"))),
            (None, None) => Err(invalid(
                "[tls.acme] needs a directory for its account key and certificates: set \
                 [tls.acme] cache = \"/var/lib/postern-relay/acme\" or state_dir (--state-dir)",
            )),
        }
    }

    /// Pins `name_port` (`"host:port"`, as written in a pool or produced by SNI routing) to a
    /// fixed address. Tests use it to point a preset's real host names at loopback stand-ins.
    pub fn resolve_override(&mut self, name_port: impl Into<String>, addr: SocketAddr) {
        self.resolve.insert(name_port.into(), addr);
    }

    /// Replaces the servers of every pool.
    pub fn set_upstreams(&mut self, servers: &[String]) {
        for pool in self.pools.values_mut() {
            pool.servers = servers.to_vec();
        }
    }

    /// Moves every enabled listener and the stats listener to `ip` on an ephemeral port
    /// (port 0), so tests can run a preset without privileges or collisions.
    pub fn use_ephemeral_ports(&mut self, ip: IpAddr) {
        for li in &mut self.listeners {
            li.listen = SocketAddr::new(ip, 0);
        }
        if let Some(s) = &mut self.stats {
            s.listen = SocketAddr::new(ip, 0);
        }
    }

    /// The listener with this name.
    pub fn listener_mut(&mut self, name: &str) -> Option<&mut ListenerConfig> {
        self.listeners.iter_mut().find(|l| l.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("200ms").unwrap(), Duration::from_millis(200));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    /// Review, with the property the `relay_config` fuzz target asserts: every deadline
    /// the relay computes from a validated configuration fits the clock. Before, this
    /// configuration validated and every connection's handshake task panicked on
    /// `Instant::now() + handshake_timeout`.
    #[test]
    fn durations_that_overflow_a_deadline_are_refused() {
        let text = |limit: &str| {
            format!(
                "[limits]\n{limit}\n[[listener]]\nname = \"chat\"\nlisten = \"127.0.0.1:0\"\n\
                 pool = \"chat\"\n[pool.chat]\nservers = [\"127.0.0.1:5222\"]\n"
            )
        };
        for limit in [
            "handshake_timeout = \"99999999999999999h\"",
            "idle_timeout = 9223372036854775807",
            "shutdown_grace = \"8761h\"",
        ] {
            let cfg = RelayConfig::from_toml_str(&text(limit)).unwrap();
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains("at most 365 days"), "{limit}: {e}");
        }
        let ok = RelayConfig::from_toml_str(&text("idle_timeout = \"8760h\"")).unwrap();
        ok.validate().unwrap();
    }

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("a.b:80").unwrap(), ("a.b".into(), 80));
        assert_eq!(split_host_port("[::1]:443").unwrap(), ("::1".into(), 443));
        assert!(split_host_port("::1:443").is_err());
        assert!(split_host_port("a.b:0").is_err());
        assert!(split_host_port("a.b").is_err());
        assert!(split_host_port(":80").is_err());
    }

    #[test]
    fn minimal_config_validates() {
        let cfg = RelayConfig::from_toml_str(
            r#"
            [[listener]]
            name = "chat"
            listen = "127.0.0.1:0"
            pool = "chat"
            [pool.chat]
            servers = ["127.0.0.1:5222"]
            health_check_interval = "100ms"
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(
            cfg.pools["chat"].health_check_interval,
            Duration::from_millis(100)
        );
        assert_eq!(cfg.limits.maxconn, 27_500);
    }

    #[test]
    fn secret_and_cover_are_checked() {
        let base =
            "[[listener]]\nname = \"tls\"\nlisten = \"127.0.0.1:0\"\ntls = true\npool = \"chat\"\n\
            [pool.chat]\nservers = [\"127.0.0.1:5222\"]\n";
        let check = |extra: &str| {
            RelayConfig::from_toml_str(&format!("{extra}\n{base}"))
                .and_then(|c| c.validate().map(|_| c))
        };
        let err = |extra: &str| check(extra).unwrap_err().to_string();
        assert!(
            err("[secret]").contains("state_dir"),
            "a secret needs a place"
        );
        let c = check("state_dir = \"/var/lib/pr\"\n[secret]").unwrap();
        assert_eq!(
            c.secret.unwrap().path(c.state_dir.as_deref()).unwrap(),
            Path::new("/var/lib/pr/secret")
        );
        let c = check("[secret]\nfile = \"/etc/pr/secret\"").unwrap();
        assert_eq!(c.cover.wait, Duration::from_secs(5));
        assert!(err("[cover]\ndir = \"/\"\nupstream = \"127.0.0.1:80\"").contains("exclude"));
        assert!(err("[cover]\nupstream = \"nope\"").contains("cover.upstream"));
        assert!(err("[cover]\ndir = \"/no/such/dir\"").contains("not a directory"));
        assert!(err("[cover]\nwait = \"0s\"").contains("cover.wait"));
    }

    const ACME_BASE: &str = "state_dir = \"/var/lib/pr\"\n\
        [[listener]]\nname = \"tls\"\nlisten = \"127.0.0.1:0\"\ntls = true\npool = \"chat\"\n\
        [pool.chat]\nservers = [\"127.0.0.1:5222\"]\n";

    fn acme_cfg(tls: &str) -> Result<RelayConfig, ConfigError> {
        let cfg = RelayConfig::from_toml_str(&format!("{ACME_BASE}{tls}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[test]
    fn acme_table() {
        let cfg = acme_cfg("[tls.acme]\ndomains = [\"relay.example.org\"]\n").unwrap();
        let acme = cfg.tls.acme.as_ref().unwrap();
        assert_eq!(acme.directory, LETS_ENCRYPT_DIRECTORY);
        assert!(acme.contact.is_empty());
        assert_eq!(
            cfg.acme_cache_dir().unwrap(),
            Some(PathBuf::from("/var/lib/pr/acme"))
        );
        let cfg = acme_cfg(
            "[tls.acme]\ndomains = [\"a.example.org\", \"b.example.org\"]\n\
             directory = \"https://localhost:14000/dir\"\ncontact = [\"mailto:a@example.org\"]\n\
             cache = \"/tmp/c\"\nca_roots = \"/tmp/r.pem\"\n",
        )
        .unwrap();
        assert_eq!(cfg.acme_cache_dir().unwrap(), Some(PathBuf::from("/tmp/c")));
        let err = |tls: &str| acme_cfg(tls).unwrap_err().to_string();
        assert!(err("[tls.acme]\ndomains = []\n").contains("domains is empty"));
        assert!(err("[tls.acme]\ndomains = [\"*.example.org\"]\n").contains("wildcard"));
        assert!(err("[tls.acme]\ndomains = [\"10.0.0.1\"]\n").contains("not a DNS name"));
        assert!(
            err("[tls.acme]\ndomains = [\"a.org\"]\ndirectory = \"http://x/\"\n")
                .contains("https://")
        );
        assert!(
            err("[tls.acme]\ndomains = [\"a.org\"]\ncontact = [\"a@b.org\"]\n").contains("mailto:")
        );
        assert!(err("[tls.acme]\ndomains = [\"a.org\"]\nbogus = 1\n").contains("bogus"));
        assert!(err(
            "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n[tls.acme]\ndomains = [\"a.org\"]\n"
        )
        .contains("mutually exclusive"));
        let no_state = RelayConfig::from_toml_str(&format!(
            "{}[tls.acme]\ndomains = [\"a.org\"]\n",
            ACME_BASE.replace("state_dir = \"/var/lib/pr\"\n", "")
        ))
        .unwrap();
        assert!(no_state
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--state-dir"));
        let plain_only = RelayConfig::from_toml_str(&format!(
            "{}[tls.acme]\ndomains = [\"a.org\"]\n",
            ACME_BASE.replace("tls = true\n", "")
        ))
        .unwrap();
        assert!(plain_only
            .validate()
            .unwrap_err()
            .to_string()
            .contains("needs a TLS listener"));
    }

    #[test]
    fn bad_references_rejected() {
        let cfg = RelayConfig::from_toml_str(
            r#"
            [[listener]]
            name = "chat"
            listen = "127.0.0.1:0"
            pool = "nope"
            "#,
        )
        .unwrap();
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("unknown pool"));
        assert!(RelayConfig::from_toml_str(
            "[[listener]]\nname=\"x\"\nlisten=\"1.2.3.4:1\"\nbogus=1"
        )
        .is_err());
    }
}
