//! PROXY protocol: reading a v1/v2 header from a load balancer in front of the relay, and
//! building the header the relay sends to its upstreams. Parsing and encoding use the `ppp`
//! crate; this module only handles framing (how many bytes to read) and address mapping.

use postern_protocol::proxy_header::{addresses_v1, addresses_v2};
use ppp::{HeaderResult, PartialResult};
use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncReadExt};

/// v2 signature (12 bytes).
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included.
const V1_MAX: usize = 107;
/// v1 prefix.
pub const V1_PREFIX: &[u8] = b"PROXY ";

/// Why a PROXY header was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The bytes are not a valid PROXY header.
    #[error("invalid PROXY header")]
    Invalid,
    /// The header is larger than allowed.
    #[error("PROXY header too large")]
    TooLarge,
    /// The peer closed before the header was complete.
    #[error("connection closed during PROXY header")]
    Eof,
    /// Reading failed.
    #[error("read error: {0}")]
    Io(#[from] std::io::Error),
}

/// Addresses carried by a received PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxiedAddrs {
    /// The original client, or `None` for LOCAL / UNKNOWN headers (health checks of the load
    /// balancer itself).
    pub source: Option<SocketAddr>,
    /// The address the client connected to, if carried.
    pub destination: Option<SocketAddr>,
}

/// Result of looking at the first bytes of a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Need more bytes.
    Incomplete,
    /// A complete header of this many bytes.
    Complete(ProxiedAddrs, usize),
}

/// Parses a header at the start of `buf` (which may contain bytes after it).
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    if buf.is_empty() {
        return Ok(Parsed::Incomplete);
    }
    let looks_v2 = V2_SIGNATURE.starts_with(&buf[..buf.len().min(12)]);
    let looks_v1 = V1_PREFIX.starts_with(&buf[..buf.len().min(6)]);
    if !looks_v1 && !looks_v2 {
        return Err(ProxyHeaderError::Invalid);
    }
    // v1: the length of the line, which is the header's length whatever the parser thinks.
    let mut v1_len = 0;
    let res = if looks_v1 {
        // v1 framing: the header is one line of at most 107 bytes ending in CRLF. Only the
        // complete line is handed to the parser, so a bad line is an error, not "need more".
        let window = &buf[..buf.len().min(V1_MAX)];
        match window.windows(2).position(|w| w == b"\r\n") {
            Some(end) => {
                v1_len = end + 2;
                HeaderResult::V1(ppp::v1::Header::try_from(&buf[..v1_len]))
            }
            None if buf.len() >= V1_MAX => return Err(ProxyHeaderError::Invalid),
            None => return Ok(Parsed::Incomplete),
        }
    } else {
        HeaderResult::parse(buf)
    };
    if res.is_incomplete() {
        if looks_v1 {
            return Err(ProxyHeaderError::Invalid);
        }
        return Ok(Parsed::Incomplete);
    }
    match res {
        HeaderResult::V1(Ok(h)) => {
            let (source, destination) = addresses_v1(&h);
            // Not `h.header.len()`: for an UNKNOWN line `ppp` may stop at an earlier LF,
            // and the rest of the line would be forwarded as the client's bytes (the
            // server, which reads to the CRLF, would disagree on where the stream starts).
            Ok(Parsed::Complete(
                ProxiedAddrs {
                    source,
                    destination,
                },
                v1_len,
            ))
        }
        HeaderResult::V2(Ok(h)) => {
            let (source, destination) = addresses_v2(&h);
            Ok(Parsed::Complete(
                ProxiedAddrs {
                    source,
                    destination,
                },
                h.len(),
            ))
        }
        _ => Err(ProxyHeaderError::Invalid),
    }
}

/// Reads a PROXY header from the start of `io`. Returns the addresses and the bytes read after
/// the header (they belong to the client's stream). The caller bounds the time.
pub async fn read_header<R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
) -> Result<(ProxiedAddrs, Vec<u8>), ProxyHeaderError> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        if let Parsed::Complete(addrs, len) = parse(&buf)? {
            return Ok((addrs, buf.split_off(len)));
        }
        if buf.len() >= max {
            return Err(ProxyHeaderError::TooLarge);
        }
        let want = (max - buf.len()).min(chunk.len());
        let n = io.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(ProxyHeaderError::Eof);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Whether a stream starting with `buf` may be (or is) a PROXY header.
#[derive(Debug, PartialEq, Eq)]
pub enum Signature {
    /// Not a PROXY header.
    No,
    /// A prefix of a signature; more bytes decide.
    Maybe,
    /// Starts with a PROXY v1 or v2 signature.
    Yes,
}

/// Classifies the start of a stream (used to refuse PROXY headers where none is expected,
/// so a client cannot spoof its address towards an upstream that auto-detects them).
pub fn signature(buf: &[u8]) -> Signature {
    let v1 = V1_PREFIX.starts_with(&buf[..buf.len().min(V1_PREFIX.len())]);
    let v2 = V2_SIGNATURE.starts_with(&buf[..buf.len().min(V2_SIGNATURE.len())]);
    if (v1 && buf.len() >= V1_PREFIX.len()) || (v2 && buf.len() >= V2_SIGNATURE.len()) {
        Signature::Yes
    } else if v1 || v2 {
        Signature::Maybe
    } else {
        Signature::No
    }
}

// Encoding lives with the server's parser in the protocol crate, so the two always agree.
pub use postern_protocol::proxy_header::{encode_v1, encode_v2};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_known_vector() {
        let src: SocketAddr = "192.0.2.1:51234".parse().unwrap();
        let dst: SocketAddr = "198.51.100.7:443".parse().unwrap();
        let mut expected = V2_SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C]);
        expected.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 7]);
        expected.extend_from_slice(&51234u16.to_be_bytes());
        expected.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(encode_v2(src, dst), expected);
        let mut with_data = expected.clone();
        with_data.extend_from_slice(b"hello");
        assert_eq!(
            parse(&with_data).unwrap(),
            Parsed::Complete(
                ProxiedAddrs {
                    source: Some(src),
                    destination: Some(dst)
                },
                28
            )
        );
    }

    #[test]
    fn v2_ipv6_and_mixed() {
        let src: SocketAddr = "[2001:db8::1]:1000".parse().unwrap();
        let dst: SocketAddr = "192.0.2.9:80".parse().unwrap();
        let h = encode_v2(src, dst);
        assert_eq!(&h[12..16], &[0x21, 0x21, 0x00, 0x24]);
        assert_eq!(h.len(), 16 + 36);
        let mapped: SocketAddr = "[::ffff:192.0.2.9]:80".parse().unwrap();
        assert_eq!(
            parse(&h).unwrap(),
            Parsed::Complete(
                ProxiedAddrs {
                    source: Some(src),
                    destination: Some(mapped)
                },
                52
            )
        );
    }

    #[test]
    fn v1_known_vector() {
        let src: SocketAddr = "192.0.2.1:51234".parse().unwrap();
        let dst: SocketAddr = "198.51.100.7:443".parse().unwrap();
        assert_eq!(
            encode_v1(src, dst),
            b"PROXY TCP4 192.0.2.1 198.51.100.7 51234 443\r\n".to_vec()
        );
        let text = b"PROXY TCP4 192.0.2.1 198.51.100.7 51234 443\r\nrest";
        for cut in 0..text.len() - 4 {
            assert_eq!(
                parse(&text[..cut]).unwrap(),
                Parsed::Incomplete,
                "cut {cut}"
            );
        }
        assert!(matches!(parse(text).unwrap(), Parsed::Complete(_, 45)));
    }

    /// Found by the `proxy_header` fuzz target: `ppp` reported 18 bytes for this 20-byte
    /// line, so the relay forwarded "\r\n" of the header as the client's stream.
    #[test]
    fn v1_unknown_header_ends_at_its_crlf() {
        let input = b"PROXY UNKNOWN  \n\r:\r\n\x00";
        let none = ProxiedAddrs {
            source: None,
            destination: None,
        };
        assert_eq!(parse(input).unwrap(), Parsed::Complete(none, 20));
        let server = postern_protocol::proxy_header::parse_v1(&input[..20]).unwrap();
        assert_eq!((server.source, server.destination), (None, None));
    }

    #[test]
    fn garbage_rejected() {
        assert!(parse(b"GET / HTTP/1.1\r\n").is_err());
        assert!(parse(b"PROXY TCP4 nonsense\r\n").is_err());
        assert_eq!(signature(b"PRO"), Signature::Maybe);
        assert_eq!(signature(b"PROXY TCP4"), Signature::Yes);
        assert_eq!(signature(b"POST"), Signature::No);
        assert_eq!(signature(&V2_SIGNATURE), Signature::Yes);
        assert_eq!(signature(b"\x16\x03\x01"), Signature::No);
    }
}
