//! One authenticated connection to the server, shared by requests and pushes.
//!
//! A reader task owns the receiving half: answers go to the request that is waiting for
//! them (matched by request id), pushes (envelopes, receipts, notices) go in order to a
//! bounded channel that the client's push handler drains. The push handler never waits
//! for an answer itself (acknowledgements are sent without waiting), so a full push
//! channel can slow the reader down but never deadlock it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postern_protocol::noise::{self, SecureWriter, StaticKeypair};
use postern_protocol::schema::{
    client_frame, server_frame, ClientFrame, ClientHello, ServerFrame, ServerHello,
};
use postern_protocol::{ProtocolError, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncWrite, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::ClientError;

/// Any byte stream the channel can run over: TCP now, TLS to a relay later.
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

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<server_frame::Body>>>>;

pub(crate) struct Connection {
    writer: tokio::sync::Mutex<SecureWriter<WriteHalf<BoxStream>>>,
    waiters: Waiters,
    next_id: AtomicU64,
    push_tx: mpsc::Sender<Push>,
    reader: JoinHandle<()>,
    /// Tells the reader task to stop (it then reports `Closed` to the push handler).
    stop: Arc<tokio::sync::Notify>,
    pub hello: ServerHello,
    pub handshake_time: Duration,
}

fn lock(
    w: &Waiters,
) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<server_frame::Body>>> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

impl Connection {
    /// Runs the Noise handshake over `stream` and starts the reader task.
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
        let waiters: Waiters = Arc::default();
        let (push_tx, push_rx) = mpsc::channel(PUSH_QUEUE);
        let reader_waiters = waiters.clone();
        let reader_push = push_tx.clone();
        let stop = Arc::new(tokio::sync::Notify::new());
        let stop_reader = stop.clone();
        let reader = tokio::spawn(async move {
            let reason = loop {
                let frame = tokio::select! {
                    frame = reader.recv::<ServerFrame>() => frame,
                    _ = stop_reader.notified() => break "closed by this client".to_string(),
                };
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
                        if let Some(w) = lock(&reader_waiters).remove(&request_id) {
                            let _ = w.send(body);
                        }
                    }
                    Err(ProtocolError::Closed) => break "the server closed the connection".into(),
                    Err(e) => break e.to_string(),
                }
            };
            // Dropping the waiters fails every request still in flight.
            lock(&reader_waiters).clear();
            let _ = reader_push.send(Push::Closed(reason)).await;
        });
        Ok((
            Self {
                writer: tokio::sync::Mutex::new(writer),
                waiters,
                next_id: AtomicU64::new(1),
                push_tx,
                reader,
                stop,
                hello: server_hello,
                handshake_time,
            },
            push_rx,
        ))
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

    /// Sends a request and waits for its answer; a server `Error` becomes `Err`.
    pub async fn request(
        &self,
        body: client_frame::Body,
        timeout: Duration,
    ) -> Result<server_frame::Body, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(id, tx);
        if self.reader.is_finished() {
            lock(&self.waiters).remove(&id);
            return Err(ClientError::NotConnected);
        }
        if let Err(e) = self.write(id, body).await {
            lock(&self.waiters).remove(&id);
            return Err(e);
        }
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => {
                lock(&self.waiters).remove(&id);
                Err(ClientError::Timeout(timeout))
            }
            Ok(Err(_)) => Err(ClientError::NotConnected),
            Ok(Ok(server_frame::Body::Error(e))) => Err(ClientError::Server {
                code: e.code,
                message: e.message,
            }),
            Ok(Ok(body)) => Ok(body),
        }
    }

    /// Sends a request whose answer nobody waits for (acknowledgements).
    pub async fn notify(&self, body: client_frame::Body) -> Result<(), ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.write(id, body).await
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
        self.stop.notify_one();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.writer.lock().await.shutdown().await;
        })
        .await;
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}
