//! Pebble, Let's Encrypt's test ACME server (Debian package `pebble`), for tests of the
//! relay's `[tls.acme]`: started on free loopback ports with `pebble-challtestsrv` as its
//! DNS server (every name resolves to 127.0.0.1), validating TLS-ALPN-01 on a port the test
//! chooses, its API served with a certificate from a CA generated here ([`Pebble::ca_roots`]
//! is what the relay must trust). Both programs are [`ReadyProcess`]es: killed when dropped.

use crate::process::ReadyProcess;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A running Pebble and its DNS server.
pub struct Pebble {
    _dns: ReadyProcess,
    _process: ReadyProcess,
    /// The ACME directory URL (`https://127.0.0.1:PORT/dir`).
    pub directory: String,
    /// The common name of the intermediate that signs what Pebble issues, from its log
    /// (`Pebble Intermediate CA 1a2b3c`).
    pub intermediate: String,
    /// PEM file of the root of Pebble's API certificate (the relay's `ca_roots`).
    pub ca_roots: PathBuf,
}

pub use crate::free_port;

/// A CA and, signed by it, the certificate Pebble serves its API with (localhost and
/// 127.0.0.1), written to `dir` as ca.pem, cert.pem, key.pem.
fn api_certificate(dir: &Path) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "postern test ACME API CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
}

impl Pebble {
    /// Starts pebble-challtestsrv (DNS only) and Pebble, which validates TLS-ALPN-01 on
    /// `tls_port`; files go to `dir`. Panics (with what to install) if Pebble is missing.
    pub fn start(dir: &Path, tls_port: u16) -> Pebble {
        crate::apt::ensure(
            &["/usr/bin/pebble", "/usr/bin/pebble-challtestsrv"],
            &["pebble"],
            "the relay's ACME tests (Pebble, Let's Encrypt's test CA)",
        );
        api_certificate(dir);
        let dns_port = free_port();
        let mut dns = Command::new("pebble-challtestsrv");
        dns.args([
            "-dns01",
            &format!("127.0.0.1:{dns_port}"),
            "-management",
            &format!("127.0.0.1:{}", free_port()),
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
        ]);
        let dns = ReadyProcess::try_start(dns, |l| {
            l.contains("Starting management server").then(String::new)
        })
        .unwrap_or_else(|(e, err)| panic!("pebble-challtestsrv: {e}\n{}", err.join("\n")));

        let path = |f: &str| format!("{:?}", dir.join(f).display().to_string());
        let fields = [
            ("listenAddress", format!("\"127.0.0.1:{}\"", free_port())),
            (
                "managementListenAddress",
                format!("\"127.0.0.1:{}\"", free_port()),
            ),
            ("certificate", path("cert.pem")),
            ("privateKey", path("key.pem")),
            ("httpPort", free_port().to_string()),
            ("tlsPort", tls_port.to_string()),
            ("ocspResponderURL", "\"\"".into()),
            ("externalAccountBindingRequired", "false".into()),
        ];
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("\"{k}\": {v}"))
            .collect();
        let config_path = dir.join("pebble.json");
        std::fs::write(
            &config_path,
            format!("{{\"pebble\": {{{}}}}}", body.join(", ")),
        )
        .unwrap();
        let mut cmd = Command::new("pebble");
        cmd.arg("-config")
            .arg(&config_path)
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{dns_port}"))
            // No random validation delays, no deliberately rejected nonces or reused
            // authorizations: fast and repeatable.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0");
        let process = ReadyProcess::try_start(cmd, |l| {
            l.split_once("ACME directory available at: ")
                .map(|(_, url)| url.trim().to_string())
        })
        .unwrap_or_else(|(e, err)| panic!("pebble: {e}\n{}", err.join("\n")));
        let intermediate = process
            .before
            .iter()
            .find_map(|l| {
                let rest = l.split_once("Generated new intermediate issuer CN=")?.1;
                Some(rest.split(" with serial").next()?.to_string())
            })
            .unwrap_or_else(|| panic!("no intermediate in Pebble's log: {:?}", process.before));
        Pebble {
            directory: process.ready.clone(),
            _dns: dns,
            _process: process,
            intermediate,
            ca_roots: dir.join("ca.pem"),
        }
    }
}
