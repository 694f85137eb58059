//! ejabberd as a peer of `--mode peers`: Debian's package (installed when missing and we
//! are root), started by the benchmark in a temporary directory with a generated
//! configuration, and killed when the guard is dropped (also on errors and panics).
//!
//! It is started with `erl` directly, the way `ejabberdctl foreground` does it, but as the
//! current user and without Erlang distribution: `ejabberdctl` insists on running as root
//! or `ejabberd` (as root it `su`s to `ejabberd`, who cannot write our temporary
//! directory) and names a distributed node, which starts a system-wide `epmd` daemon that
//! outlives the benchmark. Without `-sname` the node is `nonode@nohost`: no node name or
//! cookie to collide with anything, no `epmd`, no `~/.erlang.cookie`. Mnesia (ejabberd's
//! default database, in Debian too) keeps its files in the temporary spool directory.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::server::{cpu_seconds, rss_kib_of};
use crate::xmpp::{out, XmlStream};

/// The XMPP domain of the benchmark's accounts.
pub const DOMAIN: &str = "bench.test";
/// How long ejabberd may take to accept XMPP connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const CTL: &str = "/usr/sbin/ejabberdctl";

/// Where Debian's ejabberd lives.
pub struct Installation {
    /// `erl`, as `ejabberdctl` runs it.
    erl: PathBuf,
    /// The `ERL_LIBS` directory holding ejabberd's and its dependencies' applications.
    erl_libs: PathBuf,
    /// ejabberd's version (from its application directory, e.g. `23.01`).
    pub version: String,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Finds ejabberd, installing Debian's package first when it is missing and we are root
/// (saying so on stdout), then disabling the system's own instance so that it never runs.
pub fn ensure_installed() -> Result<Installation> {
    if !Path::new(CTL).exists() {
        if !is_root() {
            bail!(
                "ejabberd is not installed ({CTL} is missing). Install Debian's package and keep \
                 its system service off, then run the benchmark again:\n    \
                 sudo apt-get install -y ejabberd && sudo systemctl disable --now ejabberd"
            );
        }
        println!(
            "ejabberd is not installed: installing Debian's package (apt-get install -y ejabberd)"
        );
        let install = || {
            Command::new("apt-get")
                .args(["install", "-y", "ejabberd"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .context("cannot run apt-get")
        };
        if !install()?.success() {
            // A machine whose package lists were never fetched.
            println!("apt-get install failed; running apt-get update and trying again");
            let _ = Command::new("apt-get").arg("update").status();
            if !install()?.success() {
                bail!("apt-get install -y ejabberd failed (see its output above)");
            }
        }
        // The package enables and may start ejabberd's own instance (port 5222, its epmd);
        // the benchmark starts its own, so the system's must never run.
        println!("disabling the system's ejabberd service: systemctl disable --now ejabberd");
        let systemd = Command::new("systemctl")
            .args(["disable", "--now", "ejabberd"])
            .status();
        if !matches!(&systemd, Ok(s) if s.success()) {
            // No systemd (a container, sysvinit): `systemctl disable` still removed the
            // unit's links, and the SysV links go too; a running instance is stopped with
            // its init script.
            let why = match &systemd {
                Ok(status) => status.to_string(),
                Err(e) => e.to_string(),
            };
            println!("  systemctl: {why}; disabling the SysV service instead (update-rc.d)");
            let _ = Command::new("update-rc.d")
                .args(["ejabberd", "disable"])
                .status();
            if system_instance_running() {
                println!("  the system's ejabberd is running: /etc/init.d/ejabberd stop");
                let _ = Command::new("/etc/init.d/ejabberd").arg("stop").status();
            }
        }
        if system_instance_running() {
            println!(
                "  warning: the system's ejabberd is still running (it does not disturb the \
                 benchmark's own instance, which uses other ports, but it uses the machine)"
            );
        }
        if !Path::new(CTL).exists() {
            bail!("apt-get install -y ejabberd did not install {CTL}");
        }
    }
    find_installation(Path::new(CTL))
}

/// Whether an ejabberd of the system runs: a `beam.smp` whose Mnesia is in
/// `/var/lib/ejabberd` (ours is in a temporary directory).
fn system_instance_running() -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.filter_map(|e| e.ok()).any(|e| {
        std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
            let c = String::from_utf8_lossy(&c);
            c.contains("beam.smp") && c.contains("/var/lib/ejabberd")
        })
    })
}

/// Reads `erl` and `ERL_LIBS` from `ejabberdctl` (Debian sets both there) and finds the
/// ejabberd application in `ERL_LIBS`.
fn find_installation(ctl: &Path) -> Result<Installation> {
    let script =
        std::fs::read_to_string(ctl).with_context(|| format!("cannot read {}", ctl.display()))?;
    let erl = shell_assignment(&script, "ERL").unwrap_or_else(|| "/usr/bin/erl".into());
    let erl_libs = shell_assignment(&script, "ERL_LIBS")
        .with_context(|| format!("no ERL_LIBS= line in {}", ctl.display()))?;
    let erl_libs = PathBuf::from(erl_libs);
    let version = std::fs::read_dir(&erl_libs)
        .with_context(|| format!("cannot list {}", erl_libs.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("ebin/ejabberd.app").is_file())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("ejabberd-"))
                .map(str::to_string)
        })
        .max()
        .with_context(|| format!("no ejabberd-*/ebin/ejabberd.app in {}", erl_libs.display()))?;
    let erl = PathBuf::from(erl);
    if !erl.is_file() {
        bail!("{} (named in {}) is missing", erl.display(), ctl.display());
    }
    Ok(Installation {
        erl,
        erl_libs,
        version,
    })
}

/// The value of a `NAME=value` / `NAME='value'` / `NAME="value"` line of a shell script.
fn shell_assignment(script: &str, name: &str) -> Option<String> {
    script.lines().find_map(|l| {
        let v = l.trim().strip_prefix(name)?.strip_prefix('=')?;
        let v = v.trim();
        let v = v
            .strip_prefix('\'')
            .and_then(|v| v.strip_suffix('\''))
            .or_else(|| v.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
            .unwrap_or(v);
        (!v.is_empty() && !v.contains('$')).then(|| v.to_string())
    })
}

/// The generated `ejabberd.yml`: one plain-TCP client listener on loopback `port`, the
/// domain [`DOMAIN`], offline storage, stream management, in-band registration open to
/// loopback without rate limits, and no shaper or queue limit that this load would reach.
pub fn config(port: u16, clients: usize) -> String {
    format!(
        r#"# Generated by postern-bench messaging --mode peers.
loglevel: warning
log_rotate_count: 0
hosts:
  - {DOMAIN}
listen:
  -
    port: {port}
    ip: "127.0.0.1"
    module: ejabberd_c2s
    # Plain TCP, like Postern's thin clients' TCP (which carries Noise instead of TLS).
    starttls: false
    starttls_required: false
    max_stanza_size: 65536
    shaper: none
    access: c2s
    backlog: 4096
# Passwords stored as given, so SASL PLAIN costs a comparison (SCRAM storage, Debian's
# default, would cost a PBKDF2 per login): connecting is not what is measured.
auth_method: internal
auth_password_format: plain
# No per-address limit on in-band registrations (default: one per 600 s per address).
registration_timeout: infinity
# Caches (authentication, among others) large enough for every account (default 1000).
cache_size: {cache}
# A client's process may queue this many messages before it is killed (default 10000).
max_fsm_queue: 1000000
acl:
  loopback:
    ip:
      - 127.0.0.0/8
access_rules:
  c2s:
    allow: all
  # mod_register's `access` is matched against the new account's JID, `ip_access`
  # against the client's address.
  register:
    allow: all
  register_from:
    allow: loopback
shaper_rules:
  max_user_sessions: 10
  max_user_offline_messages: {offline}
  c2s_shaper: none
modules:
  mod_offline:
    access_max_user_messages: max_user_offline_messages
  mod_register:
    access: register
    ip_access: register_from
    welcome_message: {{}}
  mod_stream_mgmt:
    resend_on_timeout: if_offline
    max_ack_queue: 1000000
"#,
        offline = (clients * 10).max(10_000),
        cache = (clients * 2).max(10_000)
    )
}

/// A running ejabberd; killed on drop.
pub struct Ejabberd {
    child: Child,
    /// Where clients connect.
    pub address: String,
    /// Its stdout and stderr (start-up failures land here) and its own log file.
    pub log: PathBuf,
    ejabberd_log: PathBuf,
}

impl Ejabberd {
    /// Writes the configuration into `dir` and starts ejabberd on a free loopback port,
    /// with its spool (Mnesia), logs and `HOME` under `dir`. Call [`Ejabberd::wait_ready`]
    /// before connecting.
    pub fn start(inst: &Installation, dir: &Path, clients: usize) -> Result<Self> {
        let port = free_port()?;
        let spool = dir.join("spool");
        let logs = dir.join("logs");
        let home = dir.join("home");
        for d in [&spool, &logs, &home] {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let config_path = dir.join("ejabberd.yml");
        std::fs::File::create(&config_path)
            .and_then(|mut f| f.write_all(config(port, clients).as_bytes()))
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let log = dir.join("ejabberd.out");
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        let ejabberd_log = logs.join("ejabberd.log");
        let mut cmd = Command::new(&inst.erl);
        // What `ejabberdctl foreground` runs, minus the node name (see the module comment).
        cmd.args(["+K", "true", "+P", "250000", "-noinput", "-noshell"])
            .arg("-mnesia")
            .arg("dir")
            .arg(format!("\"{}\"", spool.display()))
            .args(["-s", "ejabberd"])
            .current_dir(&spool)
            .env("HOME", &home)
            .env("EJABBERD_CONFIG_PATH", &config_path)
            .env("EJABBERD_LOG_PATH", &ejabberd_log)
            .env("ERL_LIBS", &inst.erl_libs)
            .env("ERL_CRASH_DUMP", logs.join("erl_crash.dump"))
            .env("ERL_CRASH_DUMP_BYTES", "0")
            .env("ERL_MAX_PORTS", (clients * 2 + 32_000).to_string())
            .env("ERL_MAX_ETS_TABLES", "1400")
            // Nothing from the caller's Erlang settings.
            .env_remove("ERL_FLAGS")
            .env_remove("ERL_AFLAGS")
            .env_remove("ERL_ZFLAGS")
            .env_remove("ERL_INETRC")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        // If this process dies without dropping the guard (SIGKILL), the kernel kills
        // ejabberd too. `erl` execs `beam.smp`, which keeps the setting. It is tied to the
        // thread that spawns: call this from a thread that lives as long as the guard (the
        // runtime's main or worker threads, not a blocking-pool thread).
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
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", inst.erl.display()))?;
        Ok(Self {
            child,
            address: format!("127.0.0.1:{port}"),
            log,
            ejabberd_log,
        })
    }

    /// Waits until ejabberd answers an XMPP stream header on its port for [`DOMAIN`]
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
                    "ejabberd did not accept XMPP connections on {} within {READY_TIMEOUT:?}; \
                     see {} and {}",
                    self.address,
                    self.log.display(),
                    self.ejabberd_log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The `beam.smp` process (`erl` execs it, so it is our child).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn rss_kib(&self) -> Result<u64> {
        rss_kib_of(self.pid())
    }

    pub fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds(&self.pid().to_string())
    }

    /// The name of the running program (`beam.smp`).
    pub fn program(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/comm", self.pid()))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into())
    }

    /// Fails if ejabberd has exited, with the end of what it printed.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let printed = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = printed.lines().rev().take(15).collect();
            bail!(
                "ejabberd exited ({status}); the end of its output ({}):\n{}",
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }
}

impl Drop for Ejabberd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free on 127.0.0.1 a moment ago (ejabberd binds it itself).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_debians_ejabberdctl() {
        let script = "#!/bin/bash\nERL=\"/usr/bin/erl\"\nIEX=\"/usr/bin/iex\"\n\
                      ERL_LIBS='/usr/lib/x86_64-linux-gnu'\n    ERL_LIBS=$HOME/x\n";
        assert_eq!(
            shell_assignment(script, "ERL").as_deref(),
            Some("/usr/bin/erl")
        );
        assert_eq!(
            shell_assignment(script, "ERL_LIBS").as_deref(),
            Some("/usr/lib/x86_64-linux-gnu")
        );
        assert_eq!(shell_assignment(script, "EPMD"), None);
    }

    #[test]
    fn config_names_the_port_and_turns_tls_off() {
        let c = config(40123, 2000);
        assert!(c.contains("port: 40123"), "{c}");
        assert!(c.contains("ip: \"127.0.0.1\""));
        assert!(c.contains("starttls_required: false"));
        assert!(c.contains("mod_stream_mgmt:"));
        assert!(c.contains("mod_offline:"));
        assert!(c.contains("max_user_offline_messages: 20000"));
    }
}
