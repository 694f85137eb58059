//! Server errors.

use postern_protocol::ProtocolError;

/// Errors from running the server or touching its data directory.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("{context}: {error}")]
    Io {
        context: String,
        error: std::io::Error,
    },
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    Config(String),
    /// Another server node was writing for the same device at that moment (PostgreSQL);
    /// the write was rolled back and may simply be tried again.
    #[error("another server node is busy with the same device: try again")]
    Contended,
}

impl ServerError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |error| ServerError::Io { context, error }
    }
}
