//! Relay secrets: how a client proves, inside its TLS session with a relay, that it holds
//! the relay's link — so that the relay can answer everyone else as an ordinary web site.
//!
//! A relay may have a [`RelaySecret`] (32 random bytes, generated at its first start and
//! kept in its state directory). Its link carries it as `secret=` (base64url, no padding).
//! Right after the TLS handshake, before any Noise byte, the client sends a
//! [`TOKEN_LEN`]-byte token:
//!
//! ```text
//! token = HMAC-SHA256(key = secret, "postern relay tls auth v1" ‖ exporter master secret)
//! ```
//!
//! The exporter master secret (TLS 1.3, RFC 8446 §7.1) is unique to the session and known
//! only to its two ends, so the token is bound to the session: a censor that records a
//! client's whole connection and replays it gets a new session with the relay (its replayed
//! handshake fails, or if it completes a handshake of its own, the recorded token does not
//! match that session). It can't compute a token without the secret either. The relay is to compare
//! the bytes as they arrive and hand the connection to the cover site at the first byte
//! that differs, so a probe learns nothing from the relay's timing.
//!
//! **Why the exporter master secret rather than an RFC 5705 exporter output:** the relay
//! runs TLS on rustls's unbuffered API (so idle connections hold no TLS buffers), which
//! offers no `export_keying_material`. Both ends therefore take the exporter master secret
//! from rustls's key-log hook ([`ExporterCapture`], one per connection, capturing only that
//! one secret) and key an HMAC with the relay secret over it — the same construction on both
//! sides, from maintained primitives (`hmac`, `sha2`). TLS 1.2 has no such secret: a secret
//! relay treats a TLS 1.2 session as unauthenticated.
//!
//! ## Without TLS: an HTTP request (a relay's port 80)
//!
//! On a plain port the client's first bytes are an HTTP/1.1 `GET` whose path is an
//! [`HttpToken`] — `/` + base64url(nonce(16) ‖ time(8) ‖ mac(16)), where
//! `mac = HMAC-SHA256(secret, "postern relay http auth v1" ‖ nonce ‖ time)` truncated to 16
//! bytes and `time` is Unix seconds, big-endian — with WebSocket-style `Upgrade` headers.
//! There is no session to bind to, so the relay refuses a token whose time is more than
//! [`HTTP_TOKEN_SKEW`] away from its clock, and remembers the nonces of valid tokens for
//! twice that long so that a recorded request replayed later gets the cover site.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// Length of a relay secret, in bytes.
pub const SECRET_LEN: usize = 32;

/// Length of the token a client sends after the TLS handshake.
pub const TOKEN_LEN: usize = 32;

/// Domain separation for the TLS token.
const TLS_TOKEN_LABEL: &[u8] = b"postern relay tls auth v1";

/// Domain separation for the HTTP token.
const HTTP_TOKEN_LABEL: &[u8] = b"postern relay http auth v1";

/// Largest clock difference between client and relay accepted for an HTTP token.
pub const HTTP_TOKEN_SKEW: std::time::Duration = std::time::Duration::from_secs(120);

/// Bytes of an HTTP token before base64url: nonce, time, truncated MAC.
const HTTP_TOKEN_RAW: usize = 16 + 8 + 16;

/// A relay's secret. `Display` writes the link form (base64url without padding); `Debug`
/// never shows it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RelaySecret([u8; SECRET_LEN]);

impl fmt::Debug for RelaySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RelaySecret(…)")
    }
}

impl fmt::Display for RelaySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

/// Why a secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Not base64url, or the wrong length.
    #[error("invalid relay secret: expected {SECRET_LEN} bytes in base64url (43 characters), as in the relay's link")]
    Invalid,
    /// The secret file could not be read or written.
    #[error("relay secret file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        source: std::io::Error,
    },
}

impl FromStr for RelaySecret {
    type Err = SecretError;

    fn from_str(s: &str) -> Result<Self, SecretError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(s.trim())
            .map_err(|_| SecretError::Invalid)?;
        let bytes: [u8; SECRET_LEN] = bytes.try_into().map_err(|_| SecretError::Invalid)?;
        Ok(RelaySecret(bytes))
    }
}

impl RelaySecret {
    /// A fresh random secret.
    pub fn generate() -> RelaySecret {
        RelaySecret(rand::random())
    }

    /// Reads the secret from `path`, or creates the file (mode 0600) with a new one when it
    /// does not exist yet. Returns the secret and whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(RelaySecret, bool), SecretError> {
        let file_error = |source| SecretError::File {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Ok((text.parse()?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret = RelaySecret::generate();
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    crate::fsutil::private_dir(dir).map_err(file_error)?;
                }
                crate::fsutil::write_atomic(path, format!("{secret}\n").as_bytes(), 0o600)
                    .map_err(file_error)?;
                Ok((secret, true))
            }
            Err(e) => Err(file_error(e)),
        }
    }

    /// The token a client holding this secret sends in the TLS session whose exporter master
    /// secret is `exporter_secret`.
    pub fn tls_token(&self, exporter_secret: &[u8]) -> [u8; TOKEN_LEN] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .expect("HMAC accepts keys of any length");
        mac.update(TLS_TOKEN_LABEL);
        mac.update(exporter_secret);
        mac.finalize().into_bytes().into()
    }

    fn http_mac(&self, nonce: &[u8; 16], time: u64) -> [u8; 16] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .expect("HMAC accepts keys of any length");
        mac.update(HTTP_TOKEN_LABEL);
        mac.update(nonce);
        mac.update(&time.to_be_bytes());
        let full: [u8; 32] = mac.finalize().into_bytes().into();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }

    /// A fresh HTTP token for a request sent at `now` (Unix seconds).
    pub fn http_token(&self, now: u64) -> HttpToken {
        let nonce: [u8; 16] = rand::random();
        let mut raw = Vec::with_capacity(HTTP_TOKEN_RAW);
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&now.to_be_bytes());
        raw.extend_from_slice(&self.http_mac(&nonce, now));
        HttpToken {
            path: format!("/{}", URL_SAFE_NO_PAD.encode(raw)),
            nonce,
        }
    }

    /// Checks a request path against this secret at time `now` (Unix seconds): the MAC
    /// (in constant time) and the clock skew. Returns the token's nonce, which the caller
    /// must check against (and add to) its replay cache.
    pub fn check_http_path(&self, path: &str, now: u64) -> Result<[u8; 16], HttpTokenError> {
        let b64 = path.strip_prefix('/').ok_or(HttpTokenError::Malformed)?;
        // base64url of 40 bytes, no padding: 54 characters.
        if b64.len() != 54 {
            return Err(HttpTokenError::Malformed);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(b64)
            .map_err(|_| HttpTokenError::Malformed)?;
        let raw: [u8; HTTP_TOKEN_RAW] = raw.try_into().map_err(|_| HttpTokenError::Malformed)?;
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&raw[..16]);
        let mut time = [0u8; 8];
        time.copy_from_slice(&raw[16..24]);
        let time = u64::from_be_bytes(time);
        let expected = self.http_mac(&nonce, time);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&expected[..], &raw[24..])) {
            return Err(HttpTokenError::BadMac);
        }
        if now.abs_diff(time) > HTTP_TOKEN_SKEW.as_secs() {
            return Err(HttpTokenError::Stale);
        }
        Ok(nonce)
    }
}

/// A client's HTTP token: the request path to send, and its nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpToken {
    /// `/` followed by 54 base64url characters.
    pub path: String,
    /// The random part (what a relay's replay cache remembers).
    pub nonce: [u8; 16],
}

/// Why a request path is not a valid HTTP token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HttpTokenError {
    /// Not a token at all (most web requests).
    #[error("not a relay token")]
    Malformed,
    /// Token-shaped, but not made with this secret.
    #[error("token not made with this relay's secret")]
    BadMac,
    /// Made with this secret, but too far from the relay's clock (a replay, or a client
    /// whose clock is wrong).
    #[error("token time too far from the relay's clock")]
    Stale,
}

impl serde::Serialize for RelaySecret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for RelaySecret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A rustls key-log hook that captures only the TLS 1.3 exporter master secret of the one
/// connection it is configured for (give each connection its own, through a per-connection
/// copy of the client or server configuration).
#[cfg(feature = "tls")]
#[derive(Debug, Default)]
pub struct ExporterCapture(std::sync::Mutex<Option<Vec<u8>>>);

#[cfg(feature = "tls")]
impl ExporterCapture {
    /// The captured secret, once the handshake has completed (`None` for TLS 1.2).
    pub fn take(&self) -> Option<Vec<u8>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

#[cfg(feature = "tls")]
impl rustls::KeyLog for ExporterCapture {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        if label == "EXPORTER_SECRET" {
            *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(secret.to_vec());
        }
    }

    fn will_log(&self, label: &str) -> bool {
        label == "EXPORTER_SECRET"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_form_round_trips_and_is_checked() {
        let s = RelaySecret::generate();
        let text = s.to_string();
        assert_eq!(text.len(), 43);
        assert_eq!(text.parse::<RelaySecret>().unwrap(), s);
        assert!("".parse::<RelaySecret>().is_err());
        assert!(text[..42].parse::<RelaySecret>().is_err());
        assert!(format!("{text}AA").parse::<RelaySecret>().is_err());
        assert!(
            !format!("{s:?}").contains(&text),
            "Debug must not print the secret"
        );
    }

    #[test]
    fn tokens_depend_on_the_secret_and_the_session() {
        let (a, b) = (RelaySecret::generate(), RelaySecret::generate());
        let session1 = [1u8; 32];
        let session2 = [2u8; 32];
        assert_eq!(a.tls_token(&session1), a.tls_token(&session1));
        assert_ne!(a.tls_token(&session1), a.tls_token(&session2));
        assert_ne!(a.tls_token(&session1), b.tls_token(&session1));
    }

    #[test]
    fn http_tokens_check_mac_and_clock() {
        let (a, b) = (RelaySecret::generate(), RelaySecret::generate());
        let now = 1_800_000_000;
        let token = a.http_token(now);
        assert_eq!(token.path.len(), 55);
        assert_eq!(a.check_http_path(&token.path, now), Ok(token.nonce));
        assert_eq!(a.check_http_path(&token.path, now + 119), Ok(token.nonce));
        assert_eq!(a.check_http_path(&token.path, now - 119), Ok(token.nonce));
        assert_eq!(
            a.check_http_path(&token.path, now + 121),
            Err(HttpTokenError::Stale)
        );
        assert_eq!(
            b.check_http_path(&token.path, now),
            Err(HttpTokenError::BadMac)
        );
        assert_ne!(a.http_token(now).nonce, token.nonce, "nonces must be fresh");
        for path in [
            "/",
            "/index.html",
            "",
            "x",
            &token.path[1..],
            &format!("{}A", token.path),
        ] {
            assert_eq!(
                a.check_http_path(path, now),
                Err(HttpTokenError::Malformed),
                "{path}"
            );
        }
        // A flipped character in the MAC part.
        let mut bad = token.path.clone().into_bytes();
        let last = bad.len() - 2;
        bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
        let bad = String::from_utf8(bad).unwrap();
        assert_eq!(a.check_http_path(&bad, now), Err(HttpTokenError::BadMac));
    }

    proptest::proptest! {
        #[test]
        fn any_path_is_checked_without_panic(path in "/?[A-Za-z0-9_=-]{0,80}") {
            let _ = RelaySecret::generate().check_http_path(&path, 1_800_000_000);
        }
    }

    #[test]
    fn the_secret_file_is_created_once_and_private() {
        let dir = std::env::temp_dir().join(format!("postern-secret-{}", rand::random::<u64>()));
        let path = dir.join("state").join("relay-secret");
        let (first, created) = RelaySecret::load_or_create(&path).unwrap();
        assert!(created);
        let (again, created) = RelaySecret::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(first, again);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "secret readable by others: {mode:o}");
        }
        std::fs::write(&path, "not a secret").unwrap();
        assert!(matches!(
            RelaySecret::load_or_create(&path),
            Err(SecretError::Invalid)
        ));
        let _ = std::fs::remove_dir_all(dir);
    }
}
