//! How the CLI prints messages and times.

use std::time::{Duration, UNIX_EPOCH};

/// `2026-11-22 14:03:07` (UTC) for a millisecond timestamp.
pub fn time(ms: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_string()
}
