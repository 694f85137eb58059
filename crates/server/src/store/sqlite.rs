//! The SQLite backend (the default): one file, embedded, through rusqlite.
//!
//! Every write that the protocol acknowledges is committed first (WAL journal,
//! `synchronous = FULL`), so an acknowledged message survives a crash, and a crash in the
//! middle of an operation leaves no half-written state.
//!
//! **Group commit on a writer thread.** SQLite has one writer at a time and each commit
//! costs an fsync, so one transaction per message caps delivery at the disk's fsync rate.
//! Instead, one OS thread owns the write connection: it takes every write that is waiting
//! (up to [`MAX_BATCH`]), runs each in its own savepoint inside one transaction, commits
//! once, and only then answers each caller. Nothing is acknowledged before it is on disk;
//! under load one fsync covers many messages.
//!
//! **Why rusqlite on a thread of its own, not sqlx.** sqlx runs each SQLite connection on
//! a worker thread and hands every statement (and every row) to it and back through a
//! channel: a message's dozen statements were a dozen thread round trips, and the futex
//! wake-ups they cost were most of the server's CPU (docs/benchmarks.md). Here the writer
//! thread runs a whole batch's statements itself, from cached prepared statements, so a
//! write costs one hand-off to the thread and one answer back. Reads run on a few read
//! connections through tokio's blocking pool (one hand-off per read, not per row) and never
//! wait for the writer. sqlx is still used once at start, for the migrations, so that
//! databases created by earlier versions keep their migration history.
//!
//! **Caches the writer may keep.** The writer is the only one that changes the database
//! (one server process owns the file), so it can remember what it read or wrote instead of
//! asking again: each account's device list (the first `SELECT` of every send) and each
//! device's queue length (a `COUNT(*)` of up to `max_queue` index entries on every send
//! before). A write whose savepoint is rolled back, or a batch whose commit fails, empties
//! both caches, since they may then describe writes that never happened; they refill from
//! the database as they are used.
//!
//! **Hand-over after commit.** For the same reason the writer knows every envelope and
//! receipt the moment it is committed: it hands them to the hub (in commit order, before
//! answering anyone), and an online recipient's connection pushes them without reading them
//! back (see `hub`). A rolled-back write hands nothing over; a failed commit, nothing.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::*;
use crate::hub::{HandOver, Hub};
use crate::ServerError;

/// Read connections (and so reads running at once).
const READERS: usize = 4;
/// How long a connection waits for SQLite's lock (taken briefly by checkpoints).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a write reports to the writer thread: whether it succeeded (else its savepoint is
/// rolled back), and how to answer its caller once the batch's commit is known.
type Deferred = Box<dyn FnOnce(Result<(), String>) + Send>;
type WriteJob = Box<dyn FnOnce(&mut Writer) -> (bool, Deferred) + Send>;

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    readers: Arc<Readers>,
    writer: mpsc::Sender<WriteJob>,
}

/// The read connections, lent to one blocking task at a time.
struct Readers {
    idle: Mutex<Vec<Connection>>,
    /// One permit per connection: a read waits here, not on a blocking thread.
    permits: Semaphore,
}

/// The write connection and what the writer remembers (see the module's documentation).
struct Writer {
    conn: Connection,
    /// Username → the account's device ids, ascending.
    devices: HashMap<String, Vec<i64>>,
    /// Device id → messages waiting in its queue.
    queued: HashMap<i64, i64>,
    /// This node's online connections, given what each batch committed.
    hub: Arc<Hub>,
    /// Envelopes and receipts written in the current batch, handed to `hub` once it commits.
    handed: Vec<HandOver>,
}

fn open_connection(path: &Path, flags: OpenFlags) -> Result<Connection, ServerError> {
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // WAL is a property of the file (set by the migration pool below); `synchronous` and
    // foreign keys are per connection. FULL: the WAL is fsynced at every commit.
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
    // Every statement the store runs, with room to spare: none is ever parsed twice.
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the database file, applies pending migrations and starts
    /// the writer thread, which hands what it commits to `hub`'s connections.
    pub async fn open(path: &Path, hub: Arc<Hub>) -> Result<Self, ServerError> {
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
            .busy_timeout(BUSY_TIMEOUT);
        let migrations = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&migrations).await?;
        migrations.close().await;

        // Read-write for the readers too: a read-only connection cannot recreate the WAL's
        // -shm file, which SQLite deletes when the last connection (the migrations') closes.
        // They only ever run SELECTs.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = open_connection(path, flags)?;
        let mut idle = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            idle.push(open_connection(path, flags)?);
        }
        let (writer, jobs) = mpsc::channel(4 * MAX_BATCH);
        let state = Writer {
            conn,
            devices: HashMap::new(),
            queued: HashMap::new(),
            hub,
            handed: Vec::new(),
        };
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || write_loop(state, jobs))
            .map_err(ServerError::io("cannot start the database writer thread"))?;
        Ok(Self {
            readers: Arc::new(Readers {
                idle: Mutex::new(idle),
                permits: Semaphore::new(READERS),
            }),
            writer,
        })
    }

    /// Waits until every write submitted so far is committed. (The writer thread ends,
    /// closing the database, when the last handle is dropped.)
    pub async fn close(&self) {
        let _ = self.write(|_| Ok(())).await;
    }

    /// Runs `op` in the writer's next batch; returns its result once it is committed.
    async fn write<T, F>(&self, op: F) -> Result<T, ServerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Writer) -> Result<T, ServerError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: WriteJob = Box::new(move |w| {
            let result = op(w);
            let ok = result.is_ok();
            let deferred: Deferred = Box::new(move |commit| {
                let _ = reply.send(match commit {
                    Ok(()) => result,
                    Err(e) => Err(ServerError::Config(format!("database commit failed: {e}"))),
                });
            });
            (ok, deferred)
        });
        self.writer
            .send(job)
            .await
            .map_err(|_| ServerError::Config("the database writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| ServerError::Config("the database write failed".into()))?
    }

    /// Runs `op` on a read connection, on tokio's blocking pool.
    ///
    /// Not inline on the runtime's threads, although that saves a hand-off: tried, it took
    /// less CPU per message but delivered a third less (thin benchmark, 2,800 against
    /// 4,400 msgs/s), because every read transaction after a commit re-reads the pages the
    /// writer changed (`pread`, `fcntl` locks) and a runtime thread blocked in them stalls
    /// every connection scheduled on it.
    async fn read<T, F>(&self, op: F) -> Result<T, ServerError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        let readers = self.readers.clone();
        let _permit = readers
            .permits
            .acquire()
            .await
            .map_err(|_| ServerError::Config("the database is closed".into()))?;
        let lend = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let conn = lend
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
                .ok_or_else(|| ServerError::Config("no read connection is free".into()))?;
            let result = op(&conn);
            // A panic in `op` would drop the connection; the permit then guards one fewer.
            lend.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(conn);
            Ok(result?)
        })
        .await
        .map_err(|e| ServerError::Config(format!("a database read failed: {e}")))?
    }

    pub async fn device_by_noise_key(
        &self,
        noise_key: &[u8],
    ) -> Result<Option<DeviceRecord>, ServerError> {
        let noise_key = noise_key.to_vec();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT d.id, d.account_id, a.username FROM devices d
                 JOIN accounts a ON a.id = d.account_id WHERE d.noise_key = ?",
            )?
            .query_row([&noise_key], |r| {
                Ok(DeviceRecord {
                    device_id: r.get(0)?,
                    account_id: r.get(1)?,
                    username: r.get(2)?,
                })
            })
            .optional()
        })
        .await
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
        self.write(move |w| {
            let c = &w.conn;
            let taken: Option<i64> = c
                .prepare_cached("SELECT id FROM accounts WHERE username = ?")?
                .query_row([&username], |r| r.get(0))
                .optional()?;
            if taken.is_some() {
                return Ok(RegisterOutcome::UsernameTaken);
            }
            let known: Option<i64> = c
                .prepare_cached("SELECT id FROM devices WHERE noise_key = ?")?
                .query_row([&noise_key], |r| r.get(0))
                .optional()?;
            if known.is_some() {
                return Ok(RegisterOutcome::DeviceAlreadyRegistered);
            }
            let now = now_ms();
            let account_id: i64 = c
                .prepare_cached(
                    "INSERT INTO accounts (username, created_ms) VALUES (?, ?) RETURNING id",
                )?
                .query_row(params![username, now], |r| r.get(0))?;
            let device_id: i64 = c
                .prepare_cached(
                    "INSERT INTO devices (account_id, noise_key, curve25519, ed25519, created_ms)
                     VALUES (?, ?, ?, ?, ?) RETURNING id",
                )?
                .query_row(
                    params![account_id, noise_key, curve25519, ed25519, now],
                    |r| r.get(0),
                )?;
            insert_keys(c, device_id, &one_time_keys, fallback.as_ref())?;
            w.devices.insert(username.clone(), vec![device_id]);
            w.queued.insert(device_id, 0);
            Ok(RegisterOutcome::Registered(DeviceRecord {
                device_id,
                account_id,
                username,
            }))
        })
        .await
    }

    pub async fn one_time_key_count(&self, device_id: i64) -> Result<u32, ServerError> {
        self.read(move |c| count_keys(c, device_id)).await
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
        self.write(move |w| {
            let have = count_keys(&w.conn, device_id)?;
            if have as usize + one_time_keys.len() > max_keys as usize {
                return Ok(None);
            }
            insert_keys(&w.conn, device_id, &one_time_keys, fallback.as_ref())?;
            Ok(Some(count_keys(&w.conn, device_id)?))
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
        self.write(move |w| {
            let c = &w.conn;
            let devices: Vec<(i64, Vec<u8>, Vec<u8>)> = c
                .prepare_cached(
                    "SELECT d.id, d.curve25519, d.ed25519 FROM devices d
                     JOIN accounts a ON a.id = d.account_id WHERE a.username = ? ORDER BY d.id",
                )?
                .query_map([&username], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            if devices.is_empty() {
                return Ok(None);
            }
            let mut bundles = Vec::with_capacity(devices.len());
            for (device_id, curve25519, ed25519) in devices {
                let signed = |r: &rusqlite::Row<'_>| {
                    Ok(SignedKey {
                        public_key: r.get(0)?,
                        signature: r.get(1)?,
                    })
                };
                let otk = if one_time {
                    c.prepare_cached(
                        "DELETE FROM one_time_keys WHERE id =
                           (SELECT id FROM one_time_keys WHERE device_id = ? ORDER BY id LIMIT 1)
                         RETURNING public_key, signature",
                    )?
                    .query_row([device_id], signed)
                    .optional()?
                } else {
                    None
                };
                let (key, is_fallback) = match otk {
                    Some(k) => (Some(k), false),
                    None => (
                        c.prepare_cached(
                            "SELECT public_key, signature FROM fallback_keys WHERE device_id = ?",
                        )?
                        .query_row([device_id], signed)
                        .optional()?,
                        true,
                    ),
                };
                bundles.push(DeviceBundle {
                    device_id,
                    curve25519,
                    ed25519,
                    key,
                    is_fallback,
                });
            }
            Ok(Some(bundles))
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
        self.write(move |w| {
            let Some(devices) = w.devices_of(&recipient)? else {
                return Ok(EnqueueOutcome::UnknownRecipient);
            };
            if !addresses_every_device(&ciphertexts, &devices) {
                return Ok(EnqueueOutcome::DevicesChanged);
            }
            let now = now_ms();
            let c = &w.conn;
            let waiting: i64 = c
                .prepare_cached("SELECT bytes FROM queued_bytes WHERE account_id = ?")?
                .query_row([sender.account_id], |r| r.get(0))
                .optional()?
                .unwrap_or(0);
            let adding: u64 = ciphertexts.iter().map(|c| c.body.len() as u64).sum();
            if waiting.max(0) as u64 + adding > limits.max_queued_bytes {
                // Over quota, unless this is a retry of a message already queued (its
                // bytes are counted already): checked only here, off the common path.
                let already: Option<i64> = c
                    .prepare_cached(
                        "SELECT 1 FROM queue WHERE recipient_device = ? AND message_id = ? LIMIT 1",
                    )?
                    .query_row(params![devices[0], message_id], |r| r.get(0))
                    .optional()?;
                if already.is_none() {
                    return Ok(EnqueueOutcome::OverQuota);
                }
            }
            for ct in ciphertexts {
                if w.queue_len(ct.device_id)? >= i64::from(limits.max_queue) {
                    return Ok(EnqueueOutcome::QueueFull);
                }
                let inserted = w
                    .conn
                    .prepare_cached(
                        "INSERT OR IGNORE INTO queue
                           (recipient_device, message_id, sender_device, sender, server_time_ms,
                            olm_type, ciphertext)
                         VALUES (?, ?, ?, ?, ?, ?, ?)",
                    )?
                    .execute(params![
                        ct.device_id,
                        message_id,
                        sender.device_id,
                        sender.username,
                        now,
                        i64::from(ct.olm_type),
                        ct.body
                    ])?;
                if inserted > 0 {
                    // Now: the quota upsert below may insert a row and move it.
                    let seq = w.conn.last_insert_rowid();
                    *w.queued.entry(ct.device_id).or_insert(0) += 1;
                    w.conn
                        .prepare_cached(
                            "INSERT INTO queued_bytes (account_id, bytes) VALUES (?, ?)
                             ON CONFLICT(account_id) DO UPDATE SET bytes = bytes + excluded.bytes",
                        )?
                        .execute(params![sender.account_id, ct.body.len() as i64])?;
                    w.handed.push(HandOver::Envelope {
                        device_id: ct.device_id,
                        envelope: Arc::new(QueuedEnvelope {
                            seq,
                            message_id: message_id.clone(),
                            sender: sender.username.clone(),
                            sender_device: sender.device_id,
                            server_time_ms: now as u64,
                            olm_type: ct.olm_type,
                            ciphertext: ct.body,
                        }),
                    });
                }
            }
            Ok(EnqueueOutcome::Accepted {
                server_time_ms: now as u64,
                recipient_devices: devices,
            })
        })
        .await
    }

    /// Envelopes for `device_id` after queue position `after_seq`, oldest first.
    pub async fn pending(
        &self,
        device_id: i64,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<QueuedEnvelope>, ServerError> {
        self.read(move |c| {
            c.prepare_cached(
                "SELECT seq, message_id, sender, sender_device, server_time_ms, olm_type, ciphertext
                 FROM queue WHERE recipient_device = ? AND seq > ? ORDER BY seq LIMIT ?",
            )?
            .query_map(params![device_id, after_seq, i64::from(limit)], |r| {
                Ok(QueuedEnvelope {
                    seq: r.get(0)?,
                    message_id: r.get(1)?,
                    sender: r.get(2)?,
                    sender_device: r.get(3)?,
                    server_time_ms: r.get::<_, i64>(4)? as u64,
                    olm_type: r.get::<_, i64>(5)? as u32,
                    ciphertext: r.get(6)?,
                })
            })?
            .collect()
        })
        .await
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
        self.write(move |w| {
            let now = now_ms();
            let deleted: Option<(i64, i64)> = w
                .conn
                .prepare_cached(
                    "DELETE FROM queue WHERE recipient_device = ? AND message_id = ?
                     RETURNING sender_device, LENGTH(ciphertext)",
                )?
                .query_row(params![device.device_id, message_id], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?;
            let Some((sender_device, bytes)) = deleted else {
                return Ok(None);
            };
            w.dequeued(device.device_id);
            release_queued_bytes(&w.conn, sender_device, bytes)?;
            // The sender's device may have been deleted since; then there is no one to tell.
            let queued = w
                .conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO receipts (device_id, message_id, recipient, server_time_ms)
                     SELECT id, ?, ?, ? FROM devices WHERE id = ?",
                )?
                .execute(params![message_id, device.username, now, sender_device])?;
            if queued == 0 {
                return Ok(None);
            }
            w.handed.push(HandOver::Receipt {
                device_id: sender_device,
                receipt: Arc::new(QueuedReceipt {
                    seq: w.conn.last_insert_rowid(),
                    message_id,
                    recipient: device.username,
                    server_time_ms: now as u64,
                    expired: false,
                }),
            });
            Ok(Some(sender_device))
        })
        .await
    }

    pub async fn pending_receipts(
        &self,
        device_id: i64,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<QueuedReceipt>, ServerError> {
        self.read(move |c| {
            c.prepare_cached(
                "SELECT seq, message_id, recipient, server_time_ms, expired FROM receipts
                 WHERE device_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            )?
            .query_map(params![device_id, after_seq, i64::from(limit)], |r| {
                Ok(QueuedReceipt {
                    seq: r.get(0)?,
                    message_id: r.get(1)?,
                    recipient: r.get(2)?,
                    server_time_ms: r.get::<_, i64>(3)? as u64,
                    expired: r.get::<_, i64>(4)? != 0,
                })
            })?
            .collect()
        })
        .await
    }

    /// Deletes up to `limit` queued messages older than `before_ms` (the queue
    /// time-to-live) and queues an `expired` receipt for each sender's device. Returns the
    /// sender devices to wake (one entry per expired message, possibly repeated).
    pub async fn expire(&self, before_ms: u64, limit: u32) -> Result<Vec<i64>, ServerError> {
        self.write(move |w| {
            let rows: Vec<(Vec<u8>, i64, i64, i64)> = w
                .conn
                .prepare_cached(
                    "DELETE FROM queue WHERE seq IN
                       (SELECT seq FROM queue WHERE server_time_ms < ? ORDER BY server_time_ms LIMIT ?)
                     RETURNING message_id, sender_device, recipient_device, LENGTH(ciphertext)",
                )?
                .query_map(params![before_ms as i64, i64::from(limit)], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .collect::<Result<_, _>>()?;
            let now = now_ms();
            let mut wake = Vec::with_capacity(rows.len());
            for (message_id, sender_device, recipient_device, bytes) in rows {
                w.dequeued(recipient_device);
                release_queued_bytes(&w.conn, sender_device, bytes)?;
                let queued = w
                    .conn
                    .prepare_cached(
                        "INSERT OR IGNORE INTO receipts
                           (device_id, message_id, recipient, server_time_ms, expired)
                         SELECT s.id, ?, a.username, ?, 1 FROM devices s, devices r
                           JOIN accounts a ON a.id = r.account_id
                         WHERE s.id = ? AND r.id = ?",
                    )?
                    .execute(params![message_id, now, sender_device, recipient_device])?;
                if queued > 0 {
                    wake.push(sender_device);
                }
            }
            Ok(wake)
        })
        .await
    }

    pub async fn ack_receipt(&self, device_id: i64, message_id: &[u8]) -> Result<(), ServerError> {
        let message_id = message_id.to_vec();
        self.write(move |w| {
            w.conn
                .prepare_cached("DELETE FROM receipts WHERE device_id = ? AND message_id = ?")?
                .execute(params![device_id, message_id])?;
            Ok(())
        })
        .await
    }
}

impl Writer {
    /// The device ids of `username`'s account, ascending; `None` if there is no such user.
    fn devices_of(&mut self, username: &str) -> Result<Option<Vec<i64>>, ServerError> {
        if let Some(devices) = self.devices.get(username) {
            return Ok(Some(devices.clone()));
        }
        let devices: Vec<i64> = self
            .conn
            .prepare_cached(
                "SELECT d.id FROM devices d JOIN accounts a ON a.id = d.account_id
                 WHERE a.username = ? ORDER BY d.id",
            )?
            .query_map([username], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if devices.is_empty() {
            // Not remembered: the name may be registered later.
            return Ok(None);
        }
        self.devices.insert(username.to_string(), devices.clone());
        Ok(Some(devices))
    }

    /// Messages waiting for `device_id`.
    fn queue_len(&mut self, device_id: i64) -> Result<i64, ServerError> {
        if let Some(&n) = self.queued.get(&device_id) {
            return Ok(n);
        }
        let n: i64 = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM queue WHERE recipient_device = ?")?
            .query_row([device_id], |r| r.get(0))?;
        self.queued.insert(device_id, n);
        Ok(n)
    }

    /// A message left `device_id`'s queue.
    fn dequeued(&mut self, device_id: i64) {
        if let Some(n) = self.queued.get_mut(&device_id) {
            *n = (*n - 1).max(0);
        }
    }

    /// Forgets everything remembered: after a rollback it may describe undone writes.
    fn forget(&mut self) {
        self.devices.clear();
        self.queued.clear();
    }

    fn exec(&self, sql: &str) -> Result<(), rusqlite::Error> {
        self.conn.prepare_cached(sql)?.execute([]).map(|_| ())
    }
}

fn count_keys(c: &Connection, device_id: i64) -> Result<u32, rusqlite::Error> {
    let n: i64 = c
        .prepare_cached("SELECT COUNT(*) FROM one_time_keys WHERE device_id = ?")?
        .query_row([device_id], |r| r.get(0))?;
    Ok(n as u32)
}

/// A message of `bytes` sent by `sender_device` left the queue (delivered or expired).
fn release_queued_bytes(
    c: &Connection,
    sender_device: i64,
    bytes: i64,
) -> Result<(), rusqlite::Error> {
    c.prepare_cached(
        "UPDATE queued_bytes SET bytes = MAX(0, bytes - ?)
         WHERE account_id = (SELECT account_id FROM devices WHERE id = ?)",
    )?
    .execute(params![bytes, sender_device])?;
    Ok(())
}

fn insert_keys(
    c: &Connection,
    device_id: i64,
    one_time_keys: &[SignedKey],
    fallback: Option<&SignedKey>,
) -> Result<(), rusqlite::Error> {
    for k in one_time_keys {
        c.prepare_cached(
            "INSERT OR IGNORE INTO one_time_keys (device_id, public_key, signature) VALUES (?, ?, ?)",
        )?
        .execute(params![device_id, k.public_key, k.signature])?;
    }
    if let Some(k) = fallback {
        c.prepare_cached(
            "INSERT INTO fallback_keys (device_id, public_key, signature) VALUES (?, ?, ?)
             ON CONFLICT(device_id) DO UPDATE SET public_key = excluded.public_key,
                                                  signature = excluded.signature",
        )?
        .execute(params![device_id, k.public_key, k.signature])?;
    }
    Ok(())
}

/// The writer thread: batches of waiting writes, one transaction and one fsync per batch.
/// Ends when every [`SqliteStore`] handle is dropped, closing the connection.
fn write_loop(mut w: Writer, mut jobs: mpsc::Receiver<WriteJob>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut answers = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Err(e) = w.exec("BEGIN IMMEDIATE") {
            // Dropping the jobs drops their reply channels: every caller gets an error,
            // and nothing was acknowledged.
            tracing::error!(error = %e, "cannot start a database transaction");
            batch.clear();
            continue;
        }
        for job in batch.drain(..) {
            let savepoint = w.exec("SAVEPOINT op");
            let handed_before = w.handed.len();
            let (ok, answer) = job(&mut w);
            if !(ok && savepoint.is_ok()) {
                let _ = w.exec("ROLLBACK TO op");
                w.forget();
                w.handed.truncate(handed_before);
            }
            let _ = w.exec("RELEASE op");
            answers.push(answer);
        }
        let committed = match w.exec("COMMIT") {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::error!(error = %e, "database commit failed");
                let _ = w.exec("ROLLBACK");
                w.forget();
                Err(e.to_string())
            }
        };
        // Before any answer: a sender told "accepted" may tell the recipient out of band,
        // and the recipient's connection must already have the message by then.
        if committed.is_ok() {
            let hub = w.hub.clone();
            hub.hand_over(w.handed.drain(..));
        } else {
            w.handed.clear();
        }
        for answer in answers.drain(..) {
            answer(committed.clone());
        }
    }
}
