//! The account: what the page needs to start (`GET /api/state`) and onboarding
//! (`POST /api/account`): import the network file, choose a username, and — on the same
//! screen, since a person in a blocked network cannot register without one — a proxy.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use postern_client::{Client, ProxyEntry, ProxyMode};
use postern_protocol::network::NetworkFile;
use postern_protocol::username;
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiResult};
use crate::profile::Push;
use crate::status::ConnectionStatus;
use crate::AppState;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/state", get(state))
        .route("/api/account", post(create))
}

/// The account screen's facts.
#[derive(Debug, Serialize)]
pub struct AccountInfo {
    pub username: String,
    pub device_id: u64,
    pub server: String,
    pub server_key: String,
    /// SHA-256 of the server key, shortened, to compare with the operator's.
    pub server_key_fingerprint: String,
    pub profile: String,
}

#[derive(Debug, Serialize)]
pub struct AppStateView {
    pub account: Option<AccountInfo>,
    pub connection: ConnectionStatus,
    pub proxy_mode: Option<ProxyMode>,
}

async fn state(State(state): State<Arc<AppState>>) -> ApiResult<AppStateView> {
    let Some(client) = state.client().await else {
        return Ok(Json(AppStateView {
            account: None,
            connection: ConnectionStatus::NoAccount,
            proxy_mode: None,
        }));
    };
    Ok(Json(AppStateView {
        account: Some(info(&client)),
        connection: state.status(),
        proxy_mode: Some(client.proxy_mode().await?),
    }))
}

fn info(client: &Client) -> AccountInfo {
    let network = client.network();
    AccountInfo {
        username: client.username().to_string(),
        device_id: client.device_id(),
        server: network.server.address.clone(),
        server_key: network.server.public_key.clone(),
        server_key_fingerprint: network.key_fingerprint().unwrap_or_default(),
        profile: client.home().display().to_string(),
    }
}

/// Onboarding's form.
#[derive(Debug, Deserialize)]
pub struct CreateAccount {
    pub username: String,
    /// The network file's text (picked in the page)…
    #[serde(default)]
    pub network: Option<String>,
    /// …or its path on this machine.
    #[serde(default)]
    pub network_path: Option<String>,
    /// "Can't connect? Use a proxy": an address or a `postern://proxy` link.
    #[serde(default)]
    pub proxy: Option<String>,
    /// Override TLS for an address (a link says it itself).
    #[serde(default)]
    pub proxy_tls: Option<bool>,
}

async fn create(
    State(state): State<Arc<AppState>>,
    Json(form): Json<CreateAccount>,
) -> ApiResult<AccountInfo> {
    let _one_at_a_time = state.onboarding().await;
    if state.client().await.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "account_exists",
            "this profile already has an account",
        ));
    }
    let name = form.username.trim();
    username::validate(name)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_name", e.to_string()))?;
    let network = read_network(&form)?;
    let proxy = match form.proxy.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => {
            let mut p = ProxyEntry::parse(text).map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_proxy", e.to_string())
            })?;
            if let (Some(tls), false) = (form.proxy_tls, text.contains("://")) {
                p.tls = tls;
            }
            Some(p)
        }
    };
    let client = Client::create_account_via(state.home(), name, network, proxy).await?;
    let answer = info(&client);
    state.start(client).await;
    state.push(Push::Account);
    Ok(Json(answer))
}

fn read_network(form: &CreateAccount) -> Result<NetworkFile, ApiError> {
    let invalid = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_network", m);
    match (&form.network, &form.network_path) {
        (Some(text), _) if !text.trim().is_empty() => {
            NetworkFile::parse(text, "the chosen network file").map_err(|e| invalid(e.to_string()))
        }
        (_, Some(path)) if !path.trim().is_empty() => {
            NetworkFile::load(std::path::Path::new(path.trim())).map_err(|e| invalid(e.to_string()))
        }
        _ => Err(invalid(
            "choose the network file (network.toml) your service's operator gave you".into(),
        )),
    }
}
