//! The relays under test: finding or installing them, their configurations (HAProxy with the
//! reference settings, nginx `stream`, `postern relay`), starting and stopping them, and
//! reading their memory and CPU from `/proc`.

use anyhow::{bail, Context, Result};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// HAProxy with the reference messenger's settings.
    Haproxy,
    /// nginx `stream` module.
    Nginx,
    /// `postern relay`.
    Postern,
}

impl Kind {
    /// Column name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Haproxy => "HAProxy",
            Kind::Nginx => "nginx",
            Kind::Postern => "postern",
        }
    }
}

/// Files and addresses shared by every start of a relay.
pub struct Setup {
    /// Scratch directory (configs, certificate, logs).
    pub dir: PathBuf,
    /// The echo upstream.
    pub upstream: SocketAddr,
    /// PEM certificate, key, and both concatenated (HAProxy's `crt`).
    pub cert: PathBuf,
    /// PEM key.
    pub key: PathBuf,
    /// Certificate + key.
    pub combined: PathBuf,
    /// Worker threads / processes for every relay.
    pub workers: usize,
    /// The `postern` binary.
    pub postern: PathBuf,
    /// Extra `postern relay` arguments.
    pub postern_args: Vec<String>,
}

/// A running relay.
pub struct Running {
    /// Which.
    pub kind: Kind,
    /// Plain listener.
    pub plain: SocketAddr,
    /// TLS listener.
    pub tls: SocketAddr,
    child: Child,
}

/// Writes a self-signed ECDSA P-256 certificate shared by all relays (same handshake cost).
pub fn write_cert(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let key = rcgen::KeyPair::generate()?;
    let params = rcgen::CertificateParams::new(vec!["relay.example".to_string()])?;
    let cert = params.self_signed(&key)?;
    let (c, k, both) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("both.pem"),
    );
    std::fs::write(&c, cert.pem())?;
    std::fs::write(&k, key.serialize_pem())?;
    std::fs::write(&both, format!("{}{}", cert.pem(), key.serialize_pem()))?;
    Ok((c, k, both))
}

fn free_port() -> Result<SocketAddr> {
    Ok(SocketAddr::from((
        [127, 0, 0, 1],
        postern_test_kit::free_port(),
    )))
}

fn which(cmd: &str) -> Option<PathBuf> {
    for dir in [
        "/usr/sbin",
        "/usr/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
        "/sbin",
    ] {
        let p = Path::new(dir).join(cmd);
        if p.is_file() {
            return Some(p);
        }
    }
    None
}

/// The nginx stream module, if installed as a dynamic module.
fn nginx_stream_module() -> Option<PathBuf> {
    let p = PathBuf::from("/usr/lib/nginx/modules/ngx_stream_module.so");
    p.is_file().then_some(p)
}

/// Finds HAProxy and nginx (with `stream`), installing the Debian packages when missing and
/// running as root. Returns the peers available, and notes for those skipped.
pub fn find_or_install(want: &[Kind]) -> (Vec<Kind>, Vec<String>) {
    let missing = |k: Kind| match k {
        Kind::Haproxy => which("haproxy").is_none(),
        Kind::Nginx => which("nginx").is_none() || nginx_stream_module().is_none(),
        Kind::Postern => false,
    };
    let pkgs: Vec<&str> = want
        .iter()
        .filter(|k| missing(**k))
        .flat_map(|k| match k {
            Kind::Haproxy => vec!["haproxy"],
            Kind::Nginx => vec!["nginx", "libnginx-mod-stream"],
            Kind::Postern => vec![],
        })
        .collect();
    let mut notes = Vec::new();
    if !pkgs.is_empty() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 && which("apt-get").is_some() {
            eprintln!("installing {} with apt-get ...", pkgs.join(" "));
            let _ = Command::new("apt-get").args(["update", "-q"]).status();
            let _ = Command::new("apt-get")
                .args(["install", "-y", "-q"])
                .args(&pkgs)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status();
        } else {
            notes.push(format!(
                "not root (or no apt-get): install them with `sudo apt-get install -y {}`",
                pkgs.join(" ")
            ));
        }
    }
    let mut have = Vec::new();
    for k in want {
        if missing(*k) {
            notes.push(format!("{} not found: skipped", k.name()));
        } else {
            have.push(*k);
        }
    }
    (have, notes)
}

fn haproxy_config(s: &Setup, plain: SocketAddr, tls: SocketAddr) -> String {
    format!(
        "# The reference messenger's settings (tune.bufsize, timeouts, maxconn).
global
    nbthread {workers}
    maxconn 27500
    tune.bufsize 4096
    # This machine's open-file limit is below what maxconn 27500 needs: start anyway.
    no strict-limits
    ssl-default-bind-options ssl-min-ver TLSv1.2

defaults
    mode tcp
    maxconn 27500
    timeout connect 5s
    timeout client 200s
    timeout server 200s
    timeout client-fin 1s
    timeout server-fin 1s

frontend plain
    bind {plain}
    default_backend chat

frontend tls
    bind {tls} ssl crt {crt}
    default_backend chat

backend chat
    server s1 {up} check inter 60s
",
        workers = s.workers,
        crt = s.combined.display(),
        up = s.upstream,
    )
}

fn nginx_config(s: &Setup, plain: SocketAddr, tls: SocketAddr) -> String {
    format!(
        "load_module {module};
worker_processes {workers};
worker_rlimit_nofile 20000;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 19000; }}
stream {{
    proxy_connect_timeout 5s;
    proxy_timeout 200s;
    server {{
        listen {plain};
        proxy_pass {up};
    }}
    server {{
        listen {tls} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        proxy_pass {up};
    }}
}}
",
        module = nginx_stream_module().unwrap_or_default().display(),
        workers = s.workers,
        dir = s.dir.display(),
        cert = s.cert.display(),
        key = s.key.display(),
        up = s.upstream,
    )
}

fn wait_listening(addrs: &[SocketAddr], child: &mut Child, what: &str, log: &Path) -> Result<()> {
    let tail = || {
        let s = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    for a in addrs {
        while TcpStream::connect_timeout(a, Duration::from_millis(200)).is_err() {
            if let Some(st) = child.try_wait()? {
                bail!("{what} exited early ({st}); its log:\n{}", tail());
            }
            if Instant::now() > deadline {
                bail!("{what} did not listen on {a}; its log:\n{}", tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

impl Running {
    /// Starts a fresh relay of `kind`.
    pub fn start(kind: Kind, s: &Setup) -> Result<Running> {
        let (plain, tls) = (free_port()?, free_port()?);
        let log_path = s.dir.join(format!("{}.log", kind.name()));
        let log = std::fs::File::create(&log_path)?;
        let mut child = match kind {
            Kind::Haproxy => {
                let cfg = s.dir.join("haproxy.cfg");
                std::fs::write(&cfg, haproxy_config(s, plain, tls))?;
                Command::new(which("haproxy").context("haproxy")?)
                    .args(["-db", "-f"])
                    .arg(&cfg)
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()?
            }
            Kind::Nginx => {
                let cfg = s.dir.join("nginx.conf");
                std::fs::write(&cfg, nginx_config(s, plain, tls))?;
                Command::new(which("nginx").context("nginx")?)
                    .arg("-e")
                    .arg(s.dir.join("nginx-error.log"))
                    .arg("-p")
                    .arg(&s.dir)
                    .arg("-c")
                    .arg(&cfg)
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()?
            }
            Kind::Postern => {
                let mut c = Command::new(&s.postern);
                c.arg("relay")
                    .args(["--upstream", &s.upstream.to_string()])
                    .args(["--plain", &plain.to_string()])
                    .args(["--tls", &tls.to_string()])
                    .args([
                        "--no-stats",
                        "--send-proxy",
                        "none",
                        "--max-per-source",
                        "0",
                    ])
                    .arg("--tls-cert")
                    .arg(&s.cert)
                    .arg("--tls-key")
                    .arg(&s.key)
                    .args(&s.postern_args)
                    .env("TOKIO_WORKER_THREADS", s.workers.to_string())
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::piped())
                    .stderr(log);
                let mut child = c.spawn().context("postern binary")?;
                let out = child.stdout.take().context("stdout")?;
                // The shared ready-line wait; it keeps draining stdout afterwards.
                if let Err(e) = postern_test_kit::process::wait_ready(
                    out,
                    |l| (l.trim() == "relay ready").then_some(()),
                    postern_test_kit::process::READY_TIMEOUT,
                ) {
                    let _ = child.kill();
                    bail!("postern relay did not get ready: {e}");
                }
                child
            }
        };
        wait_listening(&[plain, tls], &mut child, kind.name(), &log_path)?;
        Ok(Running {
            kind,
            plain,
            tls,
            child,
        })
    }

    /// The relay's processes: the main one and its children (nginx workers).
    pub fn pids(&self) -> Vec<u32> {
        let root = self.child.id();
        let mut pids = vec![root];
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if stat_fields(pid).is_some_and(|f| f.ppid == root) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// Resident memory of all the relay's processes, bytes.
    pub fn rss(&self) -> u64 {
        self.pids().into_iter().map(rss_of).sum()
    }

    /// CPU time (user + system) of all the relay's processes, seconds.
    pub fn cpu(&self) -> f64 {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        self.pids()
            .into_iter()
            .filter_map(stat_fields)
            .map(|f| (f.utime + f.stime) as f64 / hz)
            .sum()
    }

    /// Stops the relay (SIGTERM, then SIGKILL) and waits for it.
    pub fn stop(mut self) {
        let pid = self.child.id() as i32;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Stat {
    ppid: u32,
    utime: u64,
    stime: u64,
}

fn stat_fields(pid: u32) -> Option<Stat> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): ppid is field 4, utime 14, stime 15.
    Some(Stat {
        ppid: f.get(1)?.parse().ok()?,
        utime: f.get(11)?.parse().ok()?,
        stime: f.get(12)?.parse().ok()?,
    })
}

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> Setup {
        Setup {
            dir: "/tmp/x".into(),
            upstream: "127.0.0.1:9000".parse().unwrap(),
            cert: "/tmp/x/cert.pem".into(),
            key: "/tmp/x/key.pem".into(),
            combined: "/tmp/x/both.pem".into(),
            workers: 2,
            postern: "postern".into(),
            postern_args: vec![],
        }
    }

    #[test]
    fn haproxy_has_reference_settings() {
        let c = haproxy_config(
            &setup(),
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        for want in [
            "tune.bufsize 4096",
            "maxconn 27500",
            "timeout connect 5s",
            "timeout client 200s",
            "timeout server 200s",
            "timeout client-fin 1s",
            "timeout server-fin 1s",
            "nbthread 2",
            "bind 127.0.0.1:2 ssl crt /tmp/x/both.pem",
            "server s1 127.0.0.1:9000",
        ] {
            assert!(c.contains(want), "{want}");
        }
    }

    #[test]
    fn nginx_has_plain_and_ssl() {
        let c = nginx_config(
            &setup(),
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        assert!(c.contains("worker_processes 2;"));
        assert!(c.contains("listen 127.0.0.1:1;"));
        assert!(c.contains("listen 127.0.0.1:2 ssl;"));
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        assert!(rss_of(me) > 0);
        assert!(stat_fields(me).is_some());
    }
}
