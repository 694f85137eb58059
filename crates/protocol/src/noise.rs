//! The Noise `IK` channel between a client device and the server.
//!
//! * Pattern `Noise_IK_25519_ChaChaPoly_BLAKE2s`, prologue `postern/1`.
//! * Message 1 (client → server) carries a [`ClientHello`], encrypted to the server's
//!   static key that the client knows from its network file. Only the holder of the
//!   matching private key can read it and answer.
//! * Message 2 (server → client) carries a [`ServerHello`]. A client accepts nothing from
//!   the server until message 2 decrypts, which proves the server holds its key.
//! * The client's static key, revealed only to the server, identifies the device.
//!
//! After the handshake the channel splits into a [`SecureReader`] and a [`SecureWriter`]
//! (snow's stateless transport with one nonce counter per direction), so that a task can
//! wait for pushes while another sends.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use prost::Message;
use snow::{Builder, StatelessTransportState};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::frame::{read_frame, write_frame, MAX_FRAME_LEN};
use crate::schema::{ClientHello, ServerHello};
use crate::ProtocolError;

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Bound into the handshake hash: both sides must agree on the protocol and version.
pub const PROLOGUE: &[u8] = b"postern/1";
/// Authentication tag added to every Noise message.
const TAG_LEN: usize = 16;
/// The largest plaintext one transport frame can carry.
pub const MAX_PAYLOAD_LEN: usize = MAX_FRAME_LEN - TAG_LEN;
/// Handshake messages are small; anything larger is refused before decryption. This also
/// keeps a handshake frame's first byte below 0x04, which lets the server tell it apart
/// from a PROXY header (see `proxy_header`).
pub const MAX_HANDSHAKE_LEN: usize = 1024;

fn params() -> snow::params::NoiseParams {
    NOISE_PARAMS
        .parse()
        .expect("NOISE_PARAMS is a valid, supported Noise protocol name")
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// A Curve25519 static key pair (the server's identity, or a client device's).
#[derive(Clone)]
pub struct StaticKeypair {
    private: [u8; 32],
    public: [u8; 32],
}

impl std::fmt::Debug for StaticKeypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticKeypair")
            .field("public", &self.public_base64())
            .finish_non_exhaustive()
    }
}

impl StaticKeypair {
    /// Generates a fresh key pair from the operating system's random source.
    pub fn generate() -> Self {
        let kp = Builder::new(params())
            .generate_keypair()
            .expect("key generation with the default resolver cannot fail");
        let mut private = [0u8; 32];
        let mut public = [0u8; 32];
        private.copy_from_slice(&kp.private);
        public.copy_from_slice(&kp.public);
        Self { private, public }
    }

    /// The public half, which peers pin.
    pub fn public(&self) -> &[u8; 32] {
        &self.public
    }

    pub fn public_base64(&self) -> String {
        b64().encode(self.public)
    }

    /// Serialises the pair as `private_base64:public_base64` (keep it secret).
    pub fn to_secret_string(&self) -> String {
        format!(
            "{}:{}",
            b64().encode(self.private),
            b64().encode(self.public)
        )
    }

    /// Parses the form written by [`Self::to_secret_string`].
    pub fn from_secret_string(s: &str) -> Result<Self, String> {
        let (private, public) = s
            .trim()
            .split_once(':')
            .ok_or("expected two base64 keys separated by ':'")?;
        Ok(Self {
            private: decode_key(private)?,
            public: decode_key(public)?,
        })
    }
}

/// Decodes a base64 Curve25519 public key (32 bytes).
pub fn decode_key(s: &str) -> Result<[u8; 32], String> {
    let bytes = b64()
        .decode(s.trim())
        .map_err(|e| format!("not valid base64: {e}"))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("a key is 32 bytes, this one is {}", b.len()))
}

/// Encodes a 32-byte key as base64.
pub fn encode_key(key: &[u8; 32]) -> String {
    b64().encode(key)
}

async fn with_deadline<T>(
    deadline: Duration,
    fut: impl std::future::Future<Output = Result<T, ProtocolError>>,
) -> Result<T, ProtocolError> {
    tokio::time::timeout(deadline, fut)
        .await
        .map_err(|_| ProtocolError::Timeout(deadline))?
}

/// Runs the initiator side of the handshake: proves nothing about us to anyone but the
/// server, and fails with [`ProtocolError::ServerAuthentication`] unless the peer holds
/// the private key for `server_public`.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    keys: &StaticKeypair,
    server_public: &[u8; 32],
    hello: &ClientHello,
    deadline: Duration,
) -> Result<(Arc<StatelessTransportState>, ServerHello), ProtocolError> {
    let mut hs = Builder::new(params())
        .local_private_key(&keys.private)
        .and_then(|b| b.remote_public_key(server_public))
        .and_then(|b| b.prologue(PROLOGUE))
        .and_then(|b| b.build_initiator())
        .map_err(|e| ProtocolError::Handshake(e.to_string()))?;
    let mut out = vec![0u8; MAX_HANDSHAKE_LEN];
    let n = hs
        .write_message(&hello.encode_to_vec(), &mut out)
        .map_err(|e| ProtocolError::Handshake(e.to_string()))?;
    with_deadline(deadline, async {
        write_frame(stream, &out[..n]).await?;
        let mut frame = Vec::new();
        match read_frame(stream, &mut frame).await {
            Ok(()) => {}
            // The far end hung up instead of answering: a server that cannot decrypt
            // message 1 (it does not hold the key we pinned) does exactly that.
            Err(ProtocolError::Closed) => return Err(ProtocolError::HandshakeClosed),
            Err(ProtocolError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ProtocolError::ServerAuthentication)
            }
            Err(e) => return Err(e),
        }
        if frame.len() > MAX_HANDSHAKE_LEN {
            return Err(ProtocolError::ServerAuthentication);
        }
        let mut payload = vec![0u8; frame.len()];
        let n = hs
            .read_message(&frame, &mut payload)
            .map_err(|_| ProtocolError::ServerAuthentication)?;
        let server_hello = ServerHello::decode(&payload[..n])?;
        let transport = hs
            .into_stateless_transport_mode()
            .map_err(|e| ProtocolError::Handshake(e.to_string()))?;
        Ok((Arc::new(transport), server_hello))
    })
    .await
}

/// The responder after reading message 1: it knows who the client is and waits for the
/// application to decide what to put in the [`ServerHello`].
pub struct ServerHandshake {
    hs: snow::HandshakeState,
    client_static: [u8; 32],
    hello: ClientHello,
}

impl ServerHandshake {
    /// Reads and decrypts message 1. Fails on anything that is not a handshake made for
    /// this server's key.
    pub async fn read_first<S: AsyncRead + Unpin>(
        stream: &mut S,
        keys: &StaticKeypair,
        deadline: Duration,
    ) -> Result<Self, ProtocolError> {
        let mut hs = Builder::new(params())
            .local_private_key(&keys.private)
            .and_then(|b| b.prologue(PROLOGUE))
            .and_then(|b| b.build_responder())
            .map_err(|e| ProtocolError::Handshake(e.to_string()))?;
        with_deadline(deadline, async move {
            let len = read_handshake_len(stream).await?;
            let mut frame = vec![0u8; len];
            tokio::io::AsyncReadExt::read_exact(stream, &mut frame).await?;
            let mut payload = vec![0u8; len];
            let n = hs
                .read_message(&frame, &mut payload)
                .map_err(|_| ProtocolError::HandshakeUndecryptable)?;
            let hello = ClientHello::decode(&payload[..n])?;
            let client_static: [u8; 32] = hs
                .get_remote_static()
                .and_then(|k| k.try_into().ok())
                .ok_or_else(|| ProtocolError::Handshake("no client static key".into()))?;
            Ok(Self {
                hs,
                client_static,
                hello,
            })
        })
        .await
    }

    /// The client device's static public key (its identity).
    pub fn client_static(&self) -> &[u8; 32] {
        &self.client_static
    }

    pub fn hello(&self) -> &ClientHello {
        &self.hello
    }

    /// Sends message 2 and switches to transport mode.
    pub async fn finish<S: AsyncWrite + Unpin>(
        mut self,
        stream: &mut S,
        hello: &ServerHello,
    ) -> Result<Arc<StatelessTransportState>, ProtocolError> {
        let mut out = vec![0u8; MAX_HANDSHAKE_LEN];
        let n = self
            .hs
            .write_message(&hello.encode_to_vec(), &mut out)
            .map_err(|e| ProtocolError::Handshake(e.to_string()))?;
        write_frame(stream, &out[..n]).await?;
        let transport = self
            .hs
            .into_stateless_transport_mode()
            .map_err(|e| ProtocolError::Handshake(e.to_string()))?;
        Ok(Arc::new(transport))
    }
}

/// What a server sends to a handshake it cannot decrypt: random bytes shaped like a
/// real message 2. The client then fails to authenticate the server and says so ("did not
/// prove its identity"), which is the truth, instead of seeing a bare close that looks
/// like an unreachable service. Returns the frame to write.
pub fn decoy_answer() -> Vec<u8> {
    let len = 32 + 16 + 40 + usize::from(rand::random::<u8>() % 24);
    let mut frame = (len as u16).to_be_bytes().to_vec();
    frame.extend((0..len).map(|_| rand::random::<u8>()));
    frame
}

async fn read_handshake_len<S: AsyncRead + Unpin>(stream: &mut S) -> Result<usize, ProtocolError> {
    let mut len = [0u8; 2];
    tokio::io::AsyncReadExt::read_exact(stream, &mut len).await?;
    let len = u16::from_be_bytes(len) as usize;
    if len > MAX_HANDSHAKE_LEN {
        return Err(ProtocolError::FrameTooLarge {
            len,
            max: MAX_HANDSHAKE_LEN,
        });
    }
    Ok(len)
}

/// Splits a finished handshake into the two directions of the channel.
pub fn split<R, W>(
    transport: Arc<StatelessTransportState>,
    reader: R,
    writer: W,
) -> (SecureReader<R>, SecureWriter<W>) {
    (
        SecureReader {
            reader,
            transport: transport.clone(),
            nonce: 0,
            frame: Vec::new(),
            plain: Vec::new(),
        },
        SecureWriter {
            writer,
            transport,
            nonce: 0,
            cipher: Vec::new(),
        },
    )
}

/// Buffer capacity a reader keeps between frames.
const KEEP_BUFFER: usize = 4096;

/// The receiving half: decrypts and decodes one protobuf message per frame.
pub struct SecureReader<R> {
    reader: R,
    transport: Arc<StatelessTransportState>,
    nonce: u64,
    frame: Vec<u8>,
    plain: Vec<u8>,
}

impl<R: AsyncRead + Unpin> SecureReader<R> {
    /// Receives the next message. Any tampering with the bytes on the way fails here with
    /// [`ProtocolError::Decrypt`]; the connection must then be dropped.
    pub async fn recv<M: Message + Default>(&mut self) -> Result<M, ProtocolError> {
        read_frame(&mut self.reader, &mut self.frame).await?;
        self.plain.resize(self.frame.len(), 0);
        let n = self
            .transport
            .read_message(self.nonce, &self.frame, &mut self.plain)
            .map_err(|_| ProtocolError::Decrypt)?;
        self.nonce += 1;
        let msg = M::decode(&self.plain[..n]);
        // Keep small buffers between frames: one large frame must not pin 64 KiB (twice)
        // for the rest of an idle connection's life.
        if self.frame.capacity() > KEEP_BUFFER {
            self.frame = Vec::new();
            self.plain = Vec::new();
        }
        Ok(msg?)
    }
}

/// The sending half.
pub struct SecureWriter<W> {
    writer: W,
    transport: Arc<StatelessTransportState>,
    nonce: u64,
    cipher: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> SecureWriter<W> {
    /// Encrypts and sends one message (refused if larger than [`MAX_PAYLOAD_LEN`]).
    pub async fn send<M: Message>(&mut self, msg: &M) -> Result<(), ProtocolError> {
        let plain = msg.encode_to_vec();
        if plain.len() > MAX_PAYLOAD_LEN {
            return Err(ProtocolError::FrameTooLarge {
                len: plain.len(),
                max: MAX_PAYLOAD_LEN,
            });
        }
        self.cipher.resize(plain.len() + TAG_LEN, 0);
        let n = self
            .transport
            .write_message(self.nonce, &plain, &mut self.cipher)
            .map_err(|e| ProtocolError::Handshake(e.to_string()))?;
        self.nonce += 1;
        write_frame(&mut self.writer, &self.cipher[..n]).await?;
        tokio::io::AsyncWriteExt::flush(&mut self.writer).await?;
        Ok(())
    }

    /// Shuts down the write direction (sends FIN).
    pub async fn shutdown(&mut self) -> Result<(), ProtocolError> {
        tokio::io::AsyncWriteExt::shutdown(&mut self.writer).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{client_frame, ClientFrame, Ping};

    const T: Duration = Duration::from_secs(5);

    fn hello() -> ClientHello {
        ClientHello {
            protocol_version: 1,
            software: "test".into(),
            send_only: false,
        }
    }

    #[tokio::test]
    async fn handshake_and_transport_both_ways() {
        let server = StaticKeypair::generate();
        let client = StaticKeypair::generate();
        let (mut c, mut s) = tokio::io::duplex(1 << 16);
        let server_keys = server.clone();
        let client_public = *client.public();
        let srv = tokio::spawn(async move {
            let hs = ServerHandshake::read_first(&mut s, &server_keys, T)
                .await
                .unwrap();
            assert_eq!(hs.client_static(), &client_public);
            let t = hs
                .finish(
                    &mut s,
                    &ServerHello {
                        protocol_version: 1,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            let (r, w) = tokio::io::split(s);
            let (mut r, mut w) = split(t, r, w);
            let got: ClientFrame = r.recv().await.unwrap();
            w.send(&got).await.unwrap();
        });
        let (t, sh) = client_handshake(&mut c, &client, server.public(), &hello(), T)
            .await
            .unwrap();
        assert_eq!(sh.protocol_version, 1);
        let (r, w) = tokio::io::split(c);
        let (mut r, mut w) = split(t, r, w);
        let msg = ClientFrame {
            request_id: 7,
            body: Some(client_frame::Body::Ping(Ping { nonce: 42 })),
        };
        w.send(&msg).await.unwrap();
        let echoed: ClientFrame = r.recv().await.unwrap();
        assert_eq!(echoed, msg);
        srv.await.unwrap();
    }

    #[tokio::test]
    async fn wrong_server_key_is_refused() {
        let server = StaticKeypair::generate();
        let impostor_expected = StaticKeypair::generate();
        let client = StaticKeypair::generate();
        let (mut c, mut s) = tokio::io::duplex(1 << 16);
        let srv = tokio::spawn(async move {
            // The real server cannot decrypt a message 1 made for another key.
            let r = ServerHandshake::read_first(&mut s, &server, T).await;
            assert!(matches!(r, Err(ProtocolError::HandshakeUndecryptable)));
            tokio::io::AsyncWriteExt::write_all(&mut s, &decoy_answer())
                .await
                .unwrap();
        });
        let err = client_handshake(&mut c, &client, impostor_expected.public(), &hello(), T)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProtocolError::ServerAuthentication),
            "{err:?}"
        );
        assert!(err.to_string().contains("did not prove its identity"));
        srv.await.unwrap();
    }

    #[test]
    fn keypair_secret_string_round_trips() {
        let k = StaticKeypair::generate();
        let back = StaticKeypair::from_secret_string(&k.to_secret_string()).unwrap();
        assert_eq!(back.public(), k.public());
        assert!(StaticKeypair::from_secret_string("nope").is_err());
    }
}
