//! Probe payloads for the active prober.

use postern_test_kit::tls::ClientHello;
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

/// A TLS 1.3 ClientHello (in a TLS record) offering x25519 and common suites, with `sni`
/// as its server name and a random key share (built with the shared ClientHello builder).
pub fn client_hello(sni: &str) -> Vec<u8> {
    let mut rng = rand::rng();
    let mut key_share = vec![0, 36, 0x00, 0x1d, 0x00, 0x20];
    key_share.extend((0..32).map(|_| rng.random::<u8>()));
    let session: Vec<u8> = (0..32).map(|_| rng.random::<u8>()).collect();
    ClientHello::new()
        .random(rng.random())
        .session_id(&session)
        .suites(&[0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xcca8])
        .sni(sni)
        .extension(0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]) // groups
        .extension(
            0x000d,
            &[0, 8, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01, 0x08, 0x07],
        ) // signature algorithms
        .extension(0x002b, &[4, 0x03, 0x04, 0x03, 0x03]) // versions
        .extension(0x0033, &key_share)
        .extension(0x002d, &[1, 1]) // psk modes
        .records(16384)
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
