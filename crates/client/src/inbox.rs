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
use crate::events::{AttachmentSummary, Event, GroupRef, IncomingMessage, MessageId};
use crate::groups::{self, GroupId, Verdict};
use crate::sessions::{Decrypted, Sessions};
use crate::store::{LocalStore, MessageStatus, TransferState, Tx};

/// The failure reason of a message the server deleted undelivered (queue time-to-live).
pub const EXPIRED: &str = "expired";
use crate::ClientError;

/// What happened to one envelope.
enum Received {
    /// Stored; the event to tell the app.
    New(Event),
    Duplicate,
    Undecryptable(String),
    /// Decrypted but not shown, for this reason (a group message from someone who is not
    /// a member here, say).
    Ignored(String),
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
            Received::New(event) => {
                self.stored.fetch_add(1, Ordering::Relaxed);
                let _ = self.events.send(event);
            }
            Received::Duplicate => debug!(%id, "duplicate delivery dropped"),
            Received::Ignored(why) => {
                warn!(%id, from = %e.sender, reason = %why, "message not shown")
            }
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
        if content.group.is_some() {
            let received = self.receive_group(&mut tx, e, id, content).await?;
            if let Received::Ignored(_) = &received {
                // Its Olm key is used up: a second delivery must count as a duplicate.
                store.remember_ignored(&mut tx, &id.0).await?;
            }
            tx.commit().await?;
            if key_changed {
                self.sessions.announce_key_change(&e.sender);
            }
            return Ok(received);
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
            (Some(a), true) => self.record_attachment(&mut tx, id, a).await?,
            _ => None,
        };
        tx.commit().await?;
        if key_changed {
            self.sessions.announce_key_change(&e.sender);
        }
        Ok(if fresh {
            Received::New(Event::Incoming(IncomingMessage {
                message_id: id,
                from: e.sender.clone(),
                text: content.text,
                sent_at_ms: content.sent_at_ms,
                server_time_ms: e.server_time_ms,
                attachment,
                group: None,
            }))
        } else {
            Received::Duplicate
        })
    }

    /// Records an announced attachment, to be fetched later in the background (a big file
    /// never holds up the chat); one that can never be fetched is marked failed at once.
    async fn record_attachment(
        &self,
        tx: &mut Tx,
        id: MessageId,
        a: &postern_protocol::schema::Attachment,
    ) -> Result<Option<AttachmentSummary>, ClientError> {
        let (state, error) = match crate::attachments::check_announced(a) {
            Ok(()) => (TransferState::Downloading, None),
            Err(why) => (TransferState::Failed, Some(why)),
        };
        LocalStore::insert_attachment(tx, &id.0, false, a, state, None).await?;
        if let Some(why) = &error {
            warn!(%id, reason = %why, "an attachment cannot be fetched");
            self.store
                .set_transfer_state_in(tx, &id.0, state, None, Some(why))
                .await?;
        }
        Ok(Some(AttachmentSummary {
            file_name: crate::attachments::safe_file_name(&a.file_name),
            content_type: a.content_type.clone(),
            size: a.size,
        }))
    }

    /// Stores a group message (or membership change) in the decrypting transaction, if
    /// its sender may speak in the group as this device knows it ([`groups::judge`]).
    async fn receive_group(
        &self,
        tx: &mut Tx,
        e: &Envelope,
        id: MessageId,
        content: Content,
    ) -> Result<Received, ClientError> {
        let store = &self.store;
        let Some(ctx) = content.group.as_ref() else {
            return Ok(Received::Ignored("not a group message".into()));
        };
        if let Err(why) = groups::check_context(ctx) {
            return Ok(Received::Ignored(format!(
                "a malformed group message: {why}"
            )));
        }
        let Some(group_id) = GroupId::from_bytes(&ctx.group_id) else {
            return Ok(Received::Ignored("a malformed group id".into()));
        };
        let local = store.group_in(tx, &group_id).await?;
        let now = postern_protocol::now_ms();
        let (adopt, event) =
            match groups::judge(local.as_ref(), &self.username, &e.sender, ctx, now) {
                Verdict::Refuse(why) => return Ok(Received::Ignored(why)),
                Verdict::Accept { adopt, event } => (adopt, event),
            };
        if ctx.change.is_some() && event.is_none() {
            return Ok(Received::Ignored("an older membership change".into()));
        }
        if let Some(g) = &adopt {
            store.save_group(tx, g).await?;
        }
        let name = adopt
            .as_ref()
            .or(local.as_ref())
            .map(|g| g.name.clone())
            .unwrap_or_else(|| ctx.name.clone());
        let group = GroupRef { id: group_id, name };
        let key = group_id.conversation_key();
        let is_event = event.is_some();
        let text = event.unwrap_or_else(|| content.text.clone());
        let fresh = store
            .insert_group_incoming(
                tx,
                &id.0,
                &key,
                &e.sender,
                &text,
                content.sent_at_ms,
                e.server_time_ms,
                is_event,
            )
            .await?;
        if !fresh {
            return Ok(Received::Duplicate);
        }
        if is_event {
            return Ok(Received::New(Event::GroupChanged {
                group,
                by: e.sender.clone(),
                text,
            }));
        }
        let attachment = match &content.attachment {
            Some(a) => self.record_attachment(tx, id, a).await?,
            None => None,
        };
        Ok(Received::New(Event::Incoming(IncomingMessage {
            message_id: id,
            from: e.sender.clone(),
            text,
            sent_at_ms: content.sent_at_ms,
            server_time_ms: e.server_time_ms,
            attachment,
            group: Some(group),
        })))
    }

    async fn on_receipt(&self, conn: &Connection, r: Receipt) -> Result<(), ClientError> {
        // An expired receipt: the server deleted the message undelivered (queue
        // time-to-live); it stays in history, failed with the reason "expired".
        let peer = if r.expired {
            self.store.mark_expired(&r.message_id).await?
        } else {
            self.store.mark_delivered(&r.message_id).await?
        };
        // Not a message to a contact: maybe one member's copy of a group message.
        let group = match peer {
            Some(_) => None,
            None => self.store.group_receipt(&r.message_id, r.expired).await?,
        };
        conn.notify(client_frame::Body::AckReceipt(AckReceipt {
            message_id: r.message_id.clone(),
        }))
        .await?;
        if let Some(g) = group {
            let Some(id) = GroupId::from_conversation_key(&g.group_key) else {
                return Ok(());
            };
            let info = self.store.group(&id).await?;
            let group = GroupRef {
                id,
                name: info.map(|i| i.name).unwrap_or_default(),
            };
            let event = if r.expired {
                Event::Failed {
                    message_id: g.message_id,
                    to: g.member,
                    reason: EXPIRED.to_string(),
                }
            } else {
                let all = self
                    .store
                    .history_status(&g.message_id.0)
                    .await?
                    .is_some_and(|s| s == MessageStatus::Delivered);
                Event::Delivered {
                    message_id: g.message_id,
                    to: g.member,
                    group: Some(group),
                    all: Some(all),
                }
            };
            let _ = self.events.send(event);
            return Ok(());
        }
        if let (Some(to), Ok(id)) = (peer, MessageId::try_from(&r.message_id[..])) {
            let event = if r.expired {
                Event::Failed {
                    message_id: id,
                    to,
                    reason: EXPIRED.to_string(),
                }
            } else {
                Event::Delivered {
                    message_id: id,
                    to,
                    group: None,
                    all: None,
                }
            };
            let _ = self.events.send(event);
        }
        Ok(())
    }
}
