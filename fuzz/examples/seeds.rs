//! Writes the committed seed corpus, `fuzz/corpus/<target>/`: small, meaningful inputs
//! (valid frames, PROXY v1/v2 headers, a real rustls ClientHello, handshake payloads, the
//! sample links, network file and relay configurations) from which the fuzzer starts.
//!
//!     cd fuzz && cargo run --example seeds
//!
//! Seeds are only ever added or overwritten, so inputs saved by hand (crash reproducers
//! turned into seeds) stay.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use postern_fuzz::{client_hello, records};
use postern_protocol::network::NetworkFile;
use postern_protocol::proxy_header::{encode_v1, encode_v2, V2_SIGNATURE};
use postern_protocol::schema::{
    client_frame, AckMessage, AckReceipt, ClaimKeys, ClientFrame, ClientHello, DeviceCiphertext,
    DeviceKeys, Ping, Register, SendMessage, SignedKey, UploadKeys,
};
use prost::Message;

fn dir(target: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&d).expect("create corpus directory");
    d
}

fn seed(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(dir(target).join(name), bytes).expect("write seed");
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a valid address")
}

/// PROXY headers a relay or load balancer sends: v1 TCP4/TCP6/UNKNOWN, v2 IPv4/IPv6/LOCAL
/// and one with a TLV.
fn proxy_headers() -> Vec<(&'static str, Vec<u8>)> {
    let v4 = (addr("192.0.2.1:56324"), addr("198.51.100.2:5222"));
    let v6 = (addr("[2001:db8::1]:4000"), addr("[2001:db8::2]:443"));
    let mut local = V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    let mut tlv = V2_SIGNATURE.to_vec();
    tlv.extend_from_slice(&[
        0x21, 0x11, 0x00, 0x13, 127, 0, 0, 1, 127, 0, 0, 2, 0, 1, 0, 2,
    ]);
    tlv.extend_from_slice(&[0x04, 0x00, 0x04, 0xde, 0xad, 0xbe, 0xef]);
    vec![
        ("v1-tcp4", encode_v1(v4.0, v4.1)),
        ("v1-tcp6", encode_v1(v6.0, v6.1)),
        ("v1-unknown", b"PROXY UNKNOWN\r\n".to_vec()),
        ("v2-ipv4", encode_v2(v4.0, v4.1)),
        ("v2-ipv6", encode_v2(v6.0, v6.1)),
        ("v2-mixed", encode_v2(v4.0, v6.1)),
        ("v2-local", local),
        ("v2-tlv", tlv),
    ]
}

fn client_frames() -> Vec<(&'static str, ClientFrame)> {
    let key = |b: u8| SignedKey {
        public_key: vec![b; 32],
        signature: vec![b; 64],
    };
    let frame = |id, body| ClientFrame {
        request_id: id,
        body: Some(body),
    };
    use client_frame::Body;
    vec![
        ("ping", frame(1, Body::Ping(Ping { nonce: 42 }))),
        (
            "register",
            frame(
                2,
                Body::Register(Register {
                    username: "alice".into(),
                    keys: Some(DeviceKeys {
                        curve25519: vec![1; 32],
                        ed25519: vec![2; 32],
                    }),
                    one_time_keys: vec![key(3), key(4)],
                    fallback_key: Some(key(5)),
                }),
            ),
        ),
        (
            "upload-keys",
            frame(
                3,
                Body::UploadKeys(UploadKeys {
                    one_time_keys: vec![key(6)],
                    fallback_key: None,
                }),
            ),
        ),
        (
            "claim-keys",
            frame(
                4,
                Body::ClaimKeys(ClaimKeys {
                    username: "bob".into(),
                }),
            ),
        ),
        (
            "send",
            frame(
                5,
                Body::Send(SendMessage {
                    message_id: vec![9; 16],
                    recipient: "bob".into(),
                    ciphertexts: vec![DeviceCiphertext {
                        device_id: 1,
                        olm_type: 0,
                        body: b"ciphertext".to_vec(),
                    }],
                }),
            ),
        ),
        (
            "ack-message",
            frame(
                6,
                Body::AckMessage(AckMessage {
                    message_id: vec![9; 16],
                }),
            ),
        ),
        (
            "ack-receipt",
            frame(
                7,
                Body::AckReceipt(AckReceipt {
                    message_id: vec![9; 16],
                }),
            ),
        ),
    ]
}

/// What a real client (rustls, as `postern proxy add --tls` and browsers send) puts first
/// on the wire for `name`.
fn rustls_client_hello(name: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).expect("name");
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), server_name).expect("client connection");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("ClientHello");
    out
}

fn main() {
    // frame: single, empty, several, truncated, a handshake-sized one.
    seed("frame", "hello", &framed(b"hello"));
    seed("frame", "empty", &framed(b""));
    let mut several = framed(b"one");
    several.extend(framed(&[0u8; 300]));
    several.extend(framed(b""));
    seed("frame", "several", &several);
    seed("frame", "truncated", &[0x00, 0x0a, 1, 2, 3]);
    seed("frame", "handshake-sized", &framed(&[0x42; 96]));

    // handshake: 0 = raw bytes as the server reads them, 1 = ClientHello payload,
    // 2 = transport payloads (u16 length-prefixed ClientFrames).
    let hello = ClientHello {
        protocol_version: 1,
        software: "postern/0.1.0".into(),
        send_only: false,
    };
    let send_only = ClientHello {
        send_only: true,
        ..hello.clone()
    };
    for (name, header) in proxy_headers() {
        let mut raw = vec![0];
        raw.extend(header);
        raw.extend(framed(&[0x55; 96]));
        seed("handshake", &format!("raw-{name}-then-message-1"), &raw);
    }
    let mut raw = vec![0];
    raw.extend(framed(&[0x55; 96]));
    seed("handshake", "raw-message-1", &raw);
    for (name, h) in [("hello", &hello), ("hello-send-only", &send_only)] {
        let mut v = vec![1];
        v.extend(h.encode_to_vec());
        seed("handshake", name, &v);
    }
    seed("handshake", "hello-empty", &[1]);
    let mut all = vec![2];
    for (name, f) in client_frames() {
        let mut v = vec![2];
        v.extend(framed(&f.encode_to_vec()));
        seed("handshake", &format!("transport-{name}"), &v);
        all.extend(framed(&f.encode_to_vec()));
    }
    seed("handshake", "transport-session", &all);

    // proxy_header (server) and relay_proxy_header (segment size first).
    let noise_start = framed(&[0x55; 96]);
    for (name, header) in proxy_headers() {
        let mut v = header.clone();
        v.extend_from_slice(&noise_start);
        seed("proxy_header", name, &v);
        let mut r = vec![3];
        r.extend(&v);
        seed("relay_proxy_header", name, &r);
    }
    seed("proxy_header", "no-header", &noise_start);
    seed("relay_proxy_header", "one-byte-segments-v1", &{
        let mut r = vec![1];
        r.extend(encode_v1(addr("192.0.2.1:1"), addr("192.0.2.2:2")));
        r
    });

    // sni: segment size first, then the client's stream.
    let real = rustls_client_hello("media.whatsapp.net");
    for (name, seg, bytes) in [
        ("rustls-media-whatsapp", 255u8, real.clone()),
        ("rustls-one-byte-segments", 1, real.clone()),
        ("rustls-signal", 200, rustls_client_hello("chat.signal.org")),
        (
            "fragmented-records",
            16,
            records(&client_hello(&[b"a.example.org"], 300), 7),
        ),
        (
            "two-names",
            255,
            records(
                &client_hello(&[b"a.example.org", b"b.example.org"], 0),
                16384,
            ),
        ),
        (
            "ip-literal",
            255,
            records(&client_hello(&[b"10.0.0.1"], 0), 16384),
        ),
        ("no-sni", 255, records(&client_hello(&[], 0), 16384)),
        (
            "upper-case-trailing-dot",
            255,
            records(&client_hello(&[b"Media.WhatsApp.NET."], 0), 16384),
        ),
    ] {
        let mut v = vec![seg];
        v.extend(bytes);
        seed("sni", name, &v);
    }

    // link: documented links and addresses.
    for (i, text) in [
        "postern://proxy?host=relay.example.org",
        "postern://proxy?host=relay.example.org&port=5222&tls=0&media=587",
        "postern://proxy?host=[2001:db8::1]&port=443&tls=1",
        "postern://proxy/?tls=true&host=Relay.Example.ORG.&x=y#frag",
        "relay.example.org",
        "relay.example.org:5222",
        "[2001:db8::1]:443",
        "2001:db8::1",
        "192.0.2.7:80",
    ]
    .iter()
    .enumerate()
    {
        seed("link", &format!("sample-{i}"), text.as_bytes());
    }

    // network_file: what `postern server init` writes, and the documented form.
    let file = NetworkFile::new("chat.example.org:5222", &[7u8; 32]);
    seed("network_file", "server-init", file.to_toml().as_bytes());
    seed(
        "network_file",
        "ipv6",
        NetworkFile::new("[2001:db8::1]:5222", &[9u8; 32])
            .to_toml()
            .as_bytes(),
    );

    // relay_config: the example and the presets shipped in deploy/.
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    for path in [
        deploy.join("relay.example.toml"),
        deploy.join("presets/postern.toml"),
        deploy.join("presets/whatsapp.toml"),
        deploy.join("presets/signal.toml"),
    ] {
        let text = std::fs::read(&path).expect("deploy file");
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("config");
        seed("relay_config", name, &text);
    }
    seed(
        "relay_config",
        "minimal",
        b"[[listener]]\nname = \"chat\"\nlisten = \"127.0.0.1:5222\"\npool = \"chat\"\n\
          [pool.chat]\nservers = [\"127.0.0.1:15222\", \"[::1]:5222\"]\n\
          health_check_interval = \"100ms\"\n",
    );
    println!("seeds written under {}", dir("").display());
}
