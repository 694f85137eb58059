//! Named censor profiles and the nftables rule set each one installs.
//!
//! A profile is data: addresses and ports dropped for flows coming from the client's
//! interface, an optional first-packet inspection (DPI) with the ports it covers, and
//! whether every flow freezes after a number of bytes to the client ([`crate::freeze`]).
//! To add a profile, add an entry to [`PROFILES`] (and its expectations to `testbed/run`).

use std::net::Ipv4Addr;

/// The nftables table the censor owns (deleted on exit).
pub const TABLE: &str = "postern_censor";

/// A host of the testbed, resolved to an address from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    Server,
    RelayA,
}

/// First-packet inspection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dpi {
    /// Bock et al. 2020: on these ports, only DNS/HTTP/TLS-looking first data passes.
    Allowlist(&'static [u16]),
    /// Wu et al. 2023: on every TCP port, random-looking first data is black-holed.
    FullyEncrypted,
    /// On every TCP port, TLS flows whose ClientHello names one of these servers (SNI)
    /// are black-holed.
    SniBlock(&'static [&'static str]),
    /// On every TCP port, TLS flows whose ClientHello has one of these JA4 fingerprints
    /// are black-holed.
    Ja4Block(&'static [&'static str]),
}

impl Dpi {
    /// Whether the interceptor must read the whole TLS ClientHello (not only the first
    /// data) to decide.
    pub fn reads_client_hello(&self) -> bool {
        matches!(self, Dpi::SniBlock(_) | Dpi::Ja4Block(_))
    }
}

/// The names the testbed's relays are published under (resolved in the client's
/// namespace by its own hosts file; `testbed/run` writes it).
pub const RELAY_NAMES: &[&str] = &["relay-a.postern.test", "relay-b.postern.test"];

#[derive(Debug, Clone, Copy)]
pub struct Profile {
    pub name: &'static str,
    pub summary: &'static str,
    /// The published measurement the profile models.
    pub source: &'static str,
    pub block_hosts: &'static [Host],
    pub block_ports: &'static [u16],
    pub dpi: Option<Dpi>,
    /// Every TCP flow from the client goes through the interceptor, which stops forwarding
    /// (silently, in both directions) once the flow has delivered `--freeze-after` bytes
    /// to the client.
    pub freeze: bool,
}

pub const PROFILES: &[Profile] = &[
    Profile {
        name: "none",
        summary: "no censorship (the baseline)",
        source: "-",
        block_hosts: &[],
        block_ports: &[],
        dpi: None,
        freeze: false,
    },
    Profile {
        name: "ip-block",
        summary: "the server's address is unreachable",
        source: "IP blocking of published endpoints",
        block_hosts: &[Host::Server],
        block_ports: &[],
        dpi: None,
        freeze: false,
    },
    Profile {
        name: "port-block",
        summary: "TCP port 5222 blocked to everyone, plus ip-block",
        source: "port blocking of the messenger's default port",
        block_hosts: &[Host::Server],
        block_ports: &[5222],
        dpi: None,
        freeze: false,
    },
    Profile {
        name: "protocol-allowlist",
        summary: "on 53/80/443 first data that is not DNS/HTTP/TLS is black-holed, plus port-block",
        source: "Bock et al., FOCI 2020 (Iran's protocol filter)",
        block_hosts: &[Host::Server],
        block_ports: &[5222],
        dpi: Some(Dpi::Allowlist(&[53, 80, 443])),
        freeze: false,
    },
    Profile {
        name: "fully-encrypted",
        summary: "random-looking first data on any TCP port is black-holed, plus ip-block",
        source: "Wu et al., USENIX Security 2023 (China's fully-encrypted-traffic detector)",
        block_hosts: &[Host::Server],
        block_ports: &[],
        dpi: Some(Dpi::FullyEncrypted),
        freeze: false,
    },
    Profile {
        name: "sni-block",
        summary: "TLS flows naming relay-a.postern.test or relay-b.postern.test (SNI) are black-holed, plus ip-block",
        source: "net4people/bbs #516, #579 (SNI block lists on mobile networks during shutdowns)",
        block_hosts: &[Host::Server],
        block_ports: &[],
        dpi: Some(Dpi::SniBlock(RELAY_NAMES)),
        freeze: false,
    },
    Profile {
        name: "ja4-block",
        summary: "TLS flows with rustls's default ClientHello (by JA4) are black-holed, plus ip-block",
        source: "telemt README, tdesktop PRs (Russia, June 2026: a messenger's proxy clients blocked by the JA4 of their ClientHello)",
        block_hosts: &[Host::Server],
        block_ports: &[],
        dpi: Some(Dpi::Ja4Block(&[crate::fingerprint::RUSTLS_DEFAULT_JA4])),
        freeze: false,
    },
    Profile {
        name: "relay-a-blocked",
        summary: "protocol-allowlist, and relay A's address is blocked too",
        source: "IP blocking of published relays",
        block_hosts: &[Host::Server, Host::RelayA],
        block_ports: &[5222],
        dpi: Some(Dpi::Allowlist(&[53, 80, 443])),
        freeze: false,
    },
    Profile {
        name: "flow-freeze",
        summary: "every TCP flow goes silent (no RST, no FIN) after --freeze-after bytes (16 KiB) to the client",
        source: "net4people/bbs #490 (Russia 2025: flows stop after ~15-20 KB server to client)",
        block_hosts: &[],
        block_ports: &[],
        dpi: None,
        freeze: true,
    },
];

pub fn find(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name == name)
}

/// Where the testbed's hosts are, and where the interceptor listens.
#[derive(Debug, Clone)]
pub struct Network {
    /// The interface the client's traffic arrives on.
    pub client_if: String,
    pub server: Ipv4Addr,
    pub relay_a: Ipv4Addr,
    pub intercept_port: u16,
}

impl Network {
    fn addr(&self, h: Host) -> Ipv4Addr {
        match h {
            Host::Server => self.server,
            Host::RelayA => self.relay_a,
        }
    }
}

fn set<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    let v: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    format!("{{ {} }}", v.join(", "))
}

impl Profile {
    /// Whether flows go through the interceptor (for inspection or to be frozen).
    pub fn intercepts(&self) -> bool {
        self.dpi.is_some() || self.freeze
    }

    /// The nftables script (for `nft -f -`) that installs this profile. Drops come first
    /// (in a prerouting chain ahead of NAT), so a blocked address is never intercepted;
    /// flows to inspect (or to freeze) are redirected to the local interceptor.
    pub fn ruleset(&self, net: &Network) -> String {
        let iif = &net.client_if;
        let mut s = format!("table inet {TABLE} {{\n");
        s.push_str(
            "  chain drops {\n    type filter hook prerouting priority -200; policy accept;\n",
        );
        if !self.block_hosts.is_empty() {
            let hosts = set(self.block_hosts.iter().map(|h| net.addr(*h)));
            s.push_str(&format!(
                "    iifname \"{iif}\" ip daddr {hosts} counter drop comment \"blocked addresses\"\n"
            ));
        }
        if !self.block_ports.is_empty() {
            let ports = set(self.block_ports);
            s.push_str(&format!(
                "    iifname \"{iif}\" tcp dport {ports} counter drop comment \"blocked ports\"\n"
            ));
        }
        s.push_str("  }\n");
        if self.intercepts() {
            let port = net.intercept_port;
            s.push_str(
                "  chain inspect {\n    type nat hook prerouting priority dstnat; policy accept;\n",
            );
            match self.dpi {
                _ if self.freeze => s.push_str(&format!(
                    "    iifname \"{iif}\" meta l4proto tcp counter redirect to :{port} comment \"flow freeze\"\n"
                )),
                Some(Dpi::Allowlist(ports)) => s.push_str(&format!(
                    "    iifname \"{iif}\" tcp dport {} counter redirect to :{port} comment \"first-packet allow-list\"\n",
                    set(ports)
                )),
                Some(Dpi::FullyEncrypted) => s.push_str(&format!(
                    "    iifname \"{iif}\" meta l4proto tcp counter redirect to :{port} comment \"fully-encrypted detector\"\n"
                )),
                Some(Dpi::SniBlock(_)) => s.push_str(&format!(
                    "    iifname \"{iif}\" meta l4proto tcp counter redirect to :{port} comment \"SNI block list\"\n"
                )),
                Some(Dpi::Ja4Block(_)) => s.push_str(&format!(
                    "    iifname \"{iif}\" meta l4proto tcp counter redirect to :{port} comment \"JA4 block list\"\n"
                )),
                None => {}
            }
            s.push_str("  }\n");
        }
        s.push_str("}\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> Network {
        Network {
            client_if: "cli0".into(),
            server: Ipv4Addr::new(10, 66, 4, 2),
            relay_a: Ipv4Addr::new(10, 66, 2, 2),
            intercept_port: 15001,
        }
    }

    #[test]
    fn names_are_unique_and_the_issue_names_exist() {
        for n in [
            "ip-block",
            "port-block",
            "protocol-allowlist",
            "fully-encrypted",
            "relay-a-blocked",
            "flow-freeze",
            "sni-block",
            "ja4-block",
        ] {
            assert!(find(n).is_some(), "{n}");
        }
        let mut names: Vec<_> = PROFILES.iter().map(|p| p.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), PROFILES.len());
    }

    #[test]
    fn rulesets_drop_and_redirect_what_the_profile_says() {
        let r = find("relay-a-blocked").unwrap().ruleset(&net());
        assert!(
            r.contains("ip daddr { 10.66.4.2, 10.66.2.2 } counter drop"),
            "{r}"
        );
        assert!(r.contains("tcp dport { 5222 } counter drop"), "{r}");
        assert!(
            r.contains("tcp dport { 53, 80, 443 } counter redirect to :15001"),
            "{r}"
        );
        let r = find("fully-encrypted").unwrap().ruleset(&net());
        assert!(
            r.contains("meta l4proto tcp counter redirect to :15001"),
            "{r}"
        );
        assert!(!r.contains("5222"), "{r}");
        let r = find("none").unwrap().ruleset(&net());
        assert!(
            !r.contains("counter drop") && !r.contains("redirect"),
            "{r}"
        );
    }

    #[test]
    fn sni_and_ja4_block_inspect_every_tcp_flow_and_name_their_sources() {
        let p = find("sni-block").unwrap();
        assert_eq!(p.dpi, Some(Dpi::SniBlock(RELAY_NAMES)));
        assert!(p.source.contains("net4people/bbs #516"), "{}", p.source);
        assert!(p
            .ruleset(&net())
            .contains("meta l4proto tcp counter redirect to :15001 comment \"SNI block list\""));
        let p = find("ja4-block").unwrap();
        assert_eq!(
            p.dpi,
            Some(Dpi::Ja4Block(&[crate::fingerprint::RUSTLS_DEFAULT_JA4]))
        );
        assert!(p.source.contains("telemt"), "{}", p.source);
        assert!(p.ruleset(&net()).contains("comment \"JA4 block list\""));
        for p in [find("sni-block").unwrap(), find("ja4-block").unwrap()] {
            assert!(p.dpi.unwrap().reads_client_hello() && p.block_hosts == [Host::Server]);
        }
    }

    #[test]
    fn flow_freeze_intercepts_every_tcp_flow_and_blocks_nothing() {
        let p = find("flow-freeze").unwrap();
        assert!(p.freeze && p.dpi.is_none() && p.intercepts());
        assert!(p.source.contains("net4people/bbs #490"), "{}", p.source);
        let r = p.ruleset(&net());
        assert!(
            r.contains(
                "iifname \"cli0\" meta l4proto tcp counter redirect to :15001 comment \"flow freeze\""
            ),
            "{r}"
        );
        assert!(!r.contains("counter drop"), "{r}");
        assert!(!r.contains("dport"), "{r}");
        assert!(!r.contains("daddr"), "{r}");
        // Only flow-freeze freezes; the others keep their rules.
        for q in PROFILES.iter().filter(|q| q.name != "flow-freeze") {
            assert!(!q.freeze, "{}", q.name);
            assert_eq!(q.intercepts(), q.dpi.is_some(), "{}", q.name);
        }
    }
}
