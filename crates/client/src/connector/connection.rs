//! One authenticated connection to the server, shared by requests and pushes, watched for
//! stalls.
//!
//! A reader task owns the receiving half: answers go to the request that is waiting for
//! them (matched by request id), pushes (envelopes, receipts, notices) go in order to a
//! bounded channel that the client's push handler drains. The push handler never waits
//! for an answer itself (acknowledgements are sent without waiting), so a full push
//! channel can slow the reader down but never deadlock it.
//!
//! A keepalive task pings the server when the connection has been silent (see
//! [`super::liveness`]) and closes the connection when a ping goes unanswered: a censor
//! that silently freezes the flow is noticed within seconds, every request still waiting
//! fails, and the push handler sees [`Push::Closed`] so the connector can race a new
//! connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postern_protocol::noise::{self, SecureWriter, StaticKeypair};
use postern_protocol::schema::{
    client_frame, server_frame, ClientFrame, ClientHello, Ping, ServerFrame, ServerHello,
};
use postern_protocol::{ProtocolError, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncWrite, WriteHalf};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::liveness::{Check, Liveness};
use crate::timeouts::STALL_DEADLINE;
use crate::ClientError;

/// Any byte stream the channel can run over: TCP, or TLS to a relay.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}
pub type BoxStream = Box<dyn Stream>;

/// Pushes waiting for the push handler.
const PUSH_QUEUE: usize = 256;

/// What the reader task hands to the push handler.
pub(crate) enum Push {
    Frame(server_frame::Body),
    /// Answered once every push received before it has been handled.
    Barrier(oneshot::Sender<()>),
    Closed(String),
}

type Writer = SecureWriter<WriteHalf<BoxStream>>;

/// The answer to a request that was sent ([`Connection::send_request`]).
pub(crate) struct Answer {
    id: u64,
    rx: oneshot::Receiver<server_frame::Body>,
    shared: Arc<Shared>,
}

impl Answer {
    /// Waits for the answer; a server `Error` becomes `Err`.
    /// (The waiter is forgotten when the answer is dropped, so a timeout leaves nothing.)
    pub async fn wait(mut self, timeout: Duration) -> Result<server_frame::Body, ClientError> {
        match tokio::time::timeout(timeout, &mut self.rx).await {
            Err(_) => Err(ClientError::Timeout(timeout)),
            Ok(Err(_)) => Err(ClientError::NotConnected),
            Ok(Ok(server_frame::Body::Error(e))) => Err(ClientError::Server {
                code: e.code,
                message: e.message,
            }),
            Ok(Ok(body)) => Ok(body),
        }
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        // Not waited for (a transfer gave up on its window): forget the waiter.
        lock(&self.shared.waiters).remove(&self.id);
    }
}

/// State the connection's handle and its tasks share.
struct Shared {
    writer: tokio::sync::Mutex<Writer>,
    waiters: Mutex<HashMap<u64, oneshot::Sender<server_frame::Body>>>,
    next_id: AtomicU64,
    liveness: Mutex<Liveness>,
    /// Request id of the keepalive ping in flight (0: none).
    keepalive_id: AtomicU64,
    /// Why the connection is being closed, when this side decided it.
    close_reason: Mutex<Option<String>>,
    stop: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn close(&self, reason: String) {
        lock(&self.close_reason).get_or_insert(reason);
        self.stop.notify_one();
    }

    async fn write(&self, request_id: u64, body: client_frame::Body) -> Result<(), ClientError> {
        self.writer
            .lock()
            .await
            .send(&ClientFrame {
                request_id,
                body: Some(body),
            })
            .await?;
        Ok(())
    }
}

pub(crate) struct Connection {
    shared: Arc<Shared>,
    push_tx: mpsc::Sender<Push>,
    reader: JoinHandle<()>,
    keepalive: JoinHandle<()>,
    pub hello: ServerHello,
    pub handshake_time: Duration,
    /// The route it came over (set by the connector once it is up).
    pub via: Option<super::route::Route>,
}

impl Connection {
    /// Runs the Noise handshake over `stream` (bounded by `deadline`) and starts the
    /// reader and keepalive tasks.
    pub async fn establish(
        mut stream: BoxStream,
        keys: &StaticKeypair,
        server_key: &[u8; 32],
        send_only: bool,
        deadline: Duration,
    ) -> Result<(Self, mpsc::Receiver<Push>), ClientError> {
        let started = Instant::now();
        let hello = ClientHello {
            protocol_version: PROTOCOL_VERSION,
            software: concat!("postern-client/", env!("CARGO_PKG_VERSION")).into(),
            send_only,
        };
        let (transport, server_hello) =
            noise::client_handshake(&mut stream, keys, server_key, &hello, deadline).await?;
        let handshake_time = started.elapsed();
        let (read_half, write_half) = tokio::io::split(stream);
        let (mut reader, writer) = noise::split(transport, read_half, write_half);
        let shared = Arc::new(Shared {
            writer: tokio::sync::Mutex::new(writer),
            waiters: Mutex::default(),
            next_id: AtomicU64::new(1),
            liveness: Mutex::new(Liveness::new(Instant::now())),
            keepalive_id: AtomicU64::new(0),
            close_reason: Mutex::default(),
            stop: Notify::new(),
        });
        let (push_tx, push_rx) = mpsc::channel(PUSH_QUEUE);
        let reader_shared = shared.clone();
        let reader_push = push_tx.clone();
        let reader = tokio::spawn(async move {
            let shared = reader_shared;
            let reason = loop {
                let frame = tokio::select! {
                    frame = reader.recv::<ServerFrame>() => frame,
                    _ = shared.stop.notified() => {
                        break lock(&shared.close_reason)
                            .clone()
                            .unwrap_or_else(|| "closed by this client".into());
                    }
                };
                if frame.is_ok() {
                    let id = frame.as_ref().map(|f| f.request_id).unwrap_or(0);
                    let mut liveness = lock(&shared.liveness);
                    if id != 0 && id == shared.keepalive_id.load(Ordering::Acquire) {
                        liveness.pong(Instant::now());
                    } else {
                        liveness.traffic(Instant::now());
                    }
                }
                match frame {
                    Ok(ServerFrame { body: None, .. }) => {}
                    Ok(ServerFrame {
                        request_id: 0,
                        body: Some(body),
                    }) => {
                        if reader_push.send(Push::Frame(body)).await.is_err() {
                            break "the client stopped".to_string();
                        }
                    }
                    Ok(ServerFrame {
                        request_id,
                        body: Some(body),
                    }) => {
                        if let Some(w) = lock(&shared.waiters).remove(&request_id) {
                            let _ = w.send(body);
                        }
                    }
                    Err(ProtocolError::Closed) => break "the server closed the connection".into(),
                    Err(e) => break e.to_string(),
                }
            };
            // Dropping the waiters fails every request still in flight.
            lock(&shared.waiters).clear();
            let _ = reader_push.send(Push::Closed(reason)).await;
        });
        let keepalive = tokio::spawn(keep_alive(shared.clone()));
        Ok((
            Self {
                shared,
                push_tx,
                reader,
                keepalive,
                hello: server_hello,
                handshake_time,
                via: None,
            },
            push_rx,
        ))
    }

    /// Sends a request and waits for its answer; a server `Error` becomes `Err`.
    pub async fn request(
        &self,
        body: client_frame::Body,
        timeout: Duration,
    ) -> Result<server_frame::Body, ClientError> {
        self.send_request(body).await?.wait(timeout).await
    }

    /// Sends a request and returns once it is written, with the answer to wait for. The
    /// server answers a connection's requests in order, so several sent one after the
    /// other (a window of file chunks) are answered in that order.
    pub async fn send_request(&self, body: client_frame::Body) -> Result<Answer, ClientError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.shared.waiters).insert(id, tx);
        if self.reader.is_finished() {
            lock(&self.shared.waiters).remove(&id);
            return Err(ClientError::NotConnected);
        }
        if let Err(e) = self.shared.write(id, body).await {
            lock(&self.shared.waiters).remove(&id);
            return Err(e);
        }
        Ok(Answer {
            id,
            rx,
            shared: self.shared.clone(),
        })
    }

    /// Sends a request whose answer nobody waits for (acknowledgements).
    pub async fn notify(&self, body: client_frame::Body) -> Result<(), ClientError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        self.shared.write(id, body).await
    }

    /// Resolves once the push handler has handled everything received so far.
    pub async fn barrier(&self) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.push_tx
            .send(Push::Barrier(tx))
            .await
            .map_err(|_| ClientError::NotConnected)?;
        rx.await.map_err(|_| ClientError::NotConnected)
    }

    pub fn is_closed(&self) -> bool {
        self.reader.is_finished()
    }

    /// Closes the connection; the push handler sees `Closed` and ends.
    pub async fn shutdown(&self) {
        self.shared.close("closed by this client".into());
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.shared.writer.lock().await.shutdown().await;
        })
        .await;
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.keepalive.abort();
        self.reader.abort();
    }
}

/// Pings when the connection is silent and closes it when a ping goes unanswered.
async fn keep_alive(shared: Arc<Shared>) {
    loop {
        let check = lock(&shared.liveness).check(Instant::now());
        match check {
            Check::Wait { next } => tokio::time::sleep_until(next).await,
            Check::Ping => {
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                shared.keepalive_id.store(id, Ordering::Release);
                lock(&shared.liveness).ping_sent(Instant::now());
                // A writer stuck on a frozen path must not stop the deadline from firing.
                let ping = client_frame::Body::Ping(Ping { nonce: id });
                if tokio::time::timeout(STALL_DEADLINE, shared.write(id, ping))
                    .await
                    .is_ok_and(|r| r.is_err())
                {
                    return; // The connection is already broken; the reader reports it.
                }
            }
            Check::Dead { silent } => {
                tracing::debug!(?silent, "connection stalled");
                shared.close(format!(
                    "nothing arrived for {:.0} s (the network may have frozen the connection)",
                    silent.as_secs_f64()
                ));
                return;
            }
        }
    }
}
