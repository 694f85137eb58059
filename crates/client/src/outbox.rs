//! The outbox: what the user typed, until the server holds it.
//!
//! A message is written to the local history as pending before anything is sent, so
//! nothing typed is lost whatever the network does. It becomes sent (✓) when the server
//! answers that it is in the recipient's queue; a message the server can never accept
//! (the contact does not exist) stays in the history, marked failed with the reason.
//! Re-sending after a lost connection is safe: the server queues a message id once, and
//! the recipient drops a second copy by its id.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use postern_protocol::schema::{
    client_frame, server_frame, Attachment, Content, ErrorCode, GroupChange, SendMessage,
};
use postern_protocol::username;
use prost::Message as _;
use tokio::sync::broadcast;

use crate::attachments::{self, Transfers};
use crate::connector::connection::Connection;
use crate::events::{Event, MessageId};
use crate::groups::{self, GroupId, GroupInfo};
use crate::sessions::Sessions;
use crate::store::{HistoryEntry, LocalStore, MemberStatus, MessageStatus, OutgoingGroup};
use crate::timeouts::REQUEST_TIMEOUT;
use crate::ClientError;

/// Longest message text, so one encrypted message always fits in one frame.
pub const MAX_TEXT_BYTES: usize = 16 * 1024;

/// What became of one pending message in a flush of the outbox.
#[derive(Debug)]
pub struct PendingOutcome {
    pub message_id: MessageId,
    pub to: String,
    pub result: Result<(), ClientError>,
}

#[derive(Clone)]
pub(crate) struct Outbox {
    store: LocalStore,
    transfers: Transfers,
    sessions: Sessions,
    events: broadcast::Sender<Event>,
    username: String,
    /// Pending messages settled (sent or failed) in this run, to tell whether a
    /// connection made progress.
    handled: Arc<AtomicU64>,
    /// One flush at a time: an app flushes when the user sends while the connection's
    /// own flush may still be running, and two flushes would encrypt and send the same
    /// pending message twice (harmless — ids are unique — but wasted one-time keys).
    flushing: Arc<tokio::sync::Mutex<()>>,
    /// One uploading flush at a time (files go out under this lock, texts under the
    /// other, so a long upload never holds up a text).
    uploading: Arc<tokio::sync::Mutex<()>>,
}

impl Outbox {
    pub fn new(
        store: LocalStore,
        transfers: Transfers,
        sessions: Sessions,
        events: broadcast::Sender<Event>,
        username: String,
    ) -> Self {
        Self {
            store,
            transfers,
            sessions,
            events,
            username,
            handled: Arc::default(),
            flushing: Arc::default(),
            uploading: Arc::default(),
        }
    }

    /// Pending messages settled (sent or failed) in this run.
    pub fn handled(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }

    /// Checks a message to `to` (a contact, or a group's conversation key); for a group,
    /// returns how it fans out to the members.
    async fn check(&self, to: &str, text: &str) -> Result<Option<OutgoingGroup>, ClientError> {
        if text.len() > MAX_TEXT_BYTES {
            return Err(ClientError::TooLong {
                bytes: text.len(),
                limit: MAX_TEXT_BYTES,
            });
        }
        if let Some(id) = GroupId::from_conversation_key(to) {
            let group = self
                .store
                .group(&id)
                .await?
                .ok_or_else(|| ClientError::NoSuchGroup(to.to_string()))?;
            if !group.joined {
                return Err(ClientError::NotInGroup(group.name));
            }
            let recipients = group.others(&self.username);
            if recipients.is_empty() {
                return Err(ClientError::InvalidInput(format!(
                    "nobody else is in the group {:?}: add someone first",
                    group.name
                )));
            }
            return Ok(Some(OutgoingGroup {
                context: group.context(None).encode_to_vec(),
                recipients,
                event: false,
            }));
        }
        username::validate(to).map_err(|_| ClientError::UnknownContact(to.to_string()))?;
        if to == self.username {
            return Err(ClientError::InvalidInput(
                "you cannot send a message to yourself".into(),
            ));
        }
        Ok(None)
    }

    /// Saves a group's new membership and queues the change to everyone concerned: the
    /// members who stay first, then those removed (so they learn it), then those added
    /// (last, so the others hold the change before a new member can write). `before` is
    /// the group as it was (None: just created). Returns the id of the message carrying
    /// the change (None: nobody to tell).
    pub async fn queue_group_change(
        &self,
        before: Option<&GroupInfo>,
        after: &GroupInfo,
        change: GroupChange,
    ) -> Result<Option<MessageId>, ClientError> {
        let me = self.username.as_str();
        let was = |u: &String| before.is_some_and(|b| b.has(u));
        let mut recipients: Vec<String> = after.others(me).into_iter().filter(was).collect();
        if let Some(b) = before {
            recipients.extend(b.others(me).into_iter().filter(|u| !after.has(u)));
        }
        recipients.extend(after.others(me).into_iter().filter(|u| !was(u)));
        let text = groups::describe(&change, me, me, after);
        let message_id = MessageId::random();
        let now = postern_protocol::now_ms();
        let key = after.conversation_key();
        let mut tx = self.store.begin().await?;
        self.store.save_group(&mut tx, after).await?;
        let told = !recipients.is_empty();
        if !told {
            // Nobody to tell (the last member left): the change is only noted here.
            self.store
                .insert_group_incoming(&mut tx, &message_id.0, &key, me, &text, now, now, true)
                .await?;
        } else {
            let group = OutgoingGroup {
                context: after.context(Some(change)).encode_to_vec(),
                recipients,
                event: true,
            };
            LocalStore::insert_outgoing_in(&mut tx, &message_id.0, &key, &text, now, Some(&group))
                .await?;
        }
        tx.commit().await?;
        Ok(told.then_some(message_id))
    }

    /// Encrypts `file` into the profile and stores a pending message carrying it, with
    /// `caption` as its text. The file is uploaded before the message goes out.
    pub async fn queue_file(
        &self,
        to: &str,
        file: &std::path::Path,
        name: Option<&str>,
        caption: &str,
    ) -> Result<MessageId, ClientError> {
        let group = self.check(to, caption).await?;
        let message_id = MessageId::random();
        let (wire, encrypted, copy) = self.transfers.seal(&message_id, file, name).await?;
        let stored = self
            .store
            .insert_outgoing_with_attachment(
                &message_id.0,
                to,
                caption,
                postern_protocol::now_ms(),
                &wire,
                &encrypted.display().to_string(),
                &copy.display().to_string(),
                group.as_ref(),
            )
            .await;
        if stored.is_err() {
            let _ = std::fs::remove_file(&encrypted);
            let _ = std::fs::remove_file(&copy);
        }
        stored?;
        Ok(message_id)
    }

    /// Checks and stores a message as pending.
    pub async fn queue(&self, to: &str, text: &str) -> Result<HistoryEntry, ClientError> {
        let group = self.check(to, text).await?;
        let entry = HistoryEntry {
            message_id: MessageId::random(),
            peer: to.to_string(),
            outgoing: true,
            text: text.to_string(),
            created_ms: postern_protocol::now_ms(),
            server_time_ms: None,
            status: MessageStatus::Pending,
            failure: None,
            attachment: None,
            sender: None,
            group_event: group.as_ref().is_some_and(|g| g.event),
            deliveries: Vec::new(),
        };
        self.store
            .insert_outgoing(
                &entry.message_id.0,
                to,
                text,
                entry.created_ms,
                group.as_ref(),
            )
            .await?;
        Ok(entry)
    }

    /// Transmits one pending message. One the server can never accept is marked failed
    /// (and the error returned); a connection problem leaves it pending.
    pub async fn transmit(
        &self,
        conn: &Arc<Connection>,
        entry: &HistoryEntry,
    ) -> Result<(), ClientError> {
        match self.transmit_once(conn, entry).await {
            Err(e)
                if matches!(
                    e,
                    ClientError::UnknownContact(_) | ClientError::GroupUnreachable(_)
                ) || attachments::is_permanent(&e) =>
            {
                let reason = e.to_string();
                self.store.mark_failed(&entry.message_id.0, &reason).await?;
                let _ = self.events.send(Event::Failed {
                    message_id: entry.message_id,
                    to: entry.peer.clone(),
                    reason,
                });
                Err(e)
            }
            other => other,
        }
    }

    /// Sends every pending message, oldest first, adding an outcome per message to
    /// `outcomes`. Problems with one message are reported in its outcome and the rest go
    /// on; a connection failure stops the flush (what is left stays pending) and is
    /// returned.
    ///
    /// Messages carrying a file go second, each once its upload is complete, and under a
    /// lock of their own: a text typed while a large file uploads goes out at once instead
    /// of waiting behind it (it may so arrive before the file, as in any messenger). A
    /// flush that finds another one uploading leaves the files to it: that one looks for
    /// new files after each.
    pub async fn flush(
        &self,
        conn: &Arc<Connection>,
        outcomes: &mut Vec<PendingOutcome>,
    ) -> Result<(), ClientError> {
        {
            let _one_at_a_time = self.flushing.lock().await;
            for entry in self.store.pending_outgoing().await? {
                if entry.attachment.is_none() {
                    self.settle(conn, entry, outcomes).await?;
                }
            }
        }
        let Ok(_uploading) = self.uploading.try_lock() else {
            return Ok(());
        };
        let mut tried = std::collections::HashSet::new();
        loop {
            let next = self
                .store
                .pending_outgoing()
                .await?
                .into_iter()
                .find(|e| e.attachment.is_some() && !tried.contains(&e.message_id));
            let Some(entry) = next else { return Ok(()) };
            tried.insert(entry.message_id);
            self.settle(conn, entry, outcomes).await?;
        }
    }

    /// Transmits one pending message and records its outcome; returns a connection
    /// failure (the message stays pending).
    async fn settle(
        &self,
        conn: &Arc<Connection>,
        entry: HistoryEntry,
        outcomes: &mut Vec<PendingOutcome>,
    ) -> Result<(), ClientError> {
        let result = match self.transmit(conn, &entry).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_connection_problem() => return Err(e),
            Err(e) => Err(e),
        };
        outcomes.push(PendingOutcome {
            message_id: entry.message_id,
            to: entry.peer,
            result,
        });
        self.handled.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Uploads the message's file, if any, then hands the message to the server: to the
    /// contact, or a copy to each member of a group.
    async fn transmit_once(
        &self,
        conn: &Arc<Connection>,
        entry: &HistoryEntry,
    ) -> Result<(), ClientError> {
        // The file goes up first: the message carries its key, so it must not arrive
        // before the file can be fetched.
        // (The history entry says whether there is one: plain texts cost no extra query.)
        let record = match entry.attachment {
            Some(_) => self.store.attachment(&entry.message_id.0).await?,
            None => None,
        };
        let attachment = match record {
            Some(rec) => {
                self.transfers.upload(conn, &rec).await?;
                Some(rec.wire)
            }
            None => None,
        };
        if GroupId::from_conversation_key(&entry.peer).is_some() {
            return self.transmit_group(conn, entry, attachment).await;
        }
        let content = Content {
            message_id: entry.message_id.0.to_vec(),
            sender: self.username.clone(),
            recipient: entry.peer.clone(),
            sent_at_ms: entry.created_ms,
            text: entry.text.clone(),
            attachment,
            group: None,
        }
        .encode_to_vec();
        let server_time_ms = self
            .deliver(
                conn,
                &entry.message_id.0,
                &entry.peer,
                &content,
                entry.created_ms,
            )
            .await?;
        self.store
            .mark_sent(&entry.message_id.0, server_time_ms)
            .await?;
        let _ = self.events.send(Event::Sent {
            message_id: entry.message_id,
            to: entry.peer.clone(),
        });
        Ok(())
    }

    /// Sends a group message's copies still pending, one per member, each under its own
    /// wire id; a member who no longer exists is marked failed and the others go on.
    async fn transmit_group(
        &self,
        conn: &Arc<Connection>,
        entry: &HistoryEntry,
        attachment: Option<Attachment>,
    ) -> Result<(), ClientError> {
        let id = &entry.message_id.0;
        let context = self.store.group_context_of(id).await?.ok_or_else(|| {
            ClientError::Profile("a group message was stored without its group".into())
        })?;
        let mut server_time_ms = None;
        for send in self.store.pending_group_sends(id).await? {
            let content = Content {
                message_id: send.wire_id.to_vec(),
                sender: self.username.clone(),
                recipient: send.member.clone(),
                sent_at_ms: entry.created_ms,
                text: entry.text.clone(),
                attachment: attachment.clone(),
                group: Some(context.clone()),
            }
            .encode_to_vec();
            let delivered = self
                .deliver(
                    conn,
                    &send.wire_id,
                    &send.member,
                    &content,
                    entry.created_ms,
                )
                .await;
            match delivered {
                Ok(t) => {
                    server_time_ms = Some(t);
                    self.store
                        .settle_group_send(&send.wire_id, MemberStatus::Sent, None)
                        .await?;
                }
                Err(e @ ClientError::UnknownContact(_)) => {
                    self.store
                        .settle_group_send(
                            &send.wire_id,
                            MemberStatus::Failed,
                            Some(&e.to_string()),
                        )
                        .await?;
                }
                Err(e) => return Err(e),
            }
        }
        match self.store.finish_group_message(id, server_time_ms).await? {
            MessageStatus::Failed => Err(ClientError::GroupUnreachable(context.name)),
            MessageStatus::Pending => Ok(()),
            _ => {
                let _ = self.events.send(Event::Sent {
                    message_id: entry.message_id,
                    to: entry.peer.clone(),
                });
                Ok(())
            }
        }
    }

    /// Encrypts `content` for every device of `recipient` and hands it to the server
    /// under `wire_id`; returns the server's time once it is in the recipient's queue.
    async fn deliver(
        &self,
        conn: &Connection,
        wire_id: &[u8; 16],
        recipient: &str,
        content: &[u8],
        written_ms: u64,
    ) -> Result<u64, ClientError> {
        let mut reclaimed = false;
        loop {
            let ciphertexts = self
                .sessions
                .encrypt_for(conn, recipient, content, reclaimed, written_ms)
                .await?;
            let request = client_frame::Body::Send(SendMessage {
                message_id: wire_id.to_vec(),
                recipient: recipient.to_string(),
                ciphertexts,
            });
            match conn.request(request, REQUEST_TIMEOUT).await {
                Ok(server_frame::Body::MessageAccepted(a)) => return Ok(a.server_time_ms),
                Ok(other) => return Err(ClientError::unexpected(other)),
                Err(ClientError::Server { code, .. })
                    if code == ErrorCode::DevicesChanged as i32 && !reclaimed =>
                {
                    reclaimed = true;
                }
                Err(ClientError::Server { code, .. }) if code == ErrorCode::UnknownUser as i32 => {
                    return Err(ClientError::UnknownContact(recipient.to_string()))
                }
                Err(e) => return Err(e),
            }
        }
    }
}
