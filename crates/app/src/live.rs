//! The WebSocket at `/live`: pushes to the page what happens, as it happens — the
//! client's events, banner changes, route-check progress. The page sends nothing but
//! pings; anything it sends is read (bounded) and dropped.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use tokio::sync::broadcast;

use crate::profile::Push;
use crate::AppState;

/// The page sends nothing worth more than this.
const MAX_INCOMING: usize = 4 * 1024;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/live", get(upgrade))
}

async fn upgrade(State(state): State<Arc<AppState>>, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(MAX_INCOMING)
        .max_frame_size(MAX_INCOMING)
        .on_upgrade(move |socket| serve(state, socket))
}

async fn serve(state: Arc<AppState>, mut socket: WebSocket) {
    // Subscribe first, then send the current banner: nothing falls in between.
    let mut pushes = state.subscribe();
    let hello = Push::Connection {
        status: state.status(),
    };
    if send(&mut socket, &hello).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            push = pushes.recv() => {
                let push = match push {
                    Ok(p) => p,
                    Err(broadcast::error::RecvError::Lagged(_)) => Push::Resync,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if send(&mut socket, &push).await.is_err() {
                    return;
                }
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

async fn send(socket: &mut WebSocket, push: &Push) -> Result<(), ()> {
    let text = serde_json::to_string(push).map_err(|_| ())?;
    socket
        .send(Message::Text(text.into()))
        .await
        .map_err(|_| ())
}
