//! Groups: the list, creating one, adding and removing members, leaving. A group's
//! conversation is read and written through [`super::chats`] under its conversation key
//! (`group:` and its id), like a contact's.
//!
//! A change is saved at once (the page shows it) and sent on the connection if there is
//! one, else as soon as a route works — like a message.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use postern_client::{Client, GroupInfo, MembershipChange};
use serde::Deserialize;

use super::{client, ApiResult};
use crate::profile::Push;
use crate::AppState;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/groups", get(list).post(create))
        .route("/api/groups/{group}", get(show))
        .route("/api/groups/{group}/members", post(members))
        .route("/api/groups/{group}/leave", post(leave))
}

async fn list(State(state): State<Arc<AppState>>) -> ApiResult<Vec<GroupInfo>> {
    Ok(Json(client(&state).await?.groups().await?))
}

/// `{group}` is the group's conversation key, its id, or its name.
async fn show(
    State(state): State<Arc<AppState>>,
    Path(group): Path<String>,
) -> ApiResult<GroupInfo> {
    Ok(Json(client(&state).await?.find_group(&group).await?))
}

#[derive(Debug, Deserialize)]
pub struct NewGroup {
    pub name: String,
    pub members: Vec<String>,
}

async fn create(
    State(state): State<Arc<AppState>>,
    Json(new): Json<NewGroup>,
) -> ApiResult<MembershipChange> {
    let client = client(&state).await?;
    let members = usernames(&new.members);
    let change = client.create_group(&new.name, &members).await?;
    Ok(Json(announce(&state, client, change)))
}

/// Members to add and to remove (either may be left out).
#[derive(Debug, Deserialize)]
pub struct MemberChange {
    #[serde(default)]
    pub add: Vec<String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

async fn members(
    State(state): State<Arc<AppState>>,
    Path(group): Path<String>,
    Json(change): Json<MemberChange>,
) -> ApiResult<MembershipChange> {
    let client = client(&state).await?;
    let mut last = None;
    let add = usernames(&change.add);
    if !add.is_empty() {
        last = Some(client.add_to_group(&group, &add).await?);
    }
    let remove = usernames(&change.remove);
    if !remove.is_empty() {
        let made = client.remove_from_group(&group, &remove).await?;
        if let Some(m) = last.take() {
            announce(&state, client.clone(), m);
        }
        last = Some(made);
    }
    let Some(made) = last else {
        return Err(postern_client::ClientError::InvalidInput(
            "name someone to add or remove".into(),
        )
        .into());
    };
    Ok(Json(announce(&state, client, made)))
}

async fn leave(
    State(state): State<Arc<AppState>>,
    Path(group): Path<String>,
) -> ApiResult<MembershipChange> {
    let client = client(&state).await?;
    let change = client.leave_group(&group).await?;
    Ok(Json(announce(&state, client, change)))
}

/// Usernames as typed: trimmed, lowercased, empty ones dropped.
fn usernames(typed: &[String]) -> Vec<String> {
    typed
        .iter()
        .map(|u| u.trim().to_ascii_lowercase())
        .filter(|u| !u.is_empty())
        .collect()
}

/// Tells the page a change is queued and sends it if connected.
fn announce(state: &AppState, client: Client, change: MembershipChange) -> MembershipChange {
    if let Some(message_id) = change.message_id {
        state.push(Push::Queued {
            message_id,
            to: change.group.conversation_key(),
        });
        super::chats::flush_in_background(client);
    }
    change
}
