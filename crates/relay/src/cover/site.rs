//! The cover site's own web server: a neutral built-in page, or static files from a
//! directory. HTTP/1.1 over whatever the connection is (TLS on 443, plain on 80), with the
//! limits of an ordinary server: a header timeout, a bounded request head, keep-alive.

use crate::stream::{BoxIo, Prefixed};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Largest file served from a cover directory; larger ones are answered 404 (a cover site
/// is a few pages, not a download mirror).
pub const MAX_FILE: u64 = 8 * 1024 * 1024;

/// A connection is closed after this long whatever it does.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(600);

/// The built-in page: what a freshly set up web server shows.
const BUILT_IN_PAGE: &str = "<!DOCTYPE html>
<html lang=\"en\">
<head>
<meta charset=\"utf-8\">
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">
<title>Welcome</title>
<style>body{max-width:40em;margin:4em auto;padding:0 1em;font-family:sans-serif;color:#333}</style>
</head>
<body>
<h1>Welcome</h1>
<p>This site is being set up. Please check back later.</p>
</body>
</html>
";

const NOT_FOUND_PAGE: &str = "<!DOCTYPE html>
<html lang=\"en\"><head><meta charset=\"utf-8\"><title>404 Not Found</title></head>
<body><h1>Not Found</h1><p>The requested URL was not found on this server.</p></body></html>
";

const NOT_ALLOWED_PAGE: &str = "<!DOCTYPE html>
<html lang=\"en\"><head><meta charset=\"utf-8\"><title>405 Method Not Allowed</title></head>
<body><h1>Method Not Allowed</h1></body></html>
";

/// The built-in or directory site.
pub struct Site {
    /// Canonical root directory; `None` = the built-in page.
    root: Option<PathBuf>,
    header_timeout: Duration,
}

impl Site {
    /// A site serving `dir` (or the built-in page).
    pub fn new(dir: Option<PathBuf>, header_timeout: Duration) -> Site {
        Site {
            root: dir.map(|d| d.canonicalize().unwrap_or(d)),
            header_timeout,
        }
    }

    /// Serves HTTP/1.1 on `io` after replaying `read`, until the client closes, a timeout
    /// passes, or the relay shuts down.
    pub async fn serve(self: Arc<Self>, io: BoxIo, read: Vec<u8>, cut: CancellationToken) {
        let io = Prefixed::new(read, io);
        let header_timeout = self.header_timeout;
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let site = self.clone();
            async move { Ok::<_, std::convert::Infallible>(site.respond(&req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(16 * 1024)
            .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
        tokio::select! {
            _ = cut.cancelled() => {}
            r = tokio::time::timeout(CONNECTION_LIFETIME, conn) => { let _ = r; }
        }
    }

    /// The answer to one request.
    pub async fn respond<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        let head = req.method() == Method::HEAD;
        if req.method() != Method::GET && !head {
            let mut r = page(StatusCode::METHOD_NOT_ALLOWED, NOT_ALLOWED_PAGE, false);
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        let Some(root) = &self.root else {
            return if req.uri().path() == "/" || req.uri().path() == "/index.html" {
                page(StatusCode::OK, BUILT_IN_PAGE, head)
            } else {
                page(StatusCode::NOT_FOUND, NOT_FOUND_PAGE, head)
            };
        };
        match read_file(root, req.uri().path()).await {
            Some((bytes, mime)) => {
                let len = bytes.len();
                let mut r = Response::new(Full::new(if head { Bytes::new() } else { bytes }));
                if let Ok(v) = HeaderValue::from_str(&mime) {
                    r.headers_mut().insert(CONTENT_TYPE, v);
                }
                if head {
                    r.headers_mut()
                        .insert(hyper::header::CONTENT_LENGTH, HeaderValue::from(len));
                }
                r
            }
            None => page(StatusCode::NOT_FOUND, NOT_FOUND_PAGE, head),
        }
    }
}

fn page(status: StatusCode, html: &'static str, head: bool) -> Response<Full<Bytes>> {
    let body = if head {
        Bytes::new()
    } else {
        Bytes::from_static(html.as_bytes())
    };
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if head {
        r.headers_mut()
            .insert(hyper::header::CONTENT_LENGTH, HeaderValue::from(html.len()));
    }
    r
}

/// The file under `root` that a URL path names, if it is inside `root` (no `..`, no
/// symbolic link leading out), a regular file (a directory means its `index.html`) and
/// at most [`MAX_FILE`] bytes.
pub fn file_for(root: &Path, url_path: &str) -> Option<PathBuf> {
    let decoded = percent_encoding::percent_decode_str(url_path)
        .decode_utf8()
        .ok()?;
    let mut path = root.to_path_buf();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => continue,
            ".." => return None,
            s if s.contains('\\') || s.contains('\0') || s.starts_with('.') => return None,
            s => path.push(s),
        }
    }
    if path.is_dir() {
        path.push("index.html");
    }
    let real = path.canonicalize().ok()?;
    if !real.starts_with(root) {
        return None;
    }
    let meta = std::fs::metadata(&real).ok()?;
    (meta.is_file() && meta.len() <= MAX_FILE).then_some(real)
}

async fn read_file(root: &Path, url_path: &str) -> Option<(Bytes, String)> {
    let path = file_for(root, url_path)?;
    let bytes = tokio::fs::read(&path).await.ok()?;
    let mime = mime_guess::from_path(&path).first_or_octet_stream();
    let mime = if mime.type_() == "text" {
        format!("{mime}; charset=utf-8")
    } else {
        mime.to_string()
    };
    Some((Bytes::from(bytes), mime))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    #[tokio::test]
    async fn the_built_in_site_has_one_page() {
        let site = Site::new(None, Duration::from_secs(30));
        assert_eq!(site.respond(&get("/")).await.status(), StatusCode::OK);
        assert_eq!(
            site.respond(&get("/admin")).await.status(),
            StatusCode::NOT_FOUND
        );
        let post = Request::post("/").body(()).unwrap();
        assert_eq!(
            site.respond(&post).await.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[tokio::test]
    async fn a_directory_site_serves_only_what_is_inside() {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("www");
        std::fs::create_dir_all(root.join("docs")).unwrap();
        std::fs::write(root.join("index.html"), "<h1>home</h1>").unwrap();
        std::fs::write(root.join("docs/a b.txt"), "text").unwrap();
        std::fs::write(root.join(".hidden"), "no").unwrap();
        std::fs::write(outer.path().join("secret"), "outside").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(outer.path().join("secret"), root.join("link")).unwrap();
        let site = Site::new(Some(root.clone()), Duration::from_secs(30));

        let home = site.respond(&get("/")).await;
        assert_eq!(home.status(), StatusCode::OK);
        assert_eq!(home.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
        let txt = site.respond(&get("/docs/a%20b.txt")).await;
        assert_eq!(txt.status(), StatusCode::OK);
        assert_eq!(txt.headers()[CONTENT_TYPE], "text/plain; charset=utf-8");
        for bad in [
            "/../secret",
            "/docs/../../secret",
            "/%2e%2e/secret",
            "/.hidden",
            "/link",
            "/nope",
        ] {
            assert_eq!(
                site.respond(&get(bad)).await.status(),
                StatusCode::NOT_FOUND,
                "{bad}"
            );
        }
    }
}
