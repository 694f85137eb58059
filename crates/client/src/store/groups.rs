//! The groups' part of the profile database: groups and members, the per-member sends of
//! outgoing group messages, and the incoming ones (see [`crate::groups`]).

use std::collections::HashMap;

use postern_protocol::schema::GroupContext;
use prost::Message as _;
use sqlx::Row;

use super::{LocalStore, MessageStatus, Tx};
use crate::groups::{GroupId, GroupInfo};
use crate::{ClientError, MessageId};

/// Where one member's copy of an outgoing group message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberStatus {
    /// Not yet in the member's queue on the server.
    Pending,
    /// In the member's queue (✓).
    Sent,
    /// Stored by the member's device (✓✓).
    Delivered,
    /// Can never reach the member (the reason is kept).
    Failed,
}

impl MemberStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "sent" => Self::Sent,
            "delivered" => Self::Delivered,
            "failed" => Self::Failed,
            _ => Self::Pending,
        }
    }
}

/// One member's copy of an outgoing group message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemberDelivery {
    pub member: String,
    pub status: MemberStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// A copy still to send: its wire id and who it is for.
pub(crate) struct PendingSend {
    pub wire_id: [u8; 16],
    pub member: String,
}

/// What an outgoing group message needs besides its text.
pub(crate) struct OutgoingGroup {
    /// The encoded [`GroupContext`] it carries.
    pub context: Vec<u8>,
    /// Who it goes to, in sending order.
    pub recipients: Vec<String>,
    /// A membership change rather than a text.
    pub event: bool,
}

/// A delivery receipt for one member's copy, as it applies to the whole message.
pub(crate) struct GroupReceipt {
    pub message_id: MessageId,
    pub group_key: String,
    pub member: String,
}

impl LocalStore {
    pub async fn group(&self, id: &GroupId) -> Result<Option<GroupInfo>, ClientError> {
        let mut tx = self.begin().await?;
        let g = self.group_in(&mut tx, id).await?;
        tx.rollback().await?;
        Ok(g)
    }

    pub async fn group_in(
        &self,
        tx: &mut Tx,
        id: &GroupId,
    ) -> Result<Option<GroupInfo>, ClientError> {
        let Some(row) =
            sqlx::query("SELECT name, epoch, joined, created_ms FROM groups WHERE group_id = ?")
                .bind(&id.0[..])
                .fetch_optional(&mut **tx)
                .await?
        else {
            return Ok(None);
        };
        let members: Vec<String> = sqlx::query_scalar(
            "SELECT username FROM group_members WHERE group_id = ? ORDER BY username",
        )
        .bind(&id.0[..])
        .fetch_all(&mut **tx)
        .await?;
        Ok(Some(GroupInfo {
            id: *id,
            name: row.get(0),
            epoch: row.get::<i64, _>(1) as u64,
            joined: row.get::<i64, _>(2) != 0,
            created_ms: row.get::<i64, _>(3) as u64,
            members,
        }))
    }

    /// Every group this device knows, those it is a member of first, by name.
    pub async fn groups(&self) -> Result<Vec<GroupInfo>, ClientError> {
        let ids: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT group_id FROM groups ORDER BY joined DESC, name, created_ms",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut tx = self.begin().await?;
        let mut groups = Vec::with_capacity(ids.len());
        for id in ids.iter().filter_map(|b| GroupId::from_bytes(b)) {
            if let Some(g) = self.group_in(&mut tx, &id).await? {
                groups.push(g);
            }
        }
        tx.rollback().await?;
        Ok(groups)
    }

    /// Writes a group's state: name, epoch, whether we are in it, and its members.
    pub async fn save_group(&self, tx: &mut Tx, g: &GroupInfo) -> Result<(), ClientError> {
        sqlx::query(
            "INSERT INTO groups (group_id, name, epoch, joined, created_ms) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT(group_id) DO UPDATE
             SET name = excluded.name, epoch = excluded.epoch, joined = excluded.joined",
        )
        .bind(&g.id.0[..])
        .bind(&g.name)
        .bind(g.epoch as i64)
        .bind(g.joined as i64)
        .bind(g.created_ms as i64)
        .execute(&mut **tx)
        .await?;
        sqlx::query("DELETE FROM group_members WHERE group_id = ?")
            .bind(&g.id.0[..])
            .execute(&mut **tx)
            .await?;
        for m in &g.members {
            sqlx::query("INSERT OR IGNORE INTO group_members (group_id, username) VALUES (?, ?)")
                .bind(&g.id.0[..])
                .bind(m)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Records, in the transaction storing an outgoing group message, one send per
    /// recipient, each under a fresh wire id.
    pub(crate) async fn insert_group_sends(
        tx: &mut Tx,
        message_id: &[u8],
        group: &OutgoingGroup,
    ) -> Result<(), ClientError> {
        sqlx::query("UPDATE messages SET group_context = ?, group_event = ? WHERE message_id = ?")
            .bind(&group.context)
            .bind(group.event as i64)
            .bind(message_id)
            .execute(&mut **tx)
            .await?;
        for member in &group.recipients {
            sqlx::query(
                "INSERT INTO group_sends (wire_id, message_id, member, status)
                 VALUES (?, ?, ?, 'pending')",
            )
            .bind(&MessageId::random().0[..])
            .bind(message_id)
            .bind(member)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    /// The group context an outgoing group message carries (None: not a group message).
    pub(crate) async fn group_context_of(
        &self,
        message_id: &[u8],
    ) -> Result<Option<GroupContext>, ClientError> {
        let bytes: Option<Option<Vec<u8>>> =
            sqlx::query_scalar("SELECT group_context FROM messages WHERE message_id = ?")
                .bind(message_id)
                .fetch_optional(&self.pool)
                .await?;
        match bytes.flatten() {
            Some(b) => Ok(Some(GroupContext::decode(&b[..]).map_err(|e| {
                ClientError::Profile(format!("a stored group message is damaged: {e}"))
            })?)),
            None => Ok(None),
        }
    }

    /// The copies of an outgoing group message not yet in their member's queue, in
    /// sending order.
    pub(crate) async fn pending_group_sends(
        &self,
        message_id: &[u8],
    ) -> Result<Vec<PendingSend>, ClientError> {
        let rows = sqlx::query(
            "SELECT wire_id, member FROM group_sends
             WHERE message_id = ? AND status = 'pending' ORDER BY rowid",
        )
        .bind(message_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                Some(PendingSend {
                    wire_id: r.get::<Vec<u8>, _>(0).try_into().ok()?,
                    member: r.get(1),
                })
            })
            .collect())
    }

    /// Records what became of one copy: in the member's queue, or never deliverable.
    pub(crate) async fn settle_group_send(
        &self,
        wire_id: &[u8],
        status: MemberStatus,
        failure: Option<&str>,
    ) -> Result<(), ClientError> {
        sqlx::query(
            "UPDATE group_sends SET status = ?, failure = ? WHERE wire_id = ? AND status = 'pending'",
        )
        .bind(status.as_str())
        .bind(failure)
        .bind(wire_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Once no copy is pending: the message is sent (✓) if any copy reached a queue, or
    /// failed with the first reason if none can. Returns the new status.
    pub(crate) async fn finish_group_message(
        &self,
        message_id: &[u8],
        server_time_ms: Option<u64>,
    ) -> Result<MessageStatus, ClientError> {
        let row = sqlx::query(
            "SELECT COUNT(*) FILTER (WHERE status = 'pending'),
                    COUNT(*) FILTER (WHERE status IN ('sent', 'delivered')),
                    COUNT(*) FILTER (WHERE status = 'delivered'),
                    (SELECT failure FROM group_sends f
                      WHERE f.message_id = ?1 AND f.status = 'failed' ORDER BY rowid LIMIT 1)
             FROM group_sends WHERE message_id = ?1",
        )
        .bind(message_id)
        .fetch_one(&self.pool)
        .await?;
        let (pending, reached, delivered): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        if pending > 0 {
            return Ok(MessageStatus::Pending);
        }
        let status = if reached == 0 {
            let why: Option<String> = row.get(3);
            sqlx::query(
                "UPDATE messages SET status = 'failed', failure = ?
                 WHERE message_id = ? AND status = 'pending'",
            )
            .bind(why.unwrap_or_else(|| "nobody else is in the group".into()))
            .bind(message_id)
            .execute(&self.pool)
            .await?;
            MessageStatus::Failed
        } else {
            let status = if delivered == reached {
                MessageStatus::Delivered
            } else {
                MessageStatus::Sent
            };
            sqlx::query(
                "UPDATE messages SET status = ?, server_time_ms = COALESCE(?, server_time_ms)
                 WHERE message_id = ? AND status = 'pending'",
            )
            .bind(status.as_str())
            .bind(server_time_ms.map(|t| t as i64))
            .bind(message_id)
            .execute(&self.pool)
            .await?;
            status
        };
        Ok(status)
    }

    /// Applies a receipt for one copy (delivered, or expired undelivered); the message
    /// becomes ✓✓ once every copy that reached a queue is delivered. None: not a copy of
    /// ours.
    pub(crate) async fn group_receipt(
        &self,
        wire_id: &[u8],
        expired: bool,
    ) -> Result<Option<GroupReceipt>, ClientError> {
        let mut tx = self.begin().await?;
        let (status, failure) = if expired {
            (MemberStatus::Failed, Some("expired"))
        } else {
            (MemberStatus::Delivered, None)
        };
        let Some(row) = sqlx::query(
            "UPDATE group_sends SET status = ?, failure = ?
             WHERE wire_id = ? AND status IN ('pending', 'sent')
             RETURNING message_id, member",
        )
        .bind(status.as_str())
        .bind(failure)
        .bind(wire_id)
        .fetch_optional(&mut *tx)
        .await?
        else {
            tx.rollback().await?;
            return Ok(None);
        };
        let message_id: Vec<u8> = row.get(0);
        let member: String = row.get(1);
        sqlx::query(
            "UPDATE messages SET status = 'delivered'
             WHERE message_id = ?1 AND status = 'sent'
               AND NOT EXISTS (SELECT 1 FROM group_sends
                               WHERE message_id = ?1 AND status IN ('pending', 'sent'))
               AND EXISTS (SELECT 1 FROM group_sends
                           WHERE message_id = ?1 AND status = 'delivered')",
        )
        .bind(&message_id)
        .execute(&mut *tx)
        .await?;
        let group_key: String =
            sqlx::query_scalar("SELECT peer FROM messages WHERE message_id = ?")
                .bind(&message_id)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(MessageId::try_from(&message_id[..])
            .ok()
            .map(|message_id| GroupReceipt {
                message_id,
                group_key,
                member,
            }))
    }

    /// Every member's copy of the outgoing messages in a group's conversation.
    pub(crate) async fn group_deliveries(
        &self,
        group_key: &str,
    ) -> Result<HashMap<[u8; 16], Vec<MemberDelivery>>, ClientError> {
        let rows = sqlx::query(
            "SELECT g.message_id, g.member, g.status, g.failure
             FROM group_sends g JOIN messages m ON m.message_id = g.message_id
             WHERE m.peer = ? ORDER BY g.rowid",
        )
        .bind(group_key)
        .fetch_all(&self.pool)
        .await?;
        let mut map: HashMap<[u8; 16], Vec<MemberDelivery>> = HashMap::new();
        for r in rows {
            let Ok(id) = <[u8; 16]>::try_from(r.get::<Vec<u8>, _>(0)) else {
                continue;
            };
            map.entry(id).or_default().push(MemberDelivery {
                member: r.get(1),
                status: MemberStatus::parse(r.get::<&str, _>(2)),
                failure: r.get(3),
            });
        }
        Ok(map)
    }

    /// Records an incoming group message (or membership change) inside the decrypting
    /// transaction. Returns false if it was already there.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn insert_group_incoming(
        &self,
        tx: &mut Tx,
        wire_id: &[u8],
        group_key: &str,
        sender: &str,
        text: &str,
        created_ms: u64,
        server_time_ms: u64,
        event: bool,
    ) -> Result<bool, ClientError> {
        let r = sqlx::query(
            "INSERT OR IGNORE INTO messages (message_id, peer, outgoing, body, created_ms,
                 server_time_ms, status, sender, group_event)
             VALUES (?, ?, 0, ?, ?, ?, 'received', ?, ?)",
        )
        .bind(wire_id)
        .bind(group_key)
        .bind(text)
        .bind(created_ms as i64)
        .bind(server_time_ms as i64)
        .bind(sender)
        .bind(event as i64)
        .execute(&mut **tx)
        .await?;
        Ok(r.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::GroupProgress;

    async fn marks(store: &LocalStore, key: &str) -> (MessageStatus, String) {
        let h = store.history(key).await.unwrap();
        (h[0].status, h[0].marks())
    }

    #[tokio::test]
    async fn a_group_message_is_delivered_once_every_member_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("profile.db"), [7; 32])
            .await
            .unwrap();
        let group = GroupInfo {
            id: GroupId([3; 16]),
            name: "trip".into(),
            epoch: 1,
            members: vec!["alice".into(), "bob".into(), "carol".into()],
            joined: true,
            created_ms: 1,
        };
        let mut tx = store.begin().await.unwrap();
        store.save_group(&mut tx, &group).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(store.group(&group.id).await.unwrap().as_ref(), Some(&group));

        let id = MessageId::random();
        let key = group.conversation_key();
        let fan_out = OutgoingGroup {
            context: group.context(None).encode_to_vec(),
            recipients: group.others("alice"),
            event: false,
        };
        store
            .insert_outgoing(&id.0, &key, "hi", 5, Some(&fan_out))
            .await
            .unwrap();
        let sends = store.pending_group_sends(&id.0).await.unwrap();
        let members: Vec<&str> = sends.iter().map(|s| s.member.as_str()).collect();
        assert_eq!(members, ["bob", "carol"], "in sending order");
        assert_eq!(
            store.group_context_of(&id.0).await.unwrap().unwrap().name,
            "trip"
        );

        // Bob's copy is queued; carol's not yet: still pending.
        store
            .settle_group_send(&sends[0].wire_id, MemberStatus::Sent, None)
            .await
            .unwrap();
        assert_eq!(
            store.finish_group_message(&id.0, Some(9)).await.unwrap(),
            MessageStatus::Pending
        );
        store
            .settle_group_send(&sends[1].wire_id, MemberStatus::Sent, None)
            .await
            .unwrap();
        assert_eq!(
            store.finish_group_message(&id.0, Some(9)).await.unwrap(),
            MessageStatus::Sent
        );

        let receipt = store
            .group_receipt(&sends[0].wire_id, false)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((receipt.message_id, receipt.member.as_str()), (id, "bob"));
        assert_eq!(
            marks(&store, &key).await,
            (MessageStatus::Sent, "✓✓ 1/2".to_string())
        );
        assert_eq!(
            store.history(&key).await.unwrap()[0].group_progress(),
            Some(GroupProgress {
                delivered: 1,
                reached: 2,
                waiting: vec!["carol".into()],
            })
        );
        store
            .group_receipt(&sends[1].wire_id, false)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            marks(&store, &key).await,
            (MessageStatus::Delivered, "✓✓".to_string())
        );
        assert_eq!(store.history(&key).await.unwrap()[0].group_progress(), None);
        // A receipt for something that is not a copy of ours: nothing.
        assert!(store
            .group_receipt(&[1; 16], false)
            .await
            .unwrap()
            .is_none());
        let list = store.conversations().await.unwrap();
        assert_eq!((list[0].title.as_str(), list[0].group), ("trip", true));
    }

    #[tokio::test]
    async fn a_group_message_nobody_can_receive_fails_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("profile.db"), [7; 32])
            .await
            .unwrap();
        let id = MessageId::random();
        let fan_out = OutgoingGroup {
            context: Vec::new(),
            recipients: vec!["ghost".into()],
            event: false,
        };
        store
            .insert_outgoing(&id.0, "group:00", "hi", 5, Some(&fan_out))
            .await
            .unwrap();
        let sends = store.pending_group_sends(&id.0).await.unwrap();
        store
            .settle_group_send(
                &sends[0].wire_id,
                MemberStatus::Failed,
                Some("no such user"),
            )
            .await
            .unwrap();
        assert_eq!(
            store.finish_group_message(&id.0, None).await.unwrap(),
            MessageStatus::Failed
        );
        let h = store.history("group:00").await.unwrap();
        assert_eq!(h[0].failure.as_deref(), Some("no such user"));
    }
}
