//! The PostgreSQL backend: several server nodes may share one database.
//!
//! The operations and their SQL mirror the SQLite backend (see `sqlite.rs`), with the same
//! **group commit**: a writer task runs every waiting write inside one transaction and
//! commits once before answering. What differs:
//!
//! * **One round trip per message write.** Each statement is a round trip to PostgreSQL,
//!   which the writer waits for. The three writes every message makes (queue it, its
//!   acknowledgement with the receipt it queues, the receipt's acknowledgement) are SQL
//!   functions (migrations-postgres/0003_write_functions.sql) that undo themselves and
//!   answer when they fail, so they need no savepoint either; the other writes run
//!   statement by statement, each in its own savepoint. A statement that fails outside a
//!   savepoint aborts the whole transaction: the writer then reports the batch as failed
//!   (PostgreSQL would answer its COMMIT with ROLLBACK and no error).
//!
//! * **Several writers.** Every node has [`WRITERS`] of them (a device's writes always go
//!   to the same one), and every node its own, so transactions run concurrently (READ
//!   COMMITTED). Uniqueness is kept by the constraints; the byte
//!   quota by an atomic upsert. A connection reads its device's queue from a cursor (the
//!   highest `seq` it has sent), which is only safe if rows of one device become visible in
//!   `seq` order: each write therefore takes a transaction-scoped advisory lock on the
//!   device's queue (or receipt list) before inserting, so two nodes queueing for the same
//!   device commit one after the other. The sender's byte-quota row, written by the
//!   sender's node and by the recipient's, is guarded the same way. Locks are tried, never
//!   waited for: a write that finds one held by another node's open batch is undone (its
//!   savepoint, or the function's own block) and submitted again to a later batch (nothing
//!   was acknowledged), so batches of different nodes never wait on each other and cannot
//!   deadlock.
//! * **Cross-node wake-ups.** A node knows only its own connections ([`Hub`]). Every
//!   batch that queued envelopes or receipts sends, inside its transaction, one
//!   `NOTIFY postern_wake` listing the devices to wake (split only past PostgreSQL's 8000
//!   byte payload limit); PostgreSQL delivers it at commit, to every node, and each node
//!   wakes those of the devices that are connected to it. A node that loses its listening
//!   connection may have missed notifications, so after reconnecting it wakes all its
//!   devices (they re-read their queues: nothing is lost, only an extra read).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPoolOptions};
use sqlx::{Connection, PgPool, Row};
use tokio::sync::{mpsc, oneshot};

use super::placement::Placement;
use super::*;
use crate::hub::Hub;
use crate::ServerError;

/// How nodes name their database connections, so `postern server reshard` can tell
/// that a node is still running.
pub(crate) const APPLICATION_NAME: &str = "postern-server";
/// The channel every node listens on.
const CHANNEL: &str = "postern_wake";
/// PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
const MAX_PAYLOAD: usize = 7900;
/// Writer tasks (each with its own connection and transactions) per node and database.
/// One writer runs its batch's statements one after another, each a round trip to
/// PostgreSQL, so a node with one writer is bound by round-trip latency, not by the
/// database (measured: 1 node 434 msgs/s, 2 nodes 1,179). Several writers are safe for
/// the same reason several nodes are: the advisory locks are tried, never waited for.
const WRITERS: usize = 4;
/// Times a write that lost a deadlock (or a serialization conflict) is tried again.
const RETRIES: usize = 8;
/// Times a write that found a device locked by another node's batch is tried again (with
/// pauses growing to 20 ms: a few seconds in all) before its caller is told to retry.
const CONTENDED_RETRIES: usize = 200;

/// SQLSTATE `lock_not_available`: `postern_try_lock` (migrations-postgres/0003), which every
/// write takes its advisory locks with, found one held by another batch.
///
/// Locks are tried, not waited for: the write gives way ([`ServerError::Contended`]: undone,
/// the rest of the batch goes on) and is submitted again to this node's next batch. Waiting
/// instead would hold every lock this batch already took while the other batch waits for
/// them in turn — two nodes' batches of a few hundred writes over the same devices then
/// deadlock, and each deadlock stalls both writers for PostgreSQL's `deadlock_timeout`.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// What a write function of migrations-postgres/0003 answered when it did not do its write
/// (and undid what it had done): `contended` is a lock held by another batch (see
/// [`LOCK_NOT_AVAILABLE`]), so the write is tried again in a later batch.
fn function_failed(function: &str, outcome: &str, error: Option<String>) -> ServerError {
    match outcome {
        "contended" => ServerError::Contended,
        "failed" => ServerError::Config(format!(
            "{function} failed: {}",
            error.as_deref().unwrap_or("no reason given")
        )),
        other => ServerError::Config(format!(
            "{function} answered {other:?}: the database's functions do not match this server \
             (run the same version on every node)"
        )),
    }
}

/// A device another node may have to wake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    Envelopes(i64),
    Receipts(i64),
    /// The device's one-time keys run low: it should upload more.
    KeysLow(i64),
}

/// A receipt owed to a sending device whose account lives in another shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignReceipt {
    pub sender: String,
    pub sender_device: i64,
    pub message_id: Vec<u8>,
    pub recipient: String,
    pub expired: bool,
}

/// What a write reports to the writer task: whether it succeeded (else its savepoint is
/// rolled back), the devices to wake on other nodes, and how to answer its caller once
/// the batch's commit is known.
type Deferred = Box<dyn FnOnce(Result<(), String>) + Send>;
type JobFn = Box<
    dyn for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, (JobEnd, Vec<Wake>, Deferred)> + Send,
>;

/// One write for a writer task's next batch.
struct WriteJob {
    run: JobFn,
    undo: Undo,
}

/// How a failed write is undone without spoiling the rest of its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Undo {
    /// The writer wraps it in `SAVEPOINT` / `RELEASE` and rolls back to the savepoint.
    Savepoint,
    /// A write function of migrations-postgres/0003: it undoes itself and answers instead
    /// of raising, so it goes without those two round trips.
    ItsOwn,
}

/// How a write ended, for the writer task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobEnd {
    Done,
    /// Failed and undone (by its savepoint, or by the write function itself).
    Failed,
    /// A statement failed outside any savepoint: PostgreSQL has aborted the batch's whole
    /// transaction, which must not be reported as committed.
    AbortedBatch,
}

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    /// Reads only.
    pool: PgPool,
    /// One queue per writer task: a write goes to the lane of its device (see [`WRITERS`]).
    writers: Arc<[mpsc::Sender<WriteJob>]>,
    writer_tasks: Arc<[tokio::task::JoinHandle<()>]>,
    listener: Arc<tokio::task::JoinHandle<()>>,
    /// This node's id in wake-up payloads (its own are ignored when they come back).
    node: u64,
}

/// A deadlock or serialization failure, or a unique violation: two nodes registered the
/// same username (or device key) at once; run again, the check before the insert then
/// sees the other node's row and answers "taken" as on one node.
fn is_retryable(e: &ServerError) -> bool {
    match e {
        ServerError::Database(sqlx::Error::Database(d)) => {
            matches!(
                d.code().as_deref(),
                Some("40P01") | Some("40001") | Some("23505")
            )
        }
        _ => false,
    }
}

/// The NOTIFY payloads for a batch's wake-ups: `NODE e1,2 r3 k4`, split below the limit.
pub(crate) fn payloads(node: u64, wakes: &[Wake]) -> Vec<String> {
    let mut envelopes: Vec<i64> = Vec::new();
    let mut receipts: Vec<i64> = Vec::new();
    let mut keys_low: Vec<i64> = Vec::new();
    for w in wakes {
        match *w {
            Wake::Envelopes(d) => envelopes.push(d),
            Wake::Receipts(d) => receipts.push(d),
            Wake::KeysLow(d) => keys_low.push(d),
        }
    }
    for v in [&mut envelopes, &mut receipts, &mut keys_low] {
        v.sort_unstable();
        v.dedup();
    }
    let mut out = Vec::new();
    let mut current = format!("{node:x}");
    let base = current.len();
    for (tag, ids) in [('e', &envelopes), ('r', &receipts), ('k', &keys_low)] {
        let mut open = false;
        for id in ids.iter() {
            let item = id.to_string();
            if current.len() + item.len() + 2 > MAX_PAYLOAD {
                out.push(std::mem::replace(&mut current, format!("{node:x}")));
                open = false;
            }
            if open {
                current.push(',');
            } else {
                current.push(' ');
                current.push(tag);
                open = true;
            }
            current.push_str(&item);
        }
    }
    if current.len() > base {
        out.push(current);
    }
    out
}

/// Applies a payload from another node to this node's connections.
pub(crate) fn apply(payload: &str, node: u64, hub: &Hub) {
    let mut tokens = payload.split_whitespace();
    let Some(from) = tokens.next().and_then(|t| u64::from_str_radix(t, 16).ok()) else {
        return;
    };
    if from == node {
        // This node woke its own connections already.
        return;
    }
    for t in tokens {
        let (tag, ids) = t.split_at(t.char_indices().nth(1).map_or(t.len(), |(i, _)| i));
        for id in ids.split(',').filter_map(|i| i.parse::<i64>().ok()) {
            match tag {
                "e" => hub.wake(id),
                "r" => hub.wake_receipts(id),
                "k" => hub.keys_low(id),
                _ => {}
            }
        }
    }
}

/// Listens for other nodes' wake-ups until aborted; reconnects when the connection drops.
async fn listen(options: PgConnectOptions, node: u64, hub: Arc<Hub>) {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(options);
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot connect to PostgreSQL for wake-ups; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::warn!(error = %e, "cannot LISTEN for wake-ups; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // Notifications sent while this node was not listening are lost: every connected
        // device re-reads its queue.
        hub.wake_all();
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => apply(n.payload(), node, &hub),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "lost the wake-up connection; reconnecting");
                    break;
                }
            }
        }
    }
}

impl PgStore {
    /// Connects to `url` (`postgres://…`), applies pending migrations (PostgreSQL's
    /// advisory lock keeps nodes that start together from racing), starts the writer task
    /// and the listener for other nodes' wake-ups, which it delivers to `hub`.
    pub async fn open(url: &str, hub: Arc<Hub>) -> Result<Self, ServerError> {
        let options = PgConnectOptions::from_str(url)?.application_name(APPLICATION_NAME);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations-postgres").run(&pool).await?;
        let node: u64 = rand::random();
        let mut writers = Vec::with_capacity(WRITERS);
        let mut writer_tasks = Vec::with_capacity(WRITERS);
        for _ in 0..WRITERS {
            let conn = PgConnection::connect_with(&options).await?;
            let (writer, jobs) = mpsc::channel(4 * MAX_BATCH);
            writers.push(writer);
            writer_tasks.push(tokio::spawn(write_loop(conn, options.clone(), node, jobs)));
        }
        let listener = Arc::new(tokio::spawn(listen(options, node, hub)));
        Ok(Self {
            pool,
            writers: writers.into(),
            writer_tasks: writer_tasks.into(),
            listener,
            node,
        })
    }

    /// Tells the other nodes that `device_id`'s one-time keys run low, so the one it is
    /// connected to asks it for more (this node wakes its own connections itself).
    pub async fn keys_low(&self, device_id: i64) -> Result<(), ServerError> {
        for payload in payloads(self.node, &[Wake::KeysLow(device_id)]) {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(payload)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Records (or checks) this database's place among the shards: see [`claim_shard`].
    pub async fn claim_shard(&self, want: Placement) -> Result<(), ServerError> {
        claim_shard(&self.pool, want).await
    }

    /// Waits until every write submitted so far is committed, then stops the writer and
    /// the listener and closes the read pool; writes after this fail.
    pub async fn close(&self) {
        for lane in 0..WRITERS {
            let _ = self
                .write(lane as i64, |_| Box::pin(async { Ok(()) }))
                .await;
        }
        for task in self.writer_tasks.iter() {
            task.abort();
        }
        self.listener.abort();
        self.pool.close().await;
    }

    async fn write<T, F>(&self, lane: i64, op: F) -> Result<T, ServerError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, ServerError>>
            + Send
            + Clone
            + 'static,
    {
        self.write_waking(lane, op, |_| Vec::new(), Undo::Savepoint)
            .await
    }

    /// Runs `op` in the next batch of the writer for `lane` (a device id, so one device's
    /// writes commit in the order they were made); returns its result once it is
    /// committed. `wakes` names the devices other nodes must wake once it is. A write that
    /// lost a deadlock, or found a device locked, is run again.
    async fn write_waking<T, F>(
        &self,
        lane: i64,
        op: F,
        wakes: fn(&T) -> Vec<Wake>,
        undo: Undo,
    ) -> Result<T, ServerError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, ServerError>>
            + Send
            + Clone
            + 'static,
    {
        let (mut attempt, mut contended) = (0, 0);
        loop {
            match self.submit(lane, op.clone(), wakes, undo).await {
                // Another node's batch holds a device this write needs: its commit is
                // milliseconds away, so try again in a following batch.
                Err(ServerError::Contended) if contended < CONTENDED_RETRIES => {
                    contended += 1;
                    let pause = Duration::from_millis(contended.min(20) as u64);
                    tokio::time::sleep(pause).await;
                }
                Err(e) if attempt + 1 < RETRIES && is_retryable(&e) => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "retrying a database write");
                }
                other => return other,
            }
        }
    }

    async fn submit<T, F>(
        &self,
        lane: i64,
        op: F,
        wakes: fn(&T) -> Vec<Wake>,
        undo: Undo,
    ) -> Result<T, ServerError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, ServerError>>
            + Send
            + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let run: JobFn = Box::new(move |conn| {
            Box::pin(async move {
                let result = match op(conn).await {
                    Err(ServerError::Database(sqlx::Error::Database(e)))
                        if e.code().as_deref() == Some(LOCK_NOT_AVAILABLE) =>
                    {
                        Err(ServerError::Contended)
                    }
                    other => other,
                };
                let end = match &result {
                    Ok(_) => JobEnd::Done,
                    // A statement's own error: outside a savepoint it aborts the transaction.
                    Err(ServerError::Database(_)) if undo == Undo::ItsOwn => JobEnd::AbortedBatch,
                    Err(_) => JobEnd::Failed,
                };
                let woken = result.as_ref().map(wakes).unwrap_or_default();
                let deferred: Deferred = Box::new(move |commit| {
                    let _ = reply.send(match commit {
                        Ok(()) => result,
                        Err(e) => Err(ServerError::Config(format!("database commit failed: {e}"))),
                    });
                });
                (end, woken, deferred)
            })
        });
        self.writers[lane.rem_euclid(WRITERS as i64) as usize]
            .send(WriteJob { run, undo })
            .await
            .map_err(|_| ServerError::Config("the database writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| ServerError::Config("the database write failed".into()))?
    }

    pub async fn device_by_noise_key(
        &self,
        noise_key: &[u8],
    ) -> Result<Option<DeviceRecord>, ServerError> {
        let row = sqlx::query(
            "SELECT d.id, d.account_id, a.username FROM devices d
             JOIN accounts a ON a.id = d.account_id WHERE d.noise_key = $1",
        )
        .bind(noise_key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| DeviceRecord {
            device_id: r.get(0),
            account_id: r.get(1),
            username: r.get(2),
        }))
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
        let (username, noise_key, curve25519, ed25519) = (
            username.to_string(),
            noise_key.to_vec(),
            curve25519.to_vec(),
            ed25519.to_vec(),
        );
        let (one_time_keys, fallback) = (one_time_keys.to_vec(), fallback.cloned());
        self.write(0, move |tx| {
            Box::pin(async move {
                let taken: Option<i64> =
                    sqlx::query_scalar("SELECT id FROM accounts WHERE username = $1")
                        .bind(&username)
                        .fetch_optional(&mut *tx)
                        .await?;
                if taken.is_some() {
                    return Ok(RegisterOutcome::UsernameTaken);
                }
                let known: Option<i64> =
                    sqlx::query_scalar("SELECT id FROM devices WHERE noise_key = $1")
                        .bind(&noise_key)
                        .fetch_optional(&mut *tx)
                        .await?;
                if known.is_some() {
                    return Ok(RegisterOutcome::DeviceAlreadyRegistered);
                }
                let now = now_ms();
                let account_id: i64 = sqlx::query_scalar(
                    "INSERT INTO accounts (username, created_ms) VALUES ($1, $2) RETURNING id",
                )
                .bind(&username)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
                let device_id: i64 = sqlx::query_scalar(
                    "INSERT INTO devices (account_id, noise_key, curve25519, ed25519, created_ms)
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
                )
                .bind(account_id)
                .bind(&noise_key)
                .bind(&curve25519)
                .bind(&ed25519)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
                insert_keys(tx, device_id, &one_time_keys, fallback.as_ref()).await?;
                Ok(RegisterOutcome::Registered(DeviceRecord {
                    device_id,
                    account_id,
                    username,
                }))
            })
        })
        .await
    }

    pub async fn one_time_key_count(&self, device_id: i64) -> Result<u32, ServerError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM one_time_keys WHERE device_id = $1")
            .bind(device_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(n as u32)
    }

    /// Adds one-time keys (and optionally replaces the fallback key); returns the new count,
    /// or `None` if the device would hold more than `max_keys`.
    pub async fn upload_keys(
        &self,
        device_id: i64,
        one_time_keys: &[SignedKey],
        fallback: Option<&SignedKey>,
        max_keys: u32,
    ) -> Result<Option<u32>, ServerError> {
        let (one_time_keys, fallback) = (one_time_keys.to_vec(), fallback.cloned());
        self.write(device_id, move |tx| {
            Box::pin(async move {
                let have: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM one_time_keys WHERE device_id = $1")
                        .bind(device_id)
                        .fetch_one(&mut *tx)
                        .await?;
                if have as usize + one_time_keys.len() > max_keys as usize {
                    return Ok(None);
                }
                insert_keys(tx, device_id, &one_time_keys, fallback.as_ref()).await?;
                let now: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM one_time_keys WHERE device_id = $1")
                        .bind(device_id)
                        .fetch_one(&mut *tx)
                        .await?;
                Ok(Some(now as u32))
            })
        })
        .await
    }

    /// Hands out one key per device of `username`: a one-time key (deleted as it is handed
    /// out) or, when none is left, the fallback key. `None` if the user does not exist.
    ///
    /// With `one_time == false` (the claim rate for this user is exhausted) every device's
    /// fallback key is handed out and no one-time key is used up.
    pub async fn claim_keys(
        &self,
        username: &str,
        one_time: bool,
    ) -> Result<Option<Vec<DeviceBundle>>, ServerError> {
        let username = username.to_string();
        self.write(1, move |tx| {
            Box::pin(async move {
                let rows = sqlx::query(
                    "SELECT d.id, d.curve25519, d.ed25519 FROM devices d
             JOIN accounts a ON a.id = d.account_id WHERE a.username = $1 ORDER BY d.id",
                )
                .bind(&username)
                .fetch_all(&mut *tx)
                .await?;
                if rows.is_empty() {
                    return Ok(None);
                }
                let mut bundles = Vec::with_capacity(rows.len());
                for row in rows {
                    let device_id: i64 = row.get(0);
                    let otk = if one_time {
                        sqlx::query(
                            "DELETE FROM one_time_keys WHERE id =
                   (SELECT id FROM one_time_keys WHERE device_id = $1 ORDER BY id LIMIT 1)
                 RETURNING public_key, signature",
                        )
                        .bind(device_id)
                        .fetch_optional(&mut *tx)
                        .await?
                    } else {
                        None
                    };
                    let (key, is_fallback) = match otk {
                        Some(r) => (
                            Some(SignedKey {
                                public_key: r.get(0),
                                signature: r.get(1),
                            }),
                            false,
                        ),
                        None => {
                            let fb = sqlx::query(
                        "SELECT public_key, signature FROM fallback_keys WHERE device_id = $1",
                    )
                    .bind(device_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                            (
                                fb.map(|r| SignedKey {
                                    public_key: r.get(0),
                                    signature: r.get(1),
                                }),
                                true,
                            )
                        }
                    };
                    bundles.push(DeviceBundle {
                        device_id,
                        curve25519: row.get(1),
                        ed25519: row.get(2),
                        key,
                        is_fallback,
                    });
                }
                Ok(Some(bundles))
            })
        })
        .await
    }

    /// Writes one message to the recipient devices' queues; idempotent per message id, so a
    /// sender that retries after a lost acknowledgement does not create duplicates.
    pub async fn enqueue(
        &self,
        sender: &DeviceRecord,
        recipient: &str,
        message_id: &[u8],
        ciphertexts: &[OutgoingCiphertext],
        limits: EnqueueLimits,
    ) -> Result<EnqueueOutcome, ServerError> {
        let (sender, recipient, message_id, ciphertexts) = (
            sender.clone(),
            recipient.to_string(),
            message_id.to_vec(),
            ciphertexts.to_vec(),
        );
        self.write_waking(
            sender.device_id,
            move |tx| {
                Box::pin(async move {
                    let device_ids: Vec<i64> = ciphertexts.iter().map(|c| c.device_id).collect();
                    let olm_types: Vec<i64> =
                        ciphertexts.iter().map(|c| i64::from(c.olm_type)).collect();
                    let bodies: Vec<&[u8]> =
                        ciphertexts.iter().map(|c| c.body.as_slice()).collect();
                    let now = now_ms();
                    // One round trip: migrations-postgres/0003_write_functions.sql.
                    let (outcome, devices, error): (String, Vec<i64>, Option<String>) =
                        sqlx::query_as(
                            "SELECT o_outcome, o_devices, o_error
                             FROM postern_enqueue($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                        )
                        .bind(&recipient)
                        .bind(&message_id)
                        .bind(sender.device_id)
                        .bind(sender.account_id)
                        .bind(&sender.username)
                        .bind(now)
                        .bind(&device_ids)
                        .bind(&olm_types)
                        .bind(&bodies)
                        .bind(i64::from(limits.max_queue))
                        .bind(i64::try_from(limits.max_queued_bytes).unwrap_or(i64::MAX))
                        .fetch_one(&mut *tx)
                        .await?;
                    Ok(match outcome.as_str() {
                        "accepted" => EnqueueOutcome::Accepted {
                            server_time_ms: now as u64,
                            recipient_devices: devices,
                        },
                        "unknown" => EnqueueOutcome::UnknownRecipient,
                        "changed" => EnqueueOutcome::DevicesChanged,
                        "over_quota" => EnqueueOutcome::OverQuota,
                        "queue_full" => EnqueueOutcome::QueueFull,
                        other => return Err(function_failed("postern_enqueue", other, error)),
                    })
                })
            },
            |outcome| match outcome {
                EnqueueOutcome::Accepted {
                    recipient_devices, ..
                } => recipient_devices
                    .iter()
                    .map(|d| Wake::Envelopes(*d))
                    .collect(),
                _ => Vec::new(),
            },
            Undo::ItsOwn,
        )
        .await
    }

    /// Envelopes for `device_id` after queue position `after_seq`, oldest first.
    pub async fn pending(
        &self,
        device_id: i64,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<QueuedEnvelope>, ServerError> {
        let rows = sqlx::query(
            "SELECT seq, message_id, sender, sender_device, server_time_ms, olm_type, ciphertext
             FROM queue WHERE recipient_device = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(device_id)
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| QueuedEnvelope {
                seq: r.get(0),
                message_id: r.get(1),
                sender: r.get(2),
                sender_device: r.get(3),
                server_time_ms: r.get::<i64, _>(4) as u64,
                olm_type: r.get::<i64, _>(5) as u32,
                ciphertext: r.get(6),
            })
            .collect())
    }

    /// The recipient stored the message: delete it and queue a receipt for the sender's
    /// device, in one transaction. Returns that device (to wake it), or `None` if there was
    /// nothing to delete (a repeated acknowledgement). Only for a sender whose account is in
    /// this database; across shards see [`Self::queued_sender`].
    pub async fn ack_message(
        &self,
        device: &DeviceRecord,
        message_id: &[u8],
    ) -> Result<Option<i64>, ServerError> {
        let (device, message_id) = (device.clone(), message_id.to_vec());
        self.write_waking(
            device.device_id,
            move |tx| {
                Box::pin(async move {
                    // One round trip: migrations-postgres/0003_write_functions.sql.
                    let (outcome, woken, error): (String, Option<i64>, Option<String>) =
                        sqlx::query_as(
                            "SELECT o_outcome, o_sender_device, o_error
                             FROM postern_ack_message($1, $2, $3, $4)",
                        )
                        .bind(device.device_id)
                        .bind(&message_id)
                        .bind(&device.username)
                        .bind(now_ms())
                        .fetch_one(&mut *tx)
                        .await?;
                    match outcome.as_str() {
                        "acked" | "nothing" => Ok(woken),
                        other => Err(function_failed("postern_ack_message", other, error)),
                    }
                })
            },
            |woken| woken.iter().map(|d| Wake::Receipts(*d)).collect(),
            Undo::ItsOwn,
        )
        .await
    }

    /// The sending device and account name of a message waiting for `device_id`.
    pub async fn queued_sender(
        &self,
        device_id: i64,
        message_id: &[u8],
    ) -> Result<Option<(i64, String)>, ServerError> {
        let row = sqlx::query(
            "SELECT sender_device, sender FROM queue WHERE recipient_device = $1 AND message_id = $2",
        )
        .bind(device_id)
        .bind(message_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// Deletes a delivered message (its receipt was queued in the sender's shard first);
    /// returns whether it was still there.
    pub async fn delete_delivered(
        &self,
        device_id: i64,
        message_id: &[u8],
    ) -> Result<bool, ServerError> {
        let message_id = message_id.to_vec();
        self.write(device_id, move |tx| {
            Box::pin(async move { Ok(delete_queued(tx, device_id, &message_id).await?.is_some()) })
        })
        .await
    }

    /// Queues receipts for sending devices of this database (from messages that left a
    /// queue in another shard); returns the devices to wake.
    pub async fn queue_receipts(
        &self,
        receipts: Vec<ForeignReceipt>,
    ) -> Result<Vec<i64>, ServerError> {
        let lane = receipts.first().map_or(0, |r| r.sender_device);
        self.write_waking(
            lane,
            move |tx| {
                let receipts = receipts.clone();
                Box::pin(async move {
                    let mut woken = Vec::with_capacity(receipts.len());
                    for r in &receipts {
                        if insert_receipt(
                            tx,
                            r.sender_device,
                            &r.message_id,
                            &r.recipient,
                            r.expired,
                        )
                        .await?
                        {
                            woken.push(r.sender_device);
                        }
                    }
                    Ok(woken)
                })
            },
            |woken| woken.iter().map(|d| Wake::Receipts(*d)).collect(),
            Undo::Savepoint,
        )
        .await
    }

    pub async fn pending_receipts(
        &self,
        device_id: i64,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<QueuedReceipt>, ServerError> {
        let rows = sqlx::query(
            "SELECT seq, message_id, recipient, server_time_ms, expired FROM receipts
             WHERE device_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(device_id)
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| QueuedReceipt {
                seq: r.get(0),
                message_id: r.get(1),
                recipient: r.get(2),
                server_time_ms: r.get::<i64, _>(3) as u64,
                expired: r.get::<i64, _>(4) != 0,
            })
            .collect())
    }

    /// Deletes up to `limit` queued messages older than `before_ms` (the queue
    /// time-to-live) and queues an `expired` receipt for each sender's device held by this
    /// database (`placement`); receipts for senders in other shards are returned for the
    /// caller to queue there. Returns the local sender devices to wake (one entry per
    /// expired message, possibly repeated).
    pub async fn expire(
        &self,
        before_ms: u64,
        limit: u32,
        placement: Placement,
    ) -> Result<(Vec<i64>, Vec<ForeignReceipt>), ServerError> {
        self.write_waking(0, move |tx| {
            Box::pin(async move {
                let rows = sqlx::query(
                    "DELETE FROM queue q USING devices d JOIN accounts a ON a.id = d.account_id
                     WHERE d.id = q.recipient_device AND q.seq IN
                       (SELECT seq FROM queue WHERE server_time_ms < $1 ORDER BY server_time_ms LIMIT $2 FOR UPDATE SKIP LOCKED)
                     RETURNING q.message_id, q.sender_device, q.sender, a.username,
                               octet_length(q.ciphertext)::int8, q.sender_account",
                )
                .bind(before_ms as i64)
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await?;
                let mut wake = Vec::with_capacity(rows.len());
                let mut foreign = Vec::new();
                for row in rows {
                    let receipt = ForeignReceipt {
                        message_id: row.get(0),
                        sender_device: row.get(1),
                        sender: row.get(2),
                        recipient: row.get(3),
                        expired: true,
                    };
                    release_queued_bytes(tx, row.get(5), receipt.sender_device, row.get(4)).await?;
                    if !placement.holds(&receipt.sender) {
                        foreign.push(receipt);
                    } else if insert_receipt(
                        tx,
                        receipt.sender_device,
                        &receipt.message_id,
                        &receipt.recipient,
                        true,
                    )
                    .await?
                    {
                        wake.push(receipt.sender_device);
                    }
                }
                Ok((wake, foreign))
            })
        }, |(woken, _)| woken.iter().map(|d| Wake::Receipts(*d)).collect(), Undo::Savepoint)
        .await
    }

    pub async fn ack_receipt(&self, device_id: i64, message_id: &[u8]) -> Result<(), ServerError> {
        let message_id = message_id.to_vec();
        self.write_waking(
            device_id,
            move |tx| {
                Box::pin(async move {
                    let (outcome, error): (String, Option<String>) = sqlx::query_as(
                        "SELECT o_outcome, o_error FROM postern_ack_receipt($1, $2)",
                    )
                    .bind(device_id)
                    .bind(&message_id)
                    .fetch_one(&mut *tx)
                    .await?;
                    match outcome.as_str() {
                        "done" => Ok(()),
                        other => Err(function_failed("postern_ack_receipt", other, error)),
                    }
                })
            },
            |_| Vec::new(),
            Undo::ItsOwn,
        )
        .await
    }
}

/// Records (or checks) that this database is shard `want.index` of `want.count`, so a
/// node given the databases in another order, or another number of them, refuses to
/// start instead of placing accounts where other nodes will not look. A new shard
/// other than the first starts its account and device ids at `want.first_id()`, so ids
/// stay unique across shards; both happen in one transaction, before any node serves.
pub(crate) async fn claim_shard(pool: &PgPool, want: Placement) -> Result<(), ServerError> {
    let mut tx = pool.begin().await?;
    let claimed = sqlx::query(
        "INSERT INTO shard (shard_index, shard_count, created_ms) VALUES ($1, $2, $3)
             ON CONFLICT (only_row) DO NOTHING",
    )
    .bind(want.index as i64)
    .bind(want.count as i64)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    let nth = want.index + 1;
    if claimed {
        let has_accounts: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM accounts)")
            .fetch_one(&mut *tx)
            .await?;
        if has_accounts && want.count > 1 {
            return Err(ServerError::Config(format!(
                "database {nth} of {} already holds accounts of an unsharded service: \
                     going from one database to several moves accounts first \
                     (docs/server.md, \"Resharding\")",
                want.count
            )));
        }
        if want.index > 0 {
            let first = want.first_id();
            for seq in ["accounts_id_seq", "devices_id_seq"] {
                sqlx::query(&format!("ALTER SEQUENCE {seq} RESTART WITH {first}"))
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        return Ok(());
    }
    let (index, count): (i64, i64) = sqlx::query_as("SELECT shard_index, shard_count FROM shard")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    if count != want.count as i64 {
        return Err(ServerError::Config(format!(
            "the databases were set up as {count} shard(s) but {} --database URLs were \
                 given: changing the number of shards moves accounts first \
                 (docs/server.md, \"Resharding\")",
            want.count
        )));
    }
    if index != want.index as i64 {
        return Err(ServerError::Config(format!(
            "--database number {nth} is shard {} of {count}: give every node the same \
                 --database URLs in the same order",
            index + 1
        )));
    }
    Ok(())
}

/// Deletes the message waiting for `device_id` and releases its bytes from the sender's
/// quota; returns the sending device, or `None` if it was not there.
async fn delete_queued(
    tx: &mut PgConnection,
    device_id: i64,
    message_id: &[u8],
) -> Result<Option<i64>, ServerError> {
    let deleted = sqlx::query(
        "DELETE FROM queue WHERE recipient_device = $1 AND message_id = $2
         RETURNING sender_device, octet_length(ciphertext)::int8, sender_account",
    )
    .bind(device_id)
    .bind(message_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = deleted else {
        return Ok(None);
    };
    let sender_device: i64 = row.get(0);
    release_queued_bytes(tx, row.get(2), sender_device, row.get(1)).await?;
    Ok(Some(sender_device))
}

/// Queues a receipt (delivered, or `expired`) for `sender_device`, which must be a device
/// of this database; returns whether it is new (see `postern_queue_receipt`).
async fn insert_receipt(
    tx: &mut PgConnection,
    sender_device: i64,
    message_id: &[u8],
    recipient: &str,
    expired: bool,
) -> Result<bool, ServerError> {
    Ok(
        sqlx::query_scalar("SELECT postern_queue_receipt($1, $2, $3, $4, $5)")
            .bind(sender_device)
            .bind(message_id)
            .bind(recipient)
            .bind(now_ms())
            .bind(i64::from(expired))
            .fetch_one(&mut *tx)
            .await?,
    )
}

/// A message of `bytes` sent by `sender_device` left the queue (delivered or expired):
/// releases it from the sending account's quota (see `postern_release_bytes`).
async fn release_queued_bytes(
    tx: &mut PgConnection,
    sender_account: Option<i64>,
    sender_device: i64,
    bytes: i64,
) -> Result<(), ServerError> {
    sqlx::query("SELECT postern_release_bytes($1, $2, $3)")
        .bind(sender_account)
        .bind(sender_device)
        .bind(bytes)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

async fn insert_keys(
    tx: &mut PgConnection,
    device_id: i64,
    one_time_keys: &[SignedKey],
    fallback: Option<&SignedKey>,
) -> Result<(), ServerError> {
    for k in one_time_keys {
        sqlx::query(
            "INSERT INTO one_time_keys (device_id, public_key, signature) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
        )
        .bind(device_id)
        .bind(&k.public_key)
        .bind(&k.signature)
        .execute(&mut *tx)
        .await?;
    }
    if let Some(k) = fallback {
        sqlx::query(
            "INSERT INTO fallback_keys (device_id, public_key, signature) VALUES ($1, $2, $3)
             ON CONFLICT(device_id) DO UPDATE SET public_key = excluded.public_key,
                                                  signature = excluded.signature",
        )
        .bind(device_id)
        .bind(&k.public_key)
        .bind(&k.signature)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Runs a statement; boxed so the writer task's future is provably `Send`.
fn exec<'c>(
    conn: &'c mut PgConnection,
    sql: &'static str,
) -> BoxFuture<'c, Result<(), sqlx::Error>> {
    Box::pin(async move { sqlx::query(sql).execute(conn).await.map(|_| ()) })
}

fn notify<'c>(
    conn: &'c mut PgConnection,
    payload: String,
) -> BoxFuture<'c, Result<(), sqlx::Error>> {
    Box::pin(async move {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(payload)
            .execute(conn)
            .await
            .map(|_| ())
    })
}

/// The writer task: batches of waiting writes, one transaction (and one NOTIFY) per batch.
async fn write_loop(
    mut conn: PgConnection,
    options: PgConnectOptions,
    node: u64,
    mut jobs: mpsc::Receiver<WriteJob>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = jobs.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut answers = Vec::with_capacity(batch.len());
        let mut wakes = Vec::new();
        if let Err(e) = exec(&mut conn, "BEGIN").await {
            // Dropping the jobs drops their reply channels: every caller gets an error,
            // and nothing was acknowledged. The connection may be gone: open a new one.
            tracing::error!(error = %e, "cannot start a database transaction");
            batch.clear();
            match PgConnection::connect_with(&options).await {
                Ok(c) => conn = c,
                Err(e) => {
                    tracing::error!(error = %e, "cannot reconnect to PostgreSQL");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            continue;
        }
        let mut aborted = false;
        for job in batch.drain(..) {
            if job.undo == Undo::ItsOwn {
                let (end, woken, answer) = (job.run)(&mut conn).await;
                match end {
                    JobEnd::Done => wakes.extend(woken),
                    JobEnd::Failed => {}
                    JobEnd::AbortedBatch => aborted = true,
                }
                answers.push(answer);
                continue;
            }
            let savepoint = exec(&mut conn, "SAVEPOINT op").await;
            let (end, woken, answer) = (job.run)(&mut conn).await;
            if end == JobEnd::Done && savepoint.is_ok() {
                wakes.extend(woken);
            } else if exec(&mut conn, "ROLLBACK TO op").await.is_err() {
                // Without its savepoint the write cannot be undone alone.
                aborted = true;
            }
            let _ = exec(&mut conn, "RELEASE op").await;
            answers.push(answer);
        }
        let mut notified = Ok(());
        if aborted {
            // COMMIT would answer ROLLBACK without an error: nothing of this batch is kept.
            notified = Err(sqlx::Error::Protocol(
                "a write failed outside a savepoint and aborted the batch".into(),
            ));
        } else {
            for payload in payloads(node, &wakes) {
                notified = notify(&mut conn, payload).await;
                if notified.is_err() {
                    break;
                }
            }
        }
        let committed = match notified {
            Ok(()) => exec(&mut conn, "COMMIT").await,
            Err(e) => Err(e),
        };
        let committed = match committed {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::error!(error = %e, "database commit failed");
                let _ = exec(&mut conn, "ROLLBACK").await;
                Err(e.to_string())
            }
        };
        for answer in answers {
            answer(committed.clone());
        }
    }
    let _ = conn.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn payloads_split_below_the_limit_and_apply_to_local_devices_only() {
        let wakes: Vec<Wake> = (0..3000)
            .map(Wake::Envelopes)
            .chain([
                Wake::Receipts(5000),
                Wake::Receipts(5000),
                Wake::KeysLow(6000),
            ])
            .collect();
        let out = payloads(0xabc, &wakes);
        assert!(out.len() > 1);
        assert!(out.iter().all(|p| p.len() < 8000 && p.starts_with("abc ")));
        assert!(payloads(1, &[]).is_empty());
        let hub = Arc::new(Hub::default());
        let (e, r, k) = (hub.join(2999), hub.join(5000), hub.join(6000));
        for p in &out {
            apply(p, 0xabc, &hub); // this node's own: ignored
        }
        assert!(!e.signal.envelopes.load(Ordering::Acquire));
        for p in &out {
            apply(p, 0xdef, &hub);
        }
        assert!(e.signal.envelopes.load(Ordering::Acquire));
        assert!(r.signal.receipts.load(Ordering::Acquire));
        assert!(!r.signal.envelopes.load(Ordering::Acquire));
        assert!(k.signal.keys_low.load(Ordering::Acquire));
        assert!(!k.signal.envelopes.load(Ordering::Acquire));
        apply("garbage", 1, &hub);
        apply("12 x1,2 e,, r-5", 1, &hub);
    }

    fn ct(device_id: i64, i: u32) -> Vec<OutgoingCiphertext> {
        vec![OutgoingCiphertext {
            device_id,
            olm_type: 1,
            body: i.to_be_bytes().to_vec(),
        }]
    }

    async fn registered(s: &PgStore, name: &str, noise: u8) -> DeviceRecord {
        match s
            .register(name, &[noise; 32], &[1; 32], &[2; 32], &[], None)
            .await
            .unwrap()
        {
            RegisterOutcome::Registered(d) => d,
            other => panic!("{other:?}"),
        }
    }

    /// Two nodes (stores with their own hubs) started at once on a fresh database.
    async fn two_nodes() -> ((PgStore, Arc<Hub>), (PgStore, Arc<Hub>)) {
        let url = postern_test_kit::postgres::Postgres::shared().fresh_database();
        let (hub1, hub2) = (Arc::new(Hub::default()), Arc::new(Hub::default()));
        let (n1, n2) = tokio::join!(
            PgStore::open(&url, hub1.clone()),
            PgStore::open(&url, hub2.clone())
        );
        ((n1.unwrap(), hub1), (n2.unwrap(), hub2))
    }

    /// A write whose device another node's open batch has locked waits for that batch and
    /// then succeeds: the write functions' `lock_not_available` is a retry, not an error.
    #[tokio::test]
    async fn writes_wait_for_a_device_another_batch_holds_then_go_through() {
        let url = postern_test_kit::postgres::Postgres::shared().fresh_database();
        let store = PgStore::open(&url, Arc::new(Hub::default())).await.unwrap();
        let alice = registered(&store, "alice", 1).await;
        let bob = registered(&store, "bob", 2).await;
        let l = EnqueueLimits {
            max_queue: 100,
            max_queued_bytes: u64::MAX,
        };
        let mut other = PgConnection::connect(&url).await.unwrap();
        let hold = |key: i64| sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(key);

        // Another batch holds bob's queue: the message waits, then is queued.
        exec(&mut other, "BEGIN").await.unwrap();
        hold(bob.device_id * 4).execute(&mut other).await.unwrap();
        let sending = tokio::spawn({
            let (store, alice) = (store.clone(), alice.clone());
            async move {
                store
                    .enqueue(&alice, "bob", b"m1", &ct(bob.device_id, 7), l)
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !sending.is_finished(),
            "queued while bob's queue was locked"
        );
        assert!(store
            .pending(bob.device_id, 0, 10)
            .await
            .unwrap()
            .is_empty());
        exec(&mut other, "COMMIT").await.unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(10), sending)
            .await
            .expect("queued once the lock was released")
            .unwrap()
            .unwrap();
        assert!(
            matches!(outcome, EnqueueOutcome::Accepted { .. }),
            "{outcome:?}"
        );
        assert_eq!(store.pending(bob.device_id, 0, 10).await.unwrap().len(), 1);

        // Another batch holds alice's receipts: bob's acknowledgement waits, then deletes
        // the message and queues alice's receipt.
        exec(&mut other, "BEGIN").await.unwrap();
        hold(alice.device_id * 4 + 1)
            .execute(&mut other)
            .await
            .unwrap();
        let acking = tokio::spawn({
            let (store, bob) = (store.clone(), bob.clone());
            async move { store.ack_message(&bob, b"m1").await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !acking.is_finished(),
            "acknowledged while alice's receipts were locked"
        );
        exec(&mut other, "COMMIT").await.unwrap();
        let woken = tokio::time::timeout(Duration::from_secs(10), acking)
            .await
            .expect("acknowledged once the lock was released")
            .unwrap()
            .unwrap();
        assert_eq!(woken, Some(alice.device_id));
        assert!(store
            .pending(bob.device_id, 0, 10)
            .await
            .unwrap()
            .is_empty());
        let receipts = store
            .pending_receipts(alice.device_id, 0, 10)
            .await
            .unwrap();
        assert_eq!(receipts.len(), 1);
        assert_eq!(receipts[0].message_id, b"m1");
        // A repeated acknowledgement finds nothing.
        assert_eq!(store.ack_message(&bob, b"m1").await.unwrap(), None);

        // The same for a write that runs statement by statement in a savepoint (a receipt
        // from another shard): the lock error from `postern_queue_receipt` is a retry too.
        exec(&mut other, "BEGIN").await.unwrap();
        hold(alice.device_id * 4 + 1)
            .execute(&mut other)
            .await
            .unwrap();
        let foreign = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .queue_receipts(vec![ForeignReceipt {
                        sender: "alice".into(),
                        sender_device: alice.device_id,
                        message_id: b"m2".to_vec(),
                        recipient: "carol".into(),
                        expired: false,
                    }])
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !foreign.is_finished(),
            "queued while alice's receipts were locked"
        );
        exec(&mut other, "COMMIT").await.unwrap();
        let woken = tokio::time::timeout(Duration::from_secs(10), foreign)
            .await
            .expect("queued once the lock was released")
            .unwrap()
            .unwrap();
        assert_eq!(woken, vec![alice.device_id]);
        assert_eq!(
            store
                .pending_receipts(alice.device_id, 0, 10)
                .await
                .unwrap()
                .len(),
            2
        );
        store.close().await;
    }

    /// A write function whose statement fails outright (here: it no longer exists) aborts
    /// its batch's transaction; no other write of that batch may then be reported as done.
    /// (Acknowledged receipts wake nobody, so no NOTIFY would fail before the COMMIT, which
    /// PostgreSQL answers with ROLLBACK and no error.)
    #[tokio::test]
    async fn a_batch_aborted_by_a_failed_statement_reports_nothing_as_committed() {
        let url = postern_test_kit::postgres::Postgres::shared().fresh_database();
        let store = PgStore::open(&url, Arc::new(Hub::default())).await.unwrap();
        let alice = registered(&store, "alice", 1).await;
        let bob = registered(&store, "bob", 2).await;
        let l = EnqueueLimits {
            max_queue: 1000,
            max_queued_bytes: u64::MAX,
        };
        // Fifty receipts waiting for alice.
        for i in 0..50u32 {
            let id = i.to_be_bytes();
            store
                .enqueue(&alice, "bob", &id, &ct(bob.device_id, i), l)
                .await
                .unwrap();
            store.ack_message(&bob, &id).await.unwrap();
        }
        assert_eq!(
            store
                .pending_receipts(alice.device_id, 0, 100)
                .await
                .unwrap()
                .len(),
            50
        );
        let mut admin = PgConnection::connect(&url).await.unwrap();
        exec(&mut admin, "DROP FUNCTION postern_enqueue")
            .await
            .unwrap();
        // Alice's writes share one writer (her device's lane), so they share batches: her
        // receipt acknowledgements and her sends, which now fail.
        let mut tasks = Vec::new();
        for i in 0..50u32 {
            let (s, device) = (store.clone(), alice.device_id);
            tasks.push(tokio::spawn(async move {
                let id = i.to_be_bytes();
                s.ack_receipt(device, &id)
                    .await
                    .is_ok()
                    .then_some(id.to_vec())
            }));
            let (s, a) = (store.clone(), alice.clone());
            tasks.push(tokio::spawn(async move {
                let id = (1000 + i).to_be_bytes();
                assert!(s
                    .enqueue(&a, "bob", &id, &ct(bob.device_id, i), l)
                    .await
                    .is_err());
                None
            }));
        }
        let mut reported = Vec::new();
        for t in tasks {
            reported.extend(t.await.unwrap());
        }
        let waiting: Vec<Vec<u8>> = store
            .pending_receipts(alice.device_id, 0, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.message_id)
            .collect();
        for id in &reported {
            assert!(
                !waiting.contains(id),
                "the acknowledgement of {id:?} was reported done but not kept"
            );
        }
        store.close().await;
    }

    /// Two nodes on one database: a message queued through one wakes the recipient's
    /// connection on the other, and concurrent writers for one device never let a reader
    /// with a cursor skip a row.
    #[tokio::test]
    async fn nodes_wake_each_other_and_cursors_skip_nothing() {
        let ((n1, _), (n2, hub2)) = two_nodes().await;
        let alice = registered(&n1, "alice", 1).await;
        let bob = registered(&n2, "bob", 2).await;
        let presence = hub2.join(bob.device_id);
        let l = EnqueueLimits {
            max_queue: 100_000,
            max_queued_bytes: u64::MAX,
        };
        // Give the listeners time to subscribe: wait until a wake-up arrives.
        let woken = async {
            loop {
                n1.enqueue(&alice, "bob", b"hello", &ct(bob.device_id, 0), l)
                    .await
                    .unwrap();
                if tokio::time::timeout(
                    Duration::from_millis(200),
                    presence.signal.notify.notified(),
                )
                .await
                .is_ok()
                {
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), woken)
            .await
            .expect("node 2 is woken for a message queued on node 1");
        assert!(presence.signal.envelopes.swap(false, Ordering::AcqRel));

        // Both nodes queue for bob at once while a reader follows a cursor.
        let writers: Vec<_> = [n1.clone(), n2.clone()]
            .into_iter()
            .enumerate()
            .map(|(k, node)| {
                let alice = alice.clone();
                tokio::spawn(async move {
                    let mut tasks = Vec::new();
                    for i in 0..200u32 {
                        let (node, alice) = (node.clone(), alice.clone());
                        let id = (k as u32 * 1000 + i + 1).to_be_bytes();
                        tasks.push(tokio::spawn(async move {
                            node.enqueue(&alice, "bob", &id, &ct(bob.device_id, i), l)
                                .await
                                .unwrap()
                        }));
                    }
                    for t in tasks {
                        assert!(matches!(t.await.unwrap(), EnqueueOutcome::Accepted { .. }));
                    }
                })
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        let mut cursor = 0;
        let mut done = false;
        while !done {
            done = writers.iter().all(|w| w.is_finished());
            for e in n2.pending(bob.device_id, cursor, 1000).await.unwrap() {
                cursor = e.seq;
                seen.insert(e.message_id);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for w in writers {
            w.await.unwrap();
        }
        for e in n2.pending(bob.device_id, cursor, 1000).await.unwrap() {
            seen.insert(e.message_id);
        }
        assert_eq!(
            seen.len(),
            401,
            "every message read once through the cursor"
        );
        n1.close().await;
        n2.close().await;
    }

    /// A device whose keys another node handed out is told to upload more by its own node.
    #[tokio::test]
    async fn keys_low_reaches_the_node_the_device_is_connected_to() {
        let ((n1, hub1), (n2, _)) = two_nodes().await;
        let presence = hub1.join(42);
        let told = async {
            // Until node 1's listener has subscribed, a notification may go unheard (and
            // subscribing wakes every connection once, for envelopes: not what is tested).
            while !presence.signal.keys_low.load(Ordering::Acquire) {
                n2.keys_low(42).await.unwrap();
                let _ = tokio::time::timeout(
                    Duration::from_millis(200),
                    presence.signal.notify.notified(),
                )
                .await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), told)
            .await
            .expect("node 1 hears that device 42's keys run low");
        n1.close().await;
        n2.close().await;
    }

    #[tokio::test]
    async fn two_nodes_registering_one_name_at_once_get_one_account() {
        let url = postern_test_kit::postgres::Postgres::shared().fresh_database();
        let hub = Arc::new(Hub::default());
        let (n1, n2) = tokio::join!(
            PgStore::open(&url, hub.clone()),
            PgStore::open(&url, hub.clone())
        );
        let (n1, n2) = (n1.unwrap(), n2.unwrap());
        for round in 0..10u8 {
            let name = format!("user{round}");
            let (k1, k2) = ([round; 32], [round + 100; 32]);
            let (a, b) = tokio::join!(
                n1.register(&name, &k1, &[1; 32], &[2; 32], &[], None),
                n2.register(&name, &k2, &[1; 32], &[2; 32], &[], None)
            );
            let outcomes = [a.unwrap(), b.unwrap()];
            let registered = outcomes
                .iter()
                .filter(|o| matches!(o, RegisterOutcome::Registered(_)))
                .count();
            let taken = outcomes
                .iter()
                .filter(|o| matches!(o, RegisterOutcome::UsernameTaken))
                .count();
            assert_eq!((registered, taken), (1, 1), "{outcomes:?}");
        }
    }
}
