//! Which devices are online, so a new message or receipt can wake their connections.
//!
//! Two ways to tell a connection that something is waiting:
//!
//! * **A wake-up** ([`Hub::wake`], [`Hub::wake_receipts`]): a flag and a notification; the
//!   connection reads what is new from the database, from a cursor of its own. Every race is
//!   benign (a wake-up for something already sent reads nothing; nothing can be missed,
//!   because the queue is the source of truth), and delivery is the same code for online
//!   and offline recipients. PostgreSQL's nodes, expiry and reconnects use this.
//! * **A hand-over** ([`Hub::hand_over`]): the SQLite store's writer, the only writer of its
//!   file, gives each envelope and receipt it has just committed to the recipient's
//!   connections, in commit order, so the common push needs no database read (each read
//!   was a hand-off to a blocking thread and back). The connection skips what its cursor
//!   has passed, so a hand-over that overlaps a read sends nothing twice. A mailbox is
//!   bounded: past [`MAILBOX_ENVELOPES`] envelopes, [`MAILBOX_BYTES`] or
//!   [`MAILBOX_RECEIPTS`] receipts it is emptied and turned into a wake-up, and the
//!   connection reads from the database instead.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::delivery::{QueuedEnvelope, QueuedReceipt};

/// Envelopes a connection's mailbox holds before it falls back to reading the database.
pub const MAILBOX_ENVELOPES: usize = 64;
/// Receipts a connection's mailbox holds before it falls back to reading the database.
pub const MAILBOX_RECEIPTS: usize = 64;
/// Ciphertext bytes a connection's mailbox holds before it falls back to reading the
/// database.
pub const MAILBOX_BYTES: usize = 256 * 1024;

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
    /// What the store handed over since the connection last looked.
    mailbox: Mutex<Mailbox>,
}

/// Committed envelopes and receipts handed to one connection, oldest first.
#[derive(Default)]
pub struct Mailbox {
    pub envelopes: Vec<Arc<QueuedEnvelope>>,
    pub receipts: Vec<Arc<QueuedReceipt>>,
    /// Ciphertext bytes in `envelopes`.
    bytes: usize,
}

/// What a connection has to push, taken from its signal in one step.
pub struct Waiting {
    pub mailbox: Mailbox,
    /// Read new envelopes from the database.
    pub read_envelopes: bool,
    /// Read new receipts from the database.
    pub read_receipts: bool,
    pub keys_low: bool,
}

impl DeviceSignal {
    /// Takes the mailbox and the flags together: a mailbox that overflowed is emptied and
    /// flagged under the same lock, so nothing falls between the two.
    pub fn take(&self) -> Waiting {
        let mut mailbox = lock(&self.mailbox);
        Waiting {
            mailbox: std::mem::take(&mut *mailbox),
            read_envelopes: self.envelopes.swap(false, Ordering::AcqRel),
            read_receipts: self.receipts.swap(false, Ordering::AcqRel),
            keys_low: self.keys_low.swap(false, Ordering::AcqRel),
        }
    }
}

/// Something the store committed, for a device's connections.
pub enum HandOver {
    Envelope {
        device_id: i64,
        envelope: Arc<QueuedEnvelope>,
    },
    Receipt {
        device_id: i64,
        receipt: Arc<QueuedReceipt>,
    },
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

    /// Gives committed envelopes and receipts to the connections of their devices, in the
    /// order given (the order they were committed in), and wakes those connections. Offline
    /// devices get nothing here: they read their queue when they connect.
    pub fn hand_over(&self, items: impl IntoIterator<Item = HandOver>) {
        let online = self.lock();
        for item in items {
            let device_id = match &item {
                HandOver::Envelope { device_id, .. } | HandOver::Receipt { device_id, .. } => {
                    *device_id
                }
            };
            let Some(conns) = online.get(&device_id) else {
                continue;
            };
            for (_, s) in conns {
                {
                    let mut mailbox = lock(&s.mailbox);
                    match &item {
                        HandOver::Envelope { envelope, .. } => {
                            let bytes = mailbox.bytes + envelope.ciphertext.len();
                            if mailbox.envelopes.len() >= MAILBOX_ENVELOPES || bytes > MAILBOX_BYTES
                            {
                                // Too much waiting: the database has it all.
                                mailbox.envelopes = Vec::new();
                                mailbox.bytes = 0;
                                s.envelopes.store(true, Ordering::Release);
                            } else {
                                mailbox.envelopes.push(envelope.clone());
                                mailbox.bytes = bytes;
                            }
                        }
                        HandOver::Receipt { receipt, .. } => {
                            if mailbox.receipts.len() >= MAILBOX_RECEIPTS {
                                mailbox.receipts = Vec::new();
                                s.receipts.store(true, Ordering::Release);
                            } else {
                                mailbox.receipts.push(receipt.clone());
                            }
                        }
                    }
                }
                s.notify.notify_one();
            }
        }
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
        lock(&self.devices)
    }
}

/// A panic while holding the hub's locks cannot leave what they guard inconsistent (each
/// update is a single insert, remove or push), so a poisoned lock is safe to keep using.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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

    fn envelope(seq: i64, bytes: usize) -> HandOver {
        HandOver::Envelope {
            device_id: 7,
            envelope: Arc::new(QueuedEnvelope {
                seq,
                message_id: vec![seq as u8; 16],
                sender: "alice".into(),
                sender_device: 1,
                server_time_ms: 0,
                olm_type: 1,
                ciphertext: vec![0; bytes],
            }),
        }
    }

    #[tokio::test]
    async fn hand_over_fills_the_mailbox_in_order_and_take_empties_it() {
        let hub = Arc::new(Hub::default());
        hub.hand_over([envelope(1, 10)]); // offline: dropped, the queue has it
        let a = hub.join(7);
        hub.hand_over([envelope(2, 10), envelope(3, 10)]);
        hub.hand_over([HandOver::Receipt {
            device_id: 7,
            receipt: Arc::new(QueuedReceipt {
                seq: 9,
                message_id: vec![1; 16],
                recipient: "bob".into(),
                server_time_ms: 0,
                expired: false,
            }),
        }]);
        a.signal.notify.notified().await;
        let w = a.signal.take();
        let seqs: Vec<i64> = w.mailbox.envelopes.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [2, 3]);
        assert_eq!(w.mailbox.receipts.len(), 1);
        assert!(!w.read_envelopes && !w.read_receipts && !w.keys_low);
        let again = a.signal.take();
        assert!(again.mailbox.envelopes.is_empty() && again.mailbox.receipts.is_empty());
    }

    #[test]
    fn an_overflowing_mailbox_becomes_a_database_read() {
        let hub = Arc::new(Hub::default());
        let a = hub.join(7);
        hub.hand_over((0..MAILBOX_ENVELOPES as i64 + 1).map(|seq| envelope(seq, 10)));
        let w = a.signal.take();
        assert!(
            w.read_envelopes,
            "overflow must fall back to reading the queue"
        );
        assert!(w.mailbox.envelopes.len() <= 1);
        // By bytes too.
        hub.hand_over([
            envelope(1, MAILBOX_BYTES / 2),
            envelope(2, MAILBOX_BYTES / 2 + 1),
        ]);
        let w = a.signal.take();
        assert!(w.read_envelopes);
        assert!(w.mailbox.envelopes.is_empty());
    }
}
