//! Settings → Storage and data → Proxy: the proxy mode, the saved proxies (in the order
//! they are tried), and the live check that ends with the green tick or the red cross.
//!
//! A check runs the real path — resolve, TCP, TLS for a TLS relay, the server's Noise
//! handshake — and each stage is pushed to the page as it completes, so a person sees
//! where a blocked proxy stops.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use postern_client::route::Progress;
use postern_client::{Client, ProxyEntry, ProxyMode, Route, RouteHealth};
use serde::{Deserialize, Serialize};

use super::{client, ApiError, ApiResult};
use crate::profile::Push;
use crate::AppState;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/proxies", get(list).post(add))
        .route("/api/proxies/order", put(reorder))
        .route("/api/proxies/{number}", delete(remove))
        .route("/api/proxies/{number}/qr.svg", get(qr))
        .route("/api/proxy-mode", put(set_mode))
        .route("/api/checks", post(check))
}

/// One saved proxy as the page shows it.
#[derive(Debug, Serialize)]
pub struct SavedProxy {
    /// Its place in the list, from 1 (the order routes are tried in).
    pub number: usize,
    #[serde(flatten)]
    pub entry: ProxyEntry,
    pub address: String,
    /// What was understood, in words.
    pub describe: String,
    /// The link to share it with.
    pub link: String,
    pub health: Option<RouteHealth>,
}

#[derive(Debug, Serialize)]
pub struct ProxySettings {
    pub mode: ProxyMode,
    pub proxies: Vec<SavedProxy>,
}

async fn settings(client: &Client) -> Result<ProxySettings, ApiError> {
    let health = client.route_health().await?;
    let proxies = client
        .proxies()
        .await?
        .into_iter()
        .enumerate()
        .map(|(i, entry)| SavedProxy {
            number: i + 1,
            address: entry.address(),
            describe: entry.describe(),
            link: entry.to_link().to_string(),
            health: health.get(&Route::Relay(entry.clone())).cloned(),
            entry,
        })
        .collect();
    Ok(ProxySettings {
        mode: client.proxy_mode().await?,
        proxies,
    })
}

async fn list(State(state): State<Arc<AppState>>) -> ApiResult<ProxySettings> {
    Ok(Json(settings(&client(&state).await?).await?))
}

#[derive(Debug, Deserialize)]
pub struct SetMode {
    pub mode: ProxyMode,
}

async fn set_mode(
    State(state): State<Arc<AppState>>,
    Json(SetMode { mode }): Json<SetMode>,
) -> ApiResult<ProxySettings> {
    let client = client(&state).await?;
    client.set_proxy_mode(mode).await?;
    // The running connection may be one the new mode forbids (direct, with "always use a
    // proxy"): drop it, and the connection loop races the allowed routes again.
    client.drop_connection().await;
    Ok(Json(settings(&client).await?))
}

#[derive(Debug, Deserialize)]
pub struct AddProxy {
    /// A host, host:port, or a `postern://proxy?...` link.
    pub address: String,
    /// TLS on or off for an address (a link says it itself); default: on for 443.
    #[serde(default)]
    pub tls: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct Added {
    pub number: usize,
    pub understood: String,
    /// False if it was already saved (its settings were updated).
    pub new: bool,
    /// The live check started for it.
    pub check_id: u64,
    pub settings: ProxySettings,
}

/// Save: adds the proxy, then checks it live.
async fn add(State(state): State<Arc<AppState>>, Json(form): Json<AddProxy>) -> ApiResult<Added> {
    let client = client(&state).await?;
    let text = form.address.trim();
    let mut entry = ProxyEntry::parse(text).map_err(postern_client::ClientError::from)?;
    if let (Some(tls), false) = (form.tls, text.contains("://")) {
        entry.tls = tls;
    }
    let new = client.add_proxy(&entry).await?;
    let settings = settings(&client).await?;
    let number = settings
        .proxies
        .iter()
        .find(|p| p.entry.host == entry.host && p.entry.port == entry.port)
        .map_or(settings.proxies.len(), |p| p.number);
    let check_id = start_check(&state, client, Route::Relay(entry.clone()));
    Ok(Json(Added {
        number,
        understood: entry.describe(),
        new,
        check_id,
        settings,
    }))
}

async fn remove(
    State(state): State<Arc<AppState>>,
    Path(number): Path<usize>,
) -> ApiResult<ProxySettings> {
    let client = client(&state).await?;
    client.remove_proxy(&number.to_string()).await?;
    Ok(Json(settings(&client).await?))
}

#[derive(Debug, Deserialize)]
pub struct Reorder {
    /// Every saved proxy's current number, in the new order.
    pub order: Vec<usize>,
}

async fn reorder(
    State(state): State<Arc<AppState>>,
    Json(Reorder { order }): Json<Reorder>,
) -> ApiResult<ProxySettings> {
    let client = client(&state).await?;
    client.reorder_proxies(&order).await?;
    Ok(Json(settings(&client).await?))
}

/// The saved proxy's link as a QR code, for someone to scan.
async fn qr(
    State(state): State<Arc<AppState>>,
    Path(number): Path<usize>,
) -> Result<impl IntoResponse, ApiError> {
    let client = client(&state).await?;
    let proxies = client.proxies().await?;
    let entry = number
        .checked_sub(1)
        .and_then(|i| proxies.get(i))
        .ok_or_else(|| postern_client::ClientError::NoSuchProxy(number.to_string()))?;
    super::qr_svg(&entry.to_link().to_string())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckTarget {
    /// The direct route to the server.
    Direct,
    /// A saved proxy, by number.
    Proxy(usize),
}

#[derive(Debug, Serialize)]
pub struct CheckStarted {
    pub check_id: u64,
    pub route: String,
}

async fn check(
    State(state): State<Arc<AppState>>,
    Json(target): Json<CheckTarget>,
) -> ApiResult<CheckStarted> {
    let client = client(&state).await?;
    let route = match target {
        CheckTarget::Direct => Route::Direct {
            address: client.network().server.address.clone(),
        },
        CheckTarget::Proxy(n) => {
            let proxies = client.proxies().await?;
            let entry = n
                .checked_sub(1)
                .and_then(|i| proxies.get(i).cloned())
                .ok_or_else(|| postern_client::ClientError::NoSuchProxy(n.to_string()))?;
            Route::Relay(entry)
        }
    };
    let text = route.to_string();
    let check_id = start_check(&state, client, route);
    Ok(Json(CheckStarted {
        check_id,
        route: text,
    }))
}

/// Runs a check in the background, pushing each stage as it completes.
fn start_check(state: &Arc<AppState>, client: Client, route: Route) -> u64 {
    let check_id = state.next_check_id();
    let state = state.clone();
    tokio::spawn(async move {
        let progress = Progress::new(&route);
        let mut changes = progress.watch();
        let run = client.check_route_with(&route, &progress);
        tokio::pin!(run);
        let result = loop {
            tokio::select! {
                result = &mut run => break result,
                Ok(()) = changes.changed() => {
                    let report = changes.borrow_and_update().clone();
                    state.push(Push::Check { check_id, report, done: false, ok: false });
                }
            }
        };
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                // The profile's database failed, not the route: say so as the reason.
                let mut report = progress.report();
                report.failed = Some((
                    postern_client::Stage::Handshake,
                    postern_client::Failure::Other(e.to_string()),
                ));
                report
            }
        };
        let ok = report.succeeded();
        state.push(Push::Check {
            check_id,
            report,
            done: true,
            ok,
        });
    });
    check_id
}
