//! Client errors, worded for the person using the app.

use postern_protocol::ProtocolError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the server at {address}: {error} (is it running? is the address in the network file right? if your network blocks it, use a relay)")]
    Unreachable {
        address: String,
        error: std::io::Error,
    },
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("the server refused: {message}")]
    Server { code: i32, message: String },
    #[error("unknown contact {0:?}: check the spelling (usernames are lowercase)")]
    UnknownContact(String),
    #[error("no profile in {0}: create one with `postern account create NAME --network FILE`")]
    NoProfile(String),
    #[error("a profile already exists in {0}: use another --home (or POSTERN_HOME) for a second account")]
    ProfileExists(String),
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
    #[error("not connected to the server")]
    NotConnected,
    #[error("{}", no_route_message(mode, attempts))]
    NoRoute {
        mode: String,
        attempts: Vec<crate::route::DialReport>,
    },
    #[error("the server did not answer within {0:?}")]
    Timeout(std::time::Duration),
}

impl ClientError {
    pub(crate) fn crypto(e: impl std::fmt::Display) -> Self {
        ClientError::Crypto(e.to_string())
    }
}

fn no_route_message(mode: &str, attempts: &[crate::route::DialReport]) -> String {
    if attempts.is_empty() {
        return match mode {
            "on" => {
                "proxy mode is on but no proxy is saved: add one with `postern proxy add ADDRESS`"
                    .into()
            }
            _ => "no way to reach the server is configured".into(),
        };
    }
    let mut text = String::from("could not reach the service:");
    for a in attempts {
        if let Some((stage, failure)) = &a.failed {
            text.push_str(&format!("\n  ✗ {} — {stage}: {failure}", a.route));
        }
    }
    text.push_str(
        "\nIf your network blocks the service, add a proxy (`postern proxy add ADDRESS|LINK`) \
         or try another one; `postern proxy check` tests each saved proxy.",
    );
    text
}
