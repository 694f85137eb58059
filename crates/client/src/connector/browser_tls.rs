//! The TLS layer of relay connections, shaped like a browser's.
//!
//! Censors block TLS clients by the shape of their ClientHello (its JA3/JA4 fingerprint):
//! a client that does not look like a browser is easy to single out. So relay connections
//! use BoringSSL — the TLS library Chrome is built on, through the `boring` crate — set up
//! the way Chrome sets it up: the same TLS 1.2 cipher list and order, the same groups with
//! a post-quantum hybrid key share first (X25519MLKEM768, then X25519), the same signature
//! algorithms, GREASE values and a randomly permuted extension order on every connection,
//! OCSP stapling and SCT requests, Brotli certificate compression, ALPS for `h2` on its new
//! code point, the trust anchor IDs Chrome requests, a GREASE Encrypted Client Hello, and ALPN `h2`, `http/1.1`. The resulting
//! JA4 is Chrome's ([`CHROME_JA4`]); `crates/testbed/tests/browser_fingerprint.rs`
//! compares the real ClientHello with a real Chromium's, both captured on loopback, and
//! docs/relay.md says where the reference comes from.
//!
//! The relay's certificate is not checked: as in the reference system it is camouflage,
//! usually self-signed, and the Noise handshake inside authenticates the server end to
//! end. (rustls stays in use everywhere else: the relay, tools, tests.)
//!
//! A relay with a secret binds its proof to the TLS session's exporter master secret
//! ([`postern_protocol::relay_auth`]); BoringSSL hands it out through its key-log hook,
//! caught here per connection.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, OnceLock};

use boring::ex_data::Index;
use boring::ssl::{
    CertificateCompressionAlgorithm, CertificateCompressor, ConnectConfiguration, Ssl,
    SslConnector, SslMethod, SslVerifyMode, SslVersion,
};
use tokio::net::TcpStream;

/// The JA4 fingerprint of the ClientHello sent here when it carries a server name: that
/// of Chrome (and Chromium) 156, as captured from Debian's Chromium 156 on loopback by the
/// fingerprint test. (Chrome 124 to 14x sent `t13d1516h2_8daaf6152771_d8a2da3f94cd`, as
/// published by browserleaks.com; later versions added ML-DSA signature algorithms and the
/// trust_anchors extension.)
pub const CHROME_JA4: &str = "t13d1517h2_8daaf6152771_cb7bf5808d99";

/// Chrome's cipher suites for TLS 1.2, in Chrome's order (BoringSSL puts its three TLS 1.3
/// suites in front, in the order Chrome sends them).
const CIPHERS: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:\
ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:\
ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:\
ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA:AES128-GCM-SHA256:AES256-GCM-SHA384:\
AES128-SHA:AES256-SHA";

/// Chrome's supported groups; BoringSSL sends key shares for the first (post-quantum
/// hybrid) and, because it is a hybrid, for the classical second one too.
const GROUPS: &str = "X25519MLKEM768:X25519:P-256:P-384";

/// Chrome's signature algorithms, in order: the post-quantum ML-DSA ones first.
const SIGALGS: &str =
    "mldsa44:mldsa65:mldsa87:ecdsa_secp256r1_sha256:rsa_pss_rsae_sha256:rsa_pkcs1_sha256:\
ecdsa_secp384r1_sha384:rsa_pss_rsae_sha384:rsa_pkcs1_sha384:\
rsa_pss_rsae_sha512:rsa_pkcs1_sha512";

/// The trust anchor IDs Chrome 156 requests in its trust_anchors extension
/// (draft-ietf-tls-trust-anchor-ids): its root store's, each 8-bit length-prefixed, as
/// captured from Debian's Chromium 156. Sent as they are so that the extension's length
/// and content match the browser's.
const TRUST_ANCHOR_IDS: &[u8] = &[
    0x05, 0x82, 0xdf, 0x13, 0x02, 0x01, 0x05, 0x82, 0xdf, 0x13, 0x02, 0x06, //
    0x05, 0x82, 0xdf, 0x13, 0x02, 0x0d, 0x05, 0x82, 0xdf, 0x13, 0x02, 0x0e, //
    0x05, 0x82, 0xdf, 0x13, 0x02, 0x0f, 0x05, 0x82, 0xdf, 0x13, 0x02, 0x12, //
    0x05, 0x82, 0xdf, 0x13, 0x02, 0x13, 0x05, 0x82, 0xdf, 0x13, 0x02, 0x14, //
    0x08, 0x83, 0x9a, 0x64, 0x8c, 0x9b, 0x2d, 0x01, 0x07, //
    0x08, 0x83, 0x9a, 0x64, 0x8c, 0x9b, 0x2d, 0x01, 0x08, //
    0x08, 0x83, 0x9a, 0x64, 0x8c, 0x9b, 0x2d, 0x01, 0x09, //
    0x08, 0x83, 0x9a, 0x64, 0x8c, 0x9b, 0x2d, 0x01, 0x0a, //
    0x08, 0x83, 0x9a, 0x64, 0x8c, 0x9b, 0x2d, 0x01, 0x0b, //
    0x08, 0x83, 0x9a, 0x64, 0x8c, 0x9b, 0x2d, 0x01, 0x0c, //
    0x08, 0x83, 0x9a, 0x64, 0x8c, 0x9b, 0x2d, 0x01, 0x0d, //
    0x08, 0x83, 0x9a, 0x64, 0x8c, 0x9b, 0x2d, 0x01, 0x12, //
    0x08, 0x83, 0x9a, 0x64, 0x8c, 0x9b, 0x2d, 0x01, 0x13, //
    0x04, 0xd6, 0x79, 0x09, 0x01, 0x04, 0xd6, 0x79, 0x09, 0x04, //
    0x04, 0xd6, 0x79, 0x09, 0x05, 0x04, 0xd6, 0x79, 0x09, 0x06, //
    0x04, 0xd6, 0x79, 0x09, 0x07, 0x04, 0xd6, 0x79, 0x09, 0x08, //
    0x04, 0xd6, 0x79, 0x09, 0x0a, 0x04, 0xd6, 0x79, 0x09, 0x0b, //
    0x04, 0xd6, 0x79, 0x09, 0x0c, 0x04, 0xd6, 0x79, 0x09, 0x0d, //
    0x04, 0xd6, 0x79, 0x09, 0x0f,
];

/// ALPN as Chrome offers it (length-prefixed protocol names).
const ALPN: &[u8] = b"\x02h2\x08http/1.1";

/// The key-log label of TLS 1.3's exporter master secret (NSS key-log format).
const EXPORTER_LABEL: &str = "EXPORTER_SECRET";

/// Why the TLS handshake with a relay did not complete.
#[derive(Debug, thiserror::Error)]
pub enum BrowserTlsError {
    /// BoringSSL refused the settings (a bug here, not a network problem).
    #[error("TLS setup failed: {0}")]
    Setup(#[from] boring::error::ErrorStack),
    /// The handshake failed or the far end is not a TLS server.
    #[error("{0}")]
    Handshake(String),
}

/// A finished TLS session to a relay.
pub type TlsStream = tokio_boring::SslStream<TcpStream>;

/// Brotli, the only certificate compression Chrome offers. Only decompression is needed
/// (a client never sends a certificate here); BoringSSL gives the writer exactly the
/// uncompressed length the server announced, bounded by its certificate size limit, so a
/// hostile stream cannot make it grow.
struct Brotli;

impl CertificateCompressor for Brotli {
    const ALGORITHM: CertificateCompressionAlgorithm = CertificateCompressionAlgorithm::BROTLI;
    const CAN_COMPRESS: bool = false;
    const CAN_DECOMPRESS: bool = true;

    fn decompress<W: Write>(&self, input: &[u8], output: &mut W) -> io::Result<()> {
        let mut reader = brotli_decompressor::Decompressor::new(input, 4096);
        let mut buf = [0u8; 4096];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            output.write_all(&buf[..n])?;
        }
    }
}

/// Slot for one connection's exporter secret, filled by BoringSSL's key-log hook.
type ExporterSlot = Arc<Mutex<Option<Vec<u8>>>>;

/// Reads the exporter secret out of one NSS key-log line
/// (`EXPORTER_SECRET <client random hex> <secret hex>`).
fn exporter_from_key_log(line: &str) -> Option<Vec<u8>> {
    let mut parts = line.split_ascii_whitespace();
    if parts.next()? != EXPORTER_LABEL {
        return None;
    }
    let _client_random = parts.next()?;
    hex::decode(parts.next()?).ok()
}

/// Where each connection's exporter slot lives on its `SSL` object, so that one shared
/// context's key-log hook can fill the slot of the connection it is called for.
fn slot_index() -> Result<Index<Ssl, ExporterSlot>, BrowserTlsError> {
    static INDEX: OnceLock<Index<Ssl, ExporterSlot>> = OnceLock::new();
    if let Some(i) = INDEX.get() {
        return Ok(*i);
    }
    let i = Ssl::new_ex_index::<ExporterSlot>()?;
    Ok(*INDEX.get_or_init(|| i))
}

/// Chrome's settings, built once per process: every dial shares the context (a context
/// per dial would redo this setup, and the default verify paths' CA bundle read, each
/// time), and only the per-connection `SSL` object is new.
fn context() -> Result<&'static SslConnector, BrowserTlsError> {
    static CONTEXT: OnceLock<SslConnector> = OnceLock::new();
    if let Some(c) = CONTEXT.get() {
        return Ok(c);
    }
    let index = slot_index()?;
    let mut b = SslConnector::builder(SslMethod::tls())?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    b.set_max_proto_version(Some(SslVersion::TLS1_3))?;
    b.set_cipher_list(CIPHERS)?;
    b.set_curves_list(GROUPS)?;
    b.set_sigalgs_list(SIGALGS)?;
    b.set_alpn_protos(ALPN)?;
    b.set_grease_enabled(true);
    b.set_permute_extensions(true);
    b.enable_ocsp_stapling();
    b.enable_signed_cert_timestamps();
    b.add_certificate_compression_algorithm(Brotli)?;
    // The relay's certificate is camouflage; the server is authenticated by Noise.
    b.set_verify(SslVerifyMode::NONE);
    b.set_keylog_callback(move |ssl, line| {
        if let (Some(slot), Some(secret)) = (ssl.ex_data(index), exporter_from_key_log(line)) {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(secret);
        }
    });
    Ok(CONTEXT.get_or_init(|| b.build()))
}

/// One connection's configuration on the shared context: its server name, ECH GREASE,
/// ALPS and trust anchors (per-`SSL` settings), and `slot` for its exporter secret.
fn configuration(
    slot: ExporterSlot,
    sni: Option<&str>,
) -> Result<ConnectConfiguration, BrowserTlsError> {
    let mut config = context()?.configure()?;
    config.set_ex_data(slot_index()?, slot);
    config.set_verify_hostname(false);
    config.set_use_server_name_indication(sni.is_some());
    config.set_enable_ech_grease(true);
    // ALPS (application settings) for h2, on the code point Chrome uses since version
    // 124, and the trust anchors Chrome requests. The `boring` crate has no safe wrapper
    // for these calls.
    let ssl = foreign_types::ForeignTypeRef::as_ptr(&*config);
    // SAFETY: `ssl` is the live SSL object owned by `config`; BoringSSL copies the
    // protocol name, the empty settings and the anchor list (static slices) before
    // returning.
    let ok = unsafe {
        boring_sys::SSL_set_alps_use_new_codepoint(ssl, 1);
        boring_sys::SSL_add_application_settings(ssl, b"h2".as_ptr(), 2, std::ptr::null(), 0) == 1
            && boring_sys::SSL_set1_requested_trust_anchors(
                ssl,
                TRUST_ANCHOR_IDS.as_ptr(),
                TRUST_ANCHOR_IDS.len(),
            ) == 1
    };
    if !ok {
        return Err(BrowserTlsError::Setup(boring::error::ErrorStack::get()));
    }
    Ok(config)
}

/// Completes a TLS handshake over `tcp` with a browser's ClientHello carrying `sni` (or no
/// server name). Returns the session and, for TLS 1.3, its exporter master secret. The
/// caller bounds the time.
pub async fn connect(
    tcp: TcpStream,
    sni: Option<&str>,
) -> Result<(TlsStream, Option<Vec<u8>>), BrowserTlsError> {
    let slot = ExporterSlot::default();
    let config = configuration(slot.clone(), sni)?;
    let stream = tokio_boring::connect(config, sni.unwrap_or(""), tcp)
        .await
        .map_err(|e| BrowserTlsError::Handshake(handshake_words(&e)))?;
    let exporter = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    Ok((stream, exporter))
}

/// What went wrong in a handshake, in a few words: the I/O error, or BoringSSL's.
fn handshake_words<S>(e: &tokio_boring::HandshakeError<S>) -> String {
    match e.as_io_error() {
        Some(io) => io.to_string(),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exporter_secret_is_read_from_its_key_log_line() {
        assert_eq!(
            exporter_from_key_log("EXPORTER_SECRET 0a0b 00ff10"),
            Some(vec![0x00, 0xff, 0x10])
        );
        assert_eq!(
            exporter_from_key_log("CLIENT_TRAFFIC_SECRET_0 0a0b 00ff"),
            None
        );
        assert_eq!(exporter_from_key_log("EXPORTER_SECRET 0a0b"), None);
        assert_eq!(exporter_from_key_log("EXPORTER_SECRET 0a0b zz"), None);
    }

    #[test]
    fn chrome_settings_are_accepted_by_boringssl() {
        for sni in [Some("relay.example.org"), None] {
            configuration(ExporterSlot::default(), sni).expect("settings");
        }
    }
}
