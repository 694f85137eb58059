//! What the XMPP peers of `--mode peers` (ejabberd, Prosody) have in common: Debian's
//! package installed when missing (as root, saying so on stdout) with its system service
//! disabled, and a server process that the benchmark starts in a temporary directory on a
//! loopback port and kills when the guard is dropped (also on errors, panics, and — through
//! `PR_SET_PDEATHSIG` — when the benchmark itself is killed).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::server::{cpu_seconds, rss_kib_of};
use crate::xmpp::{out, XmlStream};

/// The XMPP domain of the benchmark's accounts.
pub const DOMAIN: &str = "bench.test";
/// How long a server may take to accept XMPP connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a process runs whose command line contains every one of `markers`.
fn running(markers: &[&str]) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.filter_map(|e| e.ok()).any(|e| {
        std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
            let c = String::from_utf8_lossy(&c);
            !c.is_empty() && markers.iter().all(|m| c.contains(m))
        })
    })
}

/// Makes sure `program` exists: if not, installs Debian's `package` (as root; otherwise
/// fails with the command to run), then disables its system service `service` so that the
/// system's own instance never runs (stopping it if it runs: a process whose command line
/// has all of `system_instance`; the benchmark's own instances do not run yet).
pub fn ensure_package(
    program: &Path,
    package: &str,
    service: &str,
    system_instance: &[&str],
) -> Result<()> {
    if program.exists() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "{package} is not installed ({} is missing). Install Debian's package and keep its \
             system service off, then run the benchmark again:\n    \
             sudo apt-get install -y {package} && sudo systemctl disable --now {service}",
            program.display()
        );
    }
    println!(
        "{package} is not installed: installing Debian's package (apt-get install -y {package})"
    );
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("cannot run apt-get")
    };
    if !install()?.success() {
        // A machine whose package lists were never fetched.
        println!("apt-get install failed; running apt-get update and trying again");
        let _ = Command::new("apt-get").arg("update").status();
        if !install()?.success() {
            bail!("apt-get install -y {package} failed (see its output above)");
        }
    }
    // The package enables and may start the system's instance (port 5222 and more); the
    // benchmark starts its own, so the system's must never run.
    println!("disabling the system's {service} service: systemctl disable --now {service}");
    let systemd = Command::new("systemctl")
        .args(["disable", "--now", service])
        .status();
    if !matches!(&systemd, Ok(s) if s.success()) {
        // No systemd (a container, sysvinit): `systemctl disable` still removed the unit's
        // links; the SysV links go too, and a running instance is stopped by its init script.
        let why = match &systemd {
            Ok(status) => status.to_string(),
            Err(e) => e.to_string(),
        };
        println!("  systemctl: {why}; disabling the SysV service instead (update-rc.d)");
        let _ = Command::new("update-rc.d")
            .args([service, "disable"])
            .status();
        if running(system_instance) {
            let init = format!("/etc/init.d/{service}");
            println!("  the system's {service} is running: {init} stop");
            let _ = Command::new(&init).arg("stop").status();
        }
    }
    if running(system_instance) {
        println!(
            "  warning: the system's {service} is still running (it does not disturb the \
             benchmark's own instance, which uses other ports, but it uses the machine)"
        );
    }
    if !program.exists() {
        bail!(
            "apt-get install -y {package} did not install {}",
            program.display()
        );
    }
    Ok(())
}

/// The installed version of Debian package `package` ("?" if dpkg does not say).
pub fn package_version(package: &str) -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", package])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "?".into())
}

/// Makes the kernel kill the child if this process dies without dropping the guard
/// (SIGKILL). It survives `exec` (`erl` becoming `beam.smp`, `env` becoming `lua5.4`) but
/// is tied to the thread that spawns: spawn from a thread that lives as long as the guard
/// (the runtime's main or worker threads, not a blocking-pool thread).
pub fn kill_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A running XMPP server; killed on drop.
pub struct XmppServer {
    /// "ejabberd", "prosody".
    pub name: &'static str,
    child: Child,
    /// Where clients connect.
    pub address: String,
    /// What it printed (start-up failures land here).
    pub log: PathBuf,
}

impl XmppServer {
    /// Spawns `cmd` (already configured for address `address`, its output going to `log`).
    pub fn spawn(
        name: &'static str,
        mut cmd: Command,
        address: String,
        log: PathBuf,
    ) -> Result<Self> {
        kill_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        Ok(Self {
            name,
            child,
            address,
            log,
        })
    }

    /// Waits until the server answers an XMPP stream header on its port for [`DOMAIN`]
    /// (polling every 50 ms; no fixed sleep). Fails if it exits first.
    pub async fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            self.check_alive()?;
            if probe(&self.address).await.is_ok() {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "{} did not accept XMPP connections on {} within {READY_TIMEOUT:?}; see {}",
                    self.name,
                    self.address,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn rss_kib(&self) -> Result<u64> {
        rss_kib_of(self.pid())
    }

    pub fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds(&self.pid().to_string())
    }

    /// The name of the running program (`beam.smp`, `lua5.4`).
    pub fn program(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/comm", self.pid()))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into())
    }

    /// Fails unless the process is `program`: CPU and memory are read from its
    /// `/proc/PID`, so a wrapper that did not exec would measure the wrong process.
    pub fn expect_program(&self, program: &str) -> Result<()> {
        let actual = self.program();
        if actual != program {
            bail!(
                "{}'s process {} is {actual:?}, not {program}: its CPU and memory would be the \
                 wrong process's",
                self.name,
                self.pid()
            );
        }
        Ok(())
    }

    /// Fails if the server has exited, with the end of what it printed.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let printed = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = printed.lines().rev().take(15).collect();
            bail!(
                "{} exited ({status}); the end of its output ({}):\n{}",
                self.name,
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }
}

impl Drop for XmppServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens a stream and reads the server's stream header: the listener is up and it is an
/// XMPP server. (Another program on the port would not answer this.)
async fn probe(address: &str) -> Result<()> {
    let mut stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(address))
        .await
        .context("connect timed out")??;
    stream
        .write_all(out::stream_header(DOMAIN).as_bytes())
        .await?;
    let (rd, mut wr) = stream.split();
    let mut xml = XmlStream::new(BufReader::new(rd));
    tokio::time::timeout(Duration::from_secs(5), xml.stream_open())
        .await
        .context("no stream header")??;
    let _ = wr.write_all(out::STREAM_END.as_bytes()).await;
    Ok(())
}
