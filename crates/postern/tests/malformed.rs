//! Bad input closes that one connection cleanly; the server keeps serving everyone else.

mod common;
use common::*;

use std::time::Duration;

use postern_protocol::network::NetworkFile;
use postern_protocol::noise::{self, StaticKeypair};
use postern_protocol::proxy_header;
use postern_protocol::schema::{server_frame, ClientFrame, ClientHello, Content, ServerFrame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

/// Sends `bytes` and expects the server to close the connection (EOF or reset) promptly.
async fn expect_closed_after(server: std::net::SocketAddr, bytes: &[u8]) {
    let mut s = TcpStream::connect(server).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut buf = vec![0u8; 4096];
    let closed = tokio::time::timeout(T, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "server kept a connection open after {:?}...",
        &bytes[..bytes.len().min(16)]
    );
}

fn hello() -> ClientHello {
    ClientHello {
        protocol_version: 1,
        software: "malformed-test".into(),
        send_only: false,
    }
}

/// Completes a real handshake (optionally after a PROXY header) and returns the channel.
async fn handshake(
    server: std::net::SocketAddr,
    key: &[u8; 32],
    proxy: Option<Vec<u8>>,
) -> RawChannel {
    raw_handshake(server, key, proxy, None)
        .await
        .expect("handshake")
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_input_is_closed_and_the_server_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let server = tokio::task::block_in_place(|| {
        TestServer::start_with(
            &tmp.path().join("server"),
            "127.0.0.1:0".parse().unwrap(),
            &["--handshake-timeout", "2"],
        )
    });
    let addr = server.addr;
    let key = NetworkFile::load(&server.network_file())
        .unwrap()
        .server_key()
        .unwrap();

    // Before the handshake: an HTTP request, random bytes, an oversized handshake frame,
    // a truncated frame, bogus PROXY headers.
    expect_closed_after(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let random: Vec<u8> = (0..600u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    expect_closed_after(addr, &random).await;
    let mut oversized = vec![0x03, 0xff];
    oversized.extend(std::iter::repeat_n(0xAB, 1023));
    expect_closed_after(addr, &oversized).await;
    expect_closed_after(addr, &[0x00, 0x60, 1, 2, 3]).await; // then silence: handshake deadline
    expect_closed_after(addr, b"PROXY TCP4 not-an-address\r\n").await;
    expect_closed_after(addr, b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2").await; // no CRLF
    let mut v2 = proxy_header::V2_SIGNATURE.to_vec();
    v2.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    expect_closed_after(addr, &v2).await;

    // After the handshake: a frame of 65,535 junk bytes fails authentication.
    let (mut r, mut w) = handshake(addr, &key, None).await;
    let _ = w.send(&ClientFrame::default()).await; // an empty request: answered, then closed
    let answer: ServerFrame = r.recv().await.unwrap();
    assert!(
        matches!(answer.body, Some(server_frame::Body::Error(_))),
        "{answer:?}"
    );
    assert!(
        r.recv::<ServerFrame>().await.is_err(),
        "closed after the error frame"
    );

    let mut s = TcpStream::connect(addr).await.unwrap();
    let me = StaticKeypair::generate();
    noise::client_handshake(&mut s, &me, &key, &hello(), T)
        .await
        .unwrap();
    let mut junk = vec![0xff, 0xff];
    junk.extend(std::iter::repeat_n(0x5A, 65_535));
    let _ = s.write_all(&junk).await;
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(T, s.read(&mut buf))
        .await
        .expect("closed promptly");
    assert!(matches!(closed, Ok(0) | Err(_)));

    // A frame that decrypts but is not a valid request: error frame, then close.
    let (mut r, mut w) = handshake(addr, &key, None).await;
    w.send(&Content {
        message_id: vec![1; 16],
        ..Default::default()
    })
    .await
    .unwrap();
    let answer: ServerFrame = r.recv().await.unwrap();
    assert!(
        matches!(answer.body, Some(server_frame::Body::Error(_))),
        "{answer:?}"
    );

    // A relay's PROXY header (v1 and v2) in front of a real handshake is accepted.
    let v2 = proxy_header::encode_v2("203.0.113.7:40000".parse().unwrap(), addr);
    let (mut r, mut w) = handshake(addr, &key, Some(v2)).await;
    w.send(&ClientFrame {
        request_id: 9,
        body: Some(postern_protocol::schema::client_frame::Body::Ping(
            postern_protocol::schema::Ping { nonce: 5 },
        )),
    })
    .await
    .unwrap();
    let pong: ServerFrame = r.recv().await.unwrap();
    assert_eq!(pong.request_id, 9);
    let v1 = format!("PROXY TCP4 203.0.113.7 127.0.0.1 40000 {}\r\n", addr.port()).into_bytes();
    let _ = handshake(addr, &key, Some(v1)).await;

    // Everyone else is still served.
    tokio::task::block_in_place(|| {
        let net = server.network_file();
        let net = net.to_str().unwrap();
        let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
        ok(&alice, &["account", "create", "alice", "--network", net]);
        ok(&bob, &["account", "create", "bob", "--network", net]);
        ok(&alice, &["send", "bob", "still working"]);
        assert!(ok(&bob, &["inbox"]).contains("still working"));
    });
    let mut server = server;
    assert!(server.is_running());
}
