//! Contacts: the safety number to compare in person, and the verified mark.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use postern_client::ContactSafety;
use serde::Deserialize;

use super::{client, ApiError, ApiResult};
use crate::AppState;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/contacts/{peer}/safety", get(safety))
        .route("/api/contacts/{peer}/safety/qr", get(qr))
        .route(
            "/api/contacts/{peer}/verified",
            axum::routing::post(verify).delete(unverify),
        )
}

/// The safety number (the contact's devices read from the server first when connected)
/// and whether the user verified it.
async fn safety(
    State(state): State<Arc<AppState>>,
    Path(peer): Path<String>,
) -> ApiResult<ContactSafety> {
    Ok(Json(client(&state).await?.safety_number(&peer).await?))
}

/// The safety number as a QR code, for the contact to scan (from the keys pinned here:
/// the page asks for it right after the number, which read them from the server).
async fn qr(
    State(state): State<Arc<AppState>>,
    Path(peer): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let number = client(&state).await?.pinned_safety_number(&peer).await?;
    super::qr_svg(&number.qr_payload())
}

#[derive(Debug, Deserialize)]
pub struct Verify {
    /// The number the user compared, as shown: refused if the keys changed since.
    pub number: String,
}

async fn verify(
    State(state): State<Arc<AppState>>,
    Path(peer): Path<String>,
    Json(v): Json<Verify>,
) -> ApiResult<ContactSafety> {
    let client = client(&state).await?;
    client.mark_verified(&peer, &v.number).await?;
    Ok(Json(client.safety_number(&peer).await?))
}

async fn unverify(
    State(state): State<Arc<AppState>>,
    Path(peer): Path<String>,
) -> ApiResult<ContactSafety> {
    let client = client(&state).await?;
    client.clear_verified(&peer).await?;
    Ok(Json(client.safety_number(&peer).await?))
}
