//! Chats: the conversation list, one conversation, sending, read markers.
//!
//! Sending never waits for the network: the message is stored as pending (so it shows
//! at once, with …) and handed to the connection if there is one; otherwise the
//! connection loop sends it as soon as a route works.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use postern_client::{ClientError, Conversation, GroupProgress, HistoryEntry, MessageId};
use serde::{Deserialize, Serialize};

use super::{client, ApiResult};
use crate::profile::Push;
use crate::AppState;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/chats", get(list))
        .route("/api/chats/{peer}", get(history))
        .route("/api/chats/{peer}/read", post(read))
        .route("/api/messages", post(send))
}

async fn list(State(state): State<Arc<AppState>>) -> ApiResult<Vec<Conversation>> {
    Ok(Json(client(&state).await?.conversations().await?))
}

/// A line of a conversation as the app shows it: the entry, and its marks as the client
/// library words them (so the app and the CLI cannot disagree on "✓✓ 1/2").
#[derive(Debug, Serialize)]
pub struct Line {
    #[serde(flatten)]
    pub entry: HistoryEntry,
    pub marks: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<GroupProgress>,
}

async fn history(
    State(state): State<Arc<AppState>>,
    Path(peer): Path<String>,
) -> ApiResult<Vec<Line>> {
    let history = client(&state).await?.history(&peer).await?;
    Ok(Json(
        history
            .into_iter()
            .map(|entry| Line {
                marks: entry.marks(),
                progress: entry.group_progress(),
                entry,
            })
            .collect(),
    ))
}

async fn read(State(state): State<Arc<AppState>>, Path(peer): Path<String>) -> ApiResult<()> {
    client(&state).await?.mark_read(&peer).await?;
    Ok(Json(()))
}

#[derive(Debug, Deserialize)]
pub struct Compose {
    pub to: String,
    pub text: String,
}

#[derive(Debug, Serialize)]
pub struct Queued {
    pub message_id: MessageId,
}

async fn send(
    State(state): State<Arc<AppState>>,
    Json(compose): Json<Compose>,
) -> ApiResult<Queued> {
    let client = client(&state).await?;
    let to = compose.to.trim().to_ascii_lowercase();
    if compose.text.trim().is_empty() {
        return Err(ClientError::InvalidInput("the message is empty".into()).into());
    }
    let message_id = client.queue(&to, &compose.text).await?;
    state.push(Push::Queued {
        message_id,
        to: to.clone(),
    });
    flush_in_background(client);
    Ok(Json(Queued { message_id }))
}

/// Sends what is pending over the connection in use, if any, without making the page
/// wait (without a connection it goes out on the next one).
pub(crate) fn flush_in_background(client: postern_client::Client) {
    tokio::spawn(async move {
        match client.flush_pending().await {
            Ok(_) | Err(ClientError::NotConnected) => {}
            Err(e) => tracing::debug!(error = %e, "pending messages go out on the next connection"),
        }
    });
}
