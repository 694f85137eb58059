//! The profile the app drives, and the app's shared state.
//!
//! Until the profile has an account the page shows onboarding; once it has one (at start,
//! or after onboarding) a [`Running`] client is kept connected in receive mode — racing
//! routes, replacing stalled connections, sending what is pending — and a forwarder task
//! turns its events into [`Push`]es for every open page, updating the banner on the way.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};

use postern_client::{Client, ClientError, ConnectMode, DialReport, Event, MessageId};
use serde::Serialize;
use tokio::sync::{broadcast, RwLock};
use tokio::task::JoinHandle;

use crate::guard::Guard;
use crate::status::ConnectionStatus;

/// What the WebSocket pushes to the page.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Push {
    /// Something the client library reported (a message, a tick, a route attempt).
    Event { event: Event },
    /// The banner changed.
    Connection { status: ConnectionStatus },
    /// A message was typed (in this page or another): it is pending.
    Queued { message_id: MessageId, to: String },
    /// A route check advanced (`done` once it ended; `ok` then says how).
    Check {
        check_id: u64,
        report: DialReport,
        done: bool,
        ok: bool,
    },
    /// The account was created: reload everything.
    Account,
    /// Events were missed (the page was too slow): reload everything.
    Resync,
}

/// A client kept connected, with the tasks that serve it.
struct Running {
    client: Client,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Everything the handlers share.
pub struct AppState {
    home: PathBuf,
    guard: Guard,
    profile: RwLock<Option<Running>>,
    status: SyncMutex<ConnectionStatus>,
    pushes: broadcast::Sender<Push>,
    next_check: AtomicU64,
    /// One onboarding at a time (two tabs submitting at once must not race).
    onboarding: tokio::sync::Mutex<()>,
}

impl AppState {
    /// Opens the profile in `home` if it has an account.
    pub async fn open(home: PathBuf, guard: Guard) -> Result<Arc<AppState>, ClientError> {
        let (pushes, _) = broadcast::channel(1024);
        let state = Arc::new(AppState {
            home: home.clone(),
            guard,
            profile: RwLock::new(None),
            status: SyncMutex::new(ConnectionStatus::NoAccount),
            pushes,
            next_check: AtomicU64::new(1),
            onboarding: tokio::sync::Mutex::new(()),
        });
        match Client::open(&home).await {
            Ok(client) => state.start(client).await,
            Err(ClientError::NoProfile(_)) => {}
            Err(e) => return Err(e),
        }
        Ok(state)
    }

    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    pub fn home(&self) -> &std::path::Path {
        &self.home
    }

    /// The client, if the profile has an account.
    pub async fn client(&self) -> Option<Client> {
        self.profile.read().await.as_ref().map(|r| r.client.clone())
    }

    pub fn status(&self) -> ConnectionStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Push> {
        self.pushes.subscribe()
    }

    pub fn push(&self, push: Push) {
        let _ = self.pushes.send(push);
    }

    pub fn next_check_id(&self) -> u64 {
        self.next_check.fetch_add(1, Ordering::Relaxed)
    }

    /// Held while an account is being created.
    pub async fn onboarding(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.onboarding.lock().await
    }

    /// Keeps `client` connected and forwards its events to the pages.
    pub async fn start(self: &Arc<Self>, client: Client) {
        self.set_status(ConnectionStatus::Connecting {
            failures: Vec::new(),
            lost: None,
        });
        // Subscribe before connecting, so the first race's events are not missed.
        let events = client.subscribe();
        let forward = tokio::spawn(forward(Arc::downgrade(self), events));
        let connected = client.keep_connected(ConnectMode::Receive);
        *self.profile.write().await = Some(Running {
            client,
            tasks: vec![forward, connected],
        });
    }

    fn set_status(&self, status: ConnectionStatus) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = status.clone();
        self.push(Push::Connection { status });
    }

    /// Stops the connection and closes the profile's database.
    pub async fn close(&self) {
        if let Some(running) = self.profile.write().await.take() {
            for t in &running.tasks {
                t.abort();
            }
            running.client.close().await;
        }
    }
}

/// Turns the client's events into pushes, updating the banner on the way.
async fn forward(state: std::sync::Weak<AppState>, mut events: broadcast::Receiver<Event>) {
    loop {
        let event = events.recv().await;
        let Some(state) = state.upgrade() else { return };
        match event {
            Ok(event) => {
                let next = state.status().after(&event);
                if let Some(next) = next {
                    state.set_status(next);
                }
                state.push(Push::Event { event });
            }
            Err(broadcast::error::RecvError::Lagged(_)) => state.push(Push::Resync),
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
