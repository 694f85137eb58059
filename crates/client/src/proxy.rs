//! Proxy settings: whether to use relays, and which.
//!
//! A saved proxy is a relay address: host (name, IPv4 or IPv6), chat port, TLS on or off,
//! the relay's secret if it has one, and an optional media port. As in the reference client, a host alone means port 443
//! with TLS. Addresses can also be imported from the links relays print
//! (`postern://proxy?host=…&port=…&tls=1`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use postern_protocol::link::{is_valid_dns_name, ProxyLink, Sni};
use postern_protocol::relay_auth::RelaySecret;
use serde::{Deserialize, Serialize};

/// Whether and how relays are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    /// Direct connections only.
    Off,
    /// Relays only: never a direct connection (for users who must not be seen contacting
    /// the service).
    On,
    /// Direct first, then the saved relays.
    #[default]
    Auto,
}

impl fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProxyMode::Off => "off",
            ProxyMode::On => "on",
            ProxyMode::Auto => "auto",
        })
    }
}

/// Why a proxy mode or address could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyParseError {
    #[error("unknown proxy mode {0:?}: use on, off or auto")]
    Mode(String),
    #[error("invalid proxy link: {0}")]
    Link(String),
    #[error("empty proxy address: give a host name, host:port or a postern://proxy link")]
    Empty,
    #[error("{0:?}: missing ']' after the IPv6 address")]
    UnclosedBracket(String),
    #[error("{0:?}: expected ':PORT' after ']'")]
    AfterBracket(String),
    #[error("{0:?} is not a valid host name or IP address")]
    Host(String),
    #[error("port {0:?} must be a number from 1 to 65535")]
    Port(String),
}

impl FromStr for ProxyMode {
    type Err = ProxyParseError;
    fn from_str(s: &str) -> Result<Self, ProxyParseError> {
        match s {
            "off" => Ok(ProxyMode::Off),
            "on" => Ok(ProxyMode::On),
            "auto" => Ok(ProxyMode::Auto),
            other => Err(ProxyParseError::Mode(other.to_string())),
        }
    }
}

/// One saved relay.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProxyEntry {
    /// DNS name or IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// The relay's secret (from its link): the client proves it holds it, and the relay
    /// shows everyone without it a web site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<RelaySecret>,
    /// The server name its TLS ClientHello carries (from the link's `sni=`).
    #[serde(default, skip_serializing_if = "Sni::is_host")]
    pub sni: Sni,
    pub media: Option<u16>,
}

impl ProxyEntry {
    /// `host:port`, with brackets around IPv6 addresses.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// What was understood, spelled out ("host relay.example.org, port 443, TLS on").
    pub fn describe(&self) -> String {
        let mut s = format!(
            "host {}, port {}, TLS {}",
            self.host,
            self.port,
            if self.tls { "on" } else { "off" }
        );
        if self.secret.is_some() {
            s.push_str(", with secret");
        }
        match &self.sni {
            Sni::Host => {}
            Sni::Name(n) => s.push_str(&format!(", SNI {n}")),
            Sni::Omit => s.push_str(", no SNI"),
        }
        if let Some(m) = self.media {
            s.push_str(&format!(", media port {m}"));
        }
        s
    }

    pub fn to_link(&self) -> ProxyLink {
        ProxyLink {
            host: self.host.clone(),
            port: self.port,
            tls: self.tls,
            secret: self.secret.clone(),
            sni: self.sni.clone(),
            media: self.media,
        }
    }

    /// Reads a proxy link, or an address: `host`, `host:port`, `[v6]`, `[v6]:port` or a
    /// bare IPv6 address. A host alone means port 443 with TLS; with a port, TLS is on
    /// for 443 and off otherwise (override it with the `tls` field afterwards).
    pub fn parse(input: &str) -> Result<Self, ProxyParseError> {
        let input = input.trim();
        if input.contains("://") {
            let link: ProxyLink = input
                .parse()
                .map_err(|e| ProxyParseError::Link(format!("{e}")))?;
            return Ok(Self {
                host: link.host,
                port: link.port,
                tls: link.tls,
                secret: link.secret,
                sni: link.sni,
                media: link.media,
            });
        }
        if input.is_empty() {
            return Err(ProxyParseError::Empty);
        }
        let (host, port) = postern_protocol::net::split_host_port(input).map_err(|e| {
            use postern_protocol::net::HostPortError as E;
            match e {
                E::UnclosedBracket(_) => ProxyParseError::UnclosedBracket(input.to_string()),
                E::AfterBracket(_) => ProxyParseError::AfterBracket(input.to_string()),
                E::Empty => ProxyParseError::Empty,
                E::UnbracketedIpv6(_) => ProxyParseError::Host(input.to_string()),
            }
        })?;
        let host = host.to_ascii_lowercase();
        // Written as the link reader writes it (IP addresses canonical, no '_' in names),
        // so a saved relay always survives being shared as a link.
        let host = match host.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) if is_valid_dns_name(&host) && !host.contains('_') => host,
            Err(_) => return Err(ProxyParseError::Host(host)),
        };
        let port = match port {
            None => 443,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| ProxyParseError::Port(p.to_string()))?,
        };
        Ok(Self {
            host,
            port,
            tls: port == 443,
            secret: None,
            sni: Sni::Host,
            media: None,
        })
    }
}

impl fmt::Display for ProxyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({})",
            self.address(),
            if self.tls { "TLS" } else { "plain" }
        )?;
        match &self.sni {
            Sni::Host => {}
            Sni::Name(n) => write!(f, ", SNI {n}")?,
            Sni::Omit => f.write_str(", no SNI")?,
        }
        if let Some(m) = self.media {
            write!(f, ", media port {m}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `link` fuzz target: `proxy add` took a host the link reader refuses,
    /// so the relay's link (`to_link`) could not be imported again.
    #[test]
    fn hosts_are_only_those_a_link_can_carry() {
        assert_eq!(
            ProxyEntry::parse("________re.mmlPaxorg"),
            Err(ProxyParseError::Host("________re.mmlpaxorg".into()))
        );
        let p = ProxyEntry::parse("[2001:0DB8:0::1]:5222").unwrap();
        assert_eq!(p.host, "2001:db8::1");
        for input in ["[2001:0DB8:0::1]:5222", "relay.example.org", "192.0.2.1:80"] {
            let p = ProxyEntry::parse(input).unwrap();
            assert_eq!(ProxyEntry::parse(&p.to_link().to_string()), Ok(p.clone()));
            let again = ProxyEntry::parse(&p.address()).unwrap();
            assert_eq!((again.host, again.port), (p.host, p.port));
        }
    }

    #[test]
    fn host_alone_means_443_with_tls() {
        let p = ProxyEntry::parse("Relay.Example.org").unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.tls),
            ("relay.example.org", 443, true)
        );
    }

    #[test]
    fn ports_ipv6_and_links() {
        let p = ProxyEntry::parse("relay.example.org:5222").unwrap();
        assert_eq!((p.port, p.tls), (5222, false));
        let p = ProxyEntry::parse("[2001:db8::1]:80").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("2001:db8::1", 80));
        assert_eq!(p.address(), "[2001:db8::1]:80");
        let p = ProxyEntry::parse("2001:db8::2").unwrap();
        assert_eq!((p.port, p.tls), (443, true));
        let p =
            ProxyEntry::parse("postern://proxy?host=r.example&port=8443&tls=1&media=587").unwrap();
        assert_eq!((p.port, p.tls, p.media), (8443, true, Some(587)));
        assert_eq!(ProxyEntry::parse(&p.to_link().to_string()).unwrap(), p);
    }

    #[test]
    fn bad_input_says_what_is_wrong() {
        let text = |input: &str| ProxyEntry::parse(input).unwrap_err().to_string();
        assert!(text("relay:0").contains("1 to 65535"));
        assert!(text("relay:http").contains("1 to 65535"));
        assert!(text("bad host!").contains("not a valid host"));
        assert!(text("[2001:db8::1").contains("']'"));
        assert!(text("postern://proxy?port=1").contains("missing host"));
        assert_eq!(ProxyEntry::parse(""), Err(ProxyParseError::Empty));
        assert!("sometimes"
            .parse::<ProxyMode>()
            .unwrap_err()
            .to_string()
            .contains("on, off or auto"));
    }

    #[test]
    fn the_understood_form_names_every_choice() {
        let p = ProxyEntry::parse("garbage").unwrap();
        assert_eq!(p.describe(), "host garbage, port 443, TLS on");
        let p =
            ProxyEntry::parse("postern://proxy?host=r.example&port=80&tls=0&media=587").unwrap();
        assert_eq!(
            p.describe(),
            "host r.example, port 80, TLS off, media port 587"
        );
    }
}
