//! Proxy links: `postern://proxy?host=H&port=443&tls=1[&secret=S][&sni=NAME][&media=587]`.
//!
//! * `host` (required): a DNS name, an IPv4 address, or an IPv6 address in brackets.
//! * `port` (optional, default 443): 1-65535.
//! * `tls` (optional, default `1`): `1`/`0` (`true`/`false` accepted on input).
//! * `secret` (optional): the relay's secret (43 base64url characters). A relay with a
//!   secret answers only clients that prove they hold it and shows everyone else a web
//!   site (see [`crate::relay_auth`]).
//! * `sni` (optional): the server name the client's TLS ClientHello carries, when it
//!   should not be `host`: `sni=NAME` sends NAME (a name the relay's address also
//!   answers for, or any name the network lets through), `sni=` (empty) sends none. Without
//!   it the client sends `host` when `host` is a name, and none for an IP address, as a
//!   browser does. See [`Sni`].
//! * `media` (optional): port of an SNI media listener on the same host.
//!
//! Unknown parameters are ignored so newer links still import in older clients; repeated
//! parameters are an error.

use crate::relay_auth::RelaySecret;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

/// The scheme and path every link starts with.
pub const PREFIX: &str = "postern://proxy";

/// A relay address users can import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyLink {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Chat port.
    pub port: u16,
    /// Whether the client wraps its connection in TLS.
    pub tls: bool,
    /// The relay's secret, for relays that show non-clients a cover site.
    pub secret: Option<RelaySecret>,
    /// The server name the TLS ClientHello carries.
    pub sni: Sni,
    /// Optional media port (SNI passthrough listener).
    pub media: Option<u16>,
}

/// Which server name (SNI) a client puts in its TLS ClientHello to a relay. Censors read
/// it in clear and block by it, so a link may name another one, or none, separately from
/// the address the client dials.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sni {
    /// The link's host when it is a DNS name; none when it is an IP address (as browsers
    /// do). The default, written as no `sni=` parameter.
    #[default]
    Host,
    /// This name (a valid DNS name, lower-case).
    Name(String),
    /// No server name at all (`sni=` with nothing after it).
    Omit,
}

impl Sni {
    /// Reads an `sni=` value: empty means none, anything else must be a DNS name.
    pub fn parse(v: &str) -> Result<Sni, LinkError> {
        if v.is_empty() {
            return Ok(Sni::Omit);
        }
        let lower = v.to_ascii_lowercase();
        let lower = lower.strip_suffix('.').unwrap_or(&lower).to_string();
        if lower.parse::<IpAddr>().is_err() && is_valid_dns_name(&lower) && !lower.contains('_') {
            Ok(Sni::Name(lower))
        } else {
            Err(LinkError::BadSni(v.into()))
        }
    }

    /// The name to send when dialling `host`, if any.
    pub fn name_for<'a>(&'a self, host: &'a str) -> Option<&'a str> {
        match self {
            Sni::Host if host.parse::<IpAddr>().is_err() => Some(host),
            Sni::Host | Sni::Omit => None,
            Sni::Name(n) => Some(n),
        }
    }

    /// The value of the link's `sni=` parameter (`None`: the parameter is left out).
    pub fn link_value(&self) -> Option<&str> {
        match self {
            Sni::Host => None,
            Sni::Name(n) => Some(n),
            Sni::Omit => Some(""),
        }
    }

    pub fn is_host(&self) -> bool {
        *self == Sni::Host
    }
}

/// Why a link could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// Not a `postern://proxy` link.
    #[error("not a Postern proxy link: it must start with \"postern://proxy?\"")]
    WrongScheme,
    /// No `host=` parameter.
    #[error("missing host")]
    MissingHost,
    /// `host=` is empty or not a valid name/address.
    #[error("invalid host {0:?}: expected a DNS name, an IPv4 address or [IPv6]")]
    InvalidHost(String),
    /// IPv6 address without brackets.
    #[error("IPv6 host {0:?} must be written in brackets, e.g. [2001:db8::1]")]
    UnbracketedIpv6(String),
    /// A port is not a number in range.
    #[error("{0} must be 1-65535")]
    BadPort(&'static str),
    /// `tls` is not 0/1/true/false.
    #[error("tls must be 1 or 0")]
    BadTls,
    /// `secret` is not a relay secret.
    #[error(
        "secret must be the 43 characters the relay printed (base64url); copy the whole link again"
    )]
    BadSecret,
    /// `sni` is neither empty nor a DNS name.
    #[error("sni {0:?} must be a DNS name (or empty, for none)")]
    BadSni(String),
    /// A parameter appears twice.
    #[error("parameter {0:?} appears more than once")]
    Duplicate(String),
}

impl ProxyLink {
    /// A link with the defaults: port 443, TLS on, no media port.
    pub fn new(host: impl Into<String>) -> Self {
        ProxyLink {
            host: host.into(),
            port: 443,
            tls: true,
            secret: None,
            sni: Sni::Host,
            media: None,
        }
    }
}

fn host_for_display(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

impl fmt::Display for ProxyLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}?host={}&port={}&tls={}",
            host_for_display(&self.host),
            self.port,
            u8::from(self.tls)
        )?;
        if let Some(secret) = &self.secret {
            write!(f, "&secret={secret}")?;
        }
        if let Some(sni) = self.sni.link_value() {
            write!(f, "&sni={sni}")?;
        }
        if let Some(m) = self.media {
            write!(f, "&media={m}")?;
        }
        Ok(())
    }
}

fn parse_host(raw: &str) -> Result<String, LinkError> {
    if raw.is_empty() {
        return Err(LinkError::MissingHost);
    }
    if !raw.starts_with('[') && raw.parse::<Ipv6Addr>().is_ok() {
        return Err(LinkError::UnbracketedIpv6(raw.into()));
    }
    // The shared splitter removes brackets; a host parameter carries no port.
    let host = match crate::net::split_host_port(raw) {
        Ok((h, None)) => h,
        _ => return Err(LinkError::InvalidHost(raw.into())),
    };
    if raw.starts_with('[') {
        return host
            .parse::<Ipv6Addr>()
            .map(|a| a.to_string())
            .map_err(|_| LinkError::InvalidHost(raw.into()));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ip.to_string());
    }
    let lower = host.to_ascii_lowercase();
    let lower = lower.strip_suffix('.').unwrap_or(&lower).to_string();
    if is_valid_dns_name(&lower) && !lower.contains('_') {
        Ok(lower)
    } else {
        Err(LinkError::InvalidHost(raw.into()))
    }
}

fn parse_port(v: &str, what: &'static str) -> Result<u16, LinkError> {
    crate::net::parse_port(v).ok_or(LinkError::BadPort(what))
}

impl FromStr for ProxyLink {
    type Err = LinkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (head, query) = s.split_once('?').unwrap_or((s, ""));
        if !head.eq_ignore_ascii_case(PREFIX) && !head.eq_ignore_ascii_case("postern://proxy/") {
            return Err(LinkError::WrongScheme);
        }
        let query = query.split('#').next().unwrap_or("");
        let (mut host, mut port, mut tls, mut secret, mut media) = (None, None, None, None, None);
        let mut sni = None;
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let slot_dup = |set: bool| {
                if set {
                    Err(LinkError::Duplicate(k.to_string()))
                } else {
                    Ok(())
                }
            };
            match k.as_ref() {
                "host" => {
                    slot_dup(host.is_some())?;
                    host = Some(parse_host(&v)?);
                }
                "port" => {
                    slot_dup(port.is_some())?;
                    port = Some(parse_port(&v, "port")?);
                }
                "tls" => {
                    slot_dup(tls.is_some())?;
                    tls = Some(match v.as_ref() {
                        "1" | "true" => true,
                        "0" | "false" => false,
                        _ => return Err(LinkError::BadTls),
                    });
                }
                "secret" => {
                    slot_dup(secret.is_some())?;
                    secret = Some(v.parse().map_err(|_| LinkError::BadSecret)?);
                }
                "sni" => {
                    slot_dup(sni.is_some())?;
                    sni = Some(Sni::parse(&v)?);
                }
                "media" => {
                    slot_dup(media.is_some())?;
                    media = Some(parse_port(&v, "media port")?);
                }
                _ => {}
            }
        }
        Ok(ProxyLink {
            host: host.ok_or(LinkError::MissingHost)?,
            port: port.unwrap_or(443),
            tls: tls.unwrap_or(true),
            secret,
            sni: sni.unwrap_or_default(),
            media,
        })
    }
}

/// Whether `name` is a syntactically valid DNS name (labels of 1-63 letters, digits,
/// '-' or '_', not starting or ending with '-'; at most 253 bytes).
pub fn is_valid_dns_name(name: &str) -> bool {
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        let l: ProxyLink = "postern://proxy?host=relay.example.org".parse().unwrap();
        assert_eq!(l, ProxyLink::new("relay.example.org"));
        assert_eq!(
            l.to_string(),
            "postern://proxy?host=relay.example.org&port=443&tls=1"
        );
        let l: ProxyLink = "postern://proxy?host=[2001:db8::1]&port=5222&tls=0&media=587"
            .parse()
            .unwrap();
        assert_eq!(l.host, "2001:db8::1");
        assert_eq!((l.port, l.tls, l.media), (5222, false, Some(587)));
        assert_eq!(
            l.to_string(),
            "postern://proxy?host=[2001:db8::1]&port=5222&tls=0&media=587"
        );
        let secret = RelaySecret::generate();
        let text = format!("postern://proxy?host=relay.example.org&port=443&tls=1&secret={secret}");
        let l: ProxyLink = text.parse().unwrap();
        assert_eq!(l.secret.as_ref(), Some(&secret));
        assert_eq!(l.to_string(), text);
    }

    #[test]
    fn sni_names_another_name_or_none() {
        let l: ProxyLink = "postern://proxy?host=203.0.113.7&sni=CDN.Example.net."
            .parse()
            .unwrap();
        assert_eq!(l.sni, Sni::Name("cdn.example.net".into()));
        assert_eq!(l.sni.name_for(&l.host), Some("cdn.example.net"));
        assert!(l.to_string().ends_with("&sni=cdn.example.net"), "{l}");
        let l: ProxyLink = "postern://proxy?host=relay.example.org&sni="
            .parse()
            .unwrap();
        assert_eq!(l.sni, Sni::Omit);
        assert_eq!(l.sni.name_for(&l.host), None);
        assert_eq!(
            l.to_string(),
            "postern://proxy?host=relay.example.org&port=443&tls=1&sni="
        );
        // Without `sni=`: the host if it is a name, nothing for an address.
        assert_eq!(
            Sni::Host.name_for("relay.example.org"),
            Some("relay.example.org")
        );
        assert_eq!(Sni::Host.name_for("203.0.113.7"), None);
        assert_eq!(Sni::Host.name_for("2001:db8::1"), None);
        let e = |s: &str| s.parse::<ProxyLink>().unwrap_err().to_string();
        assert!(e("postern://proxy?host=a.org&sni=10.0.0.1").contains("DNS name"));
        assert!(e("postern://proxy?host=a.org&sni=bad name").contains("DNS name"));
        assert!(e("postern://proxy?host=a.org&sni=&sni=b.org").contains("more than once"));
    }

    #[test]
    fn errors_are_specific() {
        let e = |s: &str| s.parse::<ProxyLink>().unwrap_err().to_string();
        assert_eq!(e("postern://proxy?port=443"), "missing host");
        assert_eq!(e("postern://proxy?host="), "missing host");
        assert_eq!(
            e("postern://proxy?host=a.org&port=0"),
            "port must be 1-65535"
        );
        assert_eq!(
            e("postern://proxy?host=a.org&port=70000"),
            "port must be 1-65535"
        );
        assert_eq!(
            e("postern://proxy?host=a.org&port=x"),
            "port must be 1-65535"
        );
        assert_eq!(
            e("postern://proxy?host=a.org&media=0"),
            "media port must be 1-65535"
        );
        assert_eq!(
            e("postern://proxy?host=a.org&tls=yes"),
            "tls must be 1 or 0"
        );
        assert!(e("https://proxy?host=a.org").contains("postern://proxy"));
        assert!(e("postern://proxy?host=2001:db8::1").contains("brackets"));
        assert!(e("postern://proxy?host=bad_host!").contains("invalid host"));
        assert!(e("postern://proxy?host=a.org&host=b.org").contains("more than once"));
        assert!(e("postern://proxy?host=a.org&secret=abc").contains("43 characters"));
    }

    fn host_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\\.[a-z]{2,6}){1,3}",
            any::<std::net::Ipv4Addr>().prop_map(|a| a.to_string()),
            any::<std::net::Ipv6Addr>().prop_map(|a| a.to_string()),
        ]
    }

    fn sni_strategy() -> impl Strategy<Value = Sni> {
        prop_oneof![
            Just(Sni::Host),
            Just(Sni::Omit),
            "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\\.[a-z]{2,6}){1,3}".prop_map(Sni::Name),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(host in host_strategy(), port in 1u16.., tls: bool,
                      with_secret: bool, sni in sni_strategy(),
                      media in proptest::option::of(1u16..)) {
            let secret = with_secret.then(RelaySecret::generate);
            let link = ProxyLink { host, port, tls, secret, sni, media };
            let parsed: ProxyLink = link.to_string().parse().unwrap();
            prop_assert_eq!(parsed, link);
        }

        #[test]
        fn never_panics(s in "postern://proxy\\?.{0,80}") {
            let _ = s.parse::<ProxyLink>();
        }
    }
}
