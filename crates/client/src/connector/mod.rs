//! The connector: every way of reaching the service, and keeping a connection to it.
//!
//! * [`route`]: one route (direct, relay, TLS relay) opened stage by stage, each failure
//!   named in the user's words; [`relay_proof`]: the proof a relay with a secret asks
//!   for first (a token in the TLS session, or an HTTP upgrade request on a plain port);
//!   [`browser_tls`]: the TLS layer to relays, with a ClientHello shaped like Chrome's;
//! * [`race`]: routes raced Happy-Eyeballs style, the first to finish the server's
//!   handshake wins;
//! * [`health`]: outcomes remembered in the profile, deciding which routes go first;
//! * [`liveness`] and `connection`: one authenticated Noise channel, pinged when silent
//!   and dropped when a censor freezes it;
//! * `media`: a second connection for attachments through a relay's media port, when the
//!   relay in use offers one (else attachments share the chat connection);
//! * [`Connector::keep_connected`]: reconnects after a drop (at once after a stall, with
//!   back-off when nothing works) and re-checks failed relays while connected.
//!
//! The connector knows nothing about messages: what a connection is used for is the
//! [`OnConnected`] handler's business (the client's outbox and inbox).

pub mod browser_tls;
pub(crate) mod connection;
pub mod health;
pub mod liveness;
pub mod media;
pub mod race;
pub mod relay_proof;
pub mod route;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use postern_protocol::noise::StaticKeypair;
use postern_protocol::ProtocolError;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use crate::events::Event;
use crate::proxy::{ProxyEntry, ProxyMode};
use crate::store::LocalStore;
use crate::timeouts::{BACKOFF_MAX, BACKOFF_MIN, HANDSHAKE_TIMEOUT, REPROBE_INTERVAL};
use crate::ClientError;
use connection::{Connection, Push};
use health::{HealthMap, RouteOutcome};
use race::{race, RacePolicy};
use route::{DialReport, Failure, Progress, Route, SeenBytes, Stage};

const PROXY_MODE: &str = "proxy_mode";
/// A connection that lasted at least this long is replaced without waiting.
const RECONNECT_AT_ONCE_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether a connection receives pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectMode {
    /// Receive queued messages and receipts (an inbox, an app).
    Receive,
    /// Only send; queued messages wait for a receiving connection (`postern send`).
    SendOnly,
}

/// The outcome of connecting.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectReport {
    /// The route now in use.
    pub route: String,
    pub via_relay: bool,
    /// Every attempt, in the order they were started: failed, abandoned (another route
    /// won first) and the one that succeeded.
    pub attempts: Vec<DialReport>,
}

impl ConnectReport {
    /// Time the successful attempt took, all stages included.
    pub fn latency(&self) -> std::time::Duration {
        self.attempts
            .iter()
            .find(|a| a.succeeded())
            .map(|a| a.total())
            .unwrap_or_default()
    }
}

/// A connection that won a race, with its pushes and the race's report.
pub(crate) struct Connected {
    pub conn: Connection,
    pub pushes: mpsc::Receiver<Push>,
    pub report: ConnectReport,
}

/// Maps a failed handshake to what the user should hear. `seen` holds the first bytes
/// the far end sent: a TLS record there, on a plain route, means a TLS port.
fn handshake_failure(e: &ClientError, seen: &SeenBytes, tls: bool) -> Failure {
    let first = seen.lock().map(|s| s.clone()).unwrap_or_default();
    if !tls && route::looks_like_tls(&first) {
        return Failure::SpeaksTls;
    }
    if relay_proof::is_web_answer(&first) {
        return Failure::WrongSecret;
    }
    match e {
        ClientError::Protocol(ProtocolError::ServerAuthentication) => Failure::ServerIdentity,
        ClientError::Protocol(ProtocolError::HandshakeClosed | ProtocolError::Closed) => {
            Failure::ServiceDidNotAnswer
        }
        ClientError::Protocol(ProtocolError::Timeout(_)) => Failure::TimedOut,
        ClientError::Protocol(ProtocolError::Io(io))
            if matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
            ) =>
        {
            Failure::ServiceDidNotAnswer
        }
        other => Failure::Other(other.to_string()),
    }
}

/// Whether a plain relay route whose far end hung up on the handshake is really a TLS
/// port: a TLS handshake to the same address completes. (A TLS listener that closes on
/// non-TLS input without a word, as Postern's relays do, cannot be told from a dead
/// upstream any other way.) Only `check_route` asks, to keep races fast.
async fn speaks_tls(route: &Route) -> bool {
    let Route::Relay(p) = route else {
        return false;
    };
    if p.tls {
        return false;
    }
    let with_tls = Route::Relay(ProxyEntry {
        tls: true,
        ..p.clone()
    });
    route::dial(&with_tls, &Progress::new(&with_tls))
        .await
        .is_ok()
}

/// One attempt over one route: open the stream, then the Noise handshake.
async fn attempt(
    route: Route,
    progress: Progress,
    keys: &StaticKeypair,
    server_key: &[u8; 32],
    mode: ConnectMode,
) -> Result<(Connection, mpsc::Receiver<Push>), (Stage, Failure)> {
    let (stream, seen) = route::dial(&route, &progress).await?;
    let started = Instant::now();
    match Connection::establish(
        stream,
        keys,
        server_key,
        mode == ConnectMode::SendOnly,
        HANDSHAKE_TIMEOUT,
    )
    .await
    {
        Ok((mut conn, pushes)) => {
            progress.record(Stage::Handshake, started);
            conn.via = Some(route);
            Ok((conn, pushes))
        }
        Err(e) => Err((Stage::Handshake, handshake_failure(&e, &seen, route.tls()))),
    }
}

/// The green tick without a profile (`postern proxy check LINK --network FILE`,
/// `postern relay doctor`): the real path over `route`, then a Noise handshake in which the
/// server must prove it holds `server_key`. The client side uses a throwaway key, so no
/// account is needed and nothing is registered or remembered.
pub async fn check_route_without_profile(route: &Route, server_key: &[u8; 32]) -> DialReport {
    let progress = Progress::new(route);
    check_attempt(route, &progress, &StaticKeypair::generate(), server_key).await;
    progress.report()
}

/// One check of `route`: the real path and the server handshake, then a clean close; each
/// stage (or the failure, told apart from a TLS port dialled as plain) lands in `progress`.
async fn check_attempt(
    route: &Route,
    progress: &Progress,
    keys: &StaticKeypair,
    server_key: &[u8; 32],
) {
    match attempt(
        route.clone(),
        progress.clone(),
        keys,
        server_key,
        ConnectMode::SendOnly,
    )
    .await
    {
        Ok((conn, _pushes)) => conn.shutdown().await,
        Err((Stage::Handshake, Failure::ServiceDidNotAnswer)) if speaks_tls(route).await => {
            progress.fail(Stage::Handshake, Failure::SpeaksTls)
        }
        Err((stage, failure)) => progress.fail(stage, failure),
    }
}

/// Races `routes` and returns the winning connection. Used directly only to register
/// (before a profile, and so a route memory, exists).
pub(crate) async fn race_routes(
    routes: Vec<Route>,
    keys: &StaticKeypair,
    server_key: &[u8; 32],
    mode: ConnectMode,
    proxy_mode: ProxyMode,
) -> Result<Connected, ClientError> {
    let outcome = race(routes, RacePolicy::default(), |route, progress| {
        attempt(route, progress, keys, server_key, mode)
    })
    .await;
    match outcome.winner {
        Some((route, (conn, pushes))) => Ok(Connected {
            conn,
            pushes,
            report: ConnectReport {
                route: route.to_string(),
                via_relay: matches!(route, Route::Relay(_)),
                attempts: outcome.attempts,
            },
        }),
        None => Err(ClientError::NoRoute {
            mode: proxy_mode,
            attempts: outcome.attempts,
        }),
    }
}

/// What a connection is used for, once the connector has one.
pub(crate) trait OnConnected: Send + Sync + 'static {
    /// Uses `conn` until it closes (the pushes channel ends with [`Push::Closed`]).
    fn serve(
        &self,
        conn: Arc<Connection>,
        pushes: mpsc::Receiver<Push>,
    ) -> impl Future<Output = ()> + Send;
}

/// Routes, their memory, and the way to the server for one profile.
pub(crate) struct Connector {
    store: LocalStore,
    keys: StaticKeypair,
    server_key: [u8; 32],
    /// The server's addresses from the network file (the direct routes: several when the
    /// service runs several nodes).
    direct: Vec<String>,
    events: broadcast::Sender<Event>,
}

impl Connector {
    pub fn new(
        store: LocalStore,
        keys: StaticKeypair,
        server_key: [u8; 32],
        direct: Vec<String>,
        events: broadcast::Sender<Event>,
    ) -> Self {
        Self {
            store,
            keys,
            server_key,
            direct,
            events,
        }
    }

    pub async fn proxy_mode(&self) -> Result<ProxyMode, ClientError> {
        match self.store.setting(PROXY_MODE).await? {
            Some(m) => m
                .parse()
                .map_err(|e| ClientError::Profile(format!("saved proxy mode: {e}"))),
            None => Ok(ProxyMode::default()),
        }
    }

    pub async fn set_proxy_mode(&self, mode: ProxyMode) -> Result<(), ClientError> {
        self.store.set_setting(PROXY_MODE, &mode.to_string()).await
    }

    /// A direct route to each of the network file's addresses.
    pub fn direct_routes(&self) -> Vec<Route> {
        self.direct
            .iter()
            .map(|address| Route::Direct {
                address: address.clone(),
            })
            .collect()
    }

    pub async fn health(&self) -> Result<HealthMap, ClientError> {
        self.store.route_health().await
    }

    /// The routes the current mode allows, best first.
    pub async fn candidates(&self) -> Result<Vec<Route>, ClientError> {
        let mode = self.proxy_mode().await?;
        self.candidates_in(mode).await
    }

    async fn candidates_in(&self, mode: ProxyMode) -> Result<Vec<Route>, ClientError> {
        Ok(health::order(
            mode,
            self.direct_routes(),
            self.saved_relays().await?,
            &self.health().await?,
        ))
    }

    async fn saved_relays(&self) -> Result<Vec<Route>, ClientError> {
        Ok(self
            .store
            .proxies()
            .await?
            .into_iter()
            .map(Route::Relay)
            .collect())
    }

    /// Races every allowed route; remembers each outcome.
    pub async fn connect(&self, mode: ConnectMode) -> Result<Connected, ClientError> {
        let proxy_mode = self.proxy_mode().await?;
        let routes = self.candidates_in(proxy_mode).await?;
        let result = race_routes(
            routes.clone(),
            &self.keys,
            &self.server_key,
            mode,
            proxy_mode,
        )
        .await;
        let attempts = match &result {
            Ok(c) => &c.report.attempts,
            Err(ClientError::NoRoute { attempts, .. }) => attempts,
            Err(_) => return result,
        };
        // The race starts routes in order, so attempt i is route i.
        let outcomes: Vec<(&Route, &DialReport)> = routes.iter().zip(attempts).collect();
        self.note(&outcomes).await?;
        if let Ok(c) = &result {
            let winner = routes.iter().find(|r| r.to_string() == c.report.route);
            let _ = self.events.send(Event::Connected {
                via: c.report.route.clone(),
                relay: c.report.via_relay,
                tls: winner.is_some_and(Route::tls),
                handshake_ms: c.conn.handshake_time.as_millis() as u64,
            });
        }
        result
    }

    /// Runs the real path over `route` (TCP, TLS if set, the server handshake) without
    /// using the connection: the green tick.
    pub async fn check_route(&self, route: &Route) -> Result<DialReport, ClientError> {
        self.check_route_with(route, &Progress::new(route)).await
    }

    /// [`Connector::check_route`], recording each stage in `progress` as it completes (an
    /// app watches it to show the check live).
    pub async fn check_route_with(
        &self,
        route: &Route,
        progress: &Progress,
    ) -> Result<DialReport, ClientError> {
        check_attempt(route, progress, &self.keys, &self.server_key).await;
        let report = progress.report();
        // Only routes the profile may use are remembered: checking an address before
        // saving it (or with other TLS settings) must not make it a route to race.
        let known =
            self.direct_routes().contains(route) || self.saved_relays().await?.contains(route);
        if known {
            self.note(&[(route, &report)]).await?;
        }
        Ok(report)
    }

    /// Checks a relay's media port the way transfers use it: TLS (with the relay's secret,
    /// if the proxy has one) and a server handshake through it.
    pub async fn check_media(&self, proxy: &ProxyEntry) -> Option<DialReport> {
        let route = media::media_route_of(&Route::Relay(proxy.clone()))?;
        let progress = Progress::new(&route);
        check_attempt(&route, &progress, &self.keys, &self.server_key).await;
        Some(progress.report())
    }

    /// Remembers attempts' outcomes, in one transaction (an abandoned attempt teaches
    /// nothing), and reports the failures as events.
    async fn note(&self, outcomes: &[(&Route, &DialReport)]) -> Result<(), ClientError> {
        let remembered: Vec<(&Route, RouteOutcome)> = outcomes
            .iter()
            .filter_map(|(route, report)| {
                let outcome = if report.succeeded() {
                    RouteOutcome::Worked {
                        latency_ms: report.total().as_millis() as u64,
                    }
                } else {
                    let (stage, failure) = report.failed.as_ref()?;
                    RouteOutcome::Failed {
                        reason: format!("{stage}: {failure}"),
                        hostile: failure.is_hostile(),
                    }
                };
                Some((*route, outcome))
            })
            .collect();
        self.store.record_route_outcomes(&remembered).await?;
        for (route, report) in outcomes {
            if let Some((stage, failure)) = &report.failed {
                let _ = self.events.send(Event::AttemptFailed {
                    route: route.to_string(),
                    stage: *stage,
                    reason: failure.to_string(),
                    hostile: failure.is_hostile(),
                });
            }
        }
        Ok(())
    }

    /// Relays found hostile (remembered across runs).
    pub async fn hostile_routes(&self) -> Result<Vec<Route>, ClientError> {
        Ok(health::hostile(&self.health().await?))
    }

    /// Keeps a connection up until the returned handle is aborted: races the routes,
    /// hands each new connection to `handler`, and when it closes connects again — at
    /// once if it had worked for a while (a stall or a drop), with exponential back-off
    /// and jitter while no route works. While connected, relays that failed are checked
    /// again every [`REPROBE_INTERVAL`].
    pub fn keep_connected<H: OnConnected>(
        self: Arc<Self>,
        mode: ConnectMode,
        handler: H,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut backoff = BACKOFF_MIN;
            loop {
                let _ = self.events.send(Event::Connecting);
                match self.connect(mode).await {
                    Ok(Connected { conn, pushes, .. }) => {
                        let since = Instant::now();
                        let conn = Arc::new(conn);
                        let serve = handler.serve(conn.clone(), pushes);
                        self.reprobe_while(serve).await;
                        drop(conn);
                        // A connection that worked for a while (then stalled or dropped):
                        // race a new one at once. One that dies as soon as it opens gets
                        // the back-off, so a broken far end is not hammered.
                        if since.elapsed() >= RECONNECT_AT_ONCE_AFTER {
                            backoff = BACKOFF_MIN;
                            continue;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "no route worked");
                        let jitter = rand::random::<f64>() * 0.5 + 0.75;
                        let wait = backoff.mul_f64(jitter);
                        let reason = e.to_string();
                        let attempts = match e {
                            ClientError::NoRoute { attempts, .. } => attempts,
                            _ => Vec::new(),
                        };
                        let _ = self.events.send(Event::Unreachable {
                            reason,
                            attempts,
                            retry_in_ms: wait.as_millis() as u64,
                        });
                        tokio::time::sleep(wait).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                }
                let jitter = rand::random::<f64>() * 0.5 + 0.75;
                tokio::time::sleep(backoff.mul_f64(jitter)).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        })
    }

    /// Runs `serve` to its end, checking failed relays again meanwhile.
    async fn reprobe_while(&self, serve: impl Future<Output = ()>) {
        tokio::pin!(serve);
        let mut reprobe = tokio::time::interval(REPROBE_INTERVAL);
        reprobe.tick().await;
        loop {
            tokio::select! {
                () = &mut serve => return,
                _ = reprobe.tick() => {
                    let (Ok(health), Ok(saved)) = (self.health().await, self.saved_relays().await) else {
                        continue;
                    };
                    let failed: Vec<Route> = saved
                        .into_iter()
                        .filter(|r| health.get(r).is_some_and(|h| !h.hostile && !h.worked_last()))
                        .collect();
                    for route in failed {
                        let _ = self.check_route(&route).await;
                    }
                }
            }
        }
    }
}
