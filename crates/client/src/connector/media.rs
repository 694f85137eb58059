//! The way attachments travel.
//!
//! By default over the chat connection itself. When that connection goes through a relay
//! whose link names a media port (`media=587`: the reference system's 587/7777 layout),
//! transfers get a connection of their own through that port — TLS, the relay's secret
//! if it has one, then a send-only Noise session with the server — so a big file never
//! queues in front of chat frames, and a relay can put media on a port (or a machine) of
//! its own. When the media port fails (blocked, refused, frozen), transfers fall back to
//! the chat connection at once and the port is left alone for [`RETRY_AFTER`]; the reason
//! is kept for `postern status`, which then says "media port …: unavailable (…)".

use std::sync::Arc;
use std::time::{Duration, Instant};

use postern_protocol::noise::StaticKeypair;
use tokio::sync::Mutex;

use super::connection::Connection;
use super::route::{Progress, Route};
use super::{attempt, ConnectMode};
use crate::proxy::ProxyEntry;

/// A media port that failed is not tried again for this long.
pub const RETRY_AFTER: Duration = Duration::from_secs(60);

/// Where attachments go now, for `postern status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "via", rename_all = "snake_case")]
pub enum MediaRoute {
    /// Over the chat connection (the route in use offers no media port).
    Chat,
    /// Through the relay's media port.
    MediaPort { route: String },
    /// The relay's media port failed for this reason: over the chat connection instead.
    MediaPortFailed { route: String, reason: String },
}

/// The relay media route for a chat connection that came over `chat`, if its relay
/// offers one: the same host, secret and SNI, the media port, TLS.
pub fn media_route_of(chat: &Route) -> Option<Route> {
    let Route::Relay(p) = chat else { return None };
    let port = p.media?;
    Some(Route::Relay(ProxyEntry {
        port,
        tls: true,
        media: None,
        ..p.clone()
    }))
}

#[derive(Default)]
struct State {
    route: Option<Route>,
    conn: Option<Arc<Connection>>,
    failed: Option<(Instant, String)>,
}

/// The media connection of one profile, made when a transfer needs it.
pub(crate) struct MediaPath {
    keys: StaticKeypair,
    server_key: [u8; 32],
    state: Mutex<State>,
}

impl MediaPath {
    pub fn new(keys: StaticKeypair, server_key: [u8; 32]) -> Self {
        Self {
            keys,
            server_key,
            state: Mutex::default(),
        }
    }

    /// The connection a transfer should use while `chat` is the chat connection: the
    /// relay's media port's (opened now if needed), else `chat` itself. The flag says
    /// whether it is a separate media connection.
    pub async fn connection(&self, chat: &Arc<Connection>) -> (Arc<Connection>, bool) {
        let Some(route) = chat.via.as_ref().and_then(media_route_of) else {
            return (chat.clone(), false);
        };
        let mut state = self.state.lock().await;
        if state.route.as_ref() != Some(&route) {
            // Another relay (or another media port) since: start afresh.
            if let Some(old) = state.conn.take() {
                old.shutdown().await;
            }
            *state = State {
                route: Some(route.clone()),
                ..State::default()
            };
        }
        if let Some(conn) = state.conn.as_ref().filter(|c| !c.is_closed()) {
            return (conn.clone(), true);
        }
        if state
            .failed
            .as_ref()
            .is_some_and(|(when, _)| when.elapsed() < RETRY_AFTER)
        {
            return (chat.clone(), false);
        }
        let progress = Progress::new(&route);
        match attempt(
            route.clone(),
            progress,
            &self.keys,
            &self.server_key,
            ConnectMode::SendOnly,
        )
        .await
        {
            Ok((conn, _no_pushes)) => {
                let conn = Arc::new(conn);
                state.conn = Some(conn.clone());
                state.failed = None;
                tracing::debug!(%route, "attachments through the relay's media port");
                (conn, true)
            }
            Err((stage, failure)) => {
                let reason = format!("{stage}: {failure}");
                tracing::info!(%route, %reason, "the relay's media port failed: attachments over the chat connection");
                state.failed = Some((Instant::now(), reason));
                (chat.clone(), false)
            }
        }
    }

    /// A transfer on the media connection lost it: the media port is left alone for a
    /// while and transfers use the chat connection.
    pub async fn failed(&self, reason: &str) {
        let mut state = self.state.lock().await;
        if let Some(conn) = state.conn.take() {
            conn.shutdown().await;
        }
        state.failed = Some((Instant::now(), reason.to_string()));
    }

    /// Where attachments would go now, with `chat` as the chat connection (a media port
    /// not tried yet is tried).
    pub async fn route(&self, chat: &Arc<Connection>) -> MediaRoute {
        let Some(route) = chat.via.as_ref().and_then(media_route_of) else {
            return MediaRoute::Chat;
        };
        let (_, separate) = self.connection(chat).await;
        if separate {
            return MediaRoute::MediaPort {
                route: route.to_string(),
            };
        }
        let reason = self
            .state
            .lock()
            .await
            .failed
            .as_ref()
            .map(|(_, r)| r.clone())
            .unwrap_or_default();
        MediaRoute::MediaPortFailed {
            route: route.to_string(),
            reason,
        }
    }

    pub async fn close(&self) {
        if let Some(conn) = self.state.lock().await.conn.take() {
            conn.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_relay_with_a_media_port_has_a_media_route() {
        let mut p = ProxyEntry::parse("postern://proxy?host=r.example&port=80&tls=0").unwrap();
        assert_eq!(media_route_of(&Route::Relay(p.clone())), None);
        p.media = Some(587);
        let Some(Route::Relay(m)) = media_route_of(&Route::Relay(p.clone())) else {
            panic!("a media route");
        };
        assert_eq!(
            (m.host.as_str(), m.port, m.tls, m.media),
            ("r.example", 587, true, None)
        );
        let direct = Route::Direct {
            address: "server.example:5222".into(),
        };
        assert_eq!(media_route_of(&direct), None);
    }
}
