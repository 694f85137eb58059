//! Limits that keep one client (or one address) from exhausting the server.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Every bound the server enforces. Defaults suit a single small node.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time allowed for the PROXY header and the Noise handshake together.
    pub handshake_timeout: Duration,
    /// A connection that sends nothing (not even a ping) for this long is closed.
    pub idle_timeout: Duration,
    /// Messages waiting for one device before senders get `QUEUE_FULL`.
    pub max_queue_per_device: u32,
    /// New accounts per source address per minute.
    pub registrations_per_minute: u32,
    /// One-time keys the server stores per device.
    pub max_one_time_keys: u32,
    /// Below this many one-time keys the server asks the device for more.
    pub low_one_time_keys: u32,
    /// Concurrent connections; beyond this new connections are closed at once.
    pub max_connections: usize,
    /// Ciphertexts in one message (one per recipient device).
    pub max_devices_per_message: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_queue_per_device: 10_000,
            registrations_per_minute: 10,
            max_one_time_keys: 100,
            low_one_time_keys: 10,
            max_connections: 16_000,
            max_devices_per_message: 16,
        }
    }
}

/// Counts registrations per address in one-minute windows.
pub struct RegistrationLimiter {
    per_minute: u32,
    windows: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// Addresses tracked at once; past this, expired windows are swept.
const MAX_TRACKED: usize = 100_000;

impl RegistrationLimiter {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Returns true and counts the attempt if `addr` may register now.
    pub fn allow(&self, addr: IpAddr) -> bool {
        self.allow_at(addr, Instant::now())
    }

    fn allow_at(&self, addr: IpAddr, now: Instant) -> bool {
        let mut map = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TRACKED {
            map.retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(60));
            if map.len() >= MAX_TRACKED {
                // Under a flood from more addresses than we track, refuse rather than grow.
                return false;
            }
        }
        let entry = map.entry(addr).or_insert((now, 0));
        if now.duration_since(entry.0) >= Duration::from_secs(60) {
            *entry = (now, 0);
        }
        if entry.1 >= self.per_minute {
            return false;
        }
        entry.1 += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_limits_then_resets() {
        let l = RegistrationLimiter::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let t = Instant::now();
        assert!(l.allow_at(a, t));
        assert!(l.allow_at(a, t));
        assert!(!l.allow_at(a, t));
        assert!(l.allow_at(b, t));
        assert!(l.allow_at(a, t + Duration::from_secs(61)));
    }
}
