//! Limits that keep one client (or one address, or one account) from exhausting the server.
//!
//! Per-address limits count by [`SourceKey`] (IPv4, IPv4-mapped IPv6 as IPv4, other IPv6
//! by /64), the definition shared with the relay in `postern_protocol::net`.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use postern_protocol::net::{SourceKey, TrustedProxies};

/// Every bound the server enforces. Defaults suit a single small node.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time allowed for the PROXY header and the Noise handshake together.
    pub handshake_timeout: Duration,
    /// A connection that sends nothing (not even a ping) for this long is closed.
    pub idle_timeout: Duration,
    /// A connection whose key is not a registered device must register within this time
    /// (from its first byte), else it is closed: unregistered connections cannot pile up.
    pub unregistered_timeout: Duration,
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
    /// Concurrent connections from one source address (IPv4 address or IPv6 /64); 0 = no
    /// limit.
    pub max_connections_per_source: usize,
    /// Ciphertexts in one message (one per recipient device).
    pub max_devices_per_message: usize,
    /// Peers (relays, load balancers) whose PROXY headers are believed. Empty: no one.
    pub trusted_proxies: TrustedProxies,
    /// Messages one account may send per minute.
    pub messages_per_minute: u32,
    /// Bytes of ciphertext one account may have waiting in recipients' queues.
    pub max_queued_bytes_per_account: u64,
    /// A queued message not delivered within this time is deleted and its sender told
    /// (a receipt with `expired`).
    pub queue_ttl: Duration,
    /// New messages are refused (`STORAGE_FULL`) while the data directory's file system
    /// has less than this many bytes free.
    pub min_free_disk: u64,
    /// Key claims one account may make per minute (`RATE_LIMITED` beyond).
    pub claims_per_requester_per_minute: u32,
    /// One-time keys of one user handed out per minute; further claims get the fallback
    /// key, so nobody can drain a user's one-time keys.
    pub claims_per_target_per_minute: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            unregistered_timeout: Duration::from_secs(30),
            max_queue_per_device: 10_000,
            registrations_per_minute: 10,
            max_one_time_keys: 100,
            low_one_time_keys: 10,
            max_connections: 16_000,
            max_connections_per_source: 512,
            max_devices_per_message: 16,
            trusted_proxies: TrustedProxies::default(),
            messages_per_minute: 600,
            max_queued_bytes_per_account: 256 * 1024 * 1024,
            queue_ttl: Duration::from_secs(30 * 24 * 3600),
            min_free_disk: 512 * 1024 * 1024,
            claims_per_requester_per_minute: 120,
            claims_per_target_per_minute: 30,
        }
    }
}

/// Addresses (or accounts) a limiter tracks at once.
pub const MAX_TRACKED: usize = 100_000;

/// Counts events per key in one-minute windows, in a table of bounded size.
///
/// When the table is full a new key evicts an existing entry instead of being refused:
/// a flood from more keys than the table holds can make the limiter forget some keys (so
/// they get a fresh allowance), but it never shuts the door for everyone. Expired windows
/// are swept by [`WindowLimiter::sweep`] on a timer, never rescanned per attempt.
pub struct WindowLimiter<K> {
    per_window: u32,
    window: Duration,
    capacity: usize,
    entries: Mutex<HashMap<K, (Instant, u32)>>,
}

impl<K: Hash + Eq + Clone> WindowLimiter<K> {
    pub fn new(per_window: u32, window: Duration) -> Self {
        Self::with_capacity(per_window, window, MAX_TRACKED)
    }

    pub fn with_capacity(per_window: u32, window: Duration, capacity: usize) -> Self {
        Self {
            per_window,
            window,
            capacity: capacity.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Returns true and counts the event if `key` is within its allowance now.
    pub fn allow(&self, key: K) -> bool {
        self.allow_at(key, Instant::now())
    }

    pub fn allow_at(&self, key: K, now: Instant) -> bool {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(&key) && map.len() >= self.capacity {
            // Full: make room by forgetting one entry (whichever the table yields first).
            if let Some(victim) = map.keys().next().cloned() {
                map.remove(&victim);
            }
        }
        let entry = map.entry(key).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        if entry.1 >= self.per_window {
            return false;
        }
        entry.1 += 1;
        true
    }

    /// Drops every window that has ended (called from a timer).
    pub fn sweep(&self) {
        self.sweep_at(Instant::now());
    }

    pub fn sweep_at(&self, now: Instant) {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, (start, _)| now.duration_since(*start) < self.window);
    }

    /// Keys tracked now.
    pub fn tracked(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Registrations per source address (by [`SourceKey`]) per minute.
pub struct RegistrationLimiter(WindowLimiter<SourceKey>);

impl RegistrationLimiter {
    pub fn new(per_minute: u32) -> Self {
        Self(WindowLimiter::new(per_minute, Duration::from_secs(60)))
    }

    /// Returns true and counts the attempt if `addr` may register now.
    pub fn allow(&self, addr: IpAddr) -> bool {
        self.0.allow(SourceKey::of(addr))
    }

    pub fn sweep(&self) {
        self.0.sweep()
    }
}

/// How often refusals are logged at most.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// What the server refused, for the logs (and tests): counted always, logged at most once
/// per [`REFUSAL_LOG_EVERY`] so a flood cannot flood the log too.
#[derive(Default)]
pub struct Refusals {
    pub server_full: AtomicU64,
    pub source_full: AtomicU64,
    pub unregistered_timeout: AtomicU64,
    pub untrusted_proxy_header: AtomicU64,
    last_logged: Mutex<Option<Instant>>,
}

impl Refusals {
    /// Counts one refusal in `counter` and logs the totals if none was logged lately.
    pub fn count(&self, counter: &AtomicU64, what: &str) {
        counter.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut last = self.last_logged.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < REFUSAL_LOG_EVERY) {
            return;
        }
        *last = Some(now);
        tracing::warn!(
            latest = what,
            server_full = self.server_full.load(Ordering::Relaxed),
            source_full = self.source_full.load(Ordering::Relaxed),
            unregistered_timeout = self.unregistered_timeout.load(Ordering::Relaxed),
            untrusted_proxy_header = self.untrusted_proxy_header.load(Ordering::Relaxed),
            "abuse limits hit: connections refused or PROXY headers ignored (totals since start)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_limits_then_resets() {
        let l = WindowLimiter::new(2, Duration::from_secs(60));
        let a = SourceKey::of("192.0.2.1".parse().unwrap());
        let b = SourceKey::of("192.0.2.2".parse().unwrap());
        let t = Instant::now();
        assert!(l.allow_at(a, t));
        assert!(l.allow_at(a, t));
        assert!(!l.allow_at(a, t));
        assert!(l.allow_at(b, t));
        assert!(l.allow_at(a, t + Duration::from_secs(61)));
    }

    /// Regression (issue 18, defect 3): with the table full of addresses, registration
    /// was shut for every new address for the rest of the minute.
    #[test]
    fn a_full_table_never_refuses_a_new_address() {
        let l = WindowLimiter::with_capacity(10, Duration::from_secs(60), 1000);
        let t = Instant::now();
        for i in 0..5000u32 {
            let key = SourceKey::of(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)));
            assert!(l.allow_at(key, t), "address {i} refused");
        }
        assert!(l.tracked() <= 1000, "the table stays bounded");
        let newcomer = SourceKey::of("203.0.113.9".parse().unwrap());
        assert!(l.allow_at(newcomer, t), "a new address is never refused");
        // The limit still holds for an address that keeps trying.
        for _ in 0..9 {
            assert!(l.allow_at(newcomer, t));
        }
        assert!(!l.allow_at(newcomer, t));
    }

    #[test]
    fn sweep_drops_ended_windows() {
        let l = WindowLimiter::new(1, Duration::from_secs(60));
        let t = Instant::now();
        for i in 0..100u32 {
            l.allow_at(i, t);
        }
        l.sweep_at(t + Duration::from_secs(30));
        assert_eq!(l.tracked(), 100);
        l.sweep_at(t + Duration::from_secs(61));
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn registrations_count_ipv6_by_64() {
        let l = RegistrationLimiter::new(1);
        assert!(l.allow("2001:db8:0:1::1".parse().unwrap()));
        assert!(!l.allow("2001:db8:0:1::2".parse().unwrap()), "same /64");
        assert!(!l.allow("2001:db8:0:1:ffff:ffff:ffff:ffff".parse().unwrap()));
        assert!(l.allow("2001:db8:0:2::1".parse().unwrap()));
        assert!(l.allow("192.0.2.1".parse().unwrap()));
        assert!(
            !l.allow("::ffff:192.0.2.1".parse().unwrap()),
            "mapped = IPv4"
        );
    }
}
