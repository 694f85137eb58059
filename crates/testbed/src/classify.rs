//! Classifiers for the first client data of a TCP flow, as published censors apply them.
//!
//! * [`allowlist`]: Iran's protocol filter (Bock et al., FOCI 2020): on the filtered ports
//!   only flows whose first data looks like DNS, HTTP or TLS go through.
//! * [`fully_encrypted`]: China's detector of fully encrypted traffic (Wu et al., USENIX
//!   Security 2023, Algorithm 1): a first packet is blocked unless one of five exemptions
//!   applies.
//! * [`sni_block`] and [`ja4_block`]: block lists applied to a whole TLS ClientHello, by
//!   the server name it carries (net4people/bbs #516, #579) or by its JA4 fingerprint
//!   (Russia 2026; telemt README, tdesktop PRs); see [`crate::fingerprint`].

use std::fmt;

/// What the censor does with a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Forwarded; the reason names the rule that let it through.
    Allow(String),
    /// Black-holed; the reason says why.
    Block(String),
}

impl Verdict {
    pub fn is_block(&self) -> bool {
        matches!(self, Verdict::Block(_))
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Allow(r) => write!(f, "allow ({r})"),
            Verdict::Block(r) => write!(f, "block ({r})"),
        }
    }
}

/// ASCII printable, as in Wu et al.: 0x20..=0x7e.
pub fn is_printable(b: u8) -> bool {
    (0x20..=0x7e).contains(&b)
}

/// Average number of set bits per byte (popcount(data) / len(data)).
pub fn bits_per_byte(data: &[u8]) -> f64 {
    if data.is_empty() {
        return 0.0;
    }
    let ones: u32 = data.iter().map(|b| b.count_ones()).sum();
    f64::from(ones) / data.len() as f64
}

/// Length of the longest run of printable bytes.
pub fn longest_printable_run(data: &[u8]) -> usize {
    let (mut best, mut run) = (0, 0);
    for &b in data {
        if is_printable(b) {
            run += 1;
            best = best.max(run);
        } else {
            run = 0;
        }
    }
    best
}

/// A TLS record header: content type handshake or application data, major version 3,
/// minor version 0-9 (Wu et al.'s `[\x16-\x17]\x03[\x00-\x09]`).
pub fn looks_tls(data: &[u8]) -> bool {
    data.len() >= 3 && matches!(data[0], 0x16 | 0x17) && data[1] == 0x03 && data[2] <= 0x09
}

/// An HTTP request line: a method and a space.
pub fn looks_http(data: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"HEAD ",
        b"DELETE ",
        b"OPTIONS ",
        b"CONNECT ",
        b"PATCH ",
        b"TRACE ",
    ];
    METHODS.iter().any(|m| data.starts_with(m))
}

/// Wu et al.'s narrower HTTP exemption: the first four bytes are `GET `, `PUT `, `POST`
/// or `HEAD`.
fn wu_http(data: &[u8]) -> bool {
    [b"GET ", b"PUT ", b"POST", b"HEAD"]
        .iter()
        .any(|m| data.starts_with(*m))
}

/// A DNS query over TCP: a 2-byte length equal to what follows (at least a header), then
/// a header with QR = 0, opcode QUERY, 1-16 questions and no answers.
pub fn looks_dns(data: &[u8]) -> bool {
    if data.len() < 2 + 12 {
        return false;
    }
    let len = usize::from(u16::from_be_bytes([data[0], data[1]]));
    let h = &data[2..];
    let qr_opcode = h[2] & 0xf8;
    let qdcount = u16::from_be_bytes([h[4], h[5]]);
    let ancount = u16::from_be_bytes([h[6], h[7]]);
    len == h.len() && qr_opcode == 0 && (1..=16).contains(&qdcount) && ancount == 0
}

/// Bock et al. 2020: only DNS-, HTTP- or TLS-looking first data passes the filtered ports.
pub fn allowlist(data: &[u8]) -> Verdict {
    if looks_http(data) {
        Verdict::Allow("HTTP request".into())
    } else if looks_tls(data) {
        Verdict::Allow("TLS record".into())
    } else if looks_dns(data) {
        Verdict::Allow("DNS query".into())
    } else {
        Verdict::Block("first data is not HTTP, TLS or DNS".into())
    }
}

/// Wu et al. 2023, Algorithm 1: block a first packet unless
/// 1. popcount per byte <= 3.4 or >= 4.6,
/// 2. its first six bytes are printable,
/// 3. more than half of it is printable,
/// 4. it holds more than 20 contiguous printable bytes, or
/// 5. it starts like TLS or HTTP.
pub fn fully_encrypted(data: &[u8]) -> Verdict {
    if data.is_empty() {
        return Verdict::Allow("no data".into());
    }
    let density = bits_per_byte(data);
    if density <= 3.4 || density >= 4.6 {
        return Verdict::Allow(format!("Ex1: {density:.2} bits/byte outside 3.4-4.6"));
    }
    if data.len() >= 6 && data[..6].iter().all(|&b| is_printable(b)) {
        return Verdict::Allow("Ex2: printable first 6 bytes".into());
    }
    let printable = data.iter().filter(|&&b| is_printable(b)).count();
    if printable * 2 > data.len() {
        return Verdict::Allow(format!("Ex3: {printable}/{} bytes printable", data.len()));
    }
    let run = longest_printable_run(data);
    if run > 20 {
        return Verdict::Allow(format!("Ex4: printable run of {run}"));
    }
    if looks_tls(data) || wu_http(data) {
        return Verdict::Allow("Ex5: TLS or HTTP header".into());
    }
    Verdict::Block(format!(
        "looks random: {density:.2} bits/byte, {printable}/{} printable, longest printable run {run}",
        data.len()
    ))
}

/// A ClientHello naming a listed server is blocked; one naming another, or none, passes.
pub fn sni_block(hello: &crate::fingerprint::Hello, names: &[&str]) -> Verdict {
    match hello.sni.as_deref() {
        Some(name) if names.contains(&name) => {
            Verdict::Block(format!("SNI {name} is on the block list"))
        }
        Some(name) => Verdict::Allow(format!("SNI {name} is not listed")),
        None => Verdict::Allow("no SNI".into()),
    }
}

/// A ClientHello whose JA4 is listed is blocked.
pub fn ja4_block(hello: &crate::fingerprint::Hello, fingerprints: &[&str]) -> Verdict {
    let ja4 = hello.ja4();
    if fingerprints.contains(&ja4.as_str()) {
        Verdict::Block(format!("JA4 {ja4} is on the block list"))
    } else {
        Verdict::Allow(format!("JA4 {ja4} is not listed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u64) -> Vec<u8> {
        // xorshift: deterministic, uniform enough for these tests.
        let mut x = seed.max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// The shape of Postern's first packet: a 2-byte length, then a Noise IK message.
    fn noise_like(seed: u64) -> Vec<u8> {
        let body = random(130, seed);
        let mut v = (body.len() as u16).to_be_bytes().to_vec();
        v.extend(body);
        v
    }

    #[test]
    fn random_first_packets_are_blocked_by_both() {
        for seed in 1..50 {
            let p = noise_like(seed);
            assert!(allowlist(&p).is_block(), "{seed}");
            assert!(
                fully_encrypted(&p).is_block(),
                "{seed}: {}",
                fully_encrypted(&p)
            );
        }
    }

    #[test]
    fn tls_and_http_pass_both() {
        let mut hello = vec![0x16, 0x03, 0x01, 0x02, 0x00];
        hello.extend(random(512, 7));
        assert_eq!(allowlist(&hello), Verdict::Allow("TLS record".into()));
        assert!(!fully_encrypted(&hello).is_block());
        let get = b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n";
        assert!(!allowlist(get).is_block());
        assert!(!fully_encrypted(get).is_block());
    }

    #[test]
    fn each_exemption_of_wu_et_al() {
        // Ex1: low bit density (mostly zero bytes).
        let mut sparse = vec![0u8; 100];
        sparse[..10].copy_from_slice(&random(10, 3));
        assert!(fully_encrypted(&sparse).to_string().contains("Ex1"));
        // Ex2: printable prefix.
        let mut p = b"SSH-2.".to_vec();
        p.extend(random(200, 5));
        assert!(
            fully_encrypted(&p).to_string().contains("Ex2"),
            "{}",
            fully_encrypted(&p)
        );
        // Ex4: a run of 21 printable bytes inside random data.
        let mut r = vec![0x80];
        r.extend(random(60, 9));
        r.extend(b"abcdefghijklmnopqrstu");
        r.extend(random(60, 11));
        let v = fully_encrypted(&r);
        assert!(!v.is_block(), "{v}");
    }

    #[test]
    fn dns_over_tcp_passes_the_allowlist() {
        let mut q = vec![0, 29, 0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend(b"\x07example\x03org\x00\x00\x01\x00\x01");
        assert_eq!(allowlist(&q), Verdict::Allow("DNS query".into()));
    }

    #[test]
    fn block_lists_match_the_hello_not_the_port() {
        use crate::fingerprint::{Hello, RUSTLS_DEFAULT_JA4};
        let hello =
            Hello::parse(&crate::fingerprint::rustls_hello("relay-a.postern.test")).unwrap();
        assert!(sni_block(&hello, &["relay-a.postern.test"]).is_block());
        assert!(!sni_block(&hello, &["relay-b.postern.test"]).is_block());
        let unnamed = Hello {
            sni: None,
            ..hello.clone()
        };
        assert!(!sni_block(&unnamed, &["relay-a.postern.test"]).is_block());
        assert!(ja4_block(&hello, &[RUSTLS_DEFAULT_JA4]).is_block());
        assert!(!ja4_block(&hello, &["t13d1516h2_8daaf6152771_d8a2da3f94cd"]).is_block());
    }
}
