//! deploy/: the systemd unit (checked by `systemd-analyze verify` and `security`) and
//! deploy/install.sh run into a temporary root (idempotent, --help, --no-systemd).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn unit_text() -> String {
    std::fs::read_to_string(repo().join("deploy/systemd/postern-relay.service")).unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ensure_systemd() {
    postern_test_kit::apt::ensure(
        &["/usr/bin/systemd-analyze", "/usr/bin/systemctl"],
        &["systemd"],
        "the systemd unit's tests",
    );
}

/// The unit as installed, with ExecStart pointing at the binary under test (verify checks
/// that the program exists; /usr/local/bin/postern may not on a build machine).
fn unit_for_test(dir: &Path) -> PathBuf {
    let unit = unit_text().replace(
        "ExecStart=/usr/local/bin/postern ",
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_postern")),
    );
    assert!(unit.contains(env!("CARGO_BIN_EXE_postern")));
    let path = dir.join("postern-relay.service");
    std::fs::write(&path, unit).unwrap();
    path
}

#[test]
fn unit_has_the_promised_settings() {
    let unit = unit_text();
    for line in [
        "User=postern",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "StateDirectory=postern-relay",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ExecStart=/usr/local/bin/postern relay --config /var/lib/postern-relay/relay.toml",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line:?}");
    }
    let nofile: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .expect("LimitNOFILE")
        .parse()
        .unwrap();
    // Two descriptors per connection at the default maxconn (27500), with room to spare.
    assert!(nofile > 2 * 27500, "LimitNOFILE={nofile}");
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    ensure_systemd();
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_test(dir.path());
    // verify exits 0 even for unknown keys or bad values (it only logs them), so every
    // line it logs about our unit counts as a failure. It runs without a booted systemd.
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}", text(&out));
    let about_us: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("postern-relay"))
        .collect();
    assert!(about_us.is_empty(), "{}", text(&out));

    // The check is real: a typo in a key and a bad value are both reported.
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    let bad = std::fs::read_to_string(&unit)
        .unwrap()
        .replace("NoNewPrivileges=yes", "NoNewPrivileges=maybe")
        .replace("ProtectHome=yes", "ProtectHomes=yes");
    std::fs::write(broken.join("postern-relay.service"), bad).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(broken.join("postern-relay.service"))
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("maybe") && err.contains("ProtectHomes"),
        "{}",
        text(&out)
    );
}

#[test]
fn systemd_analyze_security_rates_the_unit_well() {
    ensure_systemd();
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_test(dir.path());
    // Exposure 0-10 (shown) is 0-100 for --threshold: fail above 2.0 ("OK" is below 4).
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager", "--threshold=20"])
        .arg(&unit)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Overall exposure level"),
        "{}",
        text(&out)
    );
}

fn install_sh(args: &[&str]) -> Output {
    Command::new("sh")
        .arg(repo().join("deploy/install.sh"))
        .args(args)
        .output()
        .unwrap()
}

fn fake_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    for f in ["passwd", "group", "shadow", "gshadow"] {
        let src = Path::new("/etc").join(f);
        if src.exists() {
            std::fs::copy(&src, root.path().join("etc").join(f)).unwrap();
        } else {
            std::fs::write(root.path().join("etc").join(f), "").unwrap();
        }
    }
    root
}

#[test]
fn install_sh_help() {
    let out = install_sh(&["--help"]);
    assert!(out.status.success(), "{}", text(&out));
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--prefix",
        "--no-systemd",
        "--binary",
        "postern relay setup",
    ] {
        assert!(help.contains(needle), "{help}");
    }
    let out = install_sh(&["--bogus"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown option"));
}

#[test]
fn install_sh_into_a_root_is_complete_and_idempotent() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    ensure_systemd();
    let root = fake_root();
    let r = root.path().to_str().unwrap();
    let bin = env!("CARGO_BIN_EXE_postern");
    let out = install_sh(&["--prefix", r, "--binary", bin]);
    assert!(out.status.success(), "{}", text(&out));

    let installed = root.path().join("usr/local/bin/postern");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(bin).unwrap()
    );
    assert_eq!(
        std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let user: Vec<&str> = passwd
        .lines()
        .filter(|l| l.starts_with("postern:"))
        .collect();
    assert_eq!(user.len(), 1, "{passwd}");
    let fields: Vec<&str> = user[0].split(':').collect();
    assert_eq!(fields[5], "/var/lib/postern-relay");
    assert_eq!(fields[6], "/usr/sbin/nologin");
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid < 1000, "a system user: {uid}");

    let state = std::fs::metadata(root.path().join("var/lib/postern-relay")).unwrap();
    assert!(state.is_dir());
    assert_eq!(state.permissions().mode() & 0o777, 0o700);
    assert_eq!(state.uid(), uid);

    let unit = root.path().join("etc/systemd/system/postern-relay.service");
    assert_eq!(std::fs::read_to_string(&unit).unwrap(), unit_text());
    let wants = root
        .path()
        .join("etc/systemd/system/multi-user.target.wants/postern-relay.service");
    assert!(
        std::fs::symlink_metadata(&wants).is_ok(),
        "not enabled: {}",
        text(&out)
    );

    // Again: nothing duplicated, the binary is recognised as current, the state dir kept.
    std::fs::write(
        root.path().join("var/lib/postern-relay/relay.toml"),
        "# mine\n",
    )
    .unwrap();
    let out = install_sh(&["--prefix", r, "--binary", bin]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("up to date"), "{}", text(&out));
    assert!(stdout.contains("user postern exists"), "{}", text(&out));
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    assert_eq!(
        passwd.lines().filter(|l| l.starts_with("postern:")).count(),
        1
    );
    assert_eq!(
        std::fs::read_to_string(root.path().join("var/lib/postern-relay/relay.toml")).unwrap(),
        "# mine\n"
    );
}

#[test]
fn install_sh_without_systemd() {
    let root = fake_root();
    let out = install_sh(&[
        "--prefix",
        root.path().to_str().unwrap(),
        "--binary",
        env!("CARGO_BIN_EXE_postern"),
        "--no-systemd",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(root.path().join("usr/local/bin/postern").exists());
    assert!(root.path().join("var/lib/postern-relay").is_dir());
    assert!(!root.path().join("etc/systemd").exists());
    assert!(String::from_utf8_lossy(&out.stdout).contains("no systemd"));
}

/// The container and cloud-init files agree with the unit and the command line: the same
/// configuration path, the same state directory, commands that exist.
#[test]
fn container_and_cloud_init_files_agree_with_the_cli() {
    let read = |p: &str| std::fs::read_to_string(repo().join(p)).unwrap();
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("FROM gcr.io/distroless/cc-debian12:nonroot"));
    assert!(
        dockerfile.contains(r#"CMD ["relay", "--config", "/var/lib/postern-relay/relay.toml"]"#)
    );
    assert!(dockerfile.contains("STATE_DIRECTORY=/var/lib/postern-relay"));
    let compose = read("deploy/docker-compose.yml");
    assert!(compose.contains("dockerfile: Dockerfile"));
    assert!(compose.contains("postern-relay:/var/lib/postern-relay"));
    assert!(compose.contains("cap_add: [NET_BIND_SERVICE]"));
    let cloud = read("deploy/cloud-init/user-data.yaml");
    assert!(cloud.starts_with("#cloud-config\n"));
    assert!(cloud.contains("/opt/postern/deploy/install.sh"));
    assert!(cloud.contains(
        "relay setup ${DOMAIN:+--domain \"$DOMAIN\"} --network /etc/postern/network.toml"
    ));
    // The subcommands these files and the guide use exist, with the flags used.
    let help = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_postern"))
            .args(args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let setup = help(&["relay", "setup"]);
    for flag in [
        "--domain",
        "--network",
        "--upstream",
        "--force",
        "--host",
        "--state-dir",
    ] {
        assert!(setup.contains(flag), "relay setup lacks {flag}");
    }
    assert!(help(&["relay", "doctor"]).contains("--network"));
    assert!(help(&["proxy", "check"]).contains("--network"));
}
