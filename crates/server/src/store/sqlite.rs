//! The SQLite backend (the default): one file, embedded, through sqlx.
//!
//! Every write that the protocol acknowledges is committed first (WAL journal,
//! `synchronous = FULL`), so an acknowledged message survives a crash, and a crash in the
//! middle of an operation leaves no half-written state.
//!
//! **Group commit.** SQLite has one writer at a time and each commit costs an fsync, so
//! one transaction per message caps delivery at the disk's fsync rate, and writers that
//! wait for the lock sleep in SQLite's busy handler. Instead, one writer task owns the
//! write connection: it takes every write that is waiting (up to [`MAX_BATCH`]), runs each
//! in its own savepoint inside one transaction, commits once, and only then answers each
//! caller. Nothing is acknowledged before it is on disk; under load one fsync covers many
//! messages. Reads use a separate pool and never wait for the writer.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, Row, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::ServerError;

/// What a write reports to the writer task: whether it succeeded (else its savepoint is
/// rolled back), and how to answer its caller once the batch's commit is known.
type Deferred = Box<dyn FnOnce(Result<(), String>) + Send>;
type WriteJob =
    Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, (bool, Deferred)> + Send>;

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    /// Reads only.
    pool: SqlitePool,
    writer: mpsc::Sender<WriteJob>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file, applies pending migrations and starts
    /// the writer task.
    pub async fn open(path: &Path) -> Result<Self, ServerError> {
        // The database holds every queued message: readable by the server's user only.
        // SQLite gives the -wal and -shm files the database's mode, so creating it 0600
        // first makes them private too; files left looser by older versions are tightened.
        let private = |e: std::io::Error| {
            ServerError::Config(format!(
                "cannot make the database {} private: {e}",
                path.display()
            ))
        };
        postern_protocol::fsutil::create_private_file(path).map_err(private)?;
        for suffix in ["-wal", "-shm"] {
            let mut side = path.as_os_str().to_owned();
            side.push(suffix);
            postern_protocol::fsutil::restrict_file(Path::new(&side)).map_err(private)?;
        }
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        let conn = SqliteConnection::connect_with(&options).await?;
        let (writer, jobs) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(write_loop(conn, jobs));
        Ok(Self { pool, writer })
    }

    /// Waits until every write submitted so far is committed, then closes the read pool.
    /// (The writer task ends when the last handle is dropped.)
    pub async fn close(&self) {
        let _ = self.write(|_| Box::pin(async { Ok(()) })).await;
        self.pool.close().await;
    }

    /// Runs `op` in the writer's next batch; returns its result once it is committed.
    async fn write<T, F>(&self, op: F) -> Result<T, ServerError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, ServerError>>
            + Send
            + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: WriteJob = Box::new(move |conn| {
            Box::pin(async move {
                let result = op(conn).await;
                let ok = result.is_ok();
                let deferred: Deferred = Box::new(move |commit| {
                    let _ = reply.send(match commit {
                        Ok(()) => result,
                        Err(e) => Err(ServerError::Config(format!("database commit failed: {e}"))),
                    });
                });
                (ok, deferred)
            })
        });
        self.writer
            .send(job)
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
             JOIN accounts a ON a.id = d.account_id WHERE d.noise_key = ?",
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
        self.write(move |tx| {
            Box::pin(async move {
                let taken: Option<i64> =
                    sqlx::query_scalar("SELECT id FROM accounts WHERE username = ?")
                        .bind(&username)
                        .fetch_optional(&mut *tx)
                        .await?;
                if taken.is_some() {
                    return Ok(RegisterOutcome::UsernameTaken);
                }
                let known: Option<i64> =
                    sqlx::query_scalar("SELECT id FROM devices WHERE noise_key = ?")
                        .bind(&noise_key)
                        .fetch_optional(&mut *tx)
                        .await?;
                if known.is_some() {
                    return Ok(RegisterOutcome::DeviceAlreadyRegistered);
                }
                let now = now_ms();
                let account_id: i64 = sqlx::query_scalar(
                    "INSERT INTO accounts (username, created_ms) VALUES (?, ?) RETURNING id",
                )
                .bind(&username)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
                let device_id: i64 = sqlx::query_scalar(
                    "INSERT INTO devices (account_id, noise_key, curve25519, ed25519, created_ms)
             VALUES (?, ?, ?, ?, ?) RETURNING id",
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
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM one_time_keys WHERE device_id = ?")
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
        self.write(move |tx| {
            Box::pin(async move {
                let have: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM one_time_keys WHERE device_id = ?")
                        .bind(device_id)
                        .fetch_one(&mut *tx)
                        .await?;
                if have as usize + one_time_keys.len() > max_keys as usize {
                    return Ok(None);
                }
                insert_keys(tx, device_id, &one_time_keys, fallback.as_ref()).await?;
                let now: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM one_time_keys WHERE device_id = ?")
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
        self.write(move |tx| {
            Box::pin(async move {
                let rows = sqlx::query(
                    "SELECT d.id, d.curve25519, d.ed25519 FROM devices d
             JOIN accounts a ON a.id = d.account_id WHERE a.username = ? ORDER BY d.id",
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
                   (SELECT id FROM one_time_keys WHERE device_id = ? ORDER BY id LIMIT 1)
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
                        "SELECT public_key, signature FROM fallback_keys WHERE device_id = ?",
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
        self.write(move |tx| Box::pin(async move {
        let devices: Vec<i64> = sqlx::query_scalar(
            "SELECT d.id FROM devices d JOIN accounts a ON a.id = d.account_id
             WHERE a.username = ? ORDER BY d.id",
        )
        .bind(&recipient)
        .fetch_all(&mut *tx)
        .await?;
        if devices.is_empty() {
            return Ok(EnqueueOutcome::UnknownRecipient);
        }
        let mut addressed: Vec<i64> = ciphertexts.iter().map(|c| c.device_id).collect();
        addressed.sort_unstable();
        addressed.dedup();
        if addressed != devices || addressed.len() != ciphertexts.len() {
            return Ok(EnqueueOutcome::DevicesChanged);
        }
        let now = now_ms();
        let already: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM queue WHERE recipient_device = ? AND message_id = ? LIMIT 1",
        )
        .bind(addressed[0])
        .bind(&message_id)
        .fetch_optional(&mut *tx)
        .await?;
        if already.is_none() {
            let waiting: i64 =
                sqlx::query_scalar("SELECT bytes FROM queued_bytes WHERE account_id = ?")
                    .bind(sender.account_id)
                    .fetch_optional(&mut *tx)
                    .await?
                    .unwrap_or(0);
            let adding: u64 = ciphertexts.iter().map(|c| c.body.len() as u64).sum();
            if waiting.max(0) as u64 + adding > limits.max_queued_bytes {
                return Ok(EnqueueOutcome::OverQuota);
            }
        }
        for c in &ciphertexts {
            let queued: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM queue WHERE recipient_device = ?")
                    .bind(c.device_id)
                    .fetch_one(&mut *tx)
                    .await?;
            if queued >= i64::from(limits.max_queue) {
                return Ok(EnqueueOutcome::QueueFull);
            }
            let inserted = sqlx::query(
                "INSERT OR IGNORE INTO queue
                   (recipient_device, message_id, sender_device, sender, server_time_ms, olm_type, ciphertext)
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(c.device_id)
            .bind(&message_id)
            .bind(sender.device_id)
            .bind(&sender.username)
            .bind(now)
            .bind(i64::from(c.olm_type))
            .bind(&c.body)
            .execute(&mut *tx)
            .await?;
            if inserted.rows_affected() > 0 {
                add_queued_bytes(tx, sender.account_id, c.body.len() as i64).await?;
            }
        }
        Ok(EnqueueOutcome::Accepted {
            server_time_ms: now as u64,
            recipient_devices: devices,
        })
        }))
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
             FROM queue WHERE recipient_device = ? AND seq > ? ORDER BY seq LIMIT ?",
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
    /// device. Returns that device (to wake it), or `None` if there was nothing to delete
    /// (a repeated acknowledgement).
    pub async fn ack_message(
        &self,
        device: &DeviceRecord,
        message_id: &[u8],
    ) -> Result<Option<i64>, ServerError> {
        let (device, message_id) = (device.clone(), message_id.to_vec());
        self.write(move |tx| {
            Box::pin(async move {
                let deleted = sqlx::query(
                    "DELETE FROM queue WHERE recipient_device = ? AND message_id = ?
             RETURNING sender_device, LENGTH(ciphertext)",
                )
                .bind(device.device_id)
                .bind(&message_id)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(row) = deleted else {
                    return Ok(None);
                };
                let sender_device: i64 = row.get(0);
                release_queued_bytes(tx, sender_device, row.get(1)).await?;
                // The sender's device may have been deleted since; then there is no one to tell.
                let res = sqlx::query(
            "INSERT OR IGNORE INTO receipts (device_id, message_id, recipient, server_time_ms)
             SELECT id, ?, ?, ? FROM devices WHERE id = ?",
        )
        .bind(&message_id)
        .bind(&device.username)
        .bind(now_ms())
        .bind(sender_device)
        .execute(&mut *tx)
        .await?;
                Ok((res.rows_affected() > 0).then_some(sender_device))
            })
        })
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
             WHERE device_id = ? AND seq > ? ORDER BY seq LIMIT ?",
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
    /// time-to-live) and queues an `expired` receipt for each sender's device. Returns the
    /// sender devices to wake (one entry per expired message, possibly repeated).
    pub async fn expire(&self, before_ms: u64, limit: u32) -> Result<Vec<i64>, ServerError> {
        self.write(move |tx| {
            Box::pin(async move {
                let rows = sqlx::query(
                    "DELETE FROM queue WHERE seq IN
                       (SELECT seq FROM queue WHERE server_time_ms < ? ORDER BY server_time_ms LIMIT ?)
                     RETURNING message_id, sender_device, recipient_device, LENGTH(ciphertext)",
                )
                .bind(before_ms as i64)
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await?;
                let now = now_ms();
                let mut wake = Vec::with_capacity(rows.len());
                for row in rows {
                    let message_id: Vec<u8> = row.get(0);
                    let sender_device: i64 = row.get(1);
                    let recipient_device: i64 = row.get(2);
                    release_queued_bytes(tx, sender_device, row.get(3)).await?;
                    let res = sqlx::query(
                        "INSERT OR IGNORE INTO receipts
                           (device_id, message_id, recipient, server_time_ms, expired)
                         SELECT s.id, ?, a.username, ?, 1 FROM devices s, devices r
                           JOIN accounts a ON a.id = r.account_id
                         WHERE s.id = ? AND r.id = ?",
                    )
                    .bind(&message_id)
                    .bind(now)
                    .bind(sender_device)
                    .bind(recipient_device)
                    .execute(&mut *tx)
                    .await?;
                    if res.rows_affected() > 0 {
                        wake.push(sender_device);
                    }
                }
                Ok(wake)
            })
        })
        .await
    }

    pub async fn ack_receipt(&self, device_id: i64, message_id: &[u8]) -> Result<(), ServerError> {
        let message_id = message_id.to_vec();
        self.write(move |tx| {
            Box::pin(async move {
                sqlx::query("DELETE FROM receipts WHERE device_id = ? AND message_id = ?")
                    .bind(device_id)
                    .bind(&message_id)
                    .execute(&mut *tx)
                    .await?;
                Ok(())
            })
        })
        .await
    }
}

/// Adds `bytes` to the account's undelivered bytes (the per-account quota).
async fn add_queued_bytes(
    tx: &mut SqliteConnection,
    account_id: i64,
    bytes: i64,
) -> Result<(), ServerError> {
    sqlx::query(
        "INSERT INTO queued_bytes (account_id, bytes) VALUES (?, ?)
         ON CONFLICT(account_id) DO UPDATE SET bytes = bytes + excluded.bytes",
    )
    .bind(account_id)
    .bind(bytes)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// A message of `bytes` sent by `sender_device` left the queue (delivered or expired).
async fn release_queued_bytes(
    tx: &mut SqliteConnection,
    sender_device: i64,
    bytes: i64,
) -> Result<(), ServerError> {
    sqlx::query(
        "UPDATE queued_bytes SET bytes = MAX(0, bytes - ?)
         WHERE account_id = (SELECT account_id FROM devices WHERE id = ?)",
    )
    .bind(bytes)
    .bind(sender_device)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn insert_keys(
    tx: &mut SqliteConnection,
    device_id: i64,
    one_time_keys: &[SignedKey],
    fallback: Option<&SignedKey>,
) -> Result<(), ServerError> {
    for k in one_time_keys {
        sqlx::query(
            "INSERT OR IGNORE INTO one_time_keys (device_id, public_key, signature) VALUES (?, ?, ?)",
        )
        .bind(device_id)
        .bind(&k.public_key)
        .bind(&k.signature)
        .execute(&mut *tx)
        .await?;
    }
    if let Some(k) = fallback {
        sqlx::query(
            "INSERT INTO fallback_keys (device_id, public_key, signature) VALUES (?, ?, ?)
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

/// Runs a statement; boxed so the writer task's future is provably `Send` (rustc cannot
/// see through sqlx's higher-ranked executor lifetimes inside a spawned task otherwise).
fn exec<'c>(
    conn: &'c mut SqliteConnection,
    sql: &'static str,
) -> BoxFuture<'c, Result<(), sqlx::Error>> {
    Box::pin(async move { sqlx::query(sql).execute(conn).await.map(|_| ()) })
}

/// The writer task: batches of waiting writes, one transaction and one fsync per batch.
async fn write_loop(mut conn: SqliteConnection, mut jobs: mpsc::Receiver<WriteJob>) {
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
        let began = exec(&mut conn, "BEGIN IMMEDIATE").await;
        if let Err(e) = began {
            // Dropping the jobs drops their reply channels: every caller gets an error,
            // and nothing was acknowledged.
            tracing::error!(error = %e, "cannot start a database transaction");
            batch.clear();
            continue;
        }
        for job in batch.drain(..) {
            let savepoint = exec(&mut conn, "SAVEPOINT op").await;
            let (ok, answer) = job(&mut conn).await;
            if !(ok && savepoint.is_ok()) {
                let _ = exec(&mut conn, "ROLLBACK TO op").await;
            }
            let _ = exec(&mut conn, "RELEASE op").await;
            answers.push(answer);
        }
        let committed = match exec(&mut conn, "COMMIT").await {
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
