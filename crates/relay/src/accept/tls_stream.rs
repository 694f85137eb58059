//! Server-side TLS over any byte stream, built on rustls's *unbuffered* API so that an idle
//! connection holds **no TLS buffers**.
//!
//! rustls's usual `ServerConnection` keeps a 4 KiB record buffer per connection for as long as
//! the connection lives, once it has read anything; for a relay holding thousands of idle
//! chat connections that was almost half of what each cost (see `docs/benchmarks.md`, idle
//! memory). With the unbuffered API the relay owns the buffers instead:
//!
//! * **incoming** — ciphertext read from the socket. Only an incomplete record is kept
//!   between reads; once every complete record is processed the buffer is freed.
//! * **outgoing** — ciphertext not yet accepted by the socket; freed once written.
//! * **plaintext** — decrypted bytes the reader had no room for (rare: the relay reads with a
//!   buffer larger than a record); freed once delivered.
//!
//! [`TlsStream`] implements `AsyncRead`/`AsyncWrite` like tokio-rustls's stream, so the rest
//! of the relay does not care which one it holds.

use crate::forward::copy::Socket;
use crate::forward::park::Parkable;
use crate::stream::Prefixed;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::ServerConfig;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Ciphertext read from the socket at a time: one full TLS record and its header.
const READ_CHUNK: usize = 16 * 1024 + 512;

/// Plaintext encrypted per `poll_write` (the writer is asked for the rest afterwards).
const WRITE_CHUNK: usize = 64 * 1024;

/// Accepts TLS connections with one server configuration.
#[derive(Clone)]
pub struct TlsAcceptor {
    config: Arc<ServerConfig>,
}

impl From<Arc<ServerConfig>> for TlsAcceptor {
    fn from(config: Arc<ServerConfig>) -> Self {
        TlsAcceptor { config }
    }
}

impl TlsAcceptor {
    /// The same acceptor offering only these ALPN protocols.
    pub fn with_alpn(&self, protocols: &[&[u8]]) -> TlsAcceptor {
        let mut config = (*self.config).clone();
        config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
        TlsAcceptor {
            config: Arc::new(config),
        }
    }

    /// Runs the server handshake on `io`; the stream is returned once the handshake is
    /// complete (the client's Finished message has been verified).
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: S,
    ) -> io::Result<TlsStream<S>> {
        Self::handshake(self.config.clone(), io).await
    }

    /// Like [`TlsAcceptor::accept`], and also returns the session's TLS 1.3 exporter master
    /// secret (`None` for TLS 1.2), which relay secrets bind their token to
    /// (see [`postern_protocol::relay_auth`]). The configuration is copied for the one
    /// connection so that its key-log hook sees only this session.
    pub async fn accept_with_exporter<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: S,
    ) -> io::Result<(TlsStream<S>, Option<Vec<u8>>)> {
        let capture = Arc::new(postern_protocol::relay_auth::ExporterCapture::default());
        let mut config = (*self.config).clone();
        config.key_log = capture.clone();
        let stream = Self::handshake(Arc::new(config), io).await?;
        Ok((stream, capture.take()))
    }

    async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
        config: Arc<ServerConfig>,
        io: S,
    ) -> io::Result<TlsStream<S>> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut stream = TlsStream::with_session(io, Box::new(conn));
        poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }
}

impl<S> TlsStream<S> {
    /// A stream over `io` carrying on `conn`, with empty buffers.
    fn with_session(io: S, conn: Box<UnbufferedServerConnection>) -> Self {
        TlsStream {
            io,
            conn,
            incoming: Vec::new(),
            in_start: 0,
            in_end: 0,
            outgoing: Vec::new(),
            out_start: 0,
            plaintext: Vec::new(),
            plain_start: 0,
            eof: false,
            close_sent: false,
        }
    }
}

/// A TLS stream on the server side. See the module documentation for its buffers.
pub struct TlsStream<S> {
    io: S,
    conn: Box<UnbufferedServerConnection>,
    /// Ciphertext buffer; `incoming[in_start..in_end]` is not yet processed. The whole
    /// vector is initialised, so reads need no zeroing.
    incoming: Vec<u8>,
    in_start: usize,
    in_end: usize,
    outgoing: Vec<u8>,
    out_start: usize,
    plaintext: Vec<u8>,
    plain_start: usize,
    /// The peer closed (close_notify or end of stream): reads return end of stream.
    eof: bool,
    close_sent: bool,
}

impl<S> TlsStream<S> {
    /// The ALPN protocol agreed in the handshake, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }
}

/// A client connection the relay terminates TLS for: TLS over the client's socket, after
/// whatever bytes came with a PROXY header.
pub type TlsClient = TlsStream<Prefixed<TcpStream>>;

impl TlsClient {
    /// Nothing is buffered: no replayed bytes, no partial record, no unsent ciphertext,
    /// no undelivered plaintext, and the session is open both ways.
    fn holds_nothing(&self) -> bool {
        self.io.unread().is_empty()
            && self.in_start == self.in_end
            && self.out_start == self.outgoing.len()
            && self.plain_start == self.plaintext.len()
            && !self.eof
            && !self.close_sent
    }
}

impl Socket for TlsClient {
    fn is_quiet(&self) -> bool {
        self.holds_nothing()
    }
}

/// A parked TLS connection keeps its session (keys, sequence numbers) and the bare socket;
/// the buffers, all empty, are dropped.
impl Parkable for TlsClient {
    type Parked = (Box<UnbufferedServerConnection>, std::net::TcpStream);

    fn park(self) -> io::Result<Self::Parked> {
        if !self.holds_nothing() {
            return Err(io::Error::other("the TLS stream still holds bytes"));
        }
        Ok((self.conn, self.io.into_inner().into_std()?))
    }

    fn fd((_, socket): &Self::Parked) -> RawFd {
        socket.as_raw_fd()
    }

    fn unpark((conn, socket): Self::Parked) -> io::Result<Self> {
        Ok(TlsStream::with_session(
            Prefixed::new(Vec::new(), TcpStream::from_std(socket)?),
            conn,
        ))
    }
}

/// What a call of [`TlsStream::process`] wants done.
enum Op<'a, 'b> {
    /// Complete the handshake.
    Handshake,
    /// Deliver plaintext into this buffer (overflow goes to `plaintext`).
    Read(&'a mut ReadBuf<'b>),
    /// Encrypt these bytes.
    Write(&'a [u8]),
    /// Queue a close_notify alert.
    Close,
}

/// How [`TlsStream::process`] ended.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// The operation is done (for `Write`, this many bytes were taken).
    Done(usize),
    /// More ciphertext from the peer is needed first.
    NeedInput,
    /// The connection is closed both ways.
    Closed,
}

thread_local! {
    /// Read buffers kept for the next connection polled on this thread, so that a read needs
    /// neither an allocation nor zeroing while no connection keeps a buffer of its own.
    static POOL: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn take_pooled() -> Vec<u8> {
    POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default()
}

fn give_pooled(buf: Vec<u8>) {
    if buf.len() >= READ_CHUNK {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < 4 {
                p.push(buf);
            }
        });
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Writes `buf[*start..]` to `io`; frees `buf` when all of it is written.
fn flush_buffer<S: AsyncWrite + Unpin>(
    io: &mut S,
    cx: &mut Context<'_>,
    buf: &mut Vec<u8>,
    start: &mut usize,
) -> Poll<io::Result<()>> {
    while *start < buf.len() {
        let n = ready!(Pin::new(&mut *io).poll_write(cx, &buf[*start..]))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        *start += n;
    }
    *buf = Vec::new();
    *start = 0;
    Poll::Ready(Ok(()))
}

/// Grows `out` by what `f` writes at its end, retrying with the size `f` asks for.
fn append_with<E>(
    out: &mut Vec<u8>,
    mut guess: usize,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, E>,
    required: impl Fn(&E) -> Option<usize>,
) -> Result<usize, E> {
    let start = out.len();
    loop {
        out.resize(start + guess, 0);
        match f(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(n);
            }
            Err(e) => match required(&e) {
                Some(size) if size > guess => guess = size,
                _ => {
                    out.truncate(start);
                    return Err(e);
                }
            },
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    /// Runs the TLS state machine over the buffered incoming records until `op` is done or
    /// more input is needed. Handshake and alert records are encoded and sent on the way.
    fn process(&mut self, cx: &mut Context<'_>, mut op: Op<'_, '_>) -> Poll<io::Result<Next>> {
        let TlsStream {
            io,
            conn,
            incoming,
            in_start,
            in_end,
            outgoing,
            out_start,
            plaintext,
            eof,
            close_sent,
            ..
        } = self;
        loop {
            let UnbufferedStatus { mut discard, state } =
                conn.process_tls_records(&mut incoming[*in_start..*in_end]);
            let state = match state {
                Ok(s) => s,
                Err(e) => return Poll::Ready(Err(tls_error(e))),
            };
            match state {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        let payload = record.payload;
                        let taken = match &mut op {
                            Op::Read(buf) => {
                                let n = payload.len().min(buf.remaining());
                                buf.put_slice(&payload[..n]);
                                n
                            }
                            _ => 0,
                        };
                        plaintext.extend_from_slice(&payload[taken..]);
                    }
                    *in_start += discard;
                    if let Op::Read(buf) = &op {
                        if !buf.filled().is_empty() || !plaintext.is_empty() {
                            return Poll::Ready(Ok(Next::Done(0)));
                        }
                    }
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    append_with(
                        outgoing,
                        4096,
                        |out| data.encode(out),
                        |e| match e {
                            EncodeError::InsufficientSize(s) => Some(s.required_size),
                            _ => None,
                        },
                    )
                    .map_err(|e| io::Error::other(format!("TLS encoding failed: {e}")))?;
                    *in_start += discard;
                }
                ConnectionState::TransmitTlsData(data) => {
                    *in_start += discard;
                    ready!(flush_buffer(io, cx, outgoing, out_start))?;
                    data.done();
                }
                ConnectionState::BlockedHandshake => {
                    *in_start += discard;
                    return Poll::Ready(Ok(Next::NeedInput));
                }
                ConnectionState::PeerClosed => {
                    *in_start += discard;
                    *eof = true;
                }
                ConnectionState::Closed => {
                    *in_start += discard;
                    *eof = true;
                    return Poll::Ready(Ok(Next::Closed));
                }
                ConnectionState::WriteTraffic(mut traffic) => {
                    *in_start += discard;
                    let done = match &op {
                        Op::Handshake => {
                            // A TLS 1.3 server may send before the client's Finished has
                            // arrived; the relay waits for it, so that a client that cannot
                            // finish a handshake never causes an upstream connection.
                            let _ = traffic;
                            return Poll::Ready(Ok(if conn.is_handshaking() {
                                Next::NeedInput
                            } else {
                                Next::Done(0)
                            }));
                        }
                        Op::Read(_) => Next::NeedInput,
                        Op::Write(data) => {
                            let data = &data[..data.len().min(WRITE_CHUNK)];
                            append_with(
                                outgoing,
                                data.len() + data.len() / 64 + 256,
                                |out| traffic.encrypt(data, out),
                                |e| match e {
                                    EncryptError::InsufficientSize(s) => Some(s.required_size),
                                    _ => None,
                                },
                            )
                            .map_err(|e| io::Error::other(format!("TLS encryption failed: {e}")))?;
                            Next::Done(data.len())
                        }
                        Op::Close => {
                            if !*close_sent {
                                append_with(
                                    outgoing,
                                    64,
                                    |out| traffic.queue_close_notify(out),
                                    |e| match e {
                                        EncryptError::InsufficientSize(s) => Some(s.required_size),
                                        _ => None,
                                    },
                                )
                                .map_err(|e| io::Error::other(format!("TLS close failed: {e}")))?;
                                *close_sent = true;
                            }
                            Next::Done(0)
                        }
                    };
                    return Poll::Ready(Ok(done));
                }
                _ => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "unexpected TLS state (early data is not accepted)",
                    )))
                }
            }
        }
    }

    /// Reads more ciphertext from the socket after the unprocessed bytes. Ok(false) at end of
    /// stream.
    fn read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.in_start > 0 {
            self.incoming.copy_within(self.in_start..self.in_end, 0);
            self.in_end -= self.in_start;
            self.in_start = 0;
        }
        if self.incoming.is_empty() {
            self.incoming = take_pooled();
        }
        if self.incoming.len() - self.in_end < READ_CHUNK {
            self.incoming.resize(self.in_end + READ_CHUNK, 0);
        }
        let mut rb = ReadBuf::new(&mut self.incoming[self.in_end..]);
        let polled = Pin::new(&mut self.io).poll_read(cx, &mut rb);
        let n = rb.filled().len();
        self.in_end += n;
        ready!(polled)?;
        Poll::Ready(Ok(n > 0))
    }

    /// Gives the incoming buffer back (to this thread's pool) once every record in it is
    /// processed.
    fn release_incoming(&mut self) {
        if self.in_start >= self.in_end {
            give_pooled(std::mem::take(&mut self.incoming));
            self.in_start = 0;
            self.in_end = 0;
        }
    }

    /// While waiting for the peer: keep only the unprocessed bytes (an incomplete record),
    /// in a buffer of their size.
    fn compact_incoming(&mut self) {
        if self.in_start >= self.in_end {
            self.release_incoming();
        } else {
            let rest = self.incoming[self.in_start..self.in_end].to_vec();
            give_pooled(std::mem::replace(&mut self.incoming, rest));
            self.in_end -= self.in_start;
            self.in_start = 0;
        }
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match ready!(self.process(cx, Op::Handshake))? {
                Next::Done(_) => {
                    self.release_incoming();
                    return Poll::Ready(Ok(()));
                }
                Next::Closed => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Next::NeedInput => {
                    if !ready!(self.read_more(cx))? {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed during the TLS handshake",
                        )));
                    }
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.plain_start < this.plaintext.len() {
            let n = (this.plaintext.len() - this.plain_start).min(buf.remaining());
            buf.put_slice(&this.plaintext[this.plain_start..this.plain_start + n]);
            this.plain_start += n;
            if this.plain_start == this.plaintext.len() {
                this.plaintext = Vec::new();
                this.plain_start = 0;
            }
            return Poll::Ready(Ok(()));
        }
        loop {
            match ready!(this.process(cx, Op::Read(&mut *buf)))? {
                Next::Done(_) => {
                    this.release_incoming();
                    return Poll::Ready(Ok(()));
                }
                Next::Closed => {
                    this.compact_incoming();
                    return Poll::Ready(Ok(()));
                }
                Next::NeedInput if this.eof => {
                    this.compact_incoming();
                    return Poll::Ready(Ok(()));
                }
                Next::NeedInput => match this.read_more(cx) {
                    Poll::Pending => {
                        this.compact_incoming();
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(true)) => {}
                    Poll::Ready(Ok(false)) => {
                        // End of stream without close_notify: fine between records (many
                        // clients just close), an error inside one.
                        this.eof = true;
                        if this.in_start < this.in_end {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "connection closed inside a TLS record",
                            )));
                        }
                        this.release_incoming();
                        return Poll::Ready(Ok(()));
                    }
                },
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Earlier ciphertext goes first; nothing more is taken while the socket is full.
        ready!(flush_buffer(
            &mut this.io,
            cx,
            &mut this.outgoing,
            &mut this.out_start
        ))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        match ready!(this.process(cx, Op::Write(data)))? {
            Next::Done(n) => {
                // Send now if the socket takes it; otherwise it is sent on the next call.
                if let Poll::Ready(Err(e)) =
                    flush_buffer(&mut this.io, cx, &mut this.outgoing, &mut this.out_start)
                {
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(n))
            }
            Next::Closed | Next::NeedInput => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(flush_buffer(
            &mut this.io,
            cx,
            &mut this.outgoing,
            &mut this.out_start
        ))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            ready!(flush_buffer(
                &mut this.io,
                cx,
                &mut this.outgoing,
                &mut this.out_start
            ))?;
            match ready!(this.process(cx, Op::Close)) {
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            this.close_sent = true;
        }
        ready!(flush_buffer(
            &mut this.io,
            cx,
            &mut this.outgoing,
            &mut this.out_start
        ))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn pair(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (TlsAcceptor, tokio_rustls::TlsConnector) {
        let g = crate::accept::tls::generate_self_signed(&["relay.test".into()]).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![g.cert.clone()], g.key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(g.cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (
            TlsAcceptor::from(Arc::new(server)),
            tokio_rustls::TlsConnector::from(Arc::new(client)),
        )
    }

    fn name() -> ServerName<'static> {
        ServerName::try_from("relay.test").unwrap()
    }

    /// The relay-secret token (`postern_protocol::relay_auth`) needs the same exporter
    /// master secret on both ends: a per-connection key-log hook captures it from this
    /// unbuffered server and from tokio-rustls's client, and the tokens agree; a second
    /// session gets a different one, so a recorded token cannot be replayed.
    #[tokio::test]
    async fn both_ends_capture_the_same_exporter_secret() {
        use postern_protocol::relay_auth::{ExporterCapture, RelaySecret};
        let secret = RelaySecret::generate();
        let mut tokens = Vec::new();
        for _ in 0..2 {
            let (acceptor, connector) = pair(&[&rustls::version::TLS13]);
            let client_capture = Arc::new(ExporterCapture::default());
            let mut client_config = (*connector.config().clone()).clone();
            client_config.key_log = client_capture.clone();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
            let (client_io, server_io) = tokio::io::duplex(64 * 1024);
            let client = tokio::spawn(async move {
                let mut tls = connector.connect(name(), client_io).await.unwrap();
                tls.write_all(b"x").await.unwrap();
                tls
            });
            let (mut server, exporter) = acceptor.accept_with_exporter(server_io).await.unwrap();
            let mut one = [0u8; 1];
            server.read_exact(&mut one).await.unwrap();
            let _client = client.await.unwrap();
            let (s, c) = (exporter.unwrap(), client_capture.take().unwrap());
            assert_eq!(s, c);
            assert_eq!(secret.tls_token(&s), secret.tls_token(&c));
            tokens.push(secret.tls_token(&s));
        }
        assert_ne!(tokens[0], tokens[1], "each session has its own token");
    }

    fn holds_no_buffers(s: &TlsStream<DuplexStream>) -> bool {
        s.incoming.capacity() == 0 && s.outgoing.capacity() == 0 && s.plaintext.capacity() == 0
    }

    /// Echoes `len` bytes each way through a server stream whose transport hands over at most
    /// `pipe` bytes at a time, then checks a clean close both ways.
    async fn echo_through(
        versions: &[&'static rustls::SupportedProtocolVersion],
        pipe: usize,
        len: usize,
    ) {
        let (acceptor, connector) = pair(versions);
        let (client_io, server_io) = tokio::io::duplex(pipe);
        let data: Vec<u8> = (0..len as u32).map(|i| (i * 31 % 257) as u8).collect();
        let d2 = data.clone();
        let client = tokio::spawn(async move {
            let tls = connector.connect(name(), client_io).await.unwrap();
            let (mut r, mut w) = tokio::io::split(tls);
            let writer = tokio::spawn(async move {
                w.write_all(&d2).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.unwrap();
            writer.await.unwrap();
            back
        });
        let mut server = acceptor.accept(server_io).await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "server read different bytes");
        server.write_all(&got).await.unwrap();
        server.shutdown().await.unwrap();
        assert!(client.await.unwrap() == data, "client read different bytes");
        assert!(holds_no_buffers(&server), "buffers held after the exchange");
    }

    #[tokio::test]
    async fn tls13_both_ways_with_close() {
        echo_through(&[&rustls::version::TLS13], 64 * 1024, 1_000_000).await;
    }

    #[tokio::test]
    async fn tls12_both_ways_with_close() {
        echo_through(&[&rustls::version::TLS12], 64 * 1024, 300_000).await;
    }

    /// Every record and handshake message arrives in pieces of 7 bytes.
    #[tokio::test]
    async fn records_split_into_small_pieces() {
        echo_through(&[&rustls::version::TLS13], 7, 50_000).await;
    }

    #[tokio::test]
    async fn idle_stream_releases_its_buffers() {
        let (acceptor, connector) = pair(&[&rustls::version::TLS13]);
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let client = tokio::spawn(async move {
            let mut tls = connector.connect(name(), client_io).await.unwrap();
            tls.write_all(b"ping").await.unwrap();
            let mut b = [0u8; 4];
            tls.read_exact(&mut b).await.unwrap();
            assert_eq!(&b, b"pong");
            tls // kept open, idle
        });
        let mut server = acceptor.accept(server_io).await.unwrap();
        let mut b = [0u8; 4];
        server.read_exact(&mut b).await.unwrap();
        server.write_all(b"pong").await.unwrap();
        let _client = client.await.unwrap();
        // A read that finds nothing leaves the stream holding no buffer.
        let mut buf = [0u8; 64];
        let pending = poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut buf);
            Poll::Ready(Pin::new(&mut server).poll_read(cx, &mut rb).is_pending())
        })
        .await;
        assert!(pending);
        assert!(holds_no_buffers(&server));
    }

    #[tokio::test]
    async fn not_tls_fails_the_handshake() {
        let (acceptor, _) = pair(&[&rustls::version::TLS13]);
        let (mut client_io, server_io) = tokio::io::duplex(1024);
        client_io
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(acceptor.accept(server_io).await.is_err());
        let (mut client_io, server_io) = tokio::io::duplex(1024);
        client_io.write_all(&[0x16, 3, 1, 0, 200, 1]).await.unwrap();
        drop(client_io);
        let e = acceptor.accept(server_io).await.err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
