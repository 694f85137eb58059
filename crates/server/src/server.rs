//! Accepting connections and shutting down cleanly.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::data_dir::DataDir;
use crate::hub::Hub;
use crate::limits::{Limits, RegistrationLimiter};
use crate::store::Store;
use crate::{connection, ServerError, Shared};

/// How long connections get to finish after shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the server needs to run.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub limits: Limits,
    /// Client addresses are kept out of logs unless the operator opts in.
    pub log_client_addresses: bool,
}

impl ServerConfig {
    pub fn new(data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen,
            limits: Limits::default(),
            log_client_addresses: false,
        }
    }
}

/// A bound, ready server.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Server {
    /// Loads the key, opens (and migrates) the database and binds the listener.
    pub async fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        let dir = DataDir::new(&config.data_dir);
        let keys = dir.load_key()?;
        let store = Store::open(&dir.database_path()).await?;
        let listener = TcpListener::bind(config.listen).await.map_err(ServerError::io(
            format!(
                "cannot listen on {} (is another server running there? ports below 1024 need root or CAP_NET_BIND_SERVICE)",
                config.listen
            ),
        ))?;
        let shared = Arc::new(Shared {
            store,
            hub: Arc::new(Hub::default()),
            keys,
            registrations: RegistrationLimiter::new(config.limits.registrations_per_minute),
            limits: config.limits,
            log_client_addresses: config.log_client_addresses,
            next_conn_id: Default::default(),
        });
        Ok(Self { listener, shared })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has a local address")
    }

    /// The server's public key (base64), as written in the network file.
    pub fn public_key(&self) -> String {
        self.shared.keys.public_base64()
    }

    /// Serves until `shutdown` completes, then stops accepting, lets connections end
    /// (at most a few seconds) and closes the database.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(self.shared.limits.max_connections));
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        info!(listen = %self.local_addr(), "server ready");
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Typically out of file descriptors: back off instead of spinning.
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        // Full: close at once so the client can try elsewhere.
                        drop(stream);
                        continue;
                    };
                    let shared = self.shared.clone();
                    let stop = stop_rx.clone();
                    tasks.spawn(async move {
                        connection::serve(stream, peer, shared, stop).await;
                        drop(permit);
                    });
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        info!(connections = tasks.len(), "shutting down");
        drop(self.listener);
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tasks.abort_all();
        }
        self.shared.store.close().await;
        info!("server stopped");
        Ok(())
    }
}
