//! Connection limits: the global `maxconn` and the per-source-address concurrent limit.
//! Slots are RAII guards, released when the connection ends.

use postern_protocol::net::PerSource;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Shared counters for both limits.
#[derive(Debug)]
pub struct ConnLimiter {
    max: usize,
    total: AtomicUsize,
    sources: Arc<PerSource>,
}

/// One slot of `maxconn`.
#[derive(Debug)]
pub struct GlobalSlot(Arc<ConnLimiter>);

impl Drop for GlobalSlot {
    fn drop(&mut self) {
        self.0.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One slot of a source address's allowance (the shared implementation, which counts
/// IPv4-mapped addresses as IPv4 and IPv6 by /64).
pub use postern_protocol::net::SourceSlot;

impl ConnLimiter {
    /// `per_source == 0` disables the per-source limit.
    pub fn new(max: usize, per_source: usize) -> Arc<Self> {
        Arc::new(ConnLimiter {
            max,
            total: AtomicUsize::new(0),
            sources: PerSource::new(per_source),
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
        self.sources.try_acquire(ip)
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
        let v4: IpAddr = "192.0.2.9".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.9".parse().unwrap();
        let _v4 = l.try_source(v4).unwrap();
        assert!(
            l.try_source(mapped).is_none(),
            "mapped IPv4 counts as the IPv4 address"
        );
    }
}
