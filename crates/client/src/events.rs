//! What the client library tells the app: message ids and events.

use std::fmt;
use std::str::FromStr;

/// A message's id: 16 random bytes chosen by the sender, shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// Text or bytes that are not a message id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageIdError {
    #[error("a message id is 32 hex digits")]
    Text,
    #[error("a message id is 16 bytes, not {0}")]
    Length(usize),
}

impl FromStr for MessageId {
    type Err = MessageIdError;
    fn from_str(s: &str) -> Result<Self, MessageIdError> {
        let bytes = hex::decode(s).map_err(|_| MessageIdError::Text)?;
        Ok(Self(bytes.try_into().map_err(|_| MessageIdError::Text)?))
    }
}

impl TryFrom<&[u8]> for MessageId {
    type Error = MessageIdError;
    fn try_from(b: &[u8]) -> Result<Self, MessageIdError> {
        Ok(Self(
            b.try_into().map_err(|_| MessageIdError::Length(b.len()))?,
        ))
    }
}

impl serde::Serialize for MessageId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A decrypted incoming message.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IncomingMessage {
    pub message_id: MessageId,
    pub from: String,
    pub text: String,
    /// The sender's clock when they wrote it.
    pub sent_at_ms: u64,
    /// When the server accepted it.
    pub server_time_ms: u64,
    /// A file that came with it (`text` is then its caption); fetched in the background,
    /// then [`Event::AttachmentSaved`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachment: Option<AttachmentSummary>,
    /// The group it was written to (`from` is then the member who wrote it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupRef>,
}

/// A group, as events name it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupRef {
    pub id: crate::groups::GroupId,
    pub name: String,
}

/// What a message says about its attachment.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttachmentSummary {
    pub file_name: String,
    pub content_type: String,
    /// Bytes of the file.
    pub size: u64,
}

/// Something that happened, in the order it happened.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A [`crate::Client::keep_connected`] loop is racing the routes.
    Connecting,
    /// The connection to the service is up (the handshake proved the server's identity).
    Connected {
        /// The route, as shown to people ("relay.example.org:443 (TLS)").
        via: String,
        /// Through a relay, rather than straight to the server.
        relay: bool,
        /// Inside TLS to the relay.
        tls: bool,
        handshake_ms: u64,
    },
    /// No route worked; the next race starts in `retry_in_ms`.
    Unreachable {
        /// Every route's outcome, in one sentence per route.
        reason: String,
        attempts: Vec<crate::DialReport>,
        retry_in_ms: u64,
    },
    /// The connection dropped.
    Disconnected { reason: String },
    /// One route did not work; the connector moves on to the others.
    AttemptFailed {
        route: String,
        stage: crate::route::Stage,
        reason: String,
        /// The far end failed the server's authentication: it will not be used again.
        hostile: bool,
    },
    /// A message arrived and is stored locally.
    Incoming(IncomingMessage),
    /// The server has our message in the recipient's queue (✓).
    Sent { message_id: MessageId, to: String },
    /// The recipient's device stored our message (✓✓). For a group message, `to` is the
    /// member whose device stored it, and `all` whether every member's has now.
    Delivered {
        message_id: MessageId,
        to: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        group: Option<GroupRef>,
        #[serde(skip_serializing_if = "Option::is_none")]
        all: Option<bool>,
    },
    /// A group's membership changed (`text` says how: "bob added carol"), or this device
    /// learned of a group it was added to.
    GroupChanged {
        group: GroupRef,
        by: String,
        text: String,
    },
    /// Our message can never be delivered (it stays in history, marked failed).
    Failed {
        message_id: MessageId,
        to: String,
        reason: String,
    },
    /// A message arrived that could not be decrypted (recorded in history, then dropped).
    Undecryptable {
        message_id: MessageId,
        from: String,
        reason: String,
    },
    /// A contact's identity keys changed (they reinstalled, added a device, or someone
    /// substituted keys): their safety number changed, the conversation shows it, and a
    /// verified contact is no longer verified.
    KeyChanged { contact: String },
    /// An attachment moved on: `done` of `total` ciphertext bytes are on the server
    /// (outgoing) or here (incoming). Sent each time the percentage changes.
    Transfer {
        message_id: MessageId,
        peer: String,
        outgoing: bool,
        file_name: String,
        done: u64,
        total: u64,
    },
    /// An incoming attachment was fetched, checked and decrypted into `path`.
    AttachmentSaved {
        message_id: MessageId,
        from: String,
        /// The conversation it belongs to: `from`, or a group's key.
        conversation: String,
        file_name: String,
        path: String,
    },
    /// An attachment can never be moved (its message says why in history).
    AttachmentFailed {
        message_id: MessageId,
        peer: String,
        outgoing: bool,
        file_name: String,
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_text_round_trip() {
        let id = MessageId::random();
        assert_eq!(id.to_string().parse::<MessageId>().unwrap(), id);
        assert!("zz".parse::<MessageId>().is_err());
        assert!("00ff".parse::<MessageId>().is_err());
    }
}
