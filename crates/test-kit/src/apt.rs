//! Debian packages a test needs: present, installed now (when the test runs as root, saying
//! so), or a failure that names the `apt-get` line to run. A test that skipped silently
//! would pass without testing anything.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

static INSTALL: Mutex<()> = Mutex::new(());

/// Makes sure every one of `programs` (absolute paths) exists, installing `packages` with
/// apt-get if one is missing. `what` says what needs them ("the app's browser tests").
pub fn ensure(programs: &[&str], packages: &[&str], what: &str) {
    ensure_that(
        || programs.iter().all(|p| Path::new(p).exists()),
        &format!("{programs:?}"),
        packages,
        what,
    )
}

/// Like [`ensure`] for what a fixed path cannot name (a versioned directory such as
/// `/usr/lib/postgresql/*/bin`): `present` says whether it is there; `missing` names it in
/// the failure.
pub fn ensure_that(present: impl Fn() -> bool, missing: &str, packages: &[&str], what: &str) {
    // One installation at a time (tests run in parallel; dpkg has one lock).
    let _one_at_a_time = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    if present() {
        return;
    }
    let line = format!("sudo apt-get install -y {}", packages.join(" "));
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    assert!(root, "{what} need {}: {line}", packages.join(" and "));
    eprintln!("{what}: installing {} (apt-get)", packages.join(" "));
    let status = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .expect("run apt-get");
    assert!(status.success(), "{line} failed");
    assert!(present(), "{line} did not install {missing}");
}
