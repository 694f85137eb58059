//! The stats listener: `/metrics` (Prometheus text format), `/healthz`, and `/` (the status
//! page), bounded so that a public stats port cannot be used to starve health checks.

use super::{page, Metrics};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Who may read the stats listener: anyone who can reach it (loopback, the default), or
/// only requests that carry the configured token. A request without it gets the same plain
/// 404 as an unknown path, so the port does not announce a relay.
#[derive(Clone, Default)]
pub struct Access {
    token: Option<Arc<str>>,
}

impl Access {
    /// Open to anyone who can connect (for a loopback listener).
    pub fn open() -> Access {
        Access { token: None }
    }

    /// Only requests carrying `token`.
    pub fn token(token: &str) -> Access {
        Access {
            token: Some(token.into()),
        }
    }

    fn matches(&self, given: &str) -> bool {
        use subtle::ConstantTimeEq;
        match &self.token {
            None => true,
            Some(t) => bool::from(t.as_bytes().ct_eq(given.as_bytes())),
        }
    }

    /// Whether a request with this query string (and `Authorization` header) may be served.
    fn allows(&self, query: Option<&str>, authorization: Option<&[u8]>) -> bool {
        if self.token.is_none() {
            return true;
        }
        let from_query = query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter_map(|kv| kv.strip_prefix("token="))
            .any(|t| self.matches(t));
        let from_header = authorization
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .is_some_and(|t| self.matches(t.trim()));
        from_query || from_header
    }
}

/// The health fast lane: one request line, `/healthz` answered, anything else 503.
/// With a token, only `GET /healthz?token=…` (the fast lane reads no headers).
async fn fast_health(
    mut stream: tokio::net::TcpStream,
    m: &Metrics,
    access: &Access,
) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 1024 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let target = String::from_utf8_lossy(&buf);
    let target = target
        .strip_prefix("GET ")
        .or_else(|| target.strip_prefix("HEAD "))
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or("");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    if !access.allows(query, None) {
        return reply(&mut stream, "404 Not Found", "not found\n").await;
    }
    let health = path == "/healthz";
    let (status, body) = match (health, m.healthy()) {
        (true, true) => ("200 OK", "ok\n"),
        (true, false) => (
            "503 Service Unavailable",
            "no healthy upstream in at least one pool\n",
        ),
        (false, _) => ("503 Service Unavailable", "busy: try again\n"),
    };
    reply(&mut stream, status, body).await
}

async fn reply(
    stream: &mut tokio::net::TcpStream,
    status: &str,
    body: &str,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let reply = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncache-control: no-store\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

fn respond(m: &Metrics, access: &Access, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let allowed = access.allows(
        req.uri().query(),
        req.headers()
            .get(hyper::header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
    );
    let path = if allowed { req.uri().path() } else { "" };
    let (status, ctype, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            m.prometheus(),
        ),
        "/healthz" => {
            if m.healthy() {
                (
                    StatusCode::OK,
                    "text/plain; charset=utf-8",
                    "ok\n".to_string(),
                )
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    "no healthy upstream in at least one pool\n".to_string(),
                )
            }
        }
        "/" => (
            StatusCode::OK,
            "text/html; charset=utf-8",
            page::render(m, m.uptime()),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    resp
}

/// Concurrent connections served by the stats listener.
pub const MAX_STATS_CONNECTIONS: usize = 64;
/// Concurrent stats connections from one address (IPv4 address or IPv6 /64).
pub const MAX_STATS_PER_SOURCE: usize = 4;
/// Connections answered by the health fast lane at once (see [`serve`]).
pub const MAX_FAST_LANE: usize = 256;
/// How long a stats connection may take to send its request headers.
pub const STATS_HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest a stats connection lives.
pub const STATS_CONNECTION_LIFETIME: Duration = Duration::from_secs(10);
/// How long the fast lane waits for a request line.
const FAST_LANE_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves the stats listener until `stop`; samples history every `every`.
///
/// The stats port may be public, and an orchestrator restarts a relay whose `/healthz`
/// does not answer, so idle connections must not be able to starve it: each address gets
/// at most [`MAX_STATS_PER_SOURCE`] connections, one request each (no keep-alive) with
/// [`STATS_HEADER_TIMEOUT`] to send it; and a connection that finds no slot (all taken,
/// or its address's taken) goes to a *fast lane* that reads one request line within a
/// second and answers `/healthz` (anything else: 503, try again) and closes.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    every: Duration,
    access: Access,
) {
    let sampler = {
        let metrics = metrics.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => metrics.sample(),
                }
            }
        })
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_STATS_CONNECTIONS));
    let fast_lane = Arc::new(tokio::sync::Semaphore::new(MAX_FAST_LANE));
    let per_source = postern_protocol::net::PerSource::new(MAX_STATS_PER_SOURCE);
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "stats accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let full = per_source
            .try_acquire(peer.ip())
            .and_then(|source| Some((source, slots.clone().try_acquire_owned().ok()?)));
        let Some((source, permit)) = full else {
            let Ok(lane) = fast_lane.clone().try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let metrics = metrics.clone();
            let access = access.clone();
            tokio::spawn(async move {
                let _lane = lane;
                let _ =
                    tokio::time::timeout(FAST_LANE_TIMEOUT, fast_health(stream, &metrics, &access))
                        .await;
            });
            continue;
        };
        let metrics = metrics.clone();
        let stop = stop.clone();
        let access = access.clone();
        tokio::spawn(async move {
            let _held = (permit, source);
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = respond(&metrics, &access, &req);
                async move { Ok::<_, std::convert::Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(STATS_HEADER_TIMEOUT)
                .keep_alive(false)
                .max_buf_size(16 * 1024)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            tokio::select! {
                _ = stop.cancelled() => {}
                r = tokio::time::timeout(STATS_CONNECTION_LIFETIME, conn) => { let _ = r; }
            }
        });
    }
    sampler.abort();
}

#[cfg(test)]
mod tests {
    use super::Access;

    #[test]
    fn a_token_is_needed_only_when_set() {
        assert!(Access::open().allows(None, None));
        let a = Access::token("0123456789abcdef");
        assert!(!a.allows(None, None));
        assert!(!a.allows(Some("token=wrong"), None));
        assert!(!a.allows(Some("token=0123456789abcdeX"), None));
        assert!(a.allows(Some("x=1&token=0123456789abcdef"), None));
        assert!(a.allows(None, Some(b"Bearer 0123456789abcdef")));
        assert!(!a.allows(None, Some(b"Basic 0123456789abcdef")));
    }
}
