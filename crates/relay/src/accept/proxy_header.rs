//! PROXY protocol for the relay: the one implementation lives in the protocol crate
//! (`postern_protocol::proxy_header`), shared with the server so the two always agree on
//! what a header is; this module re-exports it.

pub use postern_protocol::proxy_header::{
    encode_v1, encode_v2, parse, read_required, signature, Parsed, ProxyHeader, Signature,
    V1_PREFIX, V2_SIGNATURE,
};

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

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
                ProxyHeader {
                    version: 2,
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
                ProxyHeader {
                    version: 2,
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
