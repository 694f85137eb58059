//! The Postern app: a messenger in the browser, for one profile, served on loopback.
//!
//! `postern app` binds an [`App`] to a loopback port, prints (or opens) its URL, and
//! serves a single page — plain HTML, CSS and JavaScript embedded in the binary, no build
//! step — that talks to the client library in this process. How the parts fit:
//!
//! * [`guard`]: who may talk to the app. Loopback only; a random per-run token in the
//!   first URL, traded for a cookie; `Host` and `Origin` checked on every request and on
//!   the WebSocket (so neither another site in the browser nor a DNS-rebinding page can
//!   drive it); no CORS; a strict Content-Security-Policy.
//! * [`profile`]: the profile the app drives — none yet (the page shows onboarding), or a
//!   [`postern_client::Client`] kept connected, whose events are forwarded to the page.
//! * [`status`]: the connection banner ("Connecting…", "Connected via relay X (TLS)",
//!   what failed at which stage), folded from the client's events.
//! * [`api`]: the JSON endpoints the page calls — account, chats, proxies, route checks.
//! * [`live`]: the WebSocket that pushes events, banner changes and check progress.
//! * [`assets`]: the embedded page.
//!
//! Nothing is sent anywhere but the configured server and relays: the page loads no
//! remote resource (the CSP forbids it), and the app makes no connection of its own.

pub mod api;
pub mod assets;
pub mod guard;
pub mod live;
pub mod profile;
pub mod status;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;

pub use guard::Guard;
pub use profile::AppState;
pub use status::ConnectionStatus;

/// What `postern app` was asked for.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// The profile directory (it may not exist yet: the page then offers onboarding).
    pub home: PathBuf,
    /// A loopback address; port 0 picks a free one.
    pub listen: SocketAddr,
}

/// Why the app could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("the app listens on loopback only (127.0.0.1 or ::1), not {0}: it holds your messages and keys")]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {error} (is another app running there? use --listen 127.0.0.1:0 for a free port)")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot open the profile in {home}: {error}")]
    Profile {
        home: String,
        error: postern_client::ClientError,
    },
    #[error("the app stopped: {0}")]
    Serve(std::io::Error),
}

/// A bound app, ready to serve.
pub struct App {
    listener: TcpListener,
    state: Arc<AppState>,
    url: String,
}

impl App {
    /// Binds the listener and opens the profile, if there is one.
    pub async fn bind(config: AppConfig) -> Result<App, AppError> {
        if !config.listen.ip().is_loopback() {
            return Err(AppError::NotLoopback(config.listen));
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|error| AppError::Bind {
                addr: config.listen,
                error,
            })?;
        let addr = listener.local_addr().map_err(AppError::Serve)?;
        let guard = Guard::new(addr);
        let url = guard.first_url();
        let state = AppState::open(config.home.clone(), guard)
            .await
            .map_err(|error| AppError::Profile {
                home: config.home.display().to_string(),
                error,
            })?;
        Ok(App {
            listener,
            state,
            url,
        })
    }

    /// The URL to open: it carries this run's token (the page trades it for a cookie).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `stop` resolves, then closes the profile cleanly.
    pub async fn run_until(
        self,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let state = self.state.clone();
        let result = axum::serve(self.listener, router(self.state))
            .with_graceful_shutdown(stop)
            .await
            .map_err(AppError::Serve);
        state.close().await;
        result
    }
}

/// Every route of the app, behind the guard.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .merge(assets::routes())
        .merge(api::routes())
        .merge(live::routes())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::check,
        ))
        .with_state(state)
}
