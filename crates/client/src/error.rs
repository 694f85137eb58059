//! The client library's errors.
//!
//! They say what went wrong in the user's terms (which stage of which route failed, which
//! contact does not exist) but never which command to type: that is the app's business
//! (the CLI adds its own hints, an app shows its own buttons).

use std::time::Duration;

use postern_protocol::schema::server_frame;
use postern_protocol::units::human_bytes;
use postern_protocol::ProtocolError;

use crate::connector::route::DialReport;
use crate::events::MessageIdError;
use crate::proxy::{ProxyMode, ProxyParseError};
use crate::safety::SafetyNumberError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("the server refused: {message}")]
    Server { code: i32, message: String },
    #[error("there is no user named {0:?} (usernames are lowercase)")]
    UnknownContact(String),
    #[error("the username {0:?} is already taken")]
    UsernameTaken(String),
    #[error("no profile in {0}")]
    NoProfile(String),
    #[error("a profile already exists in {0}")]
    ProfileExists(String),
    #[error("the server does not know this device (was the server's database reset?)")]
    UnknownDevice,
    #[error("profile problem: {0}")]
    Profile(String),
    #[error("local database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("local database migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("end-to-end encryption error: {0}")]
    Crypto(String),
    #[error("{0}")]
    InvalidInput(String),
    #[error("the message is {bytes} bytes; the limit is {limit}")]
    TooLong { bytes: usize, limit: usize },
    #[error(transparent)]
    InvalidProxy(#[from] ProxyParseError),
    #[error(transparent)]
    InvalidMessageId(#[from] MessageIdError),
    #[error("no saved proxy matches {0:?}")]
    NoSuchProxy(String),
    #[error("not connected to the server")]
    NotConnected,
    #[error("{}", no_route_message(*mode, attempts))]
    NoRoute {
        mode: ProxyMode,
        attempts: Vec<DialReport>,
    },
    #[error("the server did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    SafetyNumber(#[from] SafetyNumberError),
    #[error("no identity keys of {0} are known here yet: they come with the first message either of you sends, or from the server when connected")]
    NoContactKeys(String),
    #[error("not every identity key of {0} is known here yet: they are read from the server when connected")]
    ContactKeysIncomplete(String),
    #[error("the safety number with {0} is not the one given: their keys changed since it was shown, so compare the new number first")]
    SafetyNumberChanged(String),
    #[error("{path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the file is {} and this server takes attachments up to {}", human_bytes(*bytes), human_bytes(*limit))]
    AttachmentTooLarge { bytes: u64, limit: u64 },
    #[error("media: unavailable ({0})")]
    MediaUnavailable(String),
    #[error("the attachment failed its integrity check ({0}): it was not saved")]
    AttachmentCorrupt(String),
    #[error("no group here is called {0:?}")]
    NoSuchGroup(String),
    #[error("several groups are called {name:?}: name one by its id ({})", ids.join(", "))]
    AmbiguousGroup { name: String, ids: Vec<String> },
    #[error("you are no longer a member of the group {0:?}")]
    NotInGroup(String),
    #[error(
        "no member of the group {0:?} could be reached: none of them exists on the server any more"
    )]
    GroupUnreachable(String),
}

impl ClientError {
    pub(crate) fn file(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| ClientError::File {
            path: path.display().to_string(),
            source,
        }
    }

    pub(crate) fn crypto(e: impl std::fmt::Display) -> Self {
        ClientError::Crypto(e.to_string())
    }

    pub(crate) fn unexpected(body: server_frame::Body) -> Self {
        ClientError::Protocol(ProtocolError::Violation(format!(
            "unexpected answer from the server: {body:?}"
        )))
    }

    /// The connection (or every route) failed, as opposed to this one request: worth
    /// another connection.
    pub fn is_connection_problem(&self) -> bool {
        matches!(
            self,
            ClientError::NotConnected
                | ClientError::Timeout(_)
                | ClientError::Protocol(_)
                | ClientError::NoRoute { .. }
        )
    }
}

fn no_route_message(mode: ProxyMode, attempts: &[DialReport]) -> String {
    if attempts.is_empty() {
        return match mode {
            ProxyMode::On => "proxy mode is on (relays only) but no proxy is saved".into(),
            _ => "no way to reach the server is configured".into(),
        };
    }
    let mut text = String::from("could not reach the service:");
    for a in attempts {
        if let Some((stage, failure)) = &a.failed {
            text.push_str(&format!("\n  ✗ {} — {stage}: {failure}", a.route));
        }
    }
    text
}
