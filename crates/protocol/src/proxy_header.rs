//! Optional PROXY protocol header (v1 text or v2 binary) at the start of a connection.
//!
//! Relays put one in front of the client's stream so the server can see the client's
//! address (for per-address rate limits, and for logs if the operator enables them). The
//! server detects it from the first byte, which is unambiguous:
//!
//! * `P` (0x50): v1, a text line `PROXY TCP4 src dst sport dport\r\n` of at most 107 bytes;
//! * `\r` (0x0D): v2, the 12-byte signature, then a 4-byte header and the addresses;
//! * 0x00–0x03: a Noise handshake frame (its length is below 1,024), so no header.
//!
//! Anything else is not Postern traffic and the connection is closed. Parsing is done by
//! the `ppp` crate; this module only bounds what is read and reports the addresses.
//!
//! This is the one PROXY header reader of the project: the server ([`read_optional`]), the
//! relay's load-balancer listeners ([`read_required`]) and test upstreams ([`parse`]) all
//! use it. Whether a header is *believed* is decided by the caller with
//! [`crate::net::TrustedProxies`]: only peers listed with `--trusted-proxy` may set the
//! client address.

use std::net::SocketAddr;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

use crate::ProtocolError;

/// The longest valid v1 header, CRLF included (from the PROXY protocol specification).
pub const V1_MAX_LEN: usize = 107;
/// The v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// We accept v2 headers up to this size (addresses plus modest TLVs); larger is refused.
pub const V2_MAX_LEN: usize = 16 + 512;

/// What a PROXY header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    pub version: u8,
    /// The original client address, or `None` for `UNKNOWN`/`LOCAL` headers.
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
}

/// Reads a PROXY header if the stream starts with one. Leaves the stream positioned at
/// the first byte after the header (or untouched when there is none).
pub async fn read_optional<S: AsyncBufRead + Unpin>(
    stream: &mut S,
) -> Result<Option<ProxyHeader>, ProtocolError> {
    let first = match stream.fill_buf().await?.first() {
        Some(b) => *b,
        None => return Err(ProtocolError::Closed),
    };
    match first {
        b'P' => read_v1(stream).await.map(Some),
        b'\r' => read_v2(stream, V2_MAX_LEN).await.map(Some),
        0x00..=0x03 => Ok(None),
        other => Err(ProtocolError::ProxyHeader(format!(
            "unexpected first byte 0x{other:02x}: neither a PROXY header nor a Postern handshake"
        ))),
    }
}

/// Reads the PROXY header a load balancer must send first (v1, or v2 of at most `max`
/// bytes). Reads exactly the header: whatever follows stays in `stream`.
pub async fn read_required<S: AsyncBufRead + Unpin>(
    stream: &mut S,
    max: usize,
) -> Result<ProxyHeader, ProtocolError> {
    let first = match stream.fill_buf().await?.first() {
        Some(b) => *b,
        None => return Err(ProtocolError::Closed),
    };
    match first {
        b'P' => read_v1(stream).await,
        b'\r' => read_v2(stream, max).await,
        other => Err(ProtocolError::ProxyHeader(format!(
            "expected a PROXY header, got first byte 0x{other:02x}"
        ))),
    }
}

/// Outcome of [`parse`] on the first bytes of a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Need more bytes.
    Incomplete,
    /// A complete header of this many bytes.
    Complete(ProxyHeader, usize),
}

/// Parses a header at the start of `buf` (which may hold bytes after it), without I/O.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProtocolError> {
    if buf.is_empty() {
        return Ok(Parsed::Incomplete);
    }
    let bad = |m: &str| ProtocolError::ProxyHeader(m.to_string());
    match signature(buf) {
        Signature::No => return Err(bad("not a PROXY header")),
        Signature::Maybe => return Ok(Parsed::Incomplete),
        Signature::Yes => {}
    }
    if buf[0] == b'P' {
        // Only the complete line is handed to the parser, so a bad line is an error.
        let window = &buf[..buf.len().min(V1_MAX_LEN)];
        return match window.windows(2).position(|w| w == b"\r\n") {
            Some(end) => parse_v1(&buf[..end + 2]).map(|h| Parsed::Complete(h, end + 2)),
            None if buf.len() >= V1_MAX_LEN => Err(bad("v1 header longer than 107 bytes")),
            None => Ok(Parsed::Incomplete),
        };
    }
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let len = 16 + u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    parse_v2(&buf[..len]).map(|h| Parsed::Complete(h, len))
}

/// Whether a stream starting with `buf` is (or may yet be) a PROXY header.
#[derive(Debug, PartialEq, Eq)]
pub enum Signature {
    /// Not a PROXY header.
    No,
    /// A prefix of a signature; more bytes decide.
    Maybe,
    /// Starts with a PROXY v1 or v2 signature.
    Yes,
}

/// The v1 prefix.
pub const V1_PREFIX: &[u8] = b"PROXY ";

/// Classifies the start of a stream (the relay refuses PROXY headers inside a client's
/// own stream, so a client cannot spoof its address towards the server).
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

async fn read_v1<S: AsyncBufRead + Unpin>(stream: &mut S) -> Result<ProxyHeader, ProtocolError> {
    let mut line = Vec::with_capacity(V1_MAX_LEN);
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX_LEN {
            return Err(ProtocolError::ProxyHeader(
                "v1 header longer than 107 bytes".into(),
            ));
        }
        line.push(stream.read_u8().await?);
    }
    parse_v1(&line)
}

/// Parses a complete v1 line (including CRLF).
pub fn parse_v1(line: &[u8]) -> Result<ProxyHeader, ProtocolError> {
    let header = ppp::v1::Header::try_from(line)
        .map_err(|e| ProtocolError::ProxyHeader(format!("v1: {e}")))?;
    let (source, destination) = addresses_v1(&header);
    Ok(ProxyHeader {
        version: 1,
        source,
        destination,
    })
}

/// The (source, destination) a v1 header carries; `None` for `UNKNOWN`.
pub fn addresses_v1(header: &ppp::v1::Header<'_>) -> (Option<SocketAddr>, Option<SocketAddr>) {
    match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => (
            Some(SocketAddr::from((a.source_address, a.source_port))),
            Some(SocketAddr::from((
                a.destination_address,
                a.destination_port,
            ))),
        ),
        ppp::v1::Addresses::Tcp6(a) => (
            Some(SocketAddr::from((a.source_address, a.source_port))),
            Some(SocketAddr::from((
                a.destination_address,
                a.destination_port,
            ))),
        ),
        ppp::v1::Addresses::Unknown => (None, None),
    }
}

async fn read_v2<S: AsyncBufRead + Unpin>(
    stream: &mut S,
    max: usize,
) -> Result<ProxyHeader, ProtocolError> {
    let mut buf = vec![0u8; 16];
    stream.read_exact(&mut buf).await?;
    if buf[..12] != V2_SIGNATURE {
        return Err(ProtocolError::ProxyHeader("bad v2 signature".into()));
    }
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if 16 + len > max {
        return Err(ProtocolError::ProxyHeader(format!(
            "v2 header of {} bytes exceeds the {max}-byte limit",
            16 + len
        )));
    }
    buf.resize(16 + len, 0);
    stream.read_exact(&mut buf[16..]).await?;
    parse_v2(&buf)
}

/// Parses a complete v2 header.
pub fn parse_v2(bytes: &[u8]) -> Result<ProxyHeader, ProtocolError> {
    let header = ppp::v2::Header::try_from(bytes)
        .map_err(|e| ProtocolError::ProxyHeader(format!("v2: {e}")))?;
    let (source, destination) = addresses_v2(&header);
    Ok(ProxyHeader {
        version: 2,
        source,
        destination,
    })
}

/// The (source, destination) a v2 header carries; `None` for `LOCAL` or non-IP headers.
pub fn addresses_v2(header: &ppp::v2::Header<'_>) -> (Option<SocketAddr>, Option<SocketAddr>) {
    match (header.command, header.addresses) {
        (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => (
            Some(SocketAddr::from((a.source_address, a.source_port))),
            Some(SocketAddr::from((
                a.destination_address,
                a.destination_port,
            ))),
        ),
        (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => (
            Some(SocketAddr::from((a.source_address, a.source_port))),
            Some(SocketAddr::from((
                a.destination_address,
                a.destination_port,
            ))),
        ),
        _ => (None, None),
    }
}

/// Puts both addresses in one family (IPv4 as IPv4-mapped IPv6 when they differ): a PROXY
/// header cannot mix families.
fn unify(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    fn v6(a: SocketAddr) -> SocketAddr {
        match a.ip() {
            std::net::IpAddr::V4(ip) => SocketAddr::new(ip.to_ipv6_mapped().into(), a.port()),
            std::net::IpAddr::V6(_) => a,
        }
    }
    if source.is_ipv4() == destination.is_ipv4() {
        (source, destination)
    } else {
        (v6(source), v6(destination))
    }
}

/// A v2 `PROXY` header (TCP) for a client `source` that connected to `destination` — what
/// relays send upstream.
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (s, d) = unify(source, destination);
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        ppp::v2::Addresses::from((s, d)),
    )
    .build()
    // Building into a Vec only fails if the payload exceeds u16::MAX, impossible here.
    .unwrap_or_default()
}

/// A v1 `PROXY` header for a client `source` that connected to `destination`.
pub fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (s, d) = unify(source, destination);
    let addrs = match (s, d) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            ppp::v1::Addresses::new_tcp4(*s.ip(), *d.ip(), s.port(), d.port())
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            ppp::v1::Addresses::new_tcp6(*s.ip(), *d.ip(), s.port(), d.port())
        }
        _ => ppp::v1::Addresses::Unknown,
    };
    addrs.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    /// Found by the `proxy_header` fuzz target: `ppp` alone ends this UNKNOWN line at its
    /// first LF (18 bytes), which would forward the header's last bytes as client data.
    #[test]
    fn v1_unknown_header_ends_at_its_crlf() {
        let input = b"PROXY UNKNOWN  \n\r:\r\n\x00";
        match super::parse(input).unwrap() {
            super::Parsed::Complete(h, len) => {
                assert_eq!(len, 20);
                assert_eq!((h.source, h.destination), (None, None));
            }
            other => panic!("{other:?}"),
        }
    }

    use super::*;
    use proptest::prelude::*;
    use tokio::io::BufReader;

    async fn detect(bytes: &[u8]) -> (Result<Option<ProxyHeader>, ProtocolError>, Vec<u8>) {
        let mut r = BufReader::new(bytes);
        let h = read_optional(&mut r).await;
        let mut rest = Vec::new();
        let _ = r.read_to_end(&mut rest).await;
        (h, rest)
    }

    #[tokio::test]
    async fn v1_tcp4_then_payload() {
        let (h, rest) =
            detect(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 5222\r\n\x00\x05hello").await;
        let h = h.unwrap().unwrap();
        assert_eq!(h.version, 1);
        assert_eq!(h.source, Some("192.0.2.1:56324".parse().unwrap()));
        assert_eq!(h.destination, Some("198.51.100.2:5222".parse().unwrap()));
        assert_eq!(rest, b"\x00\x05hello");
    }

    #[tokio::test]
    async fn v2_known_vector() {
        // PROXY v2, TCP over IPv4, 127.0.0.1:1 -> 127.0.0.2:2 (from the specification's layout).
        let mut v = V2_SIGNATURE.to_vec();
        v.extend_from_slice(&[
            0x21, 0x11, 0x00, 0x0c, 127, 0, 0, 1, 127, 0, 0, 2, 0, 1, 0, 2,
        ]);
        assert_eq!(
            encode_v2(
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.2:2".parse().unwrap()
            ),
            v
        );
        v.extend_from_slice(b"\x00\x01x");
        let (h, rest) = detect(&v).await;
        let h = h.unwrap().unwrap();
        assert_eq!(h.version, 2);
        assert_eq!(h.source, Some("127.0.0.1:1".parse().unwrap()));
        assert_eq!(rest, b"\x00\x01x");
    }

    #[tokio::test]
    async fn mixed_families_are_mapped_not_dropped() {
        let src: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let dst: SocketAddr = "[2001:db8::2]:443".parse().unwrap();
        let (h, _) = detect(&encode_v2(src, dst)).await;
        assert_eq!(
            h.unwrap().unwrap().source,
            Some("[::ffff:192.0.2.1]:4000".parse().unwrap())
        );
    }

    #[tokio::test]
    async fn v2_ipv6_round_trip() {
        let src: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
        let dst: SocketAddr = "[2001:db8::2]:443".parse().unwrap();
        let (h, _) = detect(&encode_v2(src, dst)).await;
        assert_eq!(h.unwrap().unwrap().source, Some(src));
    }

    #[tokio::test]
    async fn noise_frame_means_no_header() {
        let (h, rest) = detect(b"\x00\x60abc").await;
        assert_eq!(h.unwrap(), None);
        assert_eq!(rest, b"\x00\x60abc");
    }

    #[tokio::test]
    async fn bogus_headers_are_errors() {
        assert!(detect(b"PROXY TCP4 nonsense\r\n").await.0.is_err());
        assert!(detect(b"GET / HTTP/1.1\r\n\r\n").await.0.is_err());
        assert!(detect(&[b'P'; 300]).await.0.is_err());
        let mut big = V2_SIGNATURE.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(detect(&big).await.0.is_err());
        assert!(detect(b"").await.0.is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async { let _ = detect(&bytes).await; });
        }

        #[test]
        fn v1_prefix_with_garbage_never_panics(tail in "[ -~]{0,120}") {
            let line = format!("PROXY {tail}\r\n");
            let _ = parse_v1(line.as_bytes());
        }
    }
}
