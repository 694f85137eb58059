//! The server's Noise handshake and the protobuf payloads it decodes
//! (`crates/protocol/src/noise.rs`, as `crates/server/src/connection.rs` drives it).
//!
//! The first input byte picks what the rest is:
//! * `0`: raw bytes from an unauthenticated peer, read exactly as the server reads a new
//!   connection (PROXY header detection, then handshake message 1, on one `BufReader`).
//!   Asserts the handshake is refused (nobody without the server key can complete it), and
//!   that at most one PROXY header and one handshake frame were read.
//! * `1`: the payload of a *valid* message 1 for the server's key (made by a real Noise
//!   initiator), i.e. the `ClientHello` the server decodes. Asserts the server accepts it
//!   exactly when it decodes as a `ClientHello` (the same message, the client's static key),
//!   otherwise fails with a decode error; an accepted handshake is finished and the client
//!   authenticates message 2; a message 1 over the 1,024-byte limit is refused by size.
//! * `2`: after a completed handshake, up to 8 transport payloads (`u16` length-prefixed),
//!   each encrypted by the client and decoded by the server's `SecureReader` as a
//!   `ClientFrame`. Asserts each decodes exactly when `prost` decodes it directly, to the
//!   same value, which re-encodes and decodes to itself; that the server's name checks
//!   accept any decoded string without panicking; and that a flipped ciphertext bit is
//!   refused as a decryption failure.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use postern_fuzz::{block_on, initiator, keys, length_prefixed, message_one, transport_frame};
use postern_protocol::noise::{self, ServerHandshake, MAX_HANDSHAKE_LEN, MAX_PAYLOAD_LEN};
use postern_protocol::proxy_header::{self, V2_MAX_LEN};
use postern_protocol::schema::{client_frame, ClientFrame, ClientHello, ServerHello};
use postern_protocol::{username, ProtocolError};
use prost::Message;
use snow::StatelessTransportState;

const DEADLINE: Duration = Duration::from_secs(10);
/// Message 1 of IK carries e (32), s (32 + 16) and the payload's tag (16) besides it.
const MESSAGE_ONE_OVERHEAD: usize = 96;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => unauthenticated(rest),
        1 => client_hello(rest),
        _ => transport(rest),
    }
});

fn unauthenticated(bytes: &[u8]) {
    let mut stream = tokio::io::BufReader::with_capacity(2048, bytes);
    let result = block_on(async {
        let proxy = proxy_header::read_optional(&mut stream).await?;
        ServerHandshake::read_first(&mut stream, &keys().server, DEADLINE)
            .await
            .map(|hs| (proxy, *hs.client_static()))
    });
    assert!(
        result.is_err(),
        "a handshake without the server key was accepted: {result:?}"
    );
    let consumed = bytes.len() - stream.buffer().len() - stream.get_ref().len();
    assert!(
        consumed <= V2_MAX_LEN + 2 + MAX_HANDSHAKE_LEN,
        "read {consumed} bytes before giving up"
    );
}

fn client_hello(payload: &[u8]) {
    let k = keys();
    let fits = MAX_HANDSHAKE_LEN - MESSAGE_ONE_OVERHEAD;
    if payload.len() > fits {
        // Too large for a handshake frame: refused by its length, before any decryption.
        let mut hs = initiator();
        let frame = message_one(&mut hs, &payload[..payload.len().min(4096)]);
        let mut r = &frame[..];
        let got = block_on(ServerHandshake::read_first(&mut r, &k.server, DEADLINE));
        assert!(
            matches!(got, Err(ProtocolError::FrameTooLarge { .. })),
            "oversized message 1: {:?}",
            got.map(|h| h.hello().clone())
        );
    }
    let payload = &payload[..payload.len().min(fits)];
    let mut hs = initiator();
    let frame = message_one(&mut hs, payload);
    let mut r = &frame[..];
    let got = block_on(ServerHandshake::read_first(&mut r, &k.server, DEADLINE));
    match (got, ClientHello::decode(payload)) {
        (Ok(server), Ok(expected)) => {
            assert_eq!(server.hello(), &expected);
            assert_eq!(server.client_static(), &k.client_public);
            assert!(r.is_empty(), "read past message 1");
            let again = ClientHello::decode(expected.encode_to_vec().as_slice());
            assert_eq!(
                again.as_ref().ok(),
                Some(&expected),
                "re-encoding round-trips"
            );
            let hello = ServerHello {
                protocol_version: 1,
                device: None,
                one_time_keys_remaining: 0,
                server_time_ms: 1,
            };
            let mut wire = Vec::new();
            block_on(server.finish(&mut wire, &hello)).expect("message 2 is written");
            let mut plain = vec![0u8; wire.len()];
            let n = hs
                .read_message(&wire[2..], &mut plain)
                .expect("the client authenticates the server's message 2");
            assert_eq!(ServerHello::decode(&plain[..n]).ok(), Some(hello));
        }
        (Err(ProtocolError::Decode(_)), Err(_)) => {}
        (got, expected) => panic!(
            "server: {:?}, direct decode: {expected:?}",
            got.map(|h| h.hello().clone())
        ),
    }
}

/// One completed handshake per process: the client's and the server's transport states
/// (stateless, nonces explicit, so every input starts again from nonce 0).
fn transports() -> &'static (StatelessTransportState, Arc<StatelessTransportState>) {
    static T: OnceLock<(StatelessTransportState, Arc<StatelessTransportState>)> = OnceLock::new();
    T.get_or_init(|| {
        let k = keys();
        let mut hs = initiator();
        let hello = ClientHello {
            protocol_version: 1,
            software: "fuzz".into(),
            send_only: false,
        };
        let frame = message_one(&mut hs, &hello.encode_to_vec());
        let mut r = &frame[..];
        let server = block_on(ServerHandshake::read_first(&mut r, &k.server, DEADLINE))
            .expect("a real message 1 is accepted");
        let mut wire = Vec::new();
        let server_t = block_on(server.finish(&mut wire, &ServerHello::default()))
            .expect("message 2 is written");
        let mut plain = vec![0u8; wire.len()];
        hs.read_message(&wire[2..], &mut plain)
            .expect("message 2 authenticates");
        let client_t = hs
            .into_stateless_transport_mode()
            .expect("handshake finished");
        (client_t, server_t)
    })
}

fn transport(rest: &[u8]) {
    let (client_t, server_t) = transports();
    let payloads = length_prefixed(rest, 8, MAX_PAYLOAD_LEN);
    let mut wire = Vec::new();
    for (nonce, p) in payloads.iter().enumerate() {
        wire.extend(transport_frame(client_t, nonce as u64, p));
    }
    let (mut reader, _writer) = noise::split(server_t.clone(), &wire[..], Vec::<u8>::new());
    for p in &payloads {
        match (
            block_on(reader.recv::<ClientFrame>()),
            ClientFrame::decode(*p),
        ) {
            (Ok(frame), Ok(expected)) => {
                assert_eq!(frame, expected);
                let again = ClientFrame::decode(frame.encode_to_vec().as_slice());
                assert_eq!(again.as_ref().ok(), Some(&frame), "re-encoding round-trips");
                check_names(&frame);
            }
            // The server answers BAD_REQUEST and closes the connection.
            (Err(ProtocolError::Decode(_)), Err(_)) => return,
            (got, expected) => panic!("server: {got:?}, direct decode: {expected:?}"),
        }
    }
    assert!(matches!(
        block_on(reader.recv::<ClientFrame>()),
        Err(ProtocolError::Closed)
    ));

    if let Some(p) = payloads.first() {
        let mut frame = transport_frame(client_t, 0, p);
        let at = 2 + p.len() % (frame.len() - 2);
        frame[at] ^= 0x01;
        let (mut reader, _writer) = noise::split(server_t.clone(), &frame[..], Vec::<u8>::new());
        assert!(matches!(
            block_on(reader.recv::<ClientFrame>()),
            Err(ProtocolError::Decrypt)
        ));
    }
}

/// The name checks the server applies to what it decoded (they must take any string).
fn check_names(frame: &ClientFrame) {
    let name = match &frame.body {
        Some(client_frame::Body::Register(r)) => &r.username,
        Some(client_frame::Body::ClaimKeys(c)) => &c.username,
        Some(client_frame::Body::Send(s)) => &s.recipient,
        _ => return,
    };
    if username::validate(name).is_ok() {
        assert!((3..=32).contains(&name.len()) && name.is_ascii());
    }
}
