//! The server under test: a real `postern server run` process in a temporary data
//! directory, killed when the guard is dropped (also on error paths and panics).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use postern_protocol::network::NetworkFile;

/// How long `server run` may take to print its listening line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running server process; killed on drop.
pub struct ServerProcess {
    child: Child,
    /// Where clients connect (the port the server actually bound).
    pub address: String,
    /// The network file clients use: the server's key and `address`.
    pub network: NetworkFile,
    /// The server's log (stderr), for the error message if something goes wrong.
    pub log: PathBuf,
    /// Its data directory (`server.key` is there).
    pub data: PathBuf,
}

/// What a client task needs to reach the server (cheap to clone).
#[derive(Clone)]
pub struct Endpoint {
    pub address: String,
    pub network: NetworkFile,
}

impl ServerProcess {
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            address: self.address.clone(),
            network: self.network.clone(),
        }
    }

    /// Initialises a data directory under `dir` and starts the server on a free loopback
    /// port, waiting until it prints that it is listening.
    pub fn start(binary: &Path, dir: &Path, max_connections: usize) -> Result<Self> {
        Self::start_node(binary, dir, "server", max_connections, &[], None)
    }

    /// Like [`ServerProcess::start`] with the data directory `dir/name`, extra `server run`
    /// arguments (`--database URL`), and optionally the key of another node (`key_from`,
    /// a `server.key` file) so that several nodes are one service.
    pub fn start_node(
        binary: &Path,
        dir: &Path,
        name: &str,
        max_connections: usize,
        extra: &[String],
        key_from: Option<&Path>,
    ) -> Result<Self> {
        let data = dir.join(name);
        if let Some(key) = key_from {
            std::fs::create_dir_all(&data)
                .with_context(|| format!("cannot create {}", data.display()))?;
            std::fs::copy(key, data.join("server.key"))
                .with_context(|| format!("cannot copy {}", key.display()))?;
        }
        let init = Command::new(binary)
            .args(["server", "init", "--data"])
            .arg(&data)
            .args(["--public-address", "127.0.0.1:5222"])
            .output()
            .with_context(|| format!("cannot run {} server init", binary.display()))?;
        if !init.status.success() {
            bail!(
                "postern server init failed: {}",
                String::from_utf8_lossy(&init.stderr)
            );
        }
        let log = dir.join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut child = Command::new(binary)
            .args(["server", "run", "--data"])
            .arg(&data)
            .args(["--listen", "127.0.0.1:0"])
            .args(["--registrations-per-minute", "1000000"])
            .args(["--max-connections", &max_connections.to_string()])
            // Every benchmark client comes from 127.0.0.1: no per-address cap.
            .args(["--max-connections-per-source", "0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .with_context(|| format!("cannot start {} server run", binary.display()))?;
        let stdout = child.stdout.take().context("server stdout is not piped")?;
        // From here on the guard owns the child, so every early return kills it.
        let mut guard = Self {
            child,
            address: String::new(),
            network: NetworkFile::new("127.0.0.1:0", &[0; 32]),
            log,
            data: data.clone(),
        };
        // The shared ready-line wait (it keeps draining stdout afterwards).
        let ready = postern_test_kit::process::wait_ready(
            stdout,
            |l| {
                l.trim()
                    .strip_prefix("postern server listening on ")
                    .map(str::to_string)
            },
            READY_TIMEOUT,
        );
        let address = match ready {
            Ok((address, _)) => address,
            Err(e) => bail!(
                "the server did not report that it is listening: {e}; see {}",
                guard.log.display()
            ),
        };
        let base = NetworkFile::load(&data.join("network.toml"))?;
        let key = base
            .server_key()
            .map_err(|e| anyhow::anyhow!("network.toml: {e}"))?;
        guard.network = NetworkFile::new(address.clone(), &key);
        guard.address = address;
        Ok(guard)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the server process, in KiB (`VmRSS` in `/proc/PID/status`).
    pub fn rss_kib(&self) -> Result<u64> {
        rss_kib_of(self.pid())
    }

    /// CPU time (user + system) the server has used so far, in seconds.
    pub fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds(&self.pid().to_string())
    }

    /// Fails if the server has exited (it should run until we kill it).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the server exited ({status}); see {}", self.log.display());
        }
        Ok(())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finds the `postern` binary: `--postern PATH`, else `target/release/postern` next to
/// this benchmark's own executable.
pub fn locate_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let me = std::env::current_exe().context("cannot find the benchmark's own path")?;
    let candidate = me
        .parent()
        .map(|d| d.join("postern"))
        .context("the benchmark's path has no parent directory")?;
    if candidate.is_file() {
        Ok(candidate)
    } else {
        bail!(
            "{} not found: run `cargo build --release -p postern` first, or pass --postern PATH",
            candidate.display()
        )
    }
}

/// Resident memory of process `pid`, in KiB (`VmRSS` in `/proc/PID/status`).
pub fn rss_kib_of(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS line in {path}"))
}

/// CPU time (user + system) used so far by process `pid` ("self" for this one), seconds.
pub fn cpu_seconds(pid: &str) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // Fields after the parenthesised command name start with field 3 (state), so utime
    // (field 14) and stime (field 15) are at indexes 11 and 12.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("unexpected {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .with_context(|| format!("unexpected {path}"))
    };
    // Linux reports them in USER_HZ, which is 100 on every mainstream architecture.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}
