//! The inbox: what the server pushes to this device, handled in order.
//!
//! An envelope is decrypted and stored (Olm state and the message in one transaction)
//! before it is acknowledged, so the server deletes it only once it is safe here; a
//! message seen before (a re-delivery after a lost acknowledgement, or after a stalled
//! connection) is acknowledged again and not shown twice. Delivery receipts turn ✓ into
//! ✓✓.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use postern_protocol::schema::{
    client_frame, server_frame, AckMessage, AckReceipt, Content, Envelope, Receipt,
};
use prost::Message as _;
use tokio::sync::{broadcast, mpsc};
use tracing::{debug, warn};

use crate::connector::connection::{Connection, Push};
use crate::events::{AttachmentSummary, Event, IncomingMessage, MessageId};
use crate::sessions::{Decrypted, Sessions};
use crate::store::{LocalStore, MessageStatus, TransferState};

/// The failure reason of a message the server deleted undelivered (queue time-to-live).
pub const EXPIRED: &str = "expired";
use crate::ClientError;

/// What happened to one envelope.
enum Received {
    New(IncomingMessage),
    Duplicate,
    Undecryptable(String),
}

#[derive(Clone)]
pub(crate) struct Inbox {
    store: LocalStore,
    sessions: Sessions,
    events: broadcast::Sender<Event>,
    username: String,
    /// Envelopes stored so far in this run (new ones only), to tell whether a connection
    /// made progress.
    stored: Arc<AtomicU64>,
}

impl Inbox {
    pub fn new(
        store: LocalStore,
        sessions: Sessions,
        events: broadcast::Sender<Event>,
        username: String,
    ) -> Self {
        Self {
            store,
            sessions,
            events,
            username,
            stored: Arc::default(),
        }
    }

    /// New messages stored in this run.
    pub fn stored(&self) -> u64 {
        self.stored.load(Ordering::Relaxed)
    }

    /// Handles pushes in order until the connection closes.
    pub async fn handle_pushes(&self, conn: Arc<Connection>, mut pushes: mpsc::Receiver<Push>) {
        while let Some(push) = pushes.recv().await {
            match push {
                Push::Frame(server_frame::Body::Envelope(e)) => {
                    if let Err(err) = self.on_envelope(&conn, e).await {
                        // Not acknowledged: the server will deliver it again.
                        warn!(error = %err, "could not process an incoming message");
                    }
                }
                Push::Frame(server_frame::Body::Receipt(r)) => {
                    if let Err(err) = self.on_receipt(&conn, r).await {
                        warn!(error = %err, "could not record a delivery receipt");
                    }
                }
                Push::Frame(server_frame::Body::KeysLow(k)) => {
                    let sessions = self.sessions.clone();
                    let conn = conn.clone();
                    tokio::spawn(async move {
                        if let Err(e) = sessions.top_up_keys(&conn, k.one_time_keys_remaining).await
                        {
                            warn!(error = %e, "could not upload one-time keys");
                        }
                    });
                }
                Push::Frame(other) => debug!(?other, "ignoring unexpected push"),
                Push::Barrier(done) => {
                    let _ = done.send(());
                }
                Push::Closed(reason) => {
                    let _ = self.events.send(Event::Disconnected { reason });
                    break;
                }
            }
        }
    }

    async fn on_envelope(&self, conn: &Connection, e: Envelope) -> Result<(), ClientError> {
        let id = MessageId::try_from(&e.message_id[..])?;
        let outcome = self.receive(&e, id).await?;
        conn.notify(client_frame::Body::AckMessage(AckMessage {
            message_id: e.message_id.clone(),
        }))
        .await?;
        match outcome {
            Received::New(m) => {
                self.stored.fetch_add(1, Ordering::Relaxed);
                let _ = self.events.send(Event::Incoming(m));
            }
            Received::Duplicate => debug!(%id, "duplicate delivery dropped"),
            Received::Undecryptable(reason) => {
                let _ = self.events.send(Event::Undecryptable {
                    message_id: id,
                    from: e.sender.clone(),
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Decrypts and stores one envelope; Olm state and the message commit together.
    async fn receive(&self, e: &Envelope, id: MessageId) -> Result<Received, ClientError> {
        let store = &self.store;
        if store.has_message(&id.0).await? {
            return Ok(Received::Duplicate);
        }
        let mut tx = store.begin().await?;
        let (plaintext, key_changed) = match self.sessions.decrypt(&mut tx, e).await? {
            Decrypted::Plaintext { plain, key_changed } => (plain, key_changed),
            Decrypted::Never(reason) => {
                tx.rollback().await?;
                let mut tx = store.begin().await?;
                store
                    .insert_incoming(
                        &mut tx,
                        &id.0,
                        &e.sender,
                        "",
                        0,
                        e.server_time_ms,
                        MessageStatus::Undecryptable,
                    )
                    .await?;
                tx.commit().await?;
                return Ok(Received::Undecryptable(reason));
            }
        };
        let content = match Content::decode(&plaintext[..]) {
            Ok(c)
                if c.message_id == e.message_id
                    && c.sender == e.sender
                    && c.recipient == self.username =>
            {
                c
            }
            _ => {
                tx.rollback().await?;
                return Ok(Received::Undecryptable(
                    "the decrypted content does not match its envelope".into(),
                ));
            }
        };
        if key_changed {
            // Marked just before the message that came with the new keys.
            store
                .record_key_change(&mut tx, &e.sender, content.sent_at_ms.saturating_sub(1))
                .await?;
        }
        let fresh = store
            .insert_incoming(
                &mut tx,
                &id.0,
                &e.sender,
                &content.text,
                content.sent_at_ms,
                e.server_time_ms,
                MessageStatus::Received,
            )
            .await?;
        let attachment = match (&content.attachment, fresh) {
            (Some(a), true) => {
                // Fetched later, in the background: a big file never holds up the chat.
                let (state, error) = match crate::attachments::check_announced(a) {
                    Ok(()) => (TransferState::Downloading, None),
                    Err(why) => (TransferState::Failed, Some(why)),
                };
                LocalStore::insert_attachment(&mut tx, &id.0, false, a, state, None).await?;
                if let Some(why) = &error {
                    warn!(%id, reason = %why, "an attachment cannot be fetched");
                    store
                        .set_transfer_state_in(&mut tx, &id.0, state, None, Some(why))
                        .await?;
                }
                Some(AttachmentSummary {
                    file_name: crate::attachments::safe_file_name(&a.file_name),
                    content_type: a.content_type.clone(),
                    size: a.size,
                })
            }
            _ => None,
        };
        tx.commit().await?;
        if key_changed {
            self.sessions.announce_key_change(&e.sender);
        }
        Ok(if fresh {
            Received::New(IncomingMessage {
                message_id: id,
                from: e.sender.clone(),
                text: content.text,
                sent_at_ms: content.sent_at_ms,
                server_time_ms: e.server_time_ms,
                attachment,
            })
        } else {
            Received::Duplicate
        })
    }

    async fn on_receipt(&self, conn: &Connection, r: Receipt) -> Result<(), ClientError> {
        // An expired receipt: the server deleted the message undelivered (queue
        // time-to-live); it stays in history, failed with the reason "expired".
        let peer = if r.expired {
            self.store.mark_expired(&r.message_id).await?
        } else {
            self.store.mark_delivered(&r.message_id).await?
        };
        conn.notify(client_frame::Body::AckReceipt(AckReceipt {
            message_id: r.message_id.clone(),
        }))
        .await?;
        if let (Some(to), Ok(id)) = (peer, MessageId::try_from(&r.message_id[..])) {
            let event = if r.expired {
                Event::Failed {
                    message_id: id,
                    to,
                    reason: EXPIRED.to_string(),
                }
            } else {
                Event::Delivered { message_id: id, to }
            };
            let _ = self.events.send(event);
        }
        Ok(())
    }
}
