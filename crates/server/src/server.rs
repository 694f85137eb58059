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
use crate::disk::DiskGuard;
use crate::hub::Hub;
use crate::limits::{Limits, Refusals, RegistrationLimiter, WindowLimiter};
use crate::media::{MediaConfig, MediaStore};
use crate::store::{Database, Store};
use crate::{connection, ServerError, Shared};
use postern_protocol::net::PerSource;

/// How long connections get to finish after shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
const MINUTE: Duration = Duration::from_secs(60);
/// Queued messages expired per database write (the sweep repeats while there are more).
const EXPIRE_BATCH: u32 = 500;

/// What the server needs to run.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// SQLite in the data directory, or a PostgreSQL URL.
    pub database: Database,
    pub limits: Limits,
    /// Client addresses are kept out of logs unless the operator opts in.
    pub log_client_addresses: bool,
    /// The media store (attachments); None: the server keeps no media.
    pub media: Option<MediaConfig>,
}

impl ServerConfig {
    pub fn new(data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        let data_dir = data_dir.into();
        Self {
            media: Some(MediaConfig::new(data_dir.join("media"))),
            data_dir,
            listen,
            database: Database::Sqlite,
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
        dir.make_private()?;
        let hub = Arc::new(Hub::default());
        let store =
            Store::open_database(&config.database, &dir.database_path(), hub.clone()).await?;
        let media = match config.media {
            Some(m) => {
                let media = MediaStore::open(m).map_err(|e| {
                    ServerError::Config(format!("cannot open the media store: {e}"))
                })?;
                media.start_remote().await.map_err(|e| {
                    ServerError::Config(format!(
                        "cannot use the media bucket: {e} (check --media-s3-endpoint, \
                         --media-s3-bucket and the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY \
                         credentials)"
                    ))
                })?;
                Some(media)
            }
            None => None,
        };
        let listener = TcpListener::bind(config.listen).await.map_err(ServerError::io(
            format!(
                "cannot listen on {} (is another server running there? ports below 1024 need root or CAP_NET_BIND_SERVICE)",
                config.listen
            ),
        ))?;
        let shared = Arc::new(Shared {
            store,
            hub,
            keys,
            registrations: RegistrationLimiter::new(config.limits.registrations_per_minute),
            per_source: PerSource::new(config.limits.max_connections_per_source),
            message_rate: WindowLimiter::new(config.limits.messages_per_minute, MINUTE),
            claims_by_requester: WindowLimiter::new(
                config.limits.claims_per_requester_per_minute,
                MINUTE,
            ),
            claims_by_target: WindowLimiter::new(
                config.limits.claims_per_target_per_minute,
                MINUTE,
            ),
            disk: DiskGuard::new(config.data_dir.clone(), config.limits.min_free_disk),
            media,
            refusals: Refusals::default(),
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
        let housekeeping = tokio::spawn(housekeeping(self.shared.clone()));
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
                        self.shared.refusals.count(&self.shared.refusals.server_full, "server full");
                        continue;
                    };
                    // A peer that is not a trusted proxy is the client itself: count it
                    // now, before it costs a task. (Through a trusted proxy the client is
                    // known only after the PROXY header; `connection` counts it then.)
                    let slot = if self.shared.limits.trusted_proxies.trusts(peer.ip()) {
                        None
                    } else {
                        match self.shared.per_source.try_acquire(peer.ip()) {
                            Some(slot) => Some(slot),
                            None => {
                                drop(stream);
                                self.shared.refusals.count(&self.shared.refusals.source_full, "too many connections from one address");
                                continue;
                            }
                        }
                    };
                    let shared = self.shared.clone();
                    let stop = stop_rx.clone();
                    tasks.spawn(async move {
                        connection::serve(stream, peer, slot, shared, stop).await;
                        drop(permit);
                    });
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        info!(connections = tasks.len(), "shutting down");
        housekeeping.abort();
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

/// Timers: sweeps the limiters' ended windows, and expires queued messages older than the
/// queue time-to-live (telling their senders).
async fn housekeeping(shared: Arc<Shared>) {
    let ttl = shared.limits.queue_ttl;
    let every = (ttl / 4).clamp(Duration::from_millis(100), MINUTE);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sweep = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        if last_sweep.elapsed() >= MINUTE {
            last_sweep = tokio::time::Instant::now();
            shared.registrations.sweep();
            shared.message_rate.sweep();
            shared.claims_by_requester.sweep();
            shared.claims_by_target.sweep();
            if let Some(media) = &shared.media {
                let expired = media.expire(postern_protocol::now_ms());
                if expired > 0 {
                    info!(uploads = expired, "deleted expired media");
                }
                // Uploads whose copy to object storage failed are tried again.
                media.push_pending();
            }
        }
        let cutoff = postern_protocol::now_ms().saturating_sub(ttl.as_millis() as u64);
        loop {
            match shared.store.expire(cutoff, EXPIRE_BATCH).await {
                Ok(woken) => {
                    if !woken.is_empty() {
                        info!(messages = woken.len(), "expired undelivered messages");
                    }
                    let more = woken.len() == EXPIRE_BATCH as usize;
                    for d in woken {
                        shared.hub.wake_receipts(d);
                    }
                    if !more {
                        break;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "could not expire old messages");
                    break;
                }
            }
        }
    }
}
