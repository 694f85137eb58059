//! Start a process and wait for its ready line.
//!
//! Services print a line when they are ready (`postern server listening on ADDR`,
//! `relay ready`); tests and benchmarks wait for that line instead of sleeping. This is the
//! one implementation of that wait: it reads stdout on a thread, hands back the lines
//! before the ready line, and keeps draining the rest so the process never blocks on a
//! full pipe.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a service gets to become ready by default (generous for a loaded CI machine).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a process did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("the process has no piped stdout (use Stdio::piped())")]
    NoStdout,
    #[error("the process exited before its ready line; lines it printed: {0:?}")]
    Exited(Vec<String>),
    #[error("no ready line within {timeout:?}; lines it printed: {lines:?}")]
    Timeout {
        timeout: Duration,
        lines: Vec<String>,
    },
}

/// Reads `stdout` until `is_ready` returns `Some` for a line (or `timeout` passes).
/// Returns that value and the lines printed before it; the rest of stdout is drained on
/// a background thread.
pub fn wait_ready<T: Send + 'static>(
    stdout: ChildStdout,
    mut is_ready: impl FnMut(&str) -> Option<T> + Send + 'static,
    timeout: Duration,
) -> Result<(T, Vec<String>), ReadyError> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut before = Vec::new();
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if let Some(v) = is_ready(&line) {
                let _ = tx.send(Ok((v, std::mem::take(&mut before))));
                // Keep draining so the process never blocks on a full pipe.
                for _ in lines.by_ref() {}
                return;
            }
            before.push(line);
        }
        let _ = tx.send(Err(before));
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(lines)) => Err(ReadyError::Exited(lines)),
        Err(_) => Err(ReadyError::Timeout {
            timeout,
            lines: Vec::new(),
        }),
    }
}

/// A running child process whose stderr is collected line by line. Killed when dropped.
pub struct ReadyProcess {
    child: Child,
    /// What the ready line said after the prefix (e.g. the address a server listens on).
    pub ready: String,
    /// The stdout lines before the ready line.
    pub before: Vec<String>,
    /// Everything the process wrote to stderr so far (its logs).
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl ReadyProcess {
    /// Spawns `cmd` (stdout and stderr piped, stdin closed) and waits for a stdout line
    /// starting with `prefix` (the whole line when `prefix` is the full ready line).
    /// Panics with the process's stderr if it does not get there: for tests.
    pub fn start(cmd: Command, prefix: &str) -> Self {
        let prefix = prefix.to_string();
        Self::try_start(cmd, move |l| {
            l.strip_prefix(prefix.as_str())
                .map(|r| r.trim().to_string())
        })
        .unwrap_or_else(|(e, stderr)| panic!("{e}\nits stderr:\n{}", stderr.join("\n")))
    }

    /// Like [`ReadyProcess::start`] with a matcher, returning the error (and the stderr
    /// collected until then) instead of panicking.
    pub fn try_start(
        mut cmd: Command,
        is_ready: impl FnMut(&str) -> Option<String> + Send + 'static,
    ) -> Result<Self, (ReadyError, Vec<String>)> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| {
            (
                ReadyError::Spawn {
                    program: format!("{:?}", cmd.get_program()),
                    source,
                },
                Vec::new(),
            )
        })?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(err) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            });
        }
        let collected = |stderr: &Arc<Mutex<Vec<String>>>| {
            // Give the stderr thread a moment to catch up with a process that just died.
            std::thread::sleep(Duration::from_millis(100));
            stderr.lock().unwrap_or_else(|p| p.into_inner()).clone()
        };
        let Some(out) = child.stdout.take() else {
            let _ = child.kill();
            return Err((ReadyError::NoStdout, Vec::new()));
        };
        match wait_ready(out, is_ready, READY_TIMEOUT) {
            Ok((ready, before)) => Ok(Self {
                child,
                ready,
                before,
                stderr,
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err((e, collected(&stderr)))
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stderr lines containing `needle`.
    pub fn stderr_lines(&self, needle: &str) -> Vec<String> {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL: the process gets no chance to flush anything.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits (at most [`READY_TIMEOUT`]) for the exit; returns whether it
    /// exited successfully (false if it had to be killed).
    pub fn terminate(mut self) -> bool {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !sent {
            return false;
        }
        let started = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if started.elapsed() < READY_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => return false,
            }
        }
    }

    /// Stops the process (SIGTERM) and returns all it wrote to stderr.
    pub fn stop_and_collect_stderr(self) -> String {
        let stderr = self.stderr.clone();
        self.terminate();
        // The stderr thread ends at EOF, right after the exit.
        let started = Instant::now();
        while Arc::strong_count(&stderr) > 1 && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let lines = stderr.lock().unwrap_or_else(|p| p.into_inner());
        lines.join("\n")
    }
}

impl Drop for ReadyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed (and reaped) when this is dropped, so a test that panics half-way
/// leaves nothing running: a browser left behind by a failed capture kept running and
/// took CPU from every later test and benchmark on the machine.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
