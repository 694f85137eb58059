//! Probe payloads for the active prober.

use rand::Rng;

/// The probes, in the order they are reported.
pub const PROBES: [&str; 4] = ["http-get", "random", "tls-hello", "empty"];

/// A host-name-like random label, e.g. `kq3vz81m.com`.
pub fn random_sni() -> String {
    let mut rng = rand::rng();
    let label: String = (0..rng.random_range(6..12))
        .map(|_| {
            let c = rng.random_range(0..36u8);
            char::from(if c < 26 { b'a' + c } else { b'0' + c - 26 })
        })
        .collect();
    let tld = ["com", "net", "org", "io"][rng.random_range(0..4)];
    format!("{label}.{tld}")
}

/// The bytes a probe sends (`empty` sends nothing and waits).
pub fn payload(probe: &str, host: &str) -> Vec<u8> {
    let mut rng = rand::rng();
    match probe {
        "http-get" => format!(
            "GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Mozilla/5.0\r\nAccept: */*\r\n\r\n"
        )
        .into_bytes(),
        "random" => (0..rng.random_range(32..256))
            .map(|_| rng.random())
            .collect(),
        "tls-hello" => client_hello(&random_sni()),
        _ => Vec::new(),
    }
}

fn u16be(v: usize) -> [u8; 2] {
    (v as u16).to_be_bytes()
}

fn extension(kind: u16, body: &[u8]) -> Vec<u8> {
    let mut e = kind.to_be_bytes().to_vec();
    e.extend(u16be(body.len()));
    e.extend(body);
    e
}

/// A TLS 1.3 ClientHello (in a TLS record) offering x25519 and common suites, with `sni`
/// as its server name and a random key share.
pub fn client_hello(sni: &str) -> Vec<u8> {
    let mut rng = rand::rng();
    let mut body = vec![0x03, 0x03];
    body.extend((0..32).map(|_| rng.random::<u8>()));
    body.push(32);
    body.extend((0..32).map(|_| rng.random::<u8>()));
    let suites: [u16; 6] = [0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xcca8];
    body.extend(u16be(suites.len() * 2));
    suites.iter().for_each(|s| body.extend(s.to_be_bytes()));
    body.extend([1, 0]); // compression: null
    let mut exts = Vec::new();
    let name = sni.as_bytes();
    let mut sn = u16be(name.len() + 3).to_vec();
    sn.push(0);
    sn.extend(u16be(name.len()));
    sn.extend(name);
    exts.extend(extension(0x0000, &sn));
    exts.extend(extension(0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17])); // groups
    exts.extend(extension(
        0x000d,
        &[0, 8, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01, 0x08, 0x07],
    )); // signature algorithms
    exts.extend(extension(0x002b, &[4, 0x03, 0x04, 0x03, 0x03])); // versions
    let mut ks = u16be(36).to_vec();
    ks.extend([0x00, 0x1d, 0x00, 0x20]);
    ks.extend((0..32).map(|_| rng.random::<u8>()));
    exts.extend(extension(0x0033, &ks)); // key share
    exts.extend(extension(0x002d, &[1, 1])); // psk modes
    body.extend(u16be(exts.len()));
    body.extend(exts);
    let mut hs = vec![0x01, 0];
    hs.extend(u16be(body.len()));
    hs.extend(body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend(u16be(hs.len()));
    rec.extend(hs);
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_hello_is_a_well_formed_record() {
        let h = client_hello("example.org");
        assert!(crate::classify::looks_tls(&h));
        assert_eq!(usize::from(u16::from_be_bytes([h[3], h[4]])), h.len() - 5);
        assert_eq!(h[5], 1);
        assert!(h.windows(11).any(|w| w == b"example.org"));
    }

    #[test]
    fn random_snis_look_like_host_names() {
        let s = random_sni();
        assert!(s.contains('.') && s.len() > 6, "{s}");
    }
}
