//! Who may talk to the app.
//!
//! The app can read every message and send as the user, so a web page elsewhere in the
//! same browser must not be able to drive it, and neither must another local user. The
//! defences, each on every request (the WebSocket included):
//!
//! * **Loopback only** ([`crate::App::bind`] refuses anything else).
//! * **A per-run token.** The printed URL carries 32 random bytes; the first load trades
//!   them for an `HttpOnly`, `SameSite=Strict` cookie and redirects to a URL without them
//!   (so the token does not linger in the address bar or history). The cookie is named
//!   after the port, so two apps (two profiles) in one browser keep their own.
//! * **`Host` must be the address we listen on** — a DNS-rebinding page reaches us under
//!   its own name and is refused.
//! * **`Origin`, when sent, must be us**; requests that change something (and the
//!   WebSocket upgrade) must send it. With no CORS headers at all, other origins can
//!   neither read answers nor, thanks to the cookie's `SameSite`, act with the cookie.
//! * **Headers**: a strict Content-Security-Policy (only our own scripts, styles,
//!   images and WebSocket), no framing, no referrer, no caching.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use subtle::ConstantTimeEq;

use crate::AppState;

/// The Content-Security-Policy of every answer.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The token and the names we answer to.
#[derive(Debug, Clone)]
pub struct Guard {
    token: String,
    cookie: String,
    /// `Host` values we answer to: our address, and `localhost` on the same port.
    hosts: Vec<String>,
    /// The origin the page has (the first of `hosts`).
    origins: Vec<String>,
}

impl Guard {
    pub fn new(addr: SocketAddr) -> Self {
        let port = addr.port();
        let mut hosts = vec![match addr {
            SocketAddr::V4(a) => format!("{}:{port}", a.ip()),
            SocketAddr::V6(a) => format!("[{}]:{port}", a.ip()),
        }];
        hosts.push(format!("localhost:{port}"));
        let origins = hosts.iter().map(|h| format!("http://{h}")).collect();
        Self {
            token: hex::encode(rand::random::<[u8; 32]>()),
            cookie: format!("postern_app_{port}"),
            hosts,
            origins,
        }
    }

    /// The URL that lets a browser in (printed by `postern app`).
    pub fn first_url(&self) -> String {
        format!("http://{}/?token={}", self.hosts[0], self.token)
    }

    fn token_matches(&self, candidate: &str) -> bool {
        candidate.as_bytes().ct_eq(self.token.as_bytes()).into()
    }

    fn has_cookie(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .any(|(name, value)| name == self.cookie && self.token_matches(value))
    }

    fn token_in_query(&self, query: Option<&str>) -> bool {
        query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter_map(|pair| pair.split_once('='))
            .any(|(name, value)| name == "token" && self.token_matches(value))
    }

    /// Decides about one request: `Ok(None)` lets it through, `Ok(Some(response))`
    /// answers it here (the token-for-cookie redirect), `Err` refuses it.
    pub fn admit(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Option<Response>, Refusal> {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        if !host.is_some_and(|h| self.hosts.iter().any(|ours| ours == h)) {
            return Err(Refusal::Host);
        }
        let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
        let upgrade = headers.contains_key(header::UPGRADE);
        let changes = !matches!(*method, Method::GET | Method::HEAD) || upgrade;
        match origin {
            Some(o) if !self.origins.iter().any(|ours| ours == o) => return Err(Refusal::Origin),
            None if changes => return Err(Refusal::Origin),
            _ => {}
        }
        if self.has_cookie(headers) {
            return Ok(None);
        }
        if path == "/" && *method == Method::GET && self.token_in_query(query) {
            let cookie = format!(
                "{}={}; Path=/; HttpOnly; SameSite=Strict",
                self.cookie, self.token
            );
            let mut response = Redirect::to("/").into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, v);
            }
            return Ok(Some(response));
        }
        Err(Refusal::Token)
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this app answers only on the address it printed")]
    Host,
    #[error("requests from other web sites are refused")]
    Origin,
    #[error("open the link `postern app` printed: it carries this run's key")]
    Token,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let status = match self {
            Refusal::Host | Refusal::Origin => StatusCode::FORBIDDEN,
            Refusal::Token => StatusCode::UNAUTHORIZED,
        };
        (status, format!("Postern app: {self}.\n")).into_response()
    }
}

/// The middleware: admits or refuses, and puts the security headers on every answer.
pub async fn check(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let verdict = state.guard().admit(
        request.method(),
        request.uri().path(),
        request.uri().query(),
        request.headers(),
    );
    let mut response = match verdict {
        Ok(None) => next.run(request).await,
        Ok(Some(answer)) => answer,
        Err(refusal) => {
            tracing::warn!(%refusal, path = request.uri().path(), "request refused");
            refusal.into_response()
        }
    };
    let headers = response.headers_mut();
    // A stricter policy set by the handler (a received file: sandboxed) is kept.
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
    }
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Guard {
        Guard::new("127.0.0.1:4000".parse().unwrap())
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn cookie(g: &Guard) -> String {
        format!("other=1; {}={}", g.cookie, g.token)
    }

    #[test]
    fn the_token_is_traded_for_a_cookie_once() {
        let g = guard();
        let q = format!("token={}", g.token);
        let h = headers(&[("host", "127.0.0.1:4000")]);
        let answer = g.admit(&Method::GET, "/", Some(&q), &h).unwrap().unwrap();
        assert_eq!(answer.status(), StatusCode::SEE_OTHER);
        let set = answer.headers()[header::SET_COOKIE].to_str().unwrap();
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Strict"),
            "{set}"
        );
        assert!(set.starts_with("postern_app_4000="));
        // Without the token or the cookie: refused, even for the page.
        assert_eq!(
            g.admit(&Method::GET, "/", None, &h).unwrap_err(),
            Refusal::Token
        );
        assert_eq!(
            g.admit(&Method::GET, "/", Some("token=00"), &h)
                .unwrap_err(),
            Refusal::Token
        );
        // The token only opens the page, not the API.
        assert!(g.admit(&Method::GET, "/api/chats", Some(&q), &h).is_err());
        let h = headers(&[("host", "127.0.0.1:4000"), ("cookie", &cookie(&g))]);
        assert!(g
            .admit(&Method::GET, "/api/chats", None, &h)
            .unwrap()
            .is_none());
    }

    #[test]
    fn other_hosts_and_origins_are_refused() {
        let g = guard();
        let c = cookie(&g);
        let rebinding = headers(&[("host", "evil.example:4000"), ("cookie", &c)]);
        assert_eq!(
            g.admit(&Method::GET, "/api/chats", None, &rebinding)
                .unwrap_err(),
            Refusal::Host
        );
        let other_port = headers(&[("host", "127.0.0.1:4001"), ("cookie", &c)]);
        assert!(g.admit(&Method::GET, "/", None, &other_port).is_err());
        let cross = headers(&[
            ("host", "127.0.0.1:4000"),
            ("origin", "http://evil.example"),
            ("cookie", &c),
        ]);
        assert_eq!(
            g.admit(&Method::POST, "/api/messages", None, &cross)
                .unwrap_err(),
            Refusal::Origin
        );
        assert_eq!(
            g.admit(&Method::GET, "/api/chats", None, &cross)
                .unwrap_err(),
            Refusal::Origin
        );
        // A change without any Origin (not a browser's fetch) is refused too.
        let bare = headers(&[("host", "127.0.0.1:4000"), ("cookie", &c)]);
        assert_eq!(
            g.admit(&Method::POST, "/api/messages", None, &bare)
                .unwrap_err(),
            Refusal::Origin
        );
        let ws = headers(&[
            ("host", "127.0.0.1:4000"),
            ("cookie", &c),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(
            g.admit(&Method::GET, "/live", None, &ws).unwrap_err(),
            Refusal::Origin
        );
        let ours = headers(&[
            ("host", "localhost:4000"),
            ("origin", "http://localhost:4000"),
            ("cookie", &c),
        ]);
        assert!(g
            .admit(&Method::POST, "/api/messages", None, &ours)
            .unwrap()
            .is_none());
    }

    #[test]
    fn tokens_differ_per_run() {
        assert_ne!(guard().token, guard().token);
        assert_eq!(guard().token.len(), 64);
    }
}
