//! TLS termination: a rustls server configuration from PEM files, or from a self-signed
//! certificate generated at start with a random subject (kept in memory only), or from a
//! certificate resolver (ACME, see [`crate::accept::acme`]).

use crate::accept::tls_stream::TlsAcceptor;
use crate::config::TlsSettings;
use rand::Rng;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::sync::Arc;

/// Problems setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Certificate or key file unreadable or not PEM.
    #[error("cannot load {what} from {path}: {detail}")]
    Load {
        /// "certificate" or "private key".
        what: &'static str,
        /// The file.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// Certificate generation failed.
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificate/key pair.
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A generated self-signed certificate and its key, DER encoded.
pub struct Generated {
    /// Certificate.
    pub cert: CertificateDer<'static>,
    /// PKCS#8 private key.
    pub key: PrivateKeyDer<'static>,
    /// The random subject common name.
    pub subject: String,
}

fn random_label(rng: &mut impl Rng, len: usize) -> String {
    (0..len)
        .map(|_| (b'a' + rng.random_range(0..26u8)) as char)
        .collect()
}

/// Generates a self-signed certificate with a random host-name-like subject plus `names`
/// (DNS names or IP addresses) as subject alternative names.
pub fn generate_self_signed(names: &[String]) -> Result<Generated, TlsError> {
    let mut rng = rand::rng();
    let len = rng.random_range(6..14);
    let tld = ["com", "net", "org", "io"][rng.random_range(0..4usize)];
    let subject = format!("{}.{tld}", random_label(&mut rng, len));
    let mut sans = vec![subject.clone()];
    sans.extend(names.iter().cloned());
    let mut params = rcgen::CertificateParams::new(sans)?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, subject.clone());
    params.distinguished_name = dn;
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(Generated {
        cert: cert.der().clone(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        subject,
    })
}

/// ring, preferring AES-128-GCM with SHA-256 (the suite browsers prefer too). Measured with
/// relay-bench: with the client's usual first choice, AES-256-GCM with SHA-384, SHA-512
/// blocks (transcript and key schedule) were the largest item of a handshake profile.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        _ => 2,
    });
    Arc::new(p)
}

/// Builds the acceptor used by all TLS listeners.
pub fn acceptor(settings: &TlsSettings) -> Result<TlsAcceptor, TlsError> {
    let (chain, key) = match (&settings.cert, &settings.key) {
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| TlsError::Load {
                    what: "certificate",
                    path: cert.display().to_string(),
                    detail: e.to_string(),
                })?;
            if chain.is_empty() {
                return Err(TlsError::Load {
                    what: "certificate",
                    path: cert.display().to_string(),
                    detail: "no CERTIFICATE block".into(),
                });
            }
            let k = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Load {
                what: "private key",
                path: key.display().to_string(),
                detail: e.to_string(),
            })?;
            (chain, k)
        }
        _ => {
            let g = generate_self_signed(&settings.names)?;
            tracing::info!(subject = %g.subject, "generated a self-signed TLS certificate");
            (vec![g.cert], g.key)
        }
    };
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(finish(config, false))
}

/// Builds the acceptor with certificates chosen per handshake by `resolver` (`[tls.acme]`,
/// see [`crate::accept::acme`]); `acme` also accepts the `acme-tls/1` ALPN of CA validations.
pub fn acceptor_with_resolver(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    acme: bool,
) -> Result<TlsAcceptor, TlsError> {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    Ok(finish(config, acme))
}

fn finish(mut config: rustls::ServerConfig, acme: bool) -> TlsAcceptor {
    // Our cipher suite order (above), not the client's.
    config.ignore_client_order = true;
    // Look like an ordinary HTTPS server to anyone negotiating ALPN.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if acme {
        config
            .alpn_protocols
            .push(crate::accept::acme::ACME_TLS_ALPN.to_vec());
    }
    TlsAcceptor::from(Arc::new(config))
}
