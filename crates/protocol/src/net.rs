//! Addresses as the per-address limits see them, and which peers may send a PROXY header.
//!
//! One implementation for the server and the relay, so the two cannot drift:
//!
//! * [`SourceKey`]: the unit a per-address limit counts. An IPv4-mapped IPv6 address
//!   (`::ffff:192.0.2.1`) is the IPv4 address it maps; any other IPv6 address counts by its
//!   /64, the prefix one subscriber is normally given (so a client cannot dodge a limit by
//!   walking through the 2^64 addresses of its own network).
//! * [`Cidr`] and [`TrustedProxies`]: the `--trusted-proxy CIDR` lists. A PROXY header is
//!   believed only from a peer inside one of them; from anyone else it is ignored and the
//!   peer's own address is used.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

/// The key a per-address limit counts by (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey(IpAddr);

impl SourceKey {
    /// The key of `ip`: IPv4 (also when IPv4-mapped) as is, IPv6 by its /64.
    pub fn of(ip: IpAddr) -> Self {
        match unmap(ip) {
            IpAddr::V4(v4) => SourceKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => {
                let s = v6.segments();
                SourceKey(IpAddr::V6(Ipv6Addr::new(
                    s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                )))
            }
        }
    }

    /// The address this key stands for (an IPv6 key is its /64 prefix, host bits zero).
    pub fn ip(&self) -> IpAddr {
        self.0
    }
}

impl fmt::Display for SourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

/// `::ffff:a.b.c.d` becomes `a.b.c.d`; every other address is returned unchanged.
pub fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Why an address could not be split into host and port.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPortError {
    #[error("the address is empty")]
    Empty,
    #[error("{0:?}: '[' without a closing ']'")]
    UnclosedBracket(String),
    #[error("{0:?}: after \"]\" only \":PORT\" may follow")]
    AfterBracket(String),
    #[error(
        "{0:?}: an IPv6 address with a port must be written in brackets, e.g. [2001:db8::1]:443"
    )]
    UnbracketedIpv6(String),
}

/// Splits `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address into the host
/// (without brackets) and the port text, if any. The one host:port splitter of the
/// project (network files, relay configuration, proxy addresses, links): callers check
/// the host and port they need.
pub fn split_host_port(input: &str) -> Result<(&str, Option<&str>), HostPortError> {
    if input.is_empty() {
        return Err(HostPortError::Empty);
    }
    if let Some(rest) = input.strip_prefix('[') {
        let (host, tail) = rest
            .split_once(']')
            .ok_or_else(|| HostPortError::UnclosedBracket(input.to_string()))?;
        return match tail {
            "" => Ok((host, None)),
            t => t
                .strip_prefix(':')
                .map(|p| (host, Some(p)))
                .ok_or_else(|| HostPortError::AfterBracket(input.to_string())),
        };
    }
    if input.parse::<Ipv6Addr>().is_ok() {
        return Ok((input, None));
    }
    match input.rsplit_once(':') {
        Some((h, _)) if h.contains(':') => Err(HostPortError::UnbracketedIpv6(input.to_string())),
        Some((h, p)) => Ok((h, Some(p))),
        None => Ok((input, None)),
    }
}

/// A port number 1-65535.
pub fn parse_port(text: &str) -> Option<u16> {
    text.parse::<u16>().ok().filter(|p| *p != 0)
}

/// Why a CIDR block could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error(
        "{0:?} is not an IP address or CIDR block (examples: 10.0.0.5, 10.0.0.0/8, 2001:db8::/32)"
    )]
    Address(String),
    #[error("{input:?}: prefix length must be 0-{max}")]
    Prefix { input: String, max: u8 },
}

/// An address block such as `10.0.0.0/8` or `2001:db8::/32`; a bare address is a block of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` (unmapped first) lies in this block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, unmap(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = mask32(self.prefix);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = mask128(self.prefix);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

fn mask32(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

fn mask128(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix))
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr = addr
            .strip_prefix('[')
            .and_then(|a| a.strip_suffix(']'))
            .unwrap_or(addr);
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| CidrError::Address(s.to_string()))?;
        let ip = unmap(ip);
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => {
                p.parse::<u8>()
                    .ok()
                    .filter(|p| *p <= max)
                    .ok_or_else(|| CidrError::Prefix {
                        input: s.to_string(),
                        max,
                    })?
            }
        };
        let network = match ip {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(prefix))),
        };
        Ok(Cidr { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The peers whose PROXY headers are believed. Empty (the default) trusts no one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    pub fn new(blocks: Vec<Cidr>) -> Self {
        TrustedProxies(blocks)
    }

    /// Whether a PROXY header from `peer` may be believed.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(peer))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The client address to count and log: the header's source when `peer` is trusted
    /// and the header names one, else the peer itself.
    pub fn client_address(&self, peer: SocketAddr, claimed: Option<SocketAddr>) -> SocketAddr {
        match claimed {
            Some(c) if self.trusts(peer.ip()) => c,
            _ => peer,
        }
    }

    pub fn blocks(&self) -> &[Cidr] {
        &self.0
    }
}

/// Concurrent connections per [`SourceKey`], released when a [`SourceSlot`] is dropped.
/// The server and the relay both count with this.
#[derive(Debug)]
pub struct PerSource {
    max: usize,
    open: Mutex<HashMap<SourceKey, usize>>,
}

/// One connection's place in its source's allowance.
#[derive(Debug)]
pub struct SourceSlot {
    limit: Arc<PerSource>,
    key: Option<SourceKey>,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            let mut map = self.limit.open.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
    }
}

impl PerSource {
    /// At most `max` concurrent connections per source; `0` means no limit.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(PerSource {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a connection from `ip`, or `None` when its source has `max` open.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        if self.max == 0 {
            return Some(SourceSlot {
                limit: self.clone(),
                key: None,
            });
        }
        let key = SourceKey::of(ip);
        let mut map = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            limit: self.clone(),
            key: Some(key),
        })
    }

    /// Sources with at least one connection open (memory is bounded by connections).
    pub fn sources(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_is_unmapped() {
        assert_eq!(
            SourceKey::of(ip("2001:db8:1:2::1")),
            SourceKey::of(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            SourceKey::of(ip("2001:db8:1:2::1")),
            SourceKey::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            SourceKey::of(ip("::ffff:192.0.2.1")),
            SourceKey::of(ip("192.0.2.1"))
        );
        assert_ne!(
            SourceKey::of(ip("192.0.2.1")),
            SourceKey::of(ip("192.0.2.2"))
        );
        assert_eq!(
            SourceKey::of(ip("2001:db8::7")).to_string(),
            "2001:db8::/64"
        );
    }

    #[test]
    fn per_source_slots_are_released() {
        let l = PerSource::new(1);
        let a = l.try_acquire(ip("2001:db8::1")).unwrap();
        assert!(l.try_acquire(ip("2001:db8::2")).is_none(), "same /64");
        let _b = l.try_acquire(ip("192.0.2.1")).unwrap();
        assert!(
            l.try_acquire(ip("::ffff:192.0.2.1")).is_none(),
            "mapped = IPv4"
        );
        drop(a);
        assert!(l.try_acquire(ip("2001:db8::2")).is_some());
        assert!(PerSource::new(0).try_acquire(ip("192.0.2.1")).is_some());
    }

    #[test]
    fn host_port_splitting() {
        assert_eq!(
            split_host_port("a.example:80"),
            Ok(("a.example", Some("80")))
        );
        assert_eq!(split_host_port("a.example"), Ok(("a.example", None)));
        assert_eq!(split_host_port("[::1]:443"), Ok(("::1", Some("443"))));
        assert_eq!(split_host_port("[::1]"), Ok(("::1", None)));
        assert_eq!(split_host_port("2001:db8::1"), Ok(("2001:db8::1", None)));
        assert!(matches!(
            split_host_port("::1:443x"),
            Err(HostPortError::UnbracketedIpv6(_))
        ));
        assert!(matches!(
            split_host_port("[::1"),
            Err(HostPortError::UnclosedBracket(_))
        ));
        assert!(matches!(
            split_host_port("[::1]x"),
            Err(HostPortError::AfterBracket(_))
        ));
        assert_eq!(split_host_port(""), Err(HostPortError::Empty));
        assert_eq!(parse_port("0"), None);
        assert_eq!(parse_port("65535"), Some(65535));
    }

    #[test]
    fn cidr_blocks() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains(ip("10.1.200.3")) && !c.contains(ip("10.2.0.1")));
        assert!(
            c.contains(ip("::ffff:10.1.0.9")),
            "mapped addresses match IPv4 blocks"
        );
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")) && !v6.contains(ip("2001:db9::1")));
        assert!("0.0.0.0/0"
            .parse::<Cidr>()
            .unwrap()
            .contains(ip("203.0.113.1")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("example.org".parse::<Cidr>().is_err());
        assert_eq!(
            "10.1.2.3/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
    }

    #[test]
    fn only_trusted_peers_set_the_client_address() {
        let t = TrustedProxies::new(vec!["127.0.0.1".parse().unwrap()]);
        let claimed: SocketAddr = "198.51.100.1:4000".parse().unwrap();
        let relay: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let stranger: SocketAddr = "127.0.0.2:5000".parse().unwrap();
        assert_eq!(t.client_address(relay, Some(claimed)), claimed);
        assert_eq!(t.client_address(stranger, Some(claimed)), stranger);
        assert_eq!(
            TrustedProxies::default().client_address(relay, Some(claimed)),
            relay
        );
    }
}
