//! Certificates from an ACME CA (Let's Encrypt or another), for `[tls.acme]`.
//!
//! The work is [`rustls_acme`]'s: account, orders, TLS-ALPN-01 challenges, renewal a third
//! of the lifetime before expiry, and the cache directory (account key and certificates,
//! so a restart does not order again). This module fits it to the relay:
//!
//! * [`AcmeResolver`] picks the certificate per ClientHello: the challenge certificate for a
//!   CA's `acme-tls/1` validation, else the ACME certificate, else (before the first one is
//!   issued) the certificate saved in the cache at start, else a generated self-signed one —
//!   so TLS listeners work from the first second and switch without a restart.
//! * [`AcmeTask`] drives rustls-acme's event stream in the background and logs every event
//!   in words a volunteer understands; it ends when the relay stops.
//! * A validation connection (ALPN `acme-tls/1`) is answered by the handshake alone: the
//!   listener closes it and never forwards it (see [`crate::accept::listener`]).

use crate::accept::tls::{self, TlsError};
use crate::accept::tls_stream::TlsAcceptor;
use crate::config::{AcmeSettings, RelayConfig};
use futures::StreamExt;
use rustls::client::ClientConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_acme::acme::{AcmeError as AcmeErrorOfCrate, Identifier};
use rustls_acme::caches::DirCache;
use rustls_acme::{AcmeConfig, AcmeState, CertCache, EventError, EventOk, OrderError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// The ALPN protocol of TLS-ALPN-01 validation connections (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = rustls_acme::acme::ACME_TLS_ALPN_NAME;

/// Problems setting up ACME.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The cache directory cannot be created or secured.
    #[error("ACME cache directory {path}: {source}")]
    Cache {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// `ca_roots` unreadable, not PEM, or holding an unusable certificate.
    #[error("[tls.acme] ca_roots {path}: {detail}")]
    CaRoots {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The self-signed stand-in or the client configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// rustls refused the ACME client configuration.
    #[error("ACME client configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    /// ACME is on but the configuration has no cache directory (see
    /// [`RelayConfig::acme_cache_dir`]).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// Chooses the certificate for each handshake; see the module documentation.
#[derive(Debug)]
pub struct AcmeResolver {
    acme: Arc<rustls_acme::ResolvesServerCertAcme>,
    /// The cached ACME certificate found at start, or the self-signed one.
    fallback: Arc<CertifiedKey>,
}

impl ResolvesServerCert for AcmeResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let challenge = rustls_acme::is_tls_alpn_challenge(&hello);
        match self.acme.resolve(hello) {
            Some(cert) => Some(cert),
            // A validation connection gets the challenge certificate or nothing.
            None if challenge => None,
            None => Some(self.fallback.clone()),
        }
    }
}

/// Drives rustls-acme (orders, renewals, cache) in the background; see [`AcmeTask::run`].
pub struct AcmeTask {
    state: AcmeState<std::io::Error>,
    domains: Vec<String>,
    directory: String,
    cache: PathBuf,
}

/// The TLS acceptor for every TLS listener: from `[tls.acme]` when set (with the task that
/// must then run, see [`AcmeTask::run`]), otherwise [`tls::acceptor`].
pub async fn tls_acceptor(
    config: &RelayConfig,
) -> Result<(TlsAcceptor, Option<AcmeTask>), AcmeError> {
    let (Some(acme), Some(cache)) = (&config.tls.acme, config.acme_cache_dir()?) else {
        return Ok((tls::acceptor(&config.tls)?, None));
    };
    if !config
        .listeners
        .iter()
        .any(|l| l.enabled && l.tls && l.listen.port() == 443)
    {
        tracing::info!(
            "ACME: no TLS listener on port 443 here; the CA validates by connecting to port \
             443 of {}, so make sure that port is forwarded to a TLS listener of the relay",
            acme.domains.join(", ")
        );
    }
    let (resolver, task) = start(acme, &cache, &config.tls.names).await?;
    Ok((tls::acceptor_with_resolver(resolver, true)?, Some(task)))
}

/// Domains as the CA and SNI see them: lower case, each once, in the order given.
fn normalized(domains: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in domains {
        let d = d.to_ascii_lowercase();
        if !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

/// Prepares ACME for `settings`, keeping its files in `cache`; `names` go into the
/// self-signed stand-in. Nothing is ordered until the task runs.
pub async fn start(
    settings: &AcmeSettings,
    cache: &Path,
    names: &[String],
) -> Result<(Arc<AcmeResolver>, AcmeTask), AcmeError> {
    let provider = tls::provider();
    create_private_dir(cache)?;
    let client = Arc::new(
        ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(settings.ca_roots.as_deref())?)
            .with_no_client_auth(),
    );
    let domain_list = normalized(&settings.domains);
    let state = AcmeConfig::new_with_client_config(&domain_list, client)
        .directory(&settings.directory)
        .contact(&settings.contact)
        .cache(DirCache::new(cache.to_path_buf()))
        .state();
    let domains = domain_list.join(", ");
    let fallback = match load_saved(cache, &domain_list, &settings.directory, &provider).await {
        Some((cert, not_after)) => {
            tracing::info!(
                "ACME: serving the saved certificate for {domains} (valid until {}) from {}",
                date(not_after),
                cache.display()
            );
            cert
        }
        None => {
            let g = tls::generate_self_signed(names)?;
            tracing::info!(
                subject = %g.subject,
                "ACME: no certificate for {domains} yet; serving a self-signed one until \
                 {} issues it",
                settings.directory
            );
            Arc::new(CertifiedKey::from_der(vec![g.cert], g.key, &provider)?)
        }
    };
    let resolver = Arc::new(AcmeResolver {
        acme: state.resolver(),
        fallback,
    });
    Ok((
        resolver,
        AcmeTask {
            state,
            domains: domain_list,
            directory: settings.directory.clone(),
            cache: cache.to_path_buf(),
        },
    ))
}

/// Creates `dir` (readable by the relay's user only: it holds private keys).
fn create_private_dir(dir: &Path) -> Result<(), AcmeError> {
    let err = |source| AcmeError::Cache {
        path: dir.to_path_buf(),
        source,
    };
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        builder.mode(0o700);
        builder.create(dir).map_err(err)?;
        // An existing directory keeps its mode from before: tighten it.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    #[cfg(not(unix))]
    builder.create(dir).map_err(err)?;
    Ok(())
}

/// The Web PKI roots, plus those in `extra`.
fn roots(extra: Option<&Path>) -> Result<RootCertStore, AcmeError> {
    let mut store = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = extra {
        let err = |detail: String| AcmeError::CaRoots {
            path: path.to_path_buf(),
            detail,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no CERTIFICATE block".into()));
        }
        for c in certs {
            store.add(c).map_err(|e| err(e.to_string()))?;
        }
    }
    Ok(store)
}

/// The certificate rustls-acme saved for these domains and directory, if any and usable.
async fn load_saved(
    cache: &Path,
    domains: &[String],
    directory: &str,
    provider: &CryptoProvider,
) -> Option<(Arc<CertifiedKey>, i64)> {
    let pem = DirCache::new(cache.to_path_buf())
        .load_cert(domains, directory)
        .await
        .ok()??;
    let (chain, key) = parse_saved(&pem)?;
    let not_after = not_after(&chain[0])?;
    if not_after <= now() {
        return None;
    }
    let cert = CertifiedKey::from_der(chain, key, provider).ok()?;
    Some((Arc::new(cert), not_after))
}

/// rustls-acme's cache format: the PKCS#8 key, then the chain, all PEM.
fn parse_saved(pem: &[u8]) -> Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let key = PrivateKeyDer::from_pem_slice(pem).ok()?;
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    (!chain.is_empty()).then_some((chain, key))
}

/// The certificate's expiry, in seconds since the epoch.
fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

fn validity(cert: &CertificateDer<'_>) -> Option<(i64, i64)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let v = parsed.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `2026-03-01 12:00 UTC`.
fn date(unix: i64) -> String {
    match x509_parser::time::ASN1Time::from_timestamp(unix) {
        Ok(t) => {
            let t = t.to_datetime();
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02} UTC",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute()
            )
        }
        Err(_) => format!("{unix} (Unix time)"),
    }
}

/// `45s`, `12 min`, `3 h`.
fn span(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{} h", s / 3600),
    }
}

/// rustls-acme's wait after the n-th consecutive failed order (1s, 2s, 4s, … up to 2^16 s).
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1 << failures.saturating_sub(1).min(16))
}

impl AcmeTask {
    /// Orders, renews and logs until `stop` is cancelled (the relay stopping).
    pub async fn run(mut self, stop: CancellationToken) {
        let domains = self.domains.join(", ");
        let mut failures = 0u32;
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => return,
                e = self.state.next() => e,
            };
            let Some(event) = event else { return };
            match event {
                Ok(EventOk::DeployedCachedCert) => {
                    tracing::debug!("ACME: certificate for {domains} loaded from the cache")
                }
                Ok(EventOk::DeployedNewCert) => {
                    failures = 0;
                    tracing::debug!("ACME: new certificate for {domains} deployed");
                }
                Ok(EventOk::CertCacheStore) => {
                    log_issued(&self.cache, &self.domains, &self.directory).await
                }
                Ok(EventOk::AccountCacheStore) => tracing::info!(
                    "ACME: generated a key for a new account at {}, saved in {}",
                    self.directory,
                    self.cache.display()
                ),
                Err(EventError::Order(e)) => {
                    failures += 1;
                    tracing::warn!(
                        "ACME order failed: {}; retrying in {}",
                        order_failure(&e, &self.directory),
                        span(backoff(failures))
                    );
                }
                Err(EventError::CertCacheStore(e)) => tracing::warn!(
                    "ACME: certificate for {domains} issued and in use, but it cannot be \
                     saved in {}: {e}; after a restart the relay will order a new one",
                    self.cache.display()
                ),
                Err(e) => tracing::warn!("ACME: {e} (cache {})", self.cache.display()),
            }
        }
    }
}

/// Why an order failed, with what to check when it is about the relay's side.
fn order_failure(e: &OrderError, directory: &str) -> String {
    const CHECK: &str = "check that the name resolves to this relay and that port 443 there \
                         reaches a TLS listener of the relay";
    match e {
        OrderError::BadAuth(auth) => {
            let Identifier::Dns(name) = &auth.identifier;
            let problems: Vec<String> = auth
                .challenges
                .iter()
                .filter_map(|c| c.error.as_ref())
                .map(|p| match (&p.detail, &p.typ) {
                    (Some(d), _) => d.clone(),
                    (None, Some(t)) => t.clone(),
                    (None, None) => "no reason given".into(),
                })
                .collect();
            let why = match problems.is_empty() {
                true => format!("status {:?}", auth.status),
                false => problems.join("; "),
            };
            format!("the CA could not validate {name} ({why}); {CHECK}")
        }
        OrderError::TooManyAttemptsAuth(name) => {
            format!("the CA did not finish validating {name}; {CHECK}")
        }
        OrderError::Acme(AcmeErrorOfCrate::HttpRequest(e)) => {
            // rustls-acme does not export the error's type; its message tells the cases apart.
            let e = e.to_string();
            if e.starts_with("non 2xx") {
                format!("the CA at {directory} refused the request ({e})")
            } else {
                format!(
                    "cannot reach the CA at {directory} ({e}); check the relay's Internet \
                     access and the directory URL"
                )
            }
        }
        other => other.to_string(),
    }
}

/// Logs a new certificate with its dates, read back from the cache where it was saved.
async fn log_issued(cache: &Path, domains: &[String], directory: &str) {
    let saved = DirCache::new(cache.to_path_buf())
        .load_cert(domains, directory)
        .await
        .ok()
        .flatten();
    let dates = saved
        .as_deref()
        .and_then(parse_saved)
        .and_then(|(chain, _)| validity(&chain[0]));
    let domains = domains.join(", ");
    match dates {
        Some((from, until)) => tracing::info!(
            "ACME: certificate for {domains} issued, valid until {}; renewal starts around {}",
            date(until),
            date(until - (until - from) / 3)
        ),
        None => tracing::info!("ACME: certificate for {domains} issued"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_normalized() {
        let given = ["Relay.Example.org", "b.example.org", "relay.example.org"].map(String::from);
        assert_eq!(normalized(&given), ["relay.example.org", "b.example.org"]);
    }

    #[test]
    fn words() {
        assert_eq!(date(0), "1970-01-01 00:00 UTC");
        assert_eq!(span(Duration::from_secs(4)), "4s");
        assert_eq!(span(Duration::from_secs(600)), "10 min");
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(100), Duration::from_secs(1 << 16));
    }

    #[test]
    fn saved_certificate_format() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["relay.example.org".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pem = format!("{}\n{}", key.serialize_pem(), cert.pem());
        let (chain, _key) = parse_saved(pem.as_bytes()).unwrap();
        assert_eq!(chain, [cert.der().clone()]);
        assert!(not_after(&chain[0]).unwrap() > now());
        assert!(parse_saved(b"garbage").is_none());
    }
}
