//! The disk high-water mark: new messages are refused while the data directory's file
//! system has less than `--min-free-disk` bytes free, so the disk never fills up under
//! the database (SQLite then fails writes, acknowledged data included, in ways no client
//! can act on). Refusal is clean: the sender gets `STORAGE_FULL` and keeps the message
//! pending; acknowledgements and deliveries, which free space, go on.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long one free-space reading is reused (statvfs is cheap, but not free per message).
const RECHECK: Duration = Duration::from_secs(1);

pub struct DiskGuard {
    dir: PathBuf,
    min_free: u64,
    last: Mutex<Option<(Instant, bool)>>,
}

impl DiskGuard {
    pub fn new(dir: PathBuf, min_free: u64) -> Self {
        Self {
            dir,
            min_free,
            last: Mutex::new(None),
        }
    }

    /// Bytes available to the server in the data directory's file system.
    pub fn free_bytes(&self) -> std::io::Result<u64> {
        free_bytes(&self.dir)
    }

    /// Whether there is room for new messages (re-read at most once a second).
    pub fn has_room(&self) -> bool {
        if self.min_free == 0 {
            return true;
        }
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, ok)) = *last {
            if now.duration_since(at) < RECHECK {
                return ok;
            }
        }
        let ok = match self.free_bytes() {
            Ok(free) => free >= self.min_free,
            Err(e) => {
                // Unknown: do not refuse on a failed measurement, but say so.
                tracing::warn!(error = %e, "cannot read free disk space");
                true
            }
        };
        if !ok {
            tracing::warn!(
                min_free = self.min_free,
                "disk space below the high-water mark: refusing new messages"
            );
        }
        *last = Some((now, ok));
        ok
    }
}

#[cfg(unix)]
fn free_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(not(unix))]
fn free_bytes(_dir: &std::path::Path) -> std::io::Result<u64> {
    Ok(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_below_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        assert!(DiskGuard::new(dir.path().into(), 1).has_room());
        assert!(!DiskGuard::new(dir.path().into(), u64::MAX).has_room());
        assert!(DiskGuard::new(dir.path().into(), 0).has_room());
        assert!(DiskGuard::new(dir.path().into(), 1).free_bytes().unwrap() > 0);
    }
}
