//! One client connection: optional PROXY header, Noise handshake, then requests and pushes.
//!
//! A reader task decodes frames into a channel so the main loop can `select!` safely over
//! client requests, wake-ups from the [`Hub`](crate::hub::Hub), the idle deadline and
//! server shutdown. Pushes are read from the database from a per-connection cursor, so
//! delivery to an online device and to one that reconnects later is the same code path.
//!
//! Acknowledgements are applied by the reader task itself, as they arrive, not queued
//! behind the main loop: while the main loop pushes a backlog its writes can block (a
//! censor that freezes the flow mid-backlog stops the client's TCP from reading), and
//! acknowledgements waiting behind them would die with the connection. The client's next
//! connection would then be sent the same messages again and never get further. Applied
//! at once, every acknowledgement that reaches the server counts, so each connection
//! makes progress. They get no answer (the client never waits for one).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use postern_protocol::noise::{self, SecureWriter, ServerHandshake};
use postern_protocol::schema::{
    client_frame, server_frame, ClientFrame, DeviceBundle as WireBundle, DeviceIdentity,
    DeviceKeys, Envelope, Error as WireError, ErrorCode, KeyBundle, KeysLow, KeysUploaded,
    MediaData, MediaFetch, MediaLimits, MediaState, MediaUpload, MessageAccepted, Pong, Receipt,
    Registered, ServerFrame, ServerHello, SignedKey as WireKey,
};
use postern_protocol::{proxy_header, username, ProtocolError, PROTOCOL_VERSION};
use tokio::io::{AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::hub::Presence;
use crate::media::{MediaError, MediaId};
use crate::push_window::PushWindow;
use crate::store::{
    DeviceRecord, EnqueueLimits, EnqueueOutcome, OutgoingCiphertext, QueuedEnvelope, QueuedReceipt,
    RegisterOutcome, SignedKey,
};
use crate::{ServerError, Shared};
use postern_protocol::net::SourceSlot;
use postern_protocol::stream::Prefixed;

/// Envelopes or receipts read from the database per round trip while pushing.
const PUSH_BATCH: u32 = 64;
/// Bytes an envelope takes on the wire besides its ciphertext and sender name (ids, times,
/// protobuf tags, the Noise tag and the frame length), for the push window.
const ENVELOPE_OVERHEAD: usize = 64;
/// Length of a message id (random, chosen by the sender).
const MESSAGE_ID_LEN: usize = 16;

/// Why a connection ended early. Never shown to the client in detail.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("closed after a bad request: {0}")]
    BadRequest(String),
    #[error("nothing pushed was acknowledged for {0:?}")]
    Stalled(std::time::Duration),
}

/// Serves one accepted TCP connection until it ends or the server shuts down.
pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    slot: Option<SourceSlot>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    let conn_id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let span = if shared.log_client_addresses {
        tracing::debug_span!("conn", id = conn_id, peer = %peer)
    } else {
        tracing::debug_span!("conn", id = conn_id)
    };
    let result =
        tracing::Instrument::instrument(run(stream, peer, slot, shared, shutdown), span).await;
    match result {
        Ok(()) => debug!("connection closed"),
        Err(ConnError::Protocol(ProtocolError::Closed)) => debug!("client disconnected"),
        Err(ConnError::Server(e)) => warn!(error = %e, "connection failed on a server error"),
        Err(e) => debug!(error = %e, "connection closed"),
    }
}

/// A connection past its handshake: the two directions of the Noise channel and who is on
/// the other end.
struct Established {
    reader: noise::SecureReader<Prefixed<OwnedReadHalf>>,
    writer: SecureWriter<OwnedWriteHalf>,
    device: Option<DeviceRecord>,
    noise_key: [u8; 32],
    client_addr: SocketAddr,
    send_only: bool,
    slot: Option<SourceSlot>,
}

async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    slot: Option<SourceSlot>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let accepted = Instant::now();
    // Boxed: the handshake's futures are large and needed once; inline, they would size the
    // connection's task for its whole life (an idle connection's memory is mostly its
    // futures).
    let Established {
        mut reader,
        writer,
        device,
        noise_key,
        client_addr,
        send_only,
        slot,
    } = Box::pin(establish(stream, peer, slot, &shared)).await?;
    let _slot = slot;

    // Frames travel boxed: tokio's channel allocates its slots in blocks of 32 when it is
    // created, and an unboxed `ClientFrame` (its largest variant, `Register`) made that
    // block about 5 KiB of every idle connection's memory, a boxed frame beside an unboxed
    // error still 1 KiB; a box is one pointer (256 bytes for the block).
    let (frames_tx, frames_rx) = mpsc::channel(8);
    let acks_for: Arc<OnceLock<DeviceRecord>> = Arc::default();
    if let Some(d) = &device {
        let _ = acks_for.set(d.clone());
    }
    let window = Arc::new(PushWindow::default());
    let reader_window = window.clone();
    let reader_shared = shared.clone();
    let reader_device = acks_for.clone();
    let reader_task = tokio::spawn(async move {
        loop {
            let frame = reader.recv::<ClientFrame>().await;
            if let (
                Ok(ClientFrame {
                    body: Some(body), ..
                }),
                Some(device),
            ) = (&frame, reader_device.get())
            {
                match apply_ack(&reader_shared, &reader_window, device, body).await {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => {
                        warn!(error = %e, "could not apply an acknowledgement");
                        break;
                    }
                }
            }
            let failed = frame.is_err();
            if frames_tx.send(Box::new(frame)).await.is_err() || failed {
                break;
            }
        }
    });
    let shared_unregistered = shared.limits.unregistered_timeout;
    let mut session = Session {
        shared,
        writer,
        device: device.map(Arc::new),
        acks_for,
        window,
        shutdown: shutdown.clone(),
        noise_key,
        client_addr,
        send_only,
        presence: None,
        envelope_cursor: 0,
        receipt_cursor: 0,
        register_by: accepted + shared_unregistered,
    };
    let result = session.run(frames_rx, shutdown).await;
    reader_task.abort();
    result
}

/// Reads the optional PROXY header and the Noise handshake, looks the device up and answers.
async fn establish(
    stream: TcpStream,
    peer: SocketAddr,
    mut slot: Option<SourceSlot>,
    shared: &Shared,
) -> Result<Established, ConnError> {
    let _ = stream.set_nodelay(true);
    // The buffer lets us peek at the first byte for PROXY detection without losing it.
    let mut stream = BufReader::with_capacity(2048, stream);
    let limit = shared.limits.handshake_timeout;
    let (client_addr, via_proxy, handshake) = tokio::time::timeout(limit, async {
        let proxy = proxy_header::read_optional(&mut stream).await?;
        // Advisory, and only from a trusted proxy: from anyone else the header is ignored
        // (a client could otherwise claim any address and dodge every per-address limit).
        let claimed = proxy.and_then(|p| p.source);
        let trusted = shared.limits.trusted_proxies.trusts(peer.ip());
        if claimed.is_some() && !trusted {
            shared.refusals.count(
                &shared.refusals.untrusted_proxy_header,
                "PROXY header from a peer not in --trusted-proxy (ignored)",
            );
        }
        let client_addr = shared.limits.trusted_proxies.client_address(peer, claimed);
        if slot.is_none() {
            // Through a trusted proxy: the per-source limit counts the real client.
            match shared.per_source.try_acquire(client_addr.ip()) {
                Some(s) => slot = Some(s),
                None => {
                    shared.refusals.count(
                        &shared.refusals.source_full,
                        "too many connections from one address",
                    );
                    return Err(ProtocolError::Violation(
                        "too many connections from this address".into(),
                    ));
                }
            }
        }
        let hs = match ServerHandshake::read_first(&mut stream, &shared.keys, limit).await {
            Err(ProtocolError::HandshakeUndecryptable) => {
                // Made for another key, or altered on the way: answer so the client
                // learns the far end is not the server it pinned (see `decoy_answer`).
                let _ = stream.get_mut().write_all(&noise::decoy_answer()).await;
                return Err(ProtocolError::HandshakeUndecryptable);
            }
            other => other?,
        };
        Ok::<_, ProtocolError>((client_addr, proxy.is_some(), hs))
    })
    .await
    .map_err(|_| ProtocolError::Timeout(limit))??;
    if shared.log_client_addresses {
        debug!(peer = %peer, client = %client_addr, via_proxy, "handshake received");
    }

    let device = shared
        .store
        .device_by_noise_key(handshake.client_static())
        .await?;
    let remaining = match &device {
        Some(d) => {
            shared
                .store
                .one_time_key_count(&d.username, d.device_id)
                .await?
        }
        None => 0,
    };
    let send_only = handshake.hello().send_only;
    let noise_key = *handshake.client_static();
    let hello = ServerHello {
        protocol_version: PROTOCOL_VERSION,
        device: device.as_ref().map(identity),
        one_time_keys_remaining: remaining,
        server_time_ms: postern_protocol::now_ms(),
        media: shared.media.as_ref().map(|m| {
            let c = m.config();
            MediaLimits {
                max_file_bytes: c.max_file_bytes,
                quota_bytes: c.quota_bytes,
                ttl_seconds: c.ttl.as_secs(),
            }
        }),
    };
    let transport = handshake.finish(&mut stream, &hello).await?;
    // The buffer has done its work: whatever it read ahead is replayed, and the socket is
    // read directly from now on (2 KiB less for every connection that stays).
    let read_ahead = stream.buffer().to_vec();
    let (read_half, write_half) = stream.into_inner().into_split();
    let (reader, writer) =
        noise::split(transport, Prefixed::new(read_ahead, read_half), write_half);
    Ok(Established {
        reader,
        writer,
        device,
        noise_key,
        client_addr,
        send_only,
        slot,
    })
}

/// Applies `body` if it is an acknowledgement from `device`; returns whether it was one.
async fn apply_ack(
    shared: &Shared,
    window: &PushWindow,
    device: &DeviceRecord,
    body: &client_frame::Body,
) -> Result<bool, ServerError> {
    match body {
        client_frame::Body::AckMessage(a) => {
            window.acked(&a.message_id);
            // The store tells the sender's connections about the receipt.
            shared.store.ack_message(device, &a.message_id).await?;
            Ok(true)
        }
        client_frame::Body::AckReceipt(a) => {
            shared.store.ack_receipt(device, &a.message_id).await?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

fn identity(d: &DeviceRecord) -> DeviceIdentity {
    DeviceIdentity {
        username: d.username.clone(),
        device_id: d.device_id as u64,
    }
}

fn error_body(code: ErrorCode, message: impl Into<String>) -> server_frame::Body {
    server_frame::Body::Error(WireError {
        code: code as i32,
        message: message.into(),
    })
}

fn media_unavailable() -> server_frame::Body {
    error_body(
        ErrorCode::MediaUnavailable,
        "this server keeps no media (attachments)",
    )
}

/// The answer for a refused media request. Malformed requests close the connection, like
/// any other; the rest are answered and the connection goes on.
fn media_error(e: MediaError) -> server_frame::Body {
    let code = match &e {
        MediaError::NotFound => ErrorCode::MediaNotFound,
        MediaError::TooLarge { .. } => ErrorCode::MediaTooLarge,
        MediaError::QuotaExceeded { .. } | MediaError::TooManyUploads(_) | MediaError::DiskFull => {
            ErrorCode::StorageFull
        }
        MediaError::Conflict => ErrorCode::MediaConflict,
        MediaError::BadRequest(_) => ErrorCode::BadRequest,
        MediaError::Io { .. } | MediaError::Remote(_) => {
            warn!(error = %e, "media store failed");
            return error_body(
                ErrorCode::Internal,
                "the media store failed: try again later",
            );
        }
    };
    error_body(code, e.to_string())
}

struct Session<W> {
    shared: Arc<Shared>,
    writer: SecureWriter<W>,
    /// Shared so that handling a frame or a wake-up takes it without copying the name.
    device: Option<Arc<DeviceRecord>>,
    /// The device whose acknowledgements the reader task applies (set once known).
    acks_for: Arc<OnceLock<DeviceRecord>>,
    /// Envelopes pushed and not yet acknowledged (see `push_window`).
    window: Arc<PushWindow>,
    /// Server shutdown, also while waiting for the push window to open.
    shutdown: watch::Receiver<bool>,
    noise_key: [u8; 32],
    client_addr: SocketAddr,
    send_only: bool,
    presence: Option<Presence>,
    envelope_cursor: i64,
    receipt_cursor: i64,
    /// A connection without a registered device is closed at this instant.
    register_by: Instant,
}

impl<W: AsyncWrite + Unpin> Session<W> {
    async fn run(
        &mut self,
        mut frames: mpsc::Receiver<Box<Result<ClientFrame, ProtocolError>>>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), ConnError> {
        self.go_online();
        self.push_pending().await?;
        let idle = self.shared.limits.idle_timeout;
        let mut deadline = Instant::now() + idle;
        loop {
            let signal = self.presence.as_ref().map(|p| p.signal.clone());
            tokio::select! {
                frame = frames.recv() => {
                    deadline = Instant::now() + idle;
                    match frame.map(|f| *f) {
                        None => return Ok(()),
                        Some(Ok(frame)) => self.handle(frame).await?,
                        Some(Err(ProtocolError::Decode(e))) => {
                            let body = error_body(ErrorCode::BadRequest, format!("malformed frame: {e}"));
                            self.reply(0, body).await?;
                            return Err(ConnError::BadRequest(e.to_string()));
                        }
                        Some(Err(e)) => return Err(e.into()),
                    }
                }
                _ = async { signal.as_ref().expect("guarded by if").notify.notified().await }, if signal.is_some() => {
                    self.push_pending().await?;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    debug!("idle timeout");
                    return Ok(());
                }
                _ = tokio::time::sleep_until(self.register_by), if self.device.is_none() => {
                    // Not an account and not becoming one: it only holds a slot.
                    self.shared.refusals.count(
                        &self.shared.refusals.unregistered_timeout,
                        "connection closed: not registered in time",
                    );
                    return Ok(());
                }
                _ = shutdown.changed() => {
                    return Ok(());
                }
            }
        }
    }

    /// Starts receiving pushes, if this connection is a registered, receiving device. The
    /// first push reads everything that queued up while it was away.
    fn go_online(&mut self) {
        if let (Some(d), None, false) = (&self.device, &self.presence, self.send_only) {
            let presence = self.shared.hub.join(d.device_id);
            presence.signal.envelopes.store(true, Ordering::Release);
            presence.signal.receipts.store(true, Ordering::Release);
            self.presence = Some(presence);
        }
    }

    async fn reply(&mut self, request_id: u64, body: server_frame::Body) -> Result<(), ConnError> {
        self.writer
            .send(&ServerFrame {
                request_id,
                body: Some(body),
            })
            .await?;
        Ok(())
    }

    /// Sends everything queued for this device that this connection has not sent yet: what
    /// the store handed over, and what it has to read from the database when told to (see
    /// `hub`). The cursors skip anything already sent, so the two never overlap.
    async fn push_pending(&mut self) -> Result<(), ConnError> {
        let (Some(device), Some(presence)) = (&self.device, &self.presence) else {
            return Ok(());
        };
        // Handles of their own: the loops below update this session's cursors while using
        // them.
        let device = &*device.clone();
        let device_id = device.device_id;
        let waiting = presence.signal.take();
        // The database first: everything handed over was committed before this read began,
        // so the read covers it and the cursor then skips it.
        let mut read = waiting.read_envelopes;
        while read {
            let batch = self
                .shared
                .store
                .pending(device, self.envelope_cursor, PUSH_BATCH)
                .await?;
            // A full batch means there may be more.
            read = batch.len() == PUSH_BATCH as usize;
            for e in batch {
                if !self.push_envelope(e).await? {
                    return Ok(());
                }
            }
        }
        for e in waiting.mailbox.envelopes {
            if e.seq > self.envelope_cursor && !self.push_envelope(Arc::unwrap_or_clone(e)).await? {
                return Ok(());
            }
        }
        let mut read = waiting.read_receipts;
        while read {
            let batch = self
                .shared
                .store
                .pending_receipts(device, self.receipt_cursor, PUSH_BATCH)
                .await?;
            read = batch.len() == PUSH_BATCH as usize;
            for r in batch {
                self.push_receipt(r).await?;
            }
        }
        for r in waiting.mailbox.receipts {
            if r.seq > self.receipt_cursor {
                self.push_receipt(Arc::unwrap_or_clone(r)).await?;
            }
        }
        if waiting.keys_low {
            let remaining = self
                .shared
                .store
                .one_time_key_count(&device.username, device_id)
                .await?;
            let body = server_frame::Body::KeysLow(KeysLow {
                one_time_keys_remaining: remaining,
            });
            self.reply(0, body).await?;
        }
        Ok(())
    }

    /// Pushes one envelope once the push window has room, and moves the cursor past it.
    /// False if the server is shutting down instead (nothing was pushed).
    async fn push_envelope(&mut self, e: QueuedEnvelope) -> Result<bool, ConnError> {
        // At most a window of unacknowledged envelopes in flight, so a path that freezes
        // after some kilobytes still gets each window acknowledged.
        if !self.window.has_room() {
            let idle = self.shared.limits.idle_timeout;
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                opened = tokio::time::timeout(idle, self.window.room()) => {
                    opened.map_err(|_| ConnError::Stalled(idle))?;
                }
                // The main loop sees the shutdown too and ends the session.
                _ = shutdown.changed() => return Ok(false),
            }
        }
        self.window.pushed(
            &e.message_id,
            e.ciphertext.len() + e.sender.len() + ENVELOPE_OVERHEAD,
        );
        self.envelope_cursor = e.seq;
        let body = server_frame::Body::Envelope(Envelope {
            message_id: e.message_id,
            sender: e.sender,
            sender_device_id: e.sender_device as u64,
            server_time_ms: e.server_time_ms,
            olm_type: e.olm_type,
            ciphertext: e.ciphertext,
        });
        self.reply(0, body).await?;
        Ok(true)
    }

    /// Pushes one receipt and moves the cursor past it.
    async fn push_receipt(&mut self, r: QueuedReceipt) -> Result<(), ConnError> {
        self.receipt_cursor = r.seq;
        let body = server_frame::Body::Receipt(Receipt {
            message_id: r.message_id,
            recipient: r.recipient,
            server_time_ms: r.server_time_ms,
            expired: r.expired,
        });
        self.reply(0, body).await
    }

    async fn handle(&mut self, frame: ClientFrame) -> Result<(), ConnError> {
        use client_frame::Body;
        let id = frame.request_id;
        let Some(body) = frame.body else {
            let body = error_body(ErrorCode::BadRequest, "empty frame");
            self.reply(id, body).await?;
            return Err(ConnError::BadRequest("empty frame".into()));
        };
        let answer = match body {
            Body::Ping(p) => server_frame::Body::Pong(Pong { nonce: p.nonce }),
            // Rare requests run boxed: a session's future is as large as the largest future
            // it may await, for the whole life of the connection (see `run`).
            Body::Register(r) => Box::pin(self.register(r)).await?,
            other => match self.device.clone() {
                None => error_body(
                    ErrorCode::NotRegistered,
                    "this device is not registered: create an account first",
                ),
                Some(device) => match other {
                    Body::UploadKeys(u) => Box::pin(self.upload_keys(&device, u)).await?,
                    Body::ClaimKeys(c) => Box::pin(self.claim_keys(&device, c)).await?,
                    Body::Send(s) => self.send(&device, s).await?,
                    Body::MediaUpload(u) => Box::pin(self.media_upload(&device, u)).await,
                    Body::MediaFetch(f) => Box::pin(self.media_fetch(f)).await,
                    // Normally applied by the reader task; never answered.
                    Body::AckMessage(_) | Body::AckReceipt(_) => {
                        apply_ack(&self.shared, &self.window, &device, &other).await?;
                        return Ok(());
                    }
                    Body::Ping(_) | Body::Register(_) => unreachable!("handled above"),
                },
            },
        };
        let fatal = matches!(&answer, server_frame::Body::Error(e) if e.code == ErrorCode::BadRequest as i32);
        self.reply(id, answer).await?;
        if fatal {
            return Err(ConnError::BadRequest("invalid request".into()));
        }
        if self.presence.is_none() {
            self.go_online();
            self.push_pending().await?;
        }
        Ok(())
    }

    async fn media_upload(&self, device: &DeviceRecord, u: MediaUpload) -> server_frame::Body {
        let Some(media) = &self.shared.media else {
            return media_unavailable();
        };
        let Ok(id) = MediaId::try_from(&u.media_id[..]) else {
            return error_body(ErrorCode::BadRequest, "a media id is 16 bytes");
        };
        match media
            .upload(&device.username, &id, u.size, u.offset, u.data)
            .await
        {
            Ok(st) => server_frame::Body::MediaState(MediaState {
                media_id: u.media_id,
                stored: st.stored,
                size: st.size,
                complete: st.complete,
            }),
            Err(e) => media_error(e),
        }
    }

    async fn media_fetch(&self, f: MediaFetch) -> server_frame::Body {
        let Some(media) = &self.shared.media else {
            return media_unavailable();
        };
        let Ok(id) = MediaId::try_from(&f.media_id[..]) else {
            return error_body(ErrorCode::BadRequest, "a media id is 16 bytes");
        };
        match media.fetch(&id, f.offset, f.max_len).await {
            Ok((data, size)) => server_frame::Body::MediaData(MediaData {
                media_id: f.media_id,
                offset: f.offset,
                data,
                size,
            }),
            Err(e) => media_error(e),
        }
    }

    async fn register(
        &mut self,
        r: postern_protocol::schema::Register,
    ) -> Result<server_frame::Body, ConnError> {
        if self.device.is_some() {
            return Ok(error_body(
                ErrorCode::AlreadyRegistered,
                "this device already belongs to an account",
            ));
        }
        if let Err(msg) = username::validate(&r.username) {
            return Ok(error_body(ErrorCode::InvalidUsername, msg));
        }
        let Some(keys) = r.keys.filter(valid_device_keys) else {
            return Ok(error_body(
                ErrorCode::BadRequest,
                "device keys missing or malformed",
            ));
        };
        let Some(otks) = signed_keys(&r.one_time_keys) else {
            return Ok(error_body(ErrorCode::BadRequest, "malformed one-time key"));
        };
        if otks.len() > self.shared.limits.max_one_time_keys as usize {
            return Ok(error_body(ErrorCode::TooManyKeys, "too many one-time keys"));
        }
        let fallback = match r.fallback_key.as_ref().map(signed_key) {
            Some(None) => return Ok(error_body(ErrorCode::BadRequest, "malformed fallback key")),
            Some(Some(k)) => Some(k),
            None => None,
        };
        if !self.shared.registrations.allow(self.client_addr.ip()) {
            return Ok(error_body(
                ErrorCode::RateLimited,
                "too many registrations from this address: wait a minute and try again",
            ));
        }
        let outcome = self
            .shared
            .store
            .register(
                &r.username,
                &self.noise_key,
                &keys.curve25519,
                &keys.ed25519,
                &otks,
                fallback.as_ref(),
            )
            .await?;
        Ok(match outcome {
            RegisterOutcome::Registered(device) => {
                info!(device = device.device_id, "account registered");
                let body = server_frame::Body::Registered(Registered {
                    device: Some(identity(&device)),
                });
                let _ = self.acks_for.set(device.clone());
                self.device = Some(Arc::new(device));
                body
            }
            RegisterOutcome::UsernameTaken => error_body(
                ErrorCode::UsernameTaken,
                format!("the username {:?} is taken: choose another", r.username),
            ),
            RegisterOutcome::DeviceAlreadyRegistered => error_body(
                ErrorCode::AlreadyRegistered,
                "this device already belongs to an account",
            ),
        })
    }

    async fn upload_keys(
        &mut self,
        device: &DeviceRecord,
        u: postern_protocol::schema::UploadKeys,
    ) -> Result<server_frame::Body, ConnError> {
        let Some(otks) = signed_keys(&u.one_time_keys) else {
            return Ok(error_body(ErrorCode::BadRequest, "malformed one-time key"));
        };
        let fallback = match u.fallback_key.as_ref().map(signed_key) {
            Some(None) => return Ok(error_body(ErrorCode::BadRequest, "malformed fallback key")),
            Some(Some(k)) => Some(k),
            None => None,
        };
        let max = self.shared.limits.max_one_time_keys;
        Ok(
            match self
                .shared
                .store
                .upload_keys(device, &otks, fallback.as_ref(), max)
                .await?
            {
                Some(n) => server_frame::Body::KeysUploaded(KeysUploaded {
                    one_time_keys_remaining: n,
                }),
                None => error_body(
                    ErrorCode::TooManyKeys,
                    format!("a device may store at most {max} one-time keys"),
                ),
            },
        )
    }

    async fn claim_keys(
        &mut self,
        device: &DeviceRecord,
        c: postern_protocol::schema::ClaimKeys,
    ) -> Result<server_frame::Body, ConnError> {
        if username::validate(&c.username).is_err() {
            return Ok(error_body(ErrorCode::UnknownUser, "no such user"));
        }
        if !self.shared.claims_by_requester.allow(device.account_id) {
            return Ok(error_body(
                ErrorCode::RateLimited,
                "too many key requests from this account: wait a minute and try again",
            ));
        }
        // Past the per-target rate, claims get the fallback key: a user's one-time keys
        // cannot be drained, and sessions with them can still start.
        let one_time = self.shared.claims_by_target.allow(c.username.clone());
        let Some(bundles) = self.shared.store.claim_keys(&c.username, one_time).await? else {
            return Ok(error_body(
                ErrorCode::UnknownUser,
                format!("there is no user {:?} on this server", c.username),
            ));
        };
        let low = self.shared.limits.low_one_time_keys;
        let mut devices = Vec::with_capacity(bundles.len());
        for b in bundles {
            if !b.is_fallback
                && self
                    .shared
                    .store
                    .one_time_key_count(&c.username, b.device_id)
                    .await?
                    < low
            {
                self.shared.hub.keys_low(b.device_id);
                self.shared.store.keys_low(&c.username, b.device_id).await?;
            }
            devices.push(WireBundle {
                device_id: b.device_id as u64,
                keys: Some(DeviceKeys {
                    curve25519: b.curve25519,
                    ed25519: b.ed25519,
                }),
                one_time_key: b.key.map(|k| WireKey {
                    public_key: k.public_key,
                    signature: k.signature,
                }),
                is_fallback: b.is_fallback,
            });
        }
        Ok(server_frame::Body::KeyBundle(KeyBundle {
            username: c.username,
            devices,
        }))
    }

    async fn send(
        &mut self,
        device: &DeviceRecord,
        s: postern_protocol::schema::SendMessage,
    ) -> Result<server_frame::Body, ConnError> {
        if s.message_id.len() != MESSAGE_ID_LEN {
            return Ok(error_body(
                ErrorCode::BadRequest,
                "message id must be 16 bytes",
            ));
        }
        if s.ciphertexts.is_empty()
            || s.ciphertexts.len() > self.shared.limits.max_devices_per_message
        {
            return Ok(error_body(
                ErrorCode::BadRequest,
                "wrong number of ciphertexts",
            ));
        }
        if username::validate(&s.recipient).is_err() {
            return Ok(error_body(ErrorCode::UnknownUser, "no such user"));
        }
        if !self.shared.disk.has_room() {
            return Ok(error_body(
                ErrorCode::StorageFull,
                "the server is short of disk space: the message stays pending, try again later",
            ));
        }
        if !self.shared.message_rate.allow(device.account_id) {
            return Ok(error_body(
                ErrorCode::RateLimited,
                "too many messages from this account: wait a minute and try again",
            ));
        }
        let ciphertexts: Vec<OutgoingCiphertext> = s
            .ciphertexts
            .into_iter()
            .map(|c| OutgoingCiphertext {
                device_id: c.device_id as i64,
                olm_type: c.olm_type,
                body: c.body,
            })
            .collect();
        let outcome = self
            .shared
            .store
            .enqueue(
                device,
                &s.recipient,
                &s.message_id,
                &ciphertexts,
                EnqueueLimits {
                    max_queue: self.shared.limits.max_queue_per_device,
                    max_queued_bytes: self.shared.limits.max_queued_bytes_per_account,
                },
            )
            .await?;
        Ok(match outcome {
            // The store has told the recipient's connections.
            EnqueueOutcome::Accepted { server_time_ms, .. } => {
                server_frame::Body::MessageAccepted(MessageAccepted {
                    message_id: s.message_id,
                    server_time_ms,
                })
            }
            EnqueueOutcome::UnknownRecipient => error_body(
                ErrorCode::UnknownUser,
                format!("there is no user {:?} on this server", s.recipient),
            ),
            EnqueueOutcome::DevicesChanged => error_body(
                ErrorCode::DevicesChanged,
                "the recipient's devices changed: claim their keys again",
            ),
            EnqueueOutcome::QueueFull => error_body(
                ErrorCode::QueueFull,
                "the recipient has too many undelivered messages: try again later",
            ),
            EnqueueOutcome::OverQuota => error_body(
                ErrorCode::StorageFull,
                "this account has too much undelivered data waiting: try again once some is delivered",
            ),
        })
    }
}

fn valid_device_keys(k: &DeviceKeys) -> bool {
    k.curve25519.len() == 32 && k.ed25519.len() == 32
}

fn signed_key(k: &WireKey) -> Option<SignedKey> {
    (k.public_key.len() == 32 && k.signature.len() == 64).then(|| SignedKey {
        public_key: k.public_key.clone(),
        signature: k.signature.clone(),
    })
}

fn signed_keys(keys: &[WireKey]) -> Option<Vec<SignedKey>> {
    keys.iter().map(signed_key).collect()
}
