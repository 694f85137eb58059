//! Durable server state, behind one interface with two backends:
//!
//! * [`sqlite`] (the default): one embedded file, one server process.
//! * [`postgres`]: PostgreSQL, which several server nodes may share; they wake each
//!   other's connections through `LISTEN/NOTIFY`. [`sharded`] spreads accounts over
//!   several such databases by a hash of the username ([`placement`]).
//!
//! Both keep the same promise: every write that the protocol acknowledges is committed
//! first, so an acknowledged message survives a crash, and a crash in the middle of an
//! operation leaves no half-written state. Both **group commit**: a writer (one OS thread
//! for SQLite, a few tasks per node for PostgreSQL) runs each waiting write in its own savepoint
//! inside one transaction, commits once, and only then answers each caller. Reads never wait for the writer.
//!
//! **Why an enum and not a trait object.** Every operation is an `async fn`; a
//! `dyn Trait` of them needs `async-trait` (a boxed future and an allocation per call, and
//! `Send` bounds spelled out by hand), and a generic `Server<S: Store>` would spread a type
//! parameter through the connection code. There are exactly two backends, chosen at start
//! from `--database`, so [`Store`] is a cheap-to-clone handle over an enum of them whose
//! methods forward to the backend; both backends implement the same inherent methods with
//! the same signatures, and the test-suite below runs against each.

use std::path::Path;
use std::sync::Arc;

use crate::hub::Hub;
use crate::ServerError;

pub mod placement;
pub mod postgres;
pub mod reshard;
pub mod sharded;
pub mod sqlite;

pub use crate::delivery::{QueuedEnvelope, QueuedReceipt};
pub use postgres::PgStore;
pub use sharded::PgShards;
pub use sqlite::SqliteStore;

/// A device known to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub device_id: i64,
    pub account_id: i64,
    pub username: String,
}

/// A key plus its Ed25519 signature, as uploaded by the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedKey {
    pub public_key: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Public keys handed to a device that wants to start a session.
#[derive(Debug, Clone)]
pub struct DeviceBundle {
    pub device_id: i64,
    pub curve25519: Vec<u8>,
    pub ed25519: Vec<u8>,
    pub key: Option<SignedKey>,
    pub is_fallback: bool,
}

/// One ciphertext addressed to one device.
#[derive(Debug, Clone)]
pub struct OutgoingCiphertext {
    pub device_id: i64,
    pub olm_type: u32,
    pub body: Vec<u8>,
}

/// Result of registering an account.
#[derive(Debug)]
pub enum RegisterOutcome {
    Registered(DeviceRecord),
    UsernameTaken,
    DeviceAlreadyRegistered,
}

/// Result of queueing a message.
#[derive(Debug)]
pub enum EnqueueOutcome {
    /// Stored (or already stored under this id): acknowledge. The recipient's devices (the
    /// store has told this node's connections; see [`Store`]).
    Accepted {
        server_time_ms: u64,
        recipient_devices: Vec<i64>,
    },
    UnknownRecipient,
    /// The ciphertexts do not match the recipient's current device list.
    DevicesChanged,
    QueueFull,
    /// The sender's account already has its byte quota waiting in queues.
    OverQuota,
}

/// Per-sender bounds checked inside the enqueue transaction.
#[derive(Debug, Clone, Copy)]
pub struct EnqueueLimits {
    /// Messages waiting for one device.
    pub max_queue: u32,
    /// Bytes of ciphertext the sender's account may have waiting in all queues.
    pub max_queued_bytes: u64,
}

/// Writes committed together at most.
pub const MAX_BATCH: usize = 256;

/// Whether `ciphertexts` address each of the recipient's `devices` exactly once (both
/// stores refuse a message otherwise: the sender's view of the devices is out of date).
fn addresses_every_device(ciphertexts: &[OutgoingCiphertext], devices: &[i64]) -> bool {
    let mut addressed: Vec<i64> = ciphertexts.iter().map(|c| c.device_id).collect();
    addressed.sort_unstable();
    addressed.dedup();
    addressed == devices && addressed.len() == ciphertexts.len()
}

fn now_ms() -> i64 {
    postern_protocol::now_ms() as i64
}

#[derive(Clone)]
enum Backend {
    Sqlite(SqliteStore),
    Postgres(PgShards),
}

/// Handle to the database; cheap to clone.
///
/// It also tells this node's connections what it committed for them: the SQLite store
/// hands each envelope and receipt to the hub from its writer thread; for PostgreSQL the
/// handle wakes the connections, which read from the database (other nodes learn of it
/// through `LISTEN/NOTIFY`).
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    hub: Arc<Hub>,
}

/// Where the data lives, as given to `postern server run --database`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// The SQLite file in the data directory (the default).
    Sqlite,
    /// One or more `postgres://…` (or `postgresql://…`) URLs, in shard order: accounts
    /// are spread across them by a hash of the username.
    Postgres(Vec<String>),
}

impl Database {
    /// Parses `--database`: `sqlite` or a `postgres://` / `postgresql://` URL.
    pub fn parse(s: &str) -> Result<Self, ServerError> {
        Self::parse_all(&[s])
    }

    /// Parses every `--database` given: `sqlite` alone, or one or more PostgreSQL URLs
    /// (the shards, in the order every node must use).
    pub fn parse_all<S: AsRef<str>>(given: &[S]) -> Result<Self, ServerError> {
        let given: Vec<&str> = given.iter().map(|s| s.as_ref().trim()).collect();
        if given.is_empty() || given == ["sqlite"] {
            return Ok(Database::Sqlite);
        }
        let mut urls = Vec::with_capacity(given.len());
        for s in given {
            if s == "sqlite" {
                return Err(ServerError::Config(
                    "--database sqlite cannot be combined with PostgreSQL databases: \
                     give `sqlite` alone, or only postgres:// URLs (one per shard)"
                        .into(),
                ));
            }
            if !(s.starts_with("postgres://") || s.starts_with("postgresql://")) {
                return Err(ServerError::Config(format!(
                    "--database {s:?}: give `sqlite` or a postgres://USER@HOST/DB URL"
                )));
            }
            if urls.contains(&s.to_string()) {
                return Err(ServerError::Config(format!(
                    "--database {s:?} is given twice: each shard is a different database"
                )));
            }
            urls.push(s.to_string());
        }
        Ok(Database::Postgres(urls))
    }
}

/// Calls the backend's method of the same name. PostgreSQL's futures (sqlx's query
/// machinery, inlined) are several KiB, and a future's size is paid by every task that
/// may await it, for the task's whole life, busy or idle: each connection's tasks did.
/// Boxed, that memory is taken only while a call runs.
macro_rules! forward {
    ($self:ident, $s:ident => $call:expr) => {
        match &$self.backend {
            Backend::Sqlite($s) => $call.await,
            Backend::Postgres($s) => Box::pin($call).await,
        }
    };
}

impl Store {
    /// Opens (creating if needed) the SQLite database file, applies pending migrations and
    /// starts the writer thread, which hands what it commits to `hub`'s connections.
    pub async fn open(path: &Path, hub: Arc<Hub>) -> Result<Self, ServerError> {
        Ok(Self {
            backend: Backend::Sqlite(SqliteStore::open(path, hub.clone()).await?),
            hub,
        })
    }

    /// Connects to PostgreSQL at `url`, applies pending migrations, starts the writer task
    /// and the listener that wakes `hub`'s connections for writes made by other nodes.
    pub async fn open_postgres(url: &str, hub: Arc<Hub>) -> Result<Self, ServerError> {
        Self::open_shards(&[url.to_string()], hub).await
    }

    /// Like [`Store::open_postgres`] for each of `urls`, with accounts sharded across
    /// them; every node must be given the same URLs in the same order.
    pub async fn open_shards(urls: &[String], hub: Arc<Hub>) -> Result<Self, ServerError> {
        Ok(Self {
            backend: Backend::Postgres(PgShards::open(urls, hub.clone()).await?),
            hub,
        })
    }

    /// Opens what `database` names (`sqlite_path` for the embedded store).
    pub async fn open_database(
        database: &Database,
        sqlite_path: &Path,
        hub: Arc<Hub>,
    ) -> Result<Self, ServerError> {
        match database {
            Database::Sqlite => Self::open(sqlite_path, hub).await,
            Database::Postgres(urls) => Self::open_shards(urls, hub).await,
        }
    }

    /// Waits until every write submitted so far is committed, then closes the database.
    pub async fn close(&self) {
        forward!(self, s => s.close())
    }

    pub async fn device_by_noise_key(
        &self,
        noise_key: &[u8],
    ) -> Result<Option<DeviceRecord>, ServerError> {
        forward!(self, s => s.device_by_noise_key(noise_key))
    }

    /// Creates an account with its first device and keys, atomically.
    pub async fn register(
        &self,
        username: &str,
        noise_key: &[u8],
        curve25519: &[u8],
        ed25519: &[u8],
        one_time_keys: &[SignedKey],
        fallback: Option<&SignedKey>,
    ) -> Result<RegisterOutcome, ServerError> {
        forward!(self, s => s
        .register(username, noise_key, curve25519, ed25519, one_time_keys, fallback)
        )
    }

    /// One-time keys left for `device_id`, a device of `owner`'s account.
    pub async fn one_time_key_count(
        &self,
        owner: &str,
        device_id: i64,
    ) -> Result<u32, ServerError> {
        match &self.backend {
            Backend::Sqlite(s) => s.one_time_key_count(device_id).await,
            Backend::Postgres(s) => Box::pin(s.one_time_key_count(owner, device_id)).await,
        }
    }

    /// `device_id` (of `owner`'s account) is running out of one-time keys: on PostgreSQL,
    /// tells the other nodes, so the one it is connected to asks it for more. (Each node
    /// wakes its own connections through its hub.)
    pub async fn keys_low(&self, owner: &str, device_id: i64) -> Result<(), ServerError> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Postgres(s) => Box::pin(s.keys_low(owner, device_id)).await,
        }
    }

    /// Adds one-time keys (and optionally replaces the fallback key); returns the new count,
    /// or `None` if the device would hold more than `max_keys`.
    pub async fn upload_keys(
        &self,
        device: &DeviceRecord,
        one_time_keys: &[SignedKey],
        fallback: Option<&SignedKey>,
        max_keys: u32,
    ) -> Result<Option<u32>, ServerError> {
        match &self.backend {
            Backend::Sqlite(s) => {
                s.upload_keys(device.device_id, one_time_keys, fallback, max_keys)
                    .await
            }
            Backend::Postgres(s) => {
                Box::pin(s.upload_keys(device, one_time_keys, fallback, max_keys)).await
            }
        }
    }

    /// Hands out one key per device of `username` (see [`SqliteStore::claim_keys`]).
    pub async fn claim_keys(
        &self,
        username: &str,
        one_time: bool,
    ) -> Result<Option<Vec<DeviceBundle>>, ServerError> {
        forward!(self, s => s.claim_keys(username, one_time))
    }

    /// Writes one message to the recipient devices' queues; idempotent per message id.
    pub async fn enqueue(
        &self,
        sender: &DeviceRecord,
        recipient: &str,
        message_id: &[u8],
        ciphertexts: &[OutgoingCiphertext],
        limits: EnqueueLimits,
    ) -> Result<EnqueueOutcome, ServerError> {
        let outcome =
            forward!(self, s => s.enqueue(sender, recipient, message_id, ciphertexts, limits))?;
        if let (
            Backend::Postgres(_),
            EnqueueOutcome::Accepted {
                recipient_devices, ..
            },
        ) = (&self.backend, &outcome)
        {
            for d in recipient_devices {
                self.hub.wake(*d);
            }
        }
        Ok(outcome)
    }

    /// Envelopes for `device` after queue position `after_seq`, oldest first.
    pub async fn pending(
        &self,
        device: &DeviceRecord,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<QueuedEnvelope>, ServerError> {
        match &self.backend {
            Backend::Sqlite(s) => s.pending(device.device_id, after_seq, limit).await,
            Backend::Postgres(s) => Box::pin(s.pending(device, after_seq, limit)).await,
        }
    }

    /// The recipient stored the message: delete it and queue a receipt for the sender's
    /// device. Returns that device (already told, see [`Store`]), or `None` for a repeated
    /// acknowledgement.
    pub async fn ack_message(
        &self,
        device: &DeviceRecord,
        message_id: &[u8],
    ) -> Result<Option<i64>, ServerError> {
        let sender_device = forward!(self, s => s.ack_message(device, message_id))?;
        if let (Backend::Postgres(_), Some(d)) = (&self.backend, sender_device) {
            self.hub.wake_receipts(d);
        }
        Ok(sender_device)
    }

    pub async fn pending_receipts(
        &self,
        device: &DeviceRecord,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<QueuedReceipt>, ServerError> {
        match &self.backend {
            Backend::Sqlite(s) => s.pending_receipts(device.device_id, after_seq, limit).await,
            Backend::Postgres(s) => Box::pin(s.pending_receipts(device, after_seq, limit)).await,
        }
    }

    /// Deletes up to `limit` queued messages older than `before_ms` and queues an
    /// `expired` receipt for each sender's device; returns the sender devices to wake.
    pub async fn expire(&self, before_ms: u64, limit: u32) -> Result<Vec<i64>, ServerError> {
        forward!(self, s => s.expire(before_ms, limit))
    }

    pub async fn ack_receipt(
        &self,
        device: &DeviceRecord,
        message_id: &[u8],
    ) -> Result<(), ServerError> {
        match &self.backend {
            Backend::Sqlite(s) => s.ack_receipt(device.device_id, message_id).await,
            Backend::Postgres(s) => Box::pin(s.ack_receipt(device, message_id)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim(max_queue: u32) -> EnqueueLimits {
        EnqueueLimits {
            max_queue,
            max_queued_bytes: u64::MAX,
        }
    }

    fn key(b: u8) -> SignedKey {
        SignedKey {
            public_key: vec![b; 32],
            signature: vec![b; 64],
        }
    }

    /// The same test-suite against each backend: `sqlite::NAME` and `postgres::NAME`
    /// (a real PostgreSQL, started once per test process, a fresh database per test).
    macro_rules! on_both_backends {
        ($($name:ident),* $(,)?) => {
            mod sqlite {
                $(
                    #[tokio::test]
                    async fn $name() {
                        let dir = tempfile::tempdir().unwrap();
                        let hub = std::sync::Arc::new(crate::hub::Hub::default());
                        let s = super::Store::open(&dir.path().join("t.db"), hub).await.unwrap();
                        super::$name(s).await;
                    }
                )*
            }
            mod postgres {
                $(
                    #[tokio::test]
                    async fn $name() {
                        let url = postern_test_kit::postgres::Postgres::shared().fresh_database();
                        let hub = std::sync::Arc::new(crate::hub::Hub::default());
                        let s = super::Store::open_postgres(&url, hub).await.unwrap();
                        super::$name(s).await;
                    }
                )*
            }
            /// Three shards: alice, bob and carol each live in another database
            /// (see `the_suite_s_users_live_in_different_shards`).
            mod sharded {
                $(
                    #[tokio::test]
                    async fn $name() {
                        let s = super::sharded_store(3).await;
                        super::$name(s).await;
                    }
                )*
            }
        };
    }

    on_both_backends!(
        usernames_and_devices_are_unique,
        one_time_keys_are_handed_out_once_then_fallback,
        queue_ack_and_receipt_cycle,
        concurrent_writes_are_committed_in_batches_and_isolated,
        enqueue_rejects_bad_addressing_and_full_queues,
        expired_messages_leave_the_queue_and_tell_the_sender,
        a_sender_over_its_byte_quota_is_refused_but_retries_are_not
    );

    /// The SQLite writer hands what it commits to the online devices' connections, in
    /// commit order and with the queue's positions, and nothing for what it refused or
    /// already had.
    #[tokio::test]
    async fn sqlite_hands_committed_envelopes_and_receipts_to_online_connections() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Arc::new(crate::hub::Hub::default());
        let s = Store::open(&dir.path().join("t.db"), hub.clone())
            .await
            .unwrap();
        let (alice, bob, ct) = alice_bob(&s, 40).await;
        let carol = register(&s, "carol", 3, &[]).await;
        // Queued while Bob is offline: in the queue only.
        for id in [b"old-1", b"old-2", b"old-3"] {
            s.enqueue(&carol, "bob", id, &ct, lim(5)).await.unwrap();
        }
        let before = s.pending(&bob, 0, 10).await.unwrap();
        let (alice_online, bob_online) = (hub.join(alice.device_id), hub.join(bob.device_id));
        // Alice's first message also creates her quota row: the queue's position must
        // still be the queue row's.
        for id in [b"id-1", b"id-2"] {
            s.enqueue(&alice, "bob", id, &ct, lim(5)).await.unwrap();
        }
        let handed = bob_online.signal.take();
        assert!(!handed.read_envelopes, "no database read needed");
        let queued = s.pending(&bob, before[2].seq, 10).await.unwrap();
        let got: Vec<(i64, &[u8], &[u8])> = handed
            .mailbox
            .envelopes
            .iter()
            .map(|e| (e.seq, &e.message_id[..], &e.ciphertext[..]))
            .collect();
        let want: Vec<(i64, &[u8], &[u8])> = queued
            .iter()
            .map(|e| (e.seq, &e.message_id[..], &e.ciphertext[..]))
            .collect();
        assert_eq!(got, want);
        // A retry (already queued) and a refusal (queue full) hand nothing over.
        s.enqueue(&alice, "bob", b"id-1", &ct, lim(5))
            .await
            .unwrap();
        assert!(matches!(
            s.enqueue(&alice, "bob", b"id-3", &ct, lim(5))
                .await
                .unwrap(),
            EnqueueOutcome::QueueFull
        ));
        assert!(bob_online.signal.take().mailbox.envelopes.is_empty());
        // The receipt goes to the sender's connection.
        s.ack_message(&bob, b"id-1").await.unwrap();
        let receipts = alice_online.signal.take().mailbox.receipts;
        let stored = s.pending_receipts(&alice, 0, 10).await.unwrap();
        assert_eq!(receipts.len(), 1);
        assert_eq!(receipts[0].seq, stored[0].seq);
        assert_eq!(receipts[0].recipient, "bob");
        assert_eq!(receipts[0].message_id, b"id-1");
    }

    async fn sharded_store(count: usize) -> Store {
        let pg = postern_test_kit::postgres::Postgres::shared();
        let urls: Vec<String> = (0..count).map(|_| pg.fresh_database()).collect();
        let hub = Arc::new(crate::hub::Hub::default());
        Store::open_shards(&urls, hub).await.unwrap()
    }

    #[test]
    fn the_suite_s_users_live_in_different_shards() {
        let shards: Vec<usize> = ["alice", "bob", "carol"]
            .iter()
            .map(|u| placement::shard_of(u, 3))
            .collect();
        assert_eq!(
            shards,
            vec![1, 0, 2],
            "every message in the suite crosses shards"
        );
    }

    #[test]
    fn database_flags_parse_to_one_store() {
        assert_eq!(Database::parse_all::<&str>(&[]).unwrap(), Database::Sqlite);
        assert_eq!(Database::parse_all(&["sqlite"]).unwrap(), Database::Sqlite);
        let two = ["postgres://a@h/one", "postgresql://a@h/two"];
        assert_eq!(
            Database::parse_all(&two).unwrap(),
            Database::Postgres(two.iter().map(|s| s.to_string()).collect())
        );
        for bad in [
            &["sqlite", "postgres://a@h/one"][..],
            &["postgres://a@h/one", "postgres://a@h/one"],
            &["mysql://a@h/one"],
        ] {
            let e = Database::parse_all(bad).unwrap_err().to_string();
            assert!(e.contains("--database"), "{e}");
        }
    }

    async fn register(s: &Store, name: &str, noise: u8, otks: &[SignedKey]) -> DeviceRecord {
        match s
            .register(name, &[noise; 32], &[1; 32], &[2; 32], otks, Some(&key(99)))
            .await
            .unwrap()
        {
            RegisterOutcome::Registered(d) => d,
            other => panic!("{other:?}"),
        }
    }

    async fn usernames_and_devices_are_unique(s: Store) {
        register(&s, "alice", 1, &[]).await;
        assert!(matches!(
            s.register("alice", &[2; 32], &[1; 32], &[2; 32], &[], None)
                .await
                .unwrap(),
            RegisterOutcome::UsernameTaken
        ));
        assert!(matches!(
            s.register("bob", &[1; 32], &[1; 32], &[2; 32], &[], None)
                .await
                .unwrap(),
            RegisterOutcome::DeviceAlreadyRegistered
        ));
    }

    async fn one_time_keys_are_handed_out_once_then_fallback(s: Store) {
        let bob = register(&s, "bob", 1, &[key(10), key(11)]).await;
        let mut seen = Vec::new();
        for _ in 0..2 {
            let b = s.claim_keys("bob", true).await.unwrap().unwrap();
            assert!(!b[0].is_fallback);
            seen.push(b[0].key.clone().unwrap().public_key);
        }
        seen.sort();
        assert_eq!(seen, vec![vec![10; 32], vec![11; 32]]);
        let b = s.claim_keys("bob", true).await.unwrap().unwrap();
        assert!(b[0].is_fallback);
        assert_eq!(b[0].key.as_ref().unwrap().public_key, vec![99; 32]);
        assert_eq!(
            s.one_time_key_count(&bob.username, bob.device_id)
                .await
                .unwrap(),
            0
        );
        assert!(s.claim_keys("nobody", true).await.unwrap().is_none());
        assert_eq!(
            s.upload_keys(&bob, &[key(12)], None, 1).await.unwrap(),
            Some(1)
        );
        assert_eq!(
            s.upload_keys(&bob, &[key(13)], None, 1).await.unwrap(),
            None
        );
    }

    async fn queue_ack_and_receipt_cycle(s: Store) {
        let alice = register(&s, "alice", 1, &[]).await;
        let bob = register(&s, "bob", 2, &[]).await;
        let ct = vec![OutgoingCiphertext {
            device_id: bob.device_id,
            olm_type: 0,
            body: b"ciphertext".to_vec(),
        }];
        for _ in 0..2 {
            // The retry with the same id is accepted without a duplicate.
            assert!(matches!(
                s.enqueue(&alice, "bob", b"id-1", &ct, lim(10))
                    .await
                    .unwrap(),
                EnqueueOutcome::Accepted { .. }
            ));
        }
        let p = s.pending(&bob, 0, 10).await.unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].sender, "alice");
        assert_eq!(
            s.ack_message(&bob, b"id-1").await.unwrap(),
            Some(alice.device_id)
        );
        assert_eq!(s.ack_message(&bob, b"id-1").await.unwrap(), None);
        assert!(s.pending(&bob, 0, 10).await.unwrap().is_empty());
        let r = s.pending_receipts(&alice, 0, 10).await.unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].recipient, "bob");
        s.ack_receipt(&alice, b"id-1").await.unwrap();
        assert!(s.pending_receipts(&alice, 0, 10).await.unwrap().is_empty());
    }

    async fn concurrent_writes_are_committed_in_batches_and_isolated(s: Store) {
        let alice = register(&s, "alice", 1, &[]).await;
        let bob = register(&s, "bob", 2, &[]).await;
        let mut tasks = Vec::new();
        for i in 0..300u32 {
            let (s, alice) = (s.clone(), alice.clone());
            let ct = vec![OutgoingCiphertext {
                device_id: bob.device_id,
                olm_type: 1,
                body: i.to_be_bytes().to_vec(),
            }];
            tasks.push(tokio::spawn(async move {
                s.enqueue(&alice, "bob", &i.to_be_bytes(), &ct, lim(10_000))
                    .await
            }));
        }
        // A write that fails inside a batch (a duplicate device key violates a UNIQUE
        // constraint) does not undo its neighbours.
        let taken = s
            .register("carol", &[2; 32], &[1; 32], &[2; 32], &[], None)
            .await
            .unwrap();
        assert!(matches!(taken, RegisterOutcome::DeviceAlreadyRegistered));
        for t in tasks {
            assert!(matches!(
                t.await.unwrap().unwrap(),
                EnqueueOutcome::Accepted { .. }
            ));
        }
        assert_eq!(s.pending(&bob, 0, 1000).await.unwrap().len(), 300);
        s.close().await;
    }

    async fn enqueue_rejects_bad_addressing_and_full_queues(s: Store) {
        let alice = register(&s, "alice", 1, &[]).await;
        let bob = register(&s, "bob", 2, &[]).await;
        let ct = |dev| {
            vec![OutgoingCiphertext {
                device_id: dev,
                olm_type: 1,
                body: vec![1],
            }]
        };
        assert!(matches!(
            s.enqueue(&alice, "carol", b"x", &ct(bob.device_id), lim(10))
                .await
                .unwrap(),
            EnqueueOutcome::UnknownRecipient
        ));
        assert!(matches!(
            s.enqueue(&alice, "bob", b"x", &ct(alice.device_id), lim(10))
                .await
                .unwrap(),
            EnqueueOutcome::DevicesChanged
        ));
        s.enqueue(&alice, "bob", b"1", &ct(bob.device_id), lim(1))
            .await
            .unwrap();
        assert!(matches!(
            s.enqueue(&alice, "bob", b"2", &ct(bob.device_id), lim(1))
                .await
                .unwrap(),
            EnqueueOutcome::QueueFull
        ));
    }

    /// Alice and Bob registered, and a ciphertext of `len` bytes for Bob's device.
    async fn alice_bob(
        s: &Store,
        len: usize,
    ) -> (DeviceRecord, DeviceRecord, Vec<OutgoingCiphertext>) {
        let alice = register(s, "alice", 1, &[]).await;
        let bob = register(s, "bob", 2, &[]).await;
        let ct = vec![OutgoingCiphertext {
            device_id: bob.device_id,
            olm_type: 1,
            body: vec![7; len],
        }];
        (alice, bob, ct)
    }

    async fn expired_messages_leave_the_queue_and_tell_the_sender(s: Store) {
        let (alice, bob, ct) = alice_bob(&s, 10).await;
        s.enqueue(&alice, "bob", b"old", &ct, lim(10))
            .await
            .unwrap();
        assert!(
            s.expire(0, 100).await.unwrap().is_empty(),
            "nothing that old"
        );
        let wake = s.expire(u64::MAX / 2, 100).await.unwrap();
        assert_eq!(wake, vec![alice.device_id]);
        assert!(s.pending(&bob, 0, 10).await.unwrap().is_empty());
        let r = s.pending_receipts(&alice, 0, 10).await.unwrap();
        assert_eq!(r.len(), 1);
        assert!(r[0].expired);
        assert_eq!(r[0].recipient, "bob");
        assert_eq!(r[0].message_id, b"old");
    }

    async fn a_sender_over_its_byte_quota_is_refused_but_retries_are_not(s: Store) {
        let (alice, bob, ct) = alice_bob(&s, 600).await;
        let l = EnqueueLimits {
            max_queue: 100,
            max_queued_bytes: 1000,
        };
        assert!(matches!(
            s.enqueue(&alice, "bob", b"1", &ct, l).await.unwrap(),
            EnqueueOutcome::Accepted { .. }
        ));
        // The same message again (a retry after a lost answer) is still accepted.
        assert!(matches!(
            s.enqueue(&alice, "bob", b"1", &ct, l).await.unwrap(),
            EnqueueOutcome::Accepted { .. }
        ));
        assert!(matches!(
            s.enqueue(&alice, "bob", b"2", &ct, l).await.unwrap(),
            EnqueueOutcome::OverQuota
        ));
        s.ack_message(&bob, b"1").await.unwrap();
        assert!(matches!(
            s.enqueue(&alice, "bob", b"2", &ct, l).await.unwrap(),
            EnqueueOutcome::Accepted { .. }
        ));
        // Expired messages free their bytes too.
        assert!(matches!(
            s.enqueue(&alice, "bob", b"3", &ct, l).await.unwrap(),
            EnqueueOutcome::OverQuota
        ));
        s.expire(u64::MAX / 2, 100).await.unwrap();
        assert!(matches!(
            s.enqueue(&alice, "bob", b"3", &ct, l).await.unwrap(),
            EnqueueOutcome::Accepted { .. }
        ));
    }
}
