//! Connection limits: the global `maxconn` and the per-source-address concurrent limit.
//! Slots are RAII guards, released when the connection ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Shared counters for both limits.
#[derive(Debug)]
pub struct ConnLimiter {
    max: usize,
    per_source: usize,
    total: AtomicUsize,
    sources: Mutex<HashMap<IpAddr, usize>>,
}

/// One slot of `maxconn`.
#[derive(Debug)]
pub struct GlobalSlot(Arc<ConnLimiter>);

impl Drop for GlobalSlot {
    fn drop(&mut self) {
        self.0.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One slot of a source address's allowance.
#[derive(Debug)]
pub struct SourceSlot(Arc<ConnLimiter>, Option<IpAddr>);

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Some(key) = self.1 {
            let mut map = self.0.sources.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
    }
}

/// IPv4 addresses count individually; IPv6 addresses by /64 (one subscriber's prefix).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl ConnLimiter {
    /// `per_source == 0` disables the per-source limit.
    pub fn new(max: usize, per_source: usize) -> Arc<Self> {
        Arc::new(ConnLimiter {
            max,
            per_source,
            total: AtomicUsize::new(0),
            sources: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a global slot, or `None` when `maxconn` connections are open.
    pub fn try_global(self: &Arc<Self>) -> Option<GlobalSlot> {
        let mut cur = self.total.load(Ordering::Acquire);
        loop {
            if cur >= self.max {
                return None;
            }
            match self
                .total
                .compare_exchange(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(GlobalSlot(self.clone())),
                Err(now) => cur = now,
            }
        }
    }

    /// Takes a slot for `ip`, or `None` when that source already has its maximum open.
    pub fn try_source(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        if self.per_source == 0 {
            return Some(SourceSlot(self.clone(), None));
        }
        let key = source_key(ip);
        let mut map = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(key).or_insert(0);
        if *n >= self.per_source {
            return None;
        }
        *n += 1;
        Some(SourceSlot(self.clone(), Some(key)))
    }

    /// Connections currently open.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_release() {
        let l = ConnLimiter::new(2, 1);
        let a = l.try_global().unwrap();
        let _b = l.try_global().unwrap();
        assert!(l.try_global().is_none());
        drop(a);
        assert!(l.try_global().is_some());
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let same64: IpAddr = "2001:db8::ffff".parse().unwrap();
        let s = l.try_source(ip).unwrap();
        assert!(l.try_source(same64).is_none());
        assert!(l.try_source("192.0.2.1".parse().unwrap()).is_some());
        drop(s);
        assert!(l.try_source(same64).is_some());
    }
}
