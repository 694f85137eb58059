//! `postern relay --acme-domain …` against Pebble (Let's Encrypt's test CA, Debian package
//! `pebble`): the flags reach the relay, the default state directory follows systemd's
//! `$STATE_DIRECTORY`, and the volunteer reads in the log that the certificate was issued.
//! (The certificate itself is checked in crates/relay/tests/acme.rs.)

use postern_test_kit::pebble::{free_port, Pebble};
use postern_test_kit::process::ReadyProcess;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn acme_flags_get_a_certificate_into_the_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let tls_port = free_port();
    let pebble = Pebble::start(dir.path(), tls_port);
    let state = dir.path().join("state");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_postern"));
    cmd.args([
        "relay",
        "--upstream",
        "127.0.0.1:9",
        "--tls",
        &format!("127.0.0.1:{tls_port}"),
        "--no-stats",
        "--acme-domain",
        "relay.postern.test",
        "--acme-contact",
        "mailto:volunteer@postern.test",
        "--acme-directory",
        &pebble.directory,
        "--acme-ca-roots",
    ])
    .arg(&pebble.ca_roots)
    .env("STATE_DIRECTORY", &state)
    .env("POSTERN_LOG", "info");
    let relay = ReadyProcess::start(cmd, "relay ready");

    let started = Instant::now();
    let issued = loop {
        let lines = relay.stderr_lines("ACME: certificate for relay.postern.test issued");
        if let Some(line) = lines.into_iter().next() {
            break line;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no certificate within 60s; the relay's log:\n{}",
            relay.stderr_lines("").join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(issued.contains("valid until"), "{issued}");
    let files: Vec<String> = std::fs::read_dir(state.join("acme"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.iter().any(|f| f.starts_with("cached_cert_")),
        "{files:?}"
    );
    assert!(
        relay.terminate(),
        "the relay did not stop cleanly on SIGTERM"
    );
}

/// `postern relay setup --domain` writes a working `[tls.acme]`, and `postern relay doctor`
/// tells the self-signed stand-in from the certificate the CA issued.
#[test]
fn setup_with_a_domain_and_doctor_see_the_acme_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let tls_port = free_port();
    let pebble = Pebble::start(dir.path(), tls_port);
    let state = dir.path().join("state");
    let postern = || Command::new(env!("CARGO_BIN_EXE_postern"));
    let o = postern()
        .args(["relay", "setup", "--domain", "relay.postern.test"])
        .args(["--upstream", "127.0.0.1:9", "--no-qr"])
        .args([
            "--tls",
            &format!("127.0.0.1:{tls_port}"),
            "--stats",
            "127.0.0.1:0",
        ])
        .args(["--contact", "mailto:volunteer@postern.test"])
        .args(["--acme-directory", &pebble.directory, "--acme-ca-roots"])
        .arg(&pebble.ca_roots)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let config = state.join("relay.toml");
    let doctor = || {
        let o = postern()
            .args(["relay", "doctor", "--min-days", "1", "--config"])
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let mut cmd = postern();
    cmd.args(["relay", "--config"])
        .arg(&config)
        .env("POSTERN_LOG", "info");
    let relay = ReadyProcess::start(cmd, "relay ready");
    let started = Instant::now();
    let report = loop {
        let report = doctor();
        if report.contains("✓ certificate: for [\"relay.postern.test\"]") {
            break report;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no ACME certificate within 60 s:\n{report}\nrelay log:\n{}",
            relay.stderr_lines("").join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(report.contains(&pebble.intermediate), "{report}");
    assert!(relay.terminate());
}
