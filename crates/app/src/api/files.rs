//! Files: `POST /api/files?to=NAME&name=FILE[&caption=TEXT]` sends a file (the page posts
//! its bytes as the body), `GET /api/files/{message_id}` opens the file of a message kept
//! here (one sent, or one received once fetched and decrypted).
//!
//! The bytes are streamed to a temporary file in the profile, never held in memory, then
//! handed to the client library, which encrypts them and queues the message (uploaded
//! before the message goes out; progress arrives on /live as `transfer` events).
//!
//! Files come from other people: a received file is served with `nosniff`, a sandboxing
//! CSP, and as a download unless it is a raster image (an HTML or SVG file opened inline
//! would run in the app's own origin, with the app's API at hand).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use postern_client::MessageId;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::chats::Queued;
use super::{client, ApiError, ApiResult};
use crate::profile::Push;
use crate::AppState;

/// The largest body the page may post (the server's own limit, 100 MB by default, is
/// checked when the file is uploaded and named in the chat if it is smaller).
pub const MAX_FILE_BYTES: usize = 1024 * 1024 * 1024;

/// Types shown inline (as a picture); everything else is offered as a download.
const INLINE_TYPES: &[&str] = &["image/png", "image/jpeg", "image/gif", "image/webp"];

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/api/files",
            post(send).layer(DefaultBodyLimit::max(MAX_FILE_BYTES)),
        )
        .route("/api/files/{message_id}", get(open))
}

#[derive(Debug, Deserialize)]
struct SendFile {
    to: String,
    name: String,
    #[serde(default)]
    caption: String,
}

async fn send(
    State(state): State<Arc<AppState>>,
    Query(q): Query<SendFile>,
    body: Body,
) -> ApiResult<Queued> {
    let client = client(&state).await?;
    let to = q.to.trim().to_ascii_lowercase();
    let staging = state.home().join("outgoing");
    postern_protocol::fsutil::private_dir(&staging)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let tmp = staging.join(format!("app-{}.tmp", MessageId::random()));
    let received = receive(body, &tmp).await;
    let queued = match received {
        Ok(()) => {
            client
                .queue_file_named(&to, &tmp, &q.name, &q.caption)
                .await
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
    };
    let _ = tokio::fs::remove_file(&tmp).await;
    let message_id = queued?;
    state.push(Push::Queued {
        message_id,
        to: to.clone(),
    });
    tokio::spawn(async move {
        match client.flush_pending().await {
            Ok(_) | Err(postern_client::ClientError::NotConnected) => {}
            Err(e) => tracing::debug!(error = %e, "pending messages go out on the next connection"),
        }
    });
    Ok(Json(Queued { message_id }))
}

/// Streams the request body into `path`.
async fn receive(body: Body, path: &std::path::Path) -> Result<(), ApiError> {
    let failed = |e: String| ApiError::new(StatusCode::BAD_REQUEST, "file", e);
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|e| failed(format!("cannot store the file: {e}")))?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| failed(format!("the upload from the page broke off: {e}")))?;
        file.write_all(&chunk)
            .await
            .map_err(|e| failed(format!("cannot store the file: {e}")))?;
    }
    file.flush()
        .await
        .map_err(|e| failed(format!("cannot store the file: {e}")))?;
    Ok(())
}

async fn open(
    State(state): State<Arc<AppState>>,
    Path(message_id): Path<String>,
) -> Result<Response, ApiError> {
    let id: MessageId = message_id
        .parse()
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", "not a message id"))?;
    let Some((path, name, content_type)) = client(&state).await?.attachment_file(&id).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_here",
            "this file is not here (not fetched yet, or it failed)",
        ));
    };
    let file = tokio::fs::File::open(&path).await.map_err(|e| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_here",
            format!("{}: {e}", path.display()),
        )
    })?;
    let inline = INLINE_TYPES.contains(&content_type.as_str());
    let served_type = if inline {
        content_type.as_str()
    } else {
        "application/octet-stream"
    };
    let disposition = format!(
        "{}; filename*=UTF-8''{}",
        if inline { "inline" } else { "attachment" },
        percent_encode(&name)
    );
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (header::CONTENT_TYPE, served_type.to_string()),
            (header::CONTENT_DISPOSITION, disposition),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
            (
                header::CONTENT_SECURITY_POLICY,
                "sandbox; default-src 'none'".to_string(),
            ),
            (header::CACHE_CONTROL, "private, no-store".to_string()),
        ],
        body,
    )
        .into_response())
}

/// What RFC 8187 (`filename*=`) leaves as it is: letters, digits and `attr-char`'s marks.
const ATTR_CHAR: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'!')
    .remove(b'#')
    .remove(b'$')
    .remove(b'&')
    .remove(b'+')
    .remove(b'-')
    .remove(b'.')
    .remove(b'^')
    .remove(b'_')
    .remove(b'`')
    .remove(b'|')
    .remove(b'~');

/// The file name for `Content-Disposition: …; filename*=UTF-8''…`.
fn percent_encode(name: &str) -> String {
    percent_encoding::utf8_percent_encode(name, ATTR_CHAR).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_encoded_for_the_header() {
        assert_eq!(percent_encode("boat photo.jpg"), "boat%20photo.jpg");
        assert_eq!(percent_encode("a\"b;c"), "a%22b%3Bc");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }
}
