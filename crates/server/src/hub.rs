//! Which devices are online, so a new message or receipt can wake their connections.
//!
//! The hub carries no data, only a wake-up: each connection keeps a cursor into its
//! device's queue and reads what is new from the database. That makes every race benign
//! (a wake-up for something already sent reads nothing; nothing can be missed because the
//! queue is the source of truth) and keeps delivery identical for online and offline
//! recipients.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// What a connection is woken for. The flags let it read only what changed.
#[derive(Default)]
pub struct DeviceSignal {
    pub notify: Notify,
    /// New envelopes are queued for the device.
    pub envelopes: AtomicBool,
    /// New delivery receipts are queued for the device.
    pub receipts: AtomicBool,
    /// Set when the device's one-time keys ran low and it should upload more.
    pub keys_low: AtomicBool,
}

/// Connections of each online device: (connection id, its signal).
type Online = HashMap<i64, Vec<(u64, Arc<DeviceSignal>)>>;

#[derive(Default)]
pub struct Hub {
    next_id: AtomicU64,
    devices: Mutex<Online>,
}

/// Keeps a connection registered in the hub; unregisters on drop.
pub struct Presence {
    hub: Arc<Hub>,
    device_id: i64,
    id: u64,
    pub signal: Arc<DeviceSignal>,
}

impl Hub {
    pub fn join(self: &Arc<Self>, device_id: i64) -> Presence {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let signal = Arc::new(DeviceSignal::default());
        self.lock()
            .entry(device_id)
            .or_default()
            .push((id, signal.clone()));
        Presence {
            hub: self.clone(),
            device_id,
            id,
            signal,
        }
    }

    /// Tells every connection of `device_id` that envelopes are waiting (no-op if the
    /// device is offline: it reads its queue when it connects).
    pub fn wake(&self, device_id: i64) {
        self.signal(device_id, |s| &s.envelopes);
    }

    /// Tells every connection of `device_id` that delivery receipts are waiting.
    pub fn wake_receipts(&self, device_id: i64) {
        self.signal(device_id, |s| &s.receipts);
    }

    pub fn keys_low(&self, device_id: i64) {
        self.signal(device_id, |s| &s.keys_low);
    }

    fn signal(&self, device_id: i64, flag: impl Fn(&DeviceSignal) -> &AtomicBool) {
        if let Some(conns) = self.lock().get(&device_id) {
            for (_, s) in conns {
                flag(s).store(true, Ordering::Release);
                s.notify.notify_one();
            }
        }
    }

    /// Tells every connection to re-read its queue and receipts (after wake-ups from other
    /// nodes may have been missed).
    pub fn wake_all(&self) {
        for conns in self.lock().values() {
            for (_, s) in conns {
                s.envelopes.store(true, Ordering::Release);
                s.receipts.store(true, Ordering::Release);
                s.notify.notify_one();
            }
        }
    }

    pub fn online_devices(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Online> {
        // A panic while holding this lock cannot leave the map inconsistent (each update is
        // a single insert or remove), so a poisoned lock is safe to keep using.
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        let mut map = self.hub.lock();
        if let Some(conns) = map.get_mut(&self.device_id) {
            conns.retain(|(id, _)| *id != self.id);
            if conns.is_empty() {
                map.remove(&self.device_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wake_reaches_every_connection_and_presence_cleans_up() {
        let hub = Arc::new(Hub::default());
        let a = hub.join(7);
        let b = hub.join(7);
        hub.wake(7);
        a.signal.notify.notified().await;
        b.signal.notify.notified().await;
        assert!(a.signal.envelopes.load(Ordering::Acquire));
        assert!(!a.signal.receipts.load(Ordering::Acquire));
        assert_eq!(hub.online_devices(), 1);
        drop(a);
        drop(b);
        assert_eq!(hub.online_devices(), 0);
        hub.wake(7); // offline: nothing to do
    }
}
