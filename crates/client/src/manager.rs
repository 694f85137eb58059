//! Choosing and keeping a path to the service.
//!
//! The manager turns the proxy settings into an ordered list of [`Route`]s and tries them
//! one by one, each attempt bounded in time:
//!
//! * mode `off`: direct only; `on`: saved relays only, never a direct attempt; `auto`:
//!   direct first, then the relays;
//! * the route that worked last time (remembered in the profile) goes first;
//! * routes that failed recently go last; a relay whose far end failed the server's
//!   authentication is **hostile** and is not tried again by this client instance;
//! * [`Client::keep_connected`] reconnects after a drop with exponential back-off and
//!   jitter, and re-probes failed relays in the background so the next fail-over starts
//!   with one that works.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use postern_protocol::ProtocolError;
use serde::Serialize;

use crate::client::{Client, ConnectMode};
use crate::connection::Connection;
use crate::proxy::ProxyMode;
use crate::route::{self, DialReport, Failure, Route, Stage};
use crate::ClientError;

/// Time allowed for each of resolve, connect and TLS.
pub const STAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for the Noise handshake once the stream is open.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(8);
/// Reconnection back-off bounds.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How often failed relays are probed again while connected.
pub const REPROBE_INTERVAL: Duration = Duration::from_secs(60);

const LAST_ROUTE: &str = "last_route";
const PROXY_MODE: &str = "proxy_mode";

/// What the manager knows about a route in this run.
#[derive(Debug, Clone, Default)]
pub(crate) struct RouteHealth {
    pub last_ok: Option<Instant>,
    pub last_failure: Option<Instant>,
    pub hostile: bool,
}

pub(crate) type HealthMap = HashMap<Route, RouteHealth>;

/// The outcome of connecting.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectReport {
    /// The route now in use.
    pub route: String,
    pub via_relay: bool,
    /// Every attempt, in order (the last one succeeded).
    pub attempts: Vec<DialReport>,
}

impl ConnectReport {
    /// Time the successful attempt took, all stages included.
    pub fn latency(&self) -> Duration {
        self.attempts.last().map(|a| a.total()).unwrap_or_default()
    }
}

/// Maps a handshake error to what the user should hear.
pub(crate) fn handshake_failure(e: &ClientError) -> Failure {
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

impl Client {
    pub async fn proxy_mode(&self) -> Result<ProxyMode, ClientError> {
        Ok(match self.store().setting(PROXY_MODE).await? {
            Some(m) => m.parse().map_err(ClientError::Profile)?,
            None => ProxyMode::default(),
        })
    }

    pub async fn set_proxy_mode(&self, mode: ProxyMode) -> Result<(), ClientError> {
        self.store()
            .set_setting(PROXY_MODE, &mode.to_string())
            .await
    }

    /// The route that worked last (from an earlier run too).
    pub async fn last_route(&self) -> Result<Option<Route>, ClientError> {
        Ok(self
            .store()
            .setting(LAST_ROUTE)
            .await?
            .and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// The routes the current mode allows, best first.
    pub async fn candidates(&self) -> Result<Vec<Route>, ClientError> {
        let mode = self.proxy_mode().await?;
        let direct = Route::Direct {
            address: self.network().server.address.clone(),
        };
        let relays: Vec<Route> = self
            .store()
            .proxies()
            .await?
            .into_iter()
            .map(Route::Relay)
            .collect();
        let mut routes = match mode {
            ProxyMode::Off => vec![direct],
            ProxyMode::On => relays,
            ProxyMode::Auto => std::iter::once(direct).chain(relays).collect(),
        };
        {
            let health = self.health();
            routes.retain(|r| !health.get(r).is_some_and(|h| h.hostile));
            // Recently failed routes go last (stable: the user's order is kept otherwise).
            routes.sort_by_key(|r| {
                health
                    .get(r)
                    .is_some_and(|h| h.last_failure.is_some() && h.last_failure > h.last_ok)
            });
        }
        if let Some(last) = self.last_route().await? {
            if let Some(pos) = routes.iter().position(|r| *r == last) {
                let r = routes.remove(pos);
                routes.insert(0, r);
            }
        }
        Ok(routes)
    }

    /// Tries every allowed route in order until one connects; remembers it.
    pub async fn connect(&self, mode: ConnectMode) -> Result<ConnectReport, ClientError> {
        let routes = self.candidates().await?;
        if routes.is_empty() {
            return Err(ClientError::NoRoute {
                mode: self.proxy_mode().await?.to_string(),
                attempts: Vec::new(),
            });
        }
        let mut attempts = Vec::new();
        for route in routes {
            match self.connect_route(&route, mode).await {
                Ok(report) => {
                    attempts.push(report);
                    let json = serde_json::to_string(&route)
                        .map_err(|e| ClientError::Profile(e.to_string()))?;
                    self.store().set_setting(LAST_ROUTE, &json).await?;
                    return Ok(ConnectReport {
                        route: route.to_string(),
                        via_relay: matches!(route, Route::Relay(_)),
                        attempts,
                    });
                }
                Err(report) => attempts.push(report),
            }
        }
        Err(ClientError::NoRoute {
            mode: self.proxy_mode().await?.to_string(),
            attempts,
        })
    }

    /// One attempt over one route: dial, then the Noise handshake.
    async fn connect_route(
        &self,
        route: &Route,
        mode: ConnectMode,
    ) -> Result<DialReport, DialReport> {
        let (stream, mut report) = route::dial(route, STAGE_TIMEOUT).await;
        let result = match stream {
            Err(()) => Err(()),
            Ok(stream) => {
                let started = Instant::now();
                match self.connect_over(stream, &route.to_string(), mode).await {
                    Ok(()) => {
                        report.record(Stage::Handshake, started);
                        Ok(())
                    }
                    Err(e) => {
                        report.failed = Some((Stage::Handshake, handshake_failure(&e)));
                        Err(())
                    }
                }
            }
        };
        self.note(route, &report);
        match result {
            Ok(()) => Ok(report),
            Err(()) => Err(report),
        }
    }

    /// Runs the real path over `route` (TCP, TLS if set, the server handshake) without
    /// using the connection: the green tick.
    pub async fn check_route(&self, route: &Route) -> DialReport {
        let (stream, mut report) = route::dial(route, STAGE_TIMEOUT).await;
        if let Ok(stream) = stream {
            let started = Instant::now();
            match Connection::establish(
                stream,
                self.noise_keys(),
                self.server_key(),
                true,
                HANDSHAKE_TIMEOUT,
            )
            .await
            {
                Ok((conn, _pushes)) => {
                    report.record(Stage::Handshake, started);
                    conn.shutdown().await;
                }
                Err(e) => report.failed = Some((Stage::Handshake, handshake_failure(&e))),
            }
        }
        self.note(route, &report);
        report
    }

    /// Checks a media port: it must accept a TCP connection in time.
    pub async fn check_media(&self, host: &str, port: u16) -> DialReport {
        let route = Route::Relay(crate::proxy::ProxyEntry {
            host: host.to_string(),
            port,
            tls: false,
            media: None,
        });
        route::dial(&route, STAGE_TIMEOUT).await.1
    }

    /// Records an attempt's outcome in the run's route health.
    fn note(&self, route: &Route, report: &DialReport) {
        let mut health = self.health();
        let h = health.entry(route.clone()).or_default();
        match &report.failed {
            None => h.last_ok = Some(Instant::now()),
            Some((_, failure)) => {
                h.last_failure = Some(Instant::now());
                if failure.is_hostile() {
                    h.hostile = true;
                }
            }
        }
        drop(health);
        if let Some((stage, failure)) = &report.failed {
            self.emit(crate::Event::AttemptFailed {
                route: route.to_string(),
                stage: *stage,
                reason: failure.to_string(),
                hostile: failure.is_hostile(),
            });
        }
    }

    /// Routes found hostile in this run.
    pub fn hostile_routes(&self) -> Vec<Route> {
        self.health()
            .iter()
            .filter(|(_, h)| h.hostile)
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// Keeps a connection up until the returned handle is aborted: connects through the
    /// best route, sends what is pending, and after a drop (or when no route works)
    /// retries with exponential back-off and jitter. While connected, relays that failed
    /// are probed again every [`REPROBE_INTERVAL`].
    pub fn keep_connected(&self, mode: ConnectMode) -> tokio::task::JoinHandle<()> {
        let client = self.clone();
        tokio::spawn(async move {
            let mut backoff = BACKOFF_MIN;
            loop {
                let mut events = client.subscribe();
                match client.connect(mode).await {
                    Ok(_) => {
                        backoff = BACKOFF_MIN;
                        if let Err(e) = client.send_pending().await {
                            tracing::warn!(error = %e, "pending messages not sent yet");
                        }
                        client.watch_and_reprobe(&mut events).await;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "no route worked");
                        let jitter = rand::random::<f64>() * 0.5 + 0.75;
                        tokio::time::sleep(backoff.mul_f64(jitter)).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
        })
    }

    /// Waits for the connection to drop, probing failed relays meanwhile.
    async fn watch_and_reprobe(&self, events: &mut tokio::sync::broadcast::Receiver<crate::Event>) {
        let mut reprobe = tokio::time::interval(REPROBE_INTERVAL);
        reprobe.tick().await;
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Ok(crate::Event::Disconnected { .. }) | Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    _ => {}
                },
                _ = reprobe.tick() => {
                    let failed: Vec<Route> = self
                        .health()
                        .iter()
                        .filter(|(r, h)| matches!(r, Route::Relay(_)) && !h.hostile && h.last_failure > h.last_ok)
                        .map(|(r, _)| r.clone())
                        .collect();
                    for route in failed {
                        self.check_route(&route).await;
                    }
                    if !self.is_connected().await {
                        return;
                    }
                }
            }
        }
    }
}
