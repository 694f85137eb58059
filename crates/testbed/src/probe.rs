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

/// How a probed connection ended, as the comparison sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// Everything the far end sent (over TLS: the decrypted application data).
    pub answer: Vec<u8>,
    /// `FIN`, `RST`, `still open`, or an error kind.
    pub close: String,
    /// Seconds from the probe being sent to the close.
    pub after: f64,
}

/// The timing class of a close: at once (under a second), after a wait, or not at all.
pub fn timing_class(o: &Observed) -> &'static str {
    if o.close.starts_with("still open") {
        "open"
    } else if o.after < 1.0 {
        "at once"
    } else {
        "after a wait"
    }
}

/// An answer with what legitimately differs between two answers of the same web server
/// blanked out: the value of a `Date:` header (the clock moves between probes).
pub fn normalised(answer: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(answer.len());
    let mut rest = answer;
    while let Some(pos) = find(rest, b"\r\nDate: ").or_else(|| find(rest, b"\r\ndate: ")) {
        out.extend_from_slice(&rest[..pos + 8]);
        let value = &rest[pos + 8..];
        let end = find(value, b"\r\n").unwrap_or(value.len());
        out.extend_from_slice(b"<date>");
        rest = &value[end..];
    }
    out.extend_from_slice(rest);
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Why two observations differ, or `None` when a prober cannot tell them apart: the same
/// bytes (dates aside), the same kind of close, the same timing class.
pub fn difference(relay: &Observed, reference: &Observed) -> Option<String> {
    if normalised(&relay.answer) != normalised(&reference.answer) {
        return Some(format!(
            "answers differ: {:?} vs {:?}",
            String::from_utf8_lossy(&relay.answer[..relay.answer.len().min(60)]),
            String::from_utf8_lossy(&reference.answer[..reference.answer.len().min(60)])
        ));
    }
    if relay.close != reference.close {
        return Some(format!(
            "close differs: {} vs {}",
            relay.close, reference.close
        ));
    }
    if timing_class(relay) != timing_class(reference) {
        return Some(format!(
            "timing differs: {} ({:.1}s) vs {} ({:.1}s)",
            timing_class(relay),
            relay.after,
            timing_class(reference),
            reference.after
        ));
    }
    None
}

#[cfg(test)]
mod comparison_tests {
    use super::*;

    fn seen(answer: &[u8], close: &str, after: f64) -> Observed {
        Observed {
            answer: answer.to_vec(),
            close: close.into(),
            after,
        }
    }

    #[test]
    fn dates_do_not_count_but_everything_else_does() {
        let a = b"HTTP/1.1 404 Not Found\r\nServer: nginx\r\nDate: Wed, 02 Dec 2026 17:00:00 GMT\r\n\r\nx";
        let b = b"HTTP/1.1 404 Not Found\r\nServer: nginx\r\nDate: Wed, 02 Dec 2026 17:00:07 GMT\r\n\r\nx";
        assert_eq!(
            difference(&seen(a, "FIN", 0.01), &seen(b, "FIN", 0.02)),
            None
        );
        let c = b"HTTP/1.1 400 Bad Request\r\nServer: nginx\r\nDate: Wed, 02 Dec 2026 17:00:07 GMT\r\n\r\nx";
        assert!(difference(&seen(a, "FIN", 0.0), &seen(c, "FIN", 0.0)).is_some());
        assert!(difference(&seen(a, "FIN", 0.0), &seen(a, "RST", 0.0)).is_some());
        assert!(difference(&seen(b"", "FIN", 0.1), &seen(b"", "FIN", 10.0)).is_some());
        assert_eq!(
            difference(&seen(b"", "FIN", 15.0), &seen(b"", "FIN", 10.0)),
            None,
            "both wait, then close"
        );
    }
}
