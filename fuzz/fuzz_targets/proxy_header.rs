//! The server's PROXY header reader (`crates/protocol/src/proxy_header.rs`), fed with the
//! first bytes of a connection, checked against the relay's own reader and its
//! anti-smuggling signature check (`crates/relay/src/proxy_header.rs`).
//!
//! Asserts, for any stream start:
//! * no header is reported only for a first byte 0x00–0x03 (a handshake frame), and then
//!   nothing is consumed;
//! * a header that is read consumed at most 107 (v1) or 528 (v2) bytes, and re-parsing
//!   exactly those bytes with `parse_v1`/`parse_v2` gives the same addresses;
//! * the relay's incremental parser agrees: same header length and addresses;
//! * the relay's `signature` check recognises every header the server accepts (otherwise a
//!   client could smuggle a spoofed address through a relay to the server);
//! * re-encoding the addresses read (`encode_v1`/`encode_v2`, what relays send) parses back
//!   to the same addresses with both readers.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use postern_fuzz::block_on;
use postern_protocol::proxy_header::{
    encode_v1, encode_v2, parse_v1, parse_v2, read_optional, ProxyHeader, V1_MAX_LEN, V2_MAX_LEN,
};
use postern_relay::proxy_header::{self as relay, Parsed, ProxiedAddrs, Signature};

fuzz_target!(|data: &[u8]| {
    let mut stream = tokio::io::BufReader::new(data);
    let result = block_on(read_optional(&mut stream));
    let consumed = data.len() - stream.buffer().len() - stream.get_ref().len();
    let header = match result {
        Ok(None) => {
            assert!(
                data[0] <= 0x03,
                "no header reported for first byte {}",
                data[0]
            );
            assert_eq!(consumed, 0, "a stream without header is left untouched");
            return;
        }
        Ok(Some(h)) => h,
        Err(_) => return,
    };
    let raw = &data[..consumed];
    let reparsed = match header.version {
        1 => {
            assert!(consumed <= V1_MAX_LEN, "v1 header of {consumed} bytes");
            parse_v1(raw)
        }
        2 => {
            assert!(consumed <= V2_MAX_LEN, "v2 header of {consumed} bytes");
            parse_v2(raw)
        }
        v => panic!("version {v}"),
    };
    assert_eq!(reparsed.ok(), Some(header), "re-parsing the bytes consumed");

    let addrs = ProxiedAddrs {
        source: header.source,
        destination: header.destination,
    };
    match relay::parse(data) {
        Ok(Parsed::Complete(a, len)) => {
            assert_eq!(
                (a, len),
                (addrs, consumed),
                "the relay reads the same header"
            );
        }
        other => panic!("the server read {header:?} ({consumed} bytes), the relay: {other:?}"),
    }
    assert_eq!(
        relay::signature(data),
        Signature::Yes,
        "a header the server accepts must be refused by relays as smuggled"
    );

    if let (Some(src), Some(dst)) = (header.source, header.destination) {
        round_trip(src, dst, 1, &encode_v1(src, dst));
        round_trip(src, dst, 2, &encode_v2(src, dst));
    }
});

fn round_trip(src: SocketAddr, dst: SocketAddr, version: u8, wire: &[u8]) {
    let back = if version == 1 {
        parse_v1(wire)
    } else {
        parse_v2(wire)
    }
    .unwrap_or_else(|e| panic!("v{version} encoding of {src} -> {dst} does not parse: {e}"));
    let expected = ProxyHeader {
        version,
        source: Some(src),
        destination: Some(dst),
    };
    if src.is_ipv4() == dst.is_ipv4() {
        assert_eq!(back, expected);
    } else {
        // Mixed families are sent as IPv4-mapped IPv6.
        assert_eq!(back.source.map(|a| a.port()), Some(src.port()));
        assert_eq!(back.destination.map(|a| a.port()), Some(dst.port()));
    }
    match relay::parse(wire) {
        Ok(Parsed::Complete(a, len)) => {
            assert_eq!(len, wire.len());
            assert_eq!((a.source, a.destination), (back.source, back.destination));
        }
        other => panic!("relay cannot read its own v{version} header: {other:?}"),
    }
}
