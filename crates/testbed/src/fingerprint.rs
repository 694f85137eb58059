//! What a censor reads off a TLS ClientHello in clear: the server name (SNI) and the
//! client's fingerprint, JA4.
//!
//! JA4 is FoxIO's TLS client fingerprint (github.com/FoxIO-LLC/ja4,
//! `technical_details/JA4.md`, BSD 3-Clause), the one Russia's DPI blocked a messenger's
//! proxy clients by in 2026. Its three parts, `a_b_c`:
//!
//! * a: `t`, the highest TLS version offered (`13`), `d` if the hello names a server or
//!   `i` if not, the number of cipher suites and of extensions (two digits each), and the
//!   first and last character of the first ALPN protocol (`h2`, or `00` for none);
//! * b: the first 12 hex digits of SHA-256 over the cipher suites, sorted, as 4-digit hex
//!   joined by commas;
//! * c: the same over the sorted extensions without SNI and ALPN, `_`, and the signature
//!   algorithms in the order sent.
//!
//! GREASE values (RFC 8701) are ignored everywhere. Extension order does not count (Chrome
//! shuffles it per connection), which is what makes JA4 stable where JA3 is not.
//!
//! The hello is framed by [`postern_protocol::client_hello`] and parsed by `tls-parser`.

use sha2::{Digest, Sha256};
use tls_parser::{
    parse_tls_client_hello_extensions, parse_tls_message_handshake, SNIType, TlsExtension,
    TlsExtensionType, TlsMessage, TlsMessageHandshake,
};

/// Why bytes could not be fingerprinted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FingerprintError {
    #[error("not a ClientHello handshake message")]
    NotClientHello,
    #[error("malformed ClientHello extensions")]
    Malformed,
}

/// A ClientHello as a censor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The host name in the SNI extension, lower-case, if any.
    pub sni: Option<String>,
    /// The legacy version field (0x0303 for every modern client).
    pub legacy_version: u16,
    /// Cipher suites in the order sent, GREASE included.
    pub ciphers: Vec<u16>,
    /// Extension types in the order sent, GREASE included.
    pub extensions: Vec<u16>,
    /// Supported groups in order, GREASE included.
    pub groups: Vec<u16>,
    /// Groups with a key share, in order, GREASE included.
    pub key_shares: Vec<u16>,
    /// Signature algorithms in order, GREASE included.
    pub signature_algorithms: Vec<u16>,
    /// Versions in `supported_versions`, GREASE included.
    pub versions: Vec<u16>,
    /// ALPN protocols in order.
    pub alpn: Vec<String>,
}

/// Whether `v` is a GREASE value (0x0a0a, 0x1a1a, ... 0xfafa).
pub fn is_grease(v: u16) -> bool {
    v & 0x0f0f == 0x0a0a && v >> 8 == v & 0xff
}

fn not_grease(v: &[u16]) -> Vec<u16> {
    v.iter().copied().filter(|x| !is_grease(*x)).collect()
}

/// The group ids in a key_share extension body (a u16-length list of group, u16-length
/// key exchange).
fn key_share_groups(mut body: &[u8]) -> Vec<u16> {
    let mut groups = Vec::new();
    if body.len() < 2 {
        return groups;
    }
    body = &body[2..];
    while body.len() >= 4 {
        groups.push(u16::from_be_bytes([body[0], body[1]]));
        let len = u16::from_be_bytes([body[2], body[3]]) as usize;
        body = body.get(4 + len..).unwrap_or_default();
    }
    groups
}

impl Hello {
    /// Reads a ClientHello handshake message (type, length, body), as
    /// [`postern_protocol::client_hello`] reassembles it.
    pub fn parse(message: &[u8]) -> Result<Hello, FingerprintError> {
        let (_, parsed) =
            parse_tls_message_handshake(message).map_err(|_| FingerprintError::NotClientHello)?;
        let TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch)) = parsed else {
            return Err(FingerprintError::NotClientHello);
        };
        let mut hello = Hello {
            sni: None,
            legacy_version: ch.version.0,
            ciphers: ch.ciphers.iter().map(|c| c.0).collect(),
            extensions: Vec::new(),
            groups: Vec::new(),
            key_shares: Vec::new(),
            signature_algorithms: Vec::new(),
            versions: Vec::new(),
            alpn: Vec::new(),
        };
        let (_, extensions) = parse_tls_client_hello_extensions(ch.ext.unwrap_or_default())
            .map_err(|_| FingerprintError::Malformed)?;
        for ext in &extensions {
            let kind = match ext {
                // tls-parser folds every GREASE extension into one type; keep its value.
                TlsExtension::Grease(v, _) => *v,
                other => TlsExtensionType::from(other).0,
            };
            hello.extensions.push(kind);
            match ext {
                TlsExtension::SNI(names) => {
                    hello.sni = names
                        .iter()
                        .find(|(t, _)| *t == SNIType::HostName)
                        .and_then(|(_, n)| std::str::from_utf8(n).ok())
                        .map(|n| n.to_ascii_lowercase());
                }
                TlsExtension::EllipticCurves(g) => hello.groups = g.iter().map(|g| g.0).collect(),
                TlsExtension::KeyShare(body) => hello.key_shares = key_share_groups(body),
                TlsExtension::SignatureAlgorithms(s) => hello.signature_algorithms = s.clone(),
                TlsExtension::SupportedVersions(v) => {
                    hello.versions = v.iter().map(|v| v.0).collect()
                }
                TlsExtension::ALPN(protocols) => {
                    hello.alpn = protocols
                        .iter()
                        .map(|p| String::from_utf8_lossy(p).into_owned())
                        .collect()
                }
                _ => {}
            }
        }
        Ok(hello)
    }

    /// The JA4 fingerprint (see the module documentation).
    pub fn ja4(&self) -> String {
        let version = not_grease(&self.versions)
            .into_iter()
            .max()
            .unwrap_or(self.legacy_version);
        let version = match version {
            0x0304 => "13",
            0x0303 => "12",
            0x0302 => "11",
            0x0301 => "10",
            0x0300 => "s3",
            _ => "00",
        };
        let ciphers = not_grease(&self.ciphers);
        let extensions = not_grease(&self.extensions);
        let alpn = match self.alpn.first().map(|p| p.as_bytes()) {
            Some([only]) => alpn_chars(*only, *only),
            Some([first, .., last]) => alpn_chars(*first, *last),
            _ => "00".to_string(),
        };
        let a = format!(
            "t{version}{}{:02}{:02}{alpn}",
            if self.sni.is_some() { 'd' } else { 'i' },
            ciphers.len().min(99),
            extensions.len().min(99),
        );
        let mut sorted_ciphers = ciphers;
        sorted_ciphers.sort_unstable();
        let b = truncated_hash(&hex_list(&sorted_ciphers), sorted_ciphers.is_empty());
        let mut sorted_ext: Vec<u16> = extensions
            .into_iter()
            .filter(|e| *e != 0x0000 && *e != 0x0010)
            .collect();
        sorted_ext.sort_unstable();
        let sigalgs = not_grease(&self.signature_algorithms);
        let mut c_input = hex_list(&sorted_ext);
        if !sigalgs.is_empty() {
            c_input.push('_');
            c_input.push_str(&hex_list(&sigalgs));
        }
        let c = truncated_hash(&c_input, sorted_ext.is_empty());
        format!("{a}_{b}_{c}")
    }
}

/// JA4's ALPN characters: the first and last character when both are ASCII letters or
/// digits, else the first hex digit of the first byte and the last of the last.
fn alpn_chars(first: u8, last: u8) -> String {
    if first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric() {
        format!("{}{}", first as char, last as char)
    } else {
        let f = format!("{first:02x}");
        let l = format!("{last:02x}");
        format!("{}{}", &f[..1], &l[1..])
    }
}

fn hex_list(v: &[u16]) -> String {
    v.iter()
        .map(|x| format!("{x:04x}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn truncated_hash(s: &str, empty: bool) -> String {
    if empty {
        return "000000000000".into();
    }
    let digest = Sha256::digest(s.as_bytes());
    hex::encode(digest)[..12].to_string()
}

/// The JA4 of a rustls client with its defaults (the `ring` provider, TLS 1.3 and 1.2,
/// no ALPN) connecting by name — what Postern's client sent before it spoke like a
/// browser, and what the testbed's `ja4-block` profile blocks. A test below checks it
/// against the hello rustls really writes, so a rustls update cannot silently change it.
pub const RUSTLS_DEFAULT_JA4: &str = "t13d101000_61a7ad8aa9b6_3fcd1a44f3e3";

/// The ClientHello a rustls client with Postern's former relay settings writes, reassembled.
#[cfg(test)]
pub(crate) fn rustls_hello(name: &str) -> Vec<u8> {
    let config = std::sync::Arc::new(postern_protocol::tls::relay_client_config());
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut wire = Vec::new();
    conn.write_tls(&mut wire).unwrap();
    match postern_protocol::client_hello::examine(&wire, 16384).unwrap() {
        postern_protocol::client_hello::Framing::Complete(m) => m,
        other => panic!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_default_fingerprint_is_the_one_ja4_block_lists() {
        let hello = Hello::parse(&rustls_hello("relay-a.postern.test")).unwrap();
        assert_eq!(hello.sni.as_deref(), Some("relay-a.postern.test"));
        assert_eq!(hello.ja4(), RUSTLS_DEFAULT_JA4, "{hello:?}");
    }

    /// A published Chrome 143 hello (browserleaks.com's TLS page, its `ja4_r` lists: the
    /// raw values the fingerprint is made of) and its published JA4.
    fn chrome_143() -> Hello {
        Hello {
            sni: Some("tls.browserleaks.com".into()),
            legacy_version: 0x0303,
            ciphers: vec![
                0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, 0xc013,
                0xc014, 0x009c, 0x009d, 0x002f, 0x0035,
            ],
            extensions: vec![
                0x002d, 0x0033, 0x0010, 0xfe0d, 0x0017, 0x44cd, 0x0000, 0x000b, 0x000a, 0x002b,
                0xff01, 0x0023, 0x0012, 0x0005, 0x000d, 0x001b,
            ],
            groups: vec![0x11ec, 0x001d, 0x0017, 0x0018],
            key_shares: vec![0x11ec, 0x001d],
            signature_algorithms: vec![
                0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601,
            ],
            versions: vec![0x0304, 0x0303],
            alpn: vec!["h2".into(), "http/1.1".into()],
        }
    }

    #[test]
    fn a_published_chrome_fingerprint() {
        let hello = chrome_143();
        assert_eq!(hello.ja4(), "t13d1516h2_8daaf6152771_d8a2da3f94cd");
        // GREASE anywhere changes nothing.
        let mut greased = hello.clone();
        greased.ciphers.insert(0, 0x3a3a);
        greased.extensions.insert(3, 0x5a5a);
        greased.signature_algorithms.insert(0, 0x1a1a);
        greased.versions.insert(0, 0x7a7a);
        assert_eq!(greased.ja4(), hello.ja4());
        // Extension order does not count.
        let mut shuffled = hello.clone();
        shuffled.extensions.reverse();
        assert_eq!(shuffled.ja4(), hello.ja4());
        // No server name (and so one extension fewer), no ALPN.
        let mut bare = hello.clone();
        bare.sni = None;
        bare.extensions.retain(|e| *e != 0x0000);
        bare.alpn.clear();
        assert!(
            bare.ja4().starts_with("t13i151500_8daaf6152771_"),
            "{}",
            bare.ja4()
        );
    }

    #[test]
    fn grease_values() {
        assert!(is_grease(0x0a0a) && is_grease(0xfafa) && is_grease(0x4a4a));
        assert!(!is_grease(0x0a1a) && !is_grease(0x1301) && !is_grease(0x001d));
    }

    #[test]
    fn alpn_characters_outside_ascii_are_written_in_hex() {
        assert_eq!(alpn_chars(b'h', b'2'), "h2");
        assert_eq!(alpn_chars(0xab, b'2'), "a2");
    }

    #[test]
    fn garbage_is_refused_not_fingerprinted() {
        assert_eq!(
            Hello::parse(b"\x02\x00\x00\x01\x00"),
            Err(FingerprintError::NotClientHello)
        );
        assert!(Hello::parse(&[]).is_err());
    }
}
