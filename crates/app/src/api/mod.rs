//! The JSON endpoints the page calls. Every answer is JSON; every error is
//! `{"error": KIND, "message": TEXT, "attempts": [...]}` with an HTTP status, where KIND is
//! a stable word the page picks its wording and buttons by (`name_taken`,
//! `invalid_name`, `unreachable` with the route attempts and the stage each failed at, …).
//!
//! * [`account`]: `GET /api/state`, `POST /api/account` (onboarding);
//! * [`chats`]: conversations, history, sending, read markers;
//! * [`files`]: sending a file (the page posts its bytes) and opening one kept here;
//! * [`groups`]: the groups, creating one, adding and removing members, leaving;
//! * [`contacts`]: a contact's safety number (and its QR code), the verified mark;
//! * [`proxies`]: the proxy mode, the saved proxies (add, remove, reorder, QR code) and
//!   live route checks (the green tick).

pub mod account;
pub mod chats;
pub mod contacts;
pub mod files;
pub mod groups;
pub mod proxies;

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use postern_client::{Client, ClientError, DialReport};
use serde::Serialize;

use crate::AppState;

/// `payload` (a proxy link, a safety number) as a QR code, an SVG image.
pub(crate) fn qr_svg(payload: &str) -> Result<Response, ApiError> {
    let code = qrcode::QrCode::new(payload.as_bytes())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let svg = code
        .render::<qrcode::render::svg::Color>()
        .min_dimensions(200, 200)
        .quiet_zone(true)
        .build();
    Ok(([(axum::http::header::CONTENT_TYPE, "image/svg+xml")], svg).into_response())
}

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .merge(account::routes())
        .merge(chats::routes())
        .merge(contacts::routes())
        .merge(files::routes())
        .merge(groups::routes())
        .merge(proxies::routes())
}

/// An error answer.
#[derive(Debug, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    #[serde(rename = "error")]
    pub kind: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<DialReport>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            attempts: Vec::new(),
        }
    }

    pub fn no_account() -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "no_account",
            "this profile has no account yet: create one first",
        )
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        use StatusCode as S;
        let message = e.to_string();
        let (status, kind) = match &e {
            ClientError::UsernameTaken(_) => (S::CONFLICT, "name_taken"),
            ClientError::ProfileExists(_) => (S::CONFLICT, "account_exists"),
            ClientError::UnknownContact(_) => (S::BAD_REQUEST, "unknown_contact"),
            ClientError::InvalidInput(_) => (S::BAD_REQUEST, "invalid_input"),
            ClientError::TooLong { .. } => (S::BAD_REQUEST, "too_long"),
            ClientError::InvalidProxy(_) => (S::BAD_REQUEST, "invalid_proxy"),
            ClientError::NoSuchProxy(_) => (S::NOT_FOUND, "no_such_proxy"),
            ClientError::NotConnected => (S::SERVICE_UNAVAILABLE, "not_connected"),
            ClientError::NoRoute { .. } => (S::BAD_GATEWAY, "unreachable"),
            ClientError::Timeout(_) => (S::GATEWAY_TIMEOUT, "timeout"),
            ClientError::UnknownDevice => (S::CONFLICT, "unknown_device"),
            ClientError::NoContactKeys(_) => (S::CONFLICT, "no_contact_keys"),
            ClientError::ContactKeysIncomplete(_) => (S::SERVICE_UNAVAILABLE, "not_connected"),
            ClientError::SafetyNumberChanged(_) => (S::CONFLICT, "safety_number_changed"),
            ClientError::AttachmentTooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "too_large"),
            ClientError::MediaUnavailable(_) => (S::SERVICE_UNAVAILABLE, "media_unavailable"),
            ClientError::File { .. } => (S::BAD_REQUEST, "file"),
            ClientError::NoSuchGroup(_) => (S::NOT_FOUND, "no_such_group"),
            ClientError::AmbiguousGroup { .. } => (S::CONFLICT, "ambiguous_group"),
            ClientError::NotInGroup(_) => (S::CONFLICT, "not_in_group"),
            ClientError::GroupUnreachable(_) => (S::BAD_REQUEST, "group_unreachable"),
            _ => (S::INTERNAL_SERVER_ERROR, "internal"),
        };
        let attempts = match e {
            ClientError::NoRoute { attempts, .. } => attempts,
            _ => Vec::new(),
        };
        if status == S::INTERNAL_SERVER_ERROR {
            tracing::warn!(error = %message, "request failed");
        }
        Self {
            status,
            kind,
            message,
            attempts,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(&self)).into_response()
    }
}

pub type ApiResult<T> = Result<Json<T>, ApiError>;

/// The running client, or the answer that there is no account yet.
pub async fn client(state: &AppState) -> Result<Client, ApiError> {
    state.client().await.ok_or_else(ApiError::no_account)
}
