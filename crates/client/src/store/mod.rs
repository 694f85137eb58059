//! The profile's local database (SQLite through sqlx).
//!
//! Olm state lives only here, never cached in memory across operations: each operation
//! that touches it runs in one `BEGIN IMMEDIATE` transaction (load pickle, use, save), so
//! two processes on the same profile (say `postern inbox --follow` and `postern send`)
//! never overwrite each other's ratchet state, and a crash never leaves a decrypted
//! message unrecorded while its keys are already spent.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use postern_protocol::link::Sni;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Row, Sqlite, SqlitePool, Transaction};
use vodozemac::olm::{Account, AccountPickle, Session, SessionPickle};

use crate::{ClientError, MessageId};

mod groups;
pub(crate) use groups::OutgoingGroup;
pub use groups::{MemberDelivery, MemberStatus};

pub type Tx = Transaction<'static, Sqlite>;

/// How long a device remembers a message it decrypted and did not show (90 days: three
/// times the server's default queue lifetime, after which it delivers nothing again).
pub const IGNORED_KEPT_MS: i64 = 90 * 24 * 60 * 60 * 1000;

/// Delivery state of a message in the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    /// Typed, not yet accepted by the server (kept so nothing typed is lost).
    Pending,
    /// In the recipient's queue on the server (✓).
    Sent,
    /// Stored by the recipient's device (✓✓).
    Delivered,
    /// An incoming message.
    Received,
    /// An incoming message that could not be decrypted.
    Undecryptable,
    /// An outgoing message that can never be delivered (the reason is kept with it).
    Failed,
    /// Not a message: the contact's identity keys changed here (a new device, or new keys
    /// for one), so their safety number changed. Its text is empty.
    #[serde(rename = "key_changed")]
    KeyChanged,
}

impl MessageStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Received => "received",
            Self::Undecryptable => "undecryptable",
            Self::Failed => "failed",
            Self::KeyChanged => "key_changed",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "sent" => Self::Sent,
            "delivered" => Self::Delivered,
            "received" => Self::Received,
            "undecryptable" => Self::Undecryptable,
            "failed" => Self::Failed,
            "key_changed" => Self::KeyChanged,
            _ => Self::Pending,
        }
    }

    /// The tick marks shown next to an outgoing message.
    pub fn marks(self) -> &'static str {
        match self {
            Self::Pending => "…",
            Self::Sent => "✓",
            Self::Delivered => "✓✓",
            Self::Received => "",
            Self::Undecryptable => "⚠",
            Self::Failed => "✗",
            Self::KeyChanged => "⚠",
        }
    }
}

/// One line of a conversation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HistoryEntry {
    pub message_id: MessageId,
    pub peer: String,
    pub outgoing: bool,
    pub text: String,
    pub created_ms: u64,
    pub server_time_ms: Option<u64>,
    pub status: MessageStatus,
    /// Why an outgoing message failed ([`MessageStatus::Failed`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The file sent with the message, if any (`text` is then its caption).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachment: Option<AttachmentInfo>,
    /// In a group's conversation: who wrote an incoming message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// In a group's conversation: a membership change, which `text` describes.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub group_event: bool,
    /// An outgoing group message: where each member's copy stands.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deliveries: Vec<MemberDelivery>,
}

impl HistoryEntry {
    /// The marks shown next to an outgoing message: as [`MessageStatus::marks`], and for a
    /// group message "✓✓" once every member has it, "✓✓ 1/3" while only some do.
    pub fn marks(&self) -> String {
        match self.group_progress() {
            Some(p) => format!("✓✓ {}/{}", p.delivered, p.reached),
            None => self.status.marks().to_string(),
        }
    }

    /// For an outgoing group message some members have and others not yet: how many
    /// have it, of how many it can still reach, and who is still waiting. `None` otherwise
    /// (the one place this rule lives: the CLI and the app both show it).
    pub fn group_progress(&self) -> Option<GroupProgress> {
        let reached: Vec<&MemberDelivery> = self
            .deliveries
            .iter()
            .filter(|d| d.status != MemberStatus::Failed)
            .collect();
        let delivered = reached
            .iter()
            .filter(|d| d.status == MemberStatus::Delivered)
            .count();
        let some = matches!(self.status, MessageStatus::Sent | MessageStatus::Pending)
            && delivered > 0
            && delivered < reached.len();
        some.then(|| GroupProgress {
            delivered,
            reached: reached.len(),
            waiting: reached
                .iter()
                .filter(|d| d.status != MemberStatus::Delivered)
                .map(|d| d.member.clone())
                .collect(),
        })
    }
}

/// An outgoing group message that some members have (see [`HistoryEntry::group_progress`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupProgress {
    /// Members whose device has it.
    pub delivered: usize,
    /// Members it can still reach (those it failed for are left out).
    pub reached: usize,
    /// Members it has not reached yet.
    pub waiting: Vec<String>,
}

/// Where an attachment's transfer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferState {
    /// Outgoing: encrypted here, being uploaded (the message goes out once it is up).
    Uploading,
    /// Outgoing: on the server; the message carries its key.
    Uploaded,
    /// Incoming: announced by a message, being fetched.
    Downloading,
    /// Incoming: fetched, checked and decrypted; the file is at `path`.
    Done,
    /// Cannot be completed (the reason is kept).
    Failed,
}

impl TransferState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Uploading => "uploading",
            Self::Uploaded => "uploaded",
            Self::Downloading => "downloading",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "uploading" => Self::Uploading,
            "uploaded" => Self::Uploaded,
            "downloading" => Self::Downloading,
            "done" => Self::Done,
            _ => Self::Failed,
        }
    }
}

/// A file sent or received with a message, as history shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttachmentInfo {
    pub file_name: String,
    pub content_type: String,
    /// Bytes of the file.
    pub size: u64,
    pub state: TransferState,
    /// Ciphertext bytes moved so far, of `ciphertext_size`.
    pub transferred: u64,
    pub ciphertext_size: u64,
    /// The decrypted file (incoming, once done).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Everything kept about an attachment, keys included (never shown).
#[derive(Clone)]
pub struct AttachmentRecord {
    pub message_id: MessageId,
    /// The conversation: a contact, or a group's key.
    pub peer: String,
    /// In a group, who sent it.
    pub sender: Option<String>,
    pub outgoing: bool,
    pub wire: postern_protocol::schema::Attachment,
    pub state: TransferState,
    pub transferred: u64,
    /// Outgoing, until uploaded: the ciphertext file to upload.
    pub upload_path: Option<String>,
    /// The file itself: the copy kept of a file sent; a received one once decrypted.
    pub path: Option<String>,
}

impl std::fmt::Debug for AttachmentRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the key.
        f.debug_struct("AttachmentRecord")
            .field("message_id", &self.message_id)
            .field("file_name", &self.wire.file_name)
            .field("state", &self.state)
            .field("transferred", &self.transferred)
            .finish()
    }
}

/// A conversation in the chat list.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Conversation {
    /// The contact's username, or a group's conversation key (`group:` and its id).
    pub peer: String,
    /// What to call it: the contact's username, or the group's name.
    pub title: String,
    /// A group's conversation.
    pub group: bool,
    /// Who wrote the last message, in a group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_sender: Option<String>,
    pub last_text: String,
    pub last_outgoing: bool,
    pub last_status: MessageStatus,
    pub last_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
    /// Incoming messages not yet marked read.
    pub unread: u64,
}

/// A pinned device of a contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactDevice {
    pub device_id: u64,
    pub curve25519: Vec<u8>,
    pub ed25519: Option<Vec<u8>>,
}

/// What pinning one device did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinned {
    /// Already pinned with these keys (a missing Ed25519 key may have been filled in).
    Same,
    /// A device not pinned before.
    New,
    /// The device's identity keys differ from the pinned ones: the new keys replace them
    /// and the sessions with the old ones are deleted.
    Replaced,
}

/// What the user verified about a contact, and when the contact's keys last changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verification {
    /// The safety number the user confirmed (cleared when the keys change).
    pub verified_number: Option<String>,
    /// When the user last confirmed a number.
    pub verified_ms: Option<u64>,
    /// When the contact's identity keys last changed after first use.
    pub key_changed_ms: Option<u64>,
}

#[derive(Clone)]
pub struct LocalStore {
    pool: SqlitePool,
    pickle_key: [u8; 32],
}

impl LocalStore {
    pub async fn open(path: &Path, pickle_key: [u8; 32]) -> Result<Self, ClientError> {
        // History and sessions: readable by this user only. The profile directory is made
        // 0700 too (also one created by an older version), and the database 0600 before
        // SQLite opens it, which gives its -wal and -shm files the same mode.
        let private = |e: std::io::Error| {
            ClientError::Profile(format!("cannot make {} private: {e}", path.display()))
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            postern_protocol::fsutil::private_dir(dir).map_err(private)?;
        }
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
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool, pickle_key })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Starts a write transaction that holds the database lock until commit.
    pub async fn begin(&self) -> Result<Tx, ClientError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    // --- Olm account -------------------------------------------------------------------

    pub async fn load_account(&self, tx: &mut Tx) -> Result<Account, ClientError> {
        let pickle: String = sqlx::query_scalar("SELECT pickle FROM olm_account WHERE id = 1")
            .fetch_optional(&mut **tx)
            .await?
            .ok_or_else(|| ClientError::Profile("the profile has no Olm account".into()))?;
        let pickle = AccountPickle::from_encrypted(&pickle, &self.pickle_key).map_err(|e| {
            ClientError::Profile(format!(
                "cannot decrypt the Olm account (wrong secrets.toml?): {e}"
            ))
        })?;
        Ok(Account::from_pickle(pickle))
    }

    pub async fn save_account(&self, tx: &mut Tx, account: &Account) -> Result<(), ClientError> {
        let pickle = account.pickle().encrypt(&self.pickle_key);
        sqlx::query(
            "INSERT INTO olm_account (id, pickle) VALUES (1, ?)
             ON CONFLICT(id) DO UPDATE SET pickle = excluded.pickle",
        )
        .bind(pickle)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    // --- Olm sessions ------------------------------------------------------------------

    /// Sessions with one device, most recently used first.
    pub async fn sessions(
        &self,
        tx: &mut Tx,
        username: &str,
        device_id: u64,
    ) -> Result<Vec<Session>, ClientError> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT pickle FROM olm_sessions WHERE username = ? AND device_id = ?
             ORDER BY last_used_ms DESC",
        )
        .bind(username)
        .bind(device_id as i64)
        .fetch_all(&mut **tx)
        .await?;
        rows.iter()
            .map(|p| {
                SessionPickle::from_encrypted(p, &self.pickle_key)
                    .map(Session::from_pickle)
                    .map_err(|e| {
                        ClientError::Profile(format!("cannot decrypt an Olm session: {e}"))
                    })
            })
            .collect()
    }

    pub async fn save_session(
        &self,
        tx: &mut Tx,
        username: &str,
        device_id: u64,
        session: &Session,
    ) -> Result<(), ClientError> {
        sqlx::query(
            "INSERT INTO olm_sessions (session_id, username, device_id, pickle, last_used_ms)
             VALUES (?, ?, ?, ?, ?)
             ON CONFLICT(session_id) DO UPDATE SET pickle = excluded.pickle,
                                                   last_used_ms = excluded.last_used_ms",
        )
        .bind(session.session_id())
        .bind(username)
        .bind(device_id as i64)
        .bind(session.pickle().encrypt(&self.pickle_key))
        .bind(postern_protocol::now_ms() as i64)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    // --- Contacts ----------------------------------------------------------------------

    pub async fn contact_devices(&self, username: &str) -> Result<Vec<ContactDevice>, ClientError> {
        let mut conn = self.pool.acquire().await?;
        Self::contact_devices_on(&mut conn, username).await
    }

    async fn contact_devices_on(
        conn: &mut sqlx::SqliteConnection,
        username: &str,
    ) -> Result<Vec<ContactDevice>, ClientError> {
        let rows = sqlx::query(
            "SELECT device_id, curve25519, ed25519 FROM contact_devices WHERE username = ? ORDER BY device_id",
        )
        .bind(username)
        .fetch_all(&mut *conn)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| ContactDevice {
                device_id: r.get::<i64, _>(0) as u64,
                curve25519: r.get(1),
                ed25519: r.get(2),
            })
            .collect())
    }

    /// Pins the identity keys of a contact's devices, inside `tx`; returns whether the
    /// contact's keys changed (the caller then records the change where it belongs in
    /// the conversation: [`LocalStore::record_key_change`]).
    ///
    /// A device is pinned on first use. Keys that differ from the pinned ones (the
    /// contact reinstalled, or the server substituted keys) are not refused — that would
    /// end the conversation for good — but replace them, and the conversation and the
    /// contact's verification say so. A new device of a contact whose keys were pinned
    /// before is a change too (it can read what is sent to the contact). With `complete`,
    /// `devices` is every device the contact has (the server's list when keys are
    /// claimed), so devices not in it are forgotten, with their sessions.
    pub async fn pin_devices(
        &self,
        tx: &mut Tx,
        username: &str,
        devices: &[ContactDevice],
        complete: bool,
    ) -> Result<bool, ClientError> {
        let before = Self::contact_devices_on(tx, username).await?;
        let mut changed = false;
        for device in devices {
            match self.pin_device(tx, username, device).await? {
                Pinned::Same => {}
                Pinned::New => changed |= !before.is_empty(),
                Pinned::Replaced => changed = true,
            }
        }
        if complete {
            for gone in before
                .iter()
                .filter(|b| !devices.iter().any(|d| d.device_id == b.device_id))
            {
                self.forget_device(tx, username, gone.device_id).await?;
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Pins one device (see [`LocalStore::pin_devices`]).
    async fn pin_device(
        &self,
        tx: &mut Tx,
        username: &str,
        device: &ContactDevice,
    ) -> Result<Pinned, ClientError> {
        let existing = sqlx::query(
            "SELECT curve25519, ed25519 FROM contact_devices WHERE username = ? AND device_id = ?",
        )
        .bind(username)
        .bind(device.device_id as i64)
        .fetch_optional(&mut **tx)
        .await?;
        let Some(row) = existing else {
            sqlx::query(
                "INSERT INTO contact_devices (username, device_id, curve25519, ed25519, first_seen_ms)
                 VALUES (?, ?, ?, ?, ?)",
            )
            .bind(username)
            .bind(device.device_id as i64)
            .bind(&device.curve25519)
            .bind(&device.ed25519)
            .bind(postern_protocol::now_ms() as i64)
            .execute(&mut **tx)
            .await?;
            return Ok(Pinned::New);
        };
        let curve: Vec<u8> = row.get(0);
        let ed: Option<Vec<u8>> = row.get(1);
        let ed_conflict = matches!((&ed, &device.ed25519), (Some(a), Some(b)) if a != b);
        if curve != device.curve25519 || ed_conflict {
            // New keys for this device: the old sessions are with the old keys.
            sqlx::query(
                "UPDATE contact_devices SET curve25519 = ?, ed25519 = ?, first_seen_ms = ?
                 WHERE username = ? AND device_id = ?",
            )
            .bind(&device.curve25519)
            .bind(&device.ed25519)
            .bind(postern_protocol::now_ms() as i64)
            .bind(username)
            .bind(device.device_id as i64)
            .execute(&mut **tx)
            .await?;
            self.delete_sessions(tx, username, device.device_id).await?;
            return Ok(Pinned::Replaced);
        }
        if ed.is_none() && device.ed25519.is_some() {
            sqlx::query(
                "UPDATE contact_devices SET ed25519 = ? WHERE username = ? AND device_id = ?",
            )
            .bind(&device.ed25519)
            .bind(username)
            .bind(device.device_id as i64)
            .execute(&mut **tx)
            .await?;
        }
        Ok(Pinned::Same)
    }

    /// Forgets a device the contact no longer has, and its sessions.
    async fn forget_device(
        &self,
        tx: &mut Tx,
        username: &str,
        device_id: u64,
    ) -> Result<(), ClientError> {
        sqlx::query("DELETE FROM contact_devices WHERE username = ? AND device_id = ?")
            .bind(username)
            .bind(device_id as i64)
            .execute(&mut **tx)
            .await?;
        self.delete_sessions(tx, username, device_id).await
    }

    async fn delete_sessions(
        &self,
        tx: &mut Tx,
        username: &str,
        device_id: u64,
    ) -> Result<(), ClientError> {
        sqlx::query("DELETE FROM olm_sessions WHERE username = ? AND device_id = ?")
            .bind(username)
            .bind(device_id as i64)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Records that `username`'s identity keys changed: a `key_changed` line in the
    /// conversation at `at_ms` (just before the message that brought or used the new
    /// keys), and the contact is no longer verified.
    pub async fn record_key_change(
        &self,
        tx: &mut Tx,
        username: &str,
        at_ms: u64,
    ) -> Result<(), ClientError> {
        let now = postern_protocol::now_ms() as i64;
        sqlx::query(
            "INSERT INTO messages (message_id, peer, outgoing, body, created_ms, server_time_ms, status)
             VALUES (?, ?, 0, '', ?, ?, 'key_changed')",
        )
        .bind(&MessageId::random().0[..])
        .bind(username)
        .bind(at_ms as i64)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "INSERT INTO contact_verification (username, verified_number, key_changed_ms)
             VALUES (?, NULL, ?)
             ON CONFLICT(username) DO UPDATE SET verified_number = NULL,
                                                 key_changed_ms = excluded.key_changed_ms",
        )
        .bind(username)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// What the user verified about `username`.
    pub async fn verification(&self, username: &str) -> Result<Verification, ClientError> {
        let row = sqlx::query(
            "SELECT verified_number, verified_ms, key_changed_ms
             FROM contact_verification WHERE username = ?",
        )
        .bind(username)
        .fetch_optional(&self.pool)
        .await?;
        let ms = |v: Option<i64>| v.map(|v| v as u64);
        Ok(row
            .map(|r| Verification {
                verified_number: r.get(0),
                verified_ms: ms(r.get(1)),
                key_changed_ms: ms(r.get(2)),
            })
            .unwrap_or_default())
    }

    /// Marks `username` verified with the safety number the user compared (`Some`), or
    /// clears the mark (`None`).
    pub async fn set_verified(
        &self,
        username: &str,
        number: Option<&str>,
    ) -> Result<(), ClientError> {
        let now = number.map(|_| postern_protocol::now_ms() as i64);
        sqlx::query(
            "INSERT INTO contact_verification (username, verified_number, verified_ms)
             VALUES (?, ?, ?)
             ON CONFLICT(username) DO UPDATE SET
                 verified_number = excluded.verified_number,
                 verified_ms = COALESCE(excluded.verified_ms, contact_verification.verified_ms)",
        )
        .bind(username)
        .bind(number)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // --- Settings and proxies ----------------------------------------------------------

    pub async fn setting(&self, key: &str) -> Result<Option<String>, ClientError> {
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE key = ?")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub async fn set_setting(&self, key: &str, value: &str) -> Result<(), ClientError> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES (?, ?)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Saved proxies in the order they were added.
    pub async fn proxies(&self) -> Result<Vec<crate::proxy::ProxyEntry>, ClientError> {
        let rows =
            sqlx::query("SELECT host, port, tls, media_port, secret, sni FROM proxies ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|r| crate::proxy::ProxyEntry {
                host: r.get(0),
                port: r.get::<i64, _>(1) as u16,
                tls: r.get::<i64, _>(2) != 0,
                media: r.get::<Option<i64>, _>(3).map(|m| m as u16),
                // Written by this client from a checked secret; a damaged one is dropped
                // (the relay then shows its cover site, and the user re-imports the link).
                secret: r.get::<Option<String>, _>(4).and_then(|s| s.parse().ok()),
                // Likewise checked when saved; a damaged name falls back to the default.
                sni: match r.get::<Option<String>, _>(5) {
                    None => Sni::Host,
                    Some(v) => Sni::parse(&v).unwrap_or_default(),
                },
            })
            .collect())
    }

    /// Saves a proxy at the end of the list; returns false if one with the same host and
    /// port was already saved (it is updated in place, keeping its position).
    pub async fn add_proxy(&self, p: &crate::proxy::ProxyEntry) -> Result<bool, ClientError> {
        let mut tx = self.begin().await?;
        let existed: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM proxies WHERE host = ? AND port = ?")
                .bind(&p.host)
                .bind(i64::from(p.port))
                .fetch_one(&mut *tx)
                .await?;
        sqlx::query(
            "INSERT INTO proxies (host, port, tls, media_port, added_ms, secret, sni) VALUES (?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT(host, port) DO UPDATE SET tls = excluded.tls, media_port = excluded.media_port,
                 secret = excluded.secret, sni = excluded.sni",
        )
        .bind(&p.host)
        .bind(i64::from(p.port))
        .bind(i64::from(p.tls))
        .bind(p.media.map(i64::from))
        .bind(postern_protocol::now_ms() as i64)
        .bind(p.secret.as_ref().map(|s| s.to_string()))
        .bind(p.sni.link_value())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(existed == 0)
    }

    /// Replaces the saved list by `proxies`, in that order (the list is ordered by id, so
    /// the rows are inserted again; when each was first added is kept).
    pub async fn replace_proxies(
        &self,
        proxies: &[crate::proxy::ProxyEntry],
    ) -> Result<(), ClientError> {
        let mut tx = self.begin().await?;
        let added: Vec<(String, i64, i64)> =
            sqlx::query_as("SELECT host, port, added_ms FROM proxies")
                .fetch_all(&mut *tx)
                .await?;
        sqlx::query("DELETE FROM proxies").execute(&mut *tx).await?;
        for p in proxies {
            let added_ms = added
                .iter()
                .find(|(h, port, _)| *h == p.host && *port == i64::from(p.port))
                .map(|(_, _, ms)| *ms)
                .unwrap_or_else(|| postern_protocol::now_ms() as i64);
            sqlx::query(
                "INSERT INTO proxies (host, port, tls, media_port, added_ms, secret, sni) VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&p.host)
            .bind(i64::from(p.port))
            .bind(i64::from(p.tls))
            .bind(p.media.map(i64::from))
            .bind(added_ms)
            .bind(p.secret.as_ref().map(|s| s.to_string()))
            .bind(p.sni.link_value())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn remove_proxy(&self, p: &crate::proxy::ProxyEntry) -> Result<(), ClientError> {
        sqlx::query("DELETE FROM proxies WHERE host = ? AND port = ?")
            .bind(&p.host)
            .bind(i64::from(p.port))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // --- Route health (see `connector::health`) -----------------------------------------

    pub async fn route_health(&self) -> Result<crate::connector::health::HealthMap, ClientError> {
        let rows = sqlx::query(
            "SELECT route, last_ok_ms, last_failure_ms, last_failure, last_latency_ms, hostile
             FROM route_health",
        )
        .fetch_all(&self.pool)
        .await?;
        let ms = |v: Option<i64>| v.map(|v| v as u64);
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                // A row that no longer parses (an older format) is simply forgotten.
                let route = serde_json::from_str(r.get::<&str, _>(0)).ok()?;
                Some((
                    route,
                    crate::connector::health::RouteHealth {
                        last_ok_ms: ms(r.get(1)),
                        last_failure_ms: ms(r.get(2)),
                        last_failure: r.get(3),
                        last_latency_ms: ms(r.get(4)),
                        hostile: r.get::<i64, _>(5) != 0,
                    },
                ))
            })
            .collect())
    }

    fn route_key(route: &crate::connector::route::Route) -> Result<String, ClientError> {
        serde_json::to_string(route).map_err(|e| ClientError::Profile(e.to_string()))
    }

    /// Records what attempts through routes taught, in one transaction (one disk sync
    /// per connection, however many routes were raced).
    pub async fn record_route_outcomes(
        &self,
        outcomes: &[(
            &crate::connector::route::Route,
            crate::connector::health::RouteOutcome,
        )],
    ) -> Result<(), ClientError> {
        use crate::connector::health::RouteOutcome;
        if outcomes.is_empty() {
            return Ok(());
        }
        let now = postern_protocol::now_ms() as i64;
        let mut tx = self.begin().await?;
        for (route, outcome) in outcomes {
            let key = Self::route_key(route)?;
            match outcome {
                RouteOutcome::Worked { latency_ms } => {
                    sqlx::query(
                        "INSERT INTO route_health (route, last_ok_ms, last_latency_ms, hostile)
                         VALUES (?, ?, ?, 0)
                         ON CONFLICT(route) DO UPDATE SET last_ok_ms = excluded.last_ok_ms,
                             last_latency_ms = excluded.last_latency_ms, hostile = 0",
                    )
                    .bind(key)
                    .bind(now)
                    .bind(*latency_ms as i64)
                    .execute(&mut *tx)
                    .await?;
                }
                RouteOutcome::Failed { reason, hostile } => {
                    sqlx::query(
                        "INSERT INTO route_health (route, last_failure_ms, last_failure, hostile)
                         VALUES (?, ?, ?, ?)
                         ON CONFLICT(route) DO UPDATE SET last_failure_ms = excluded.last_failure_ms,
                             last_failure = excluded.last_failure,
                             hostile = MAX(hostile, excluded.hostile)",
                    )
                    .bind(key)
                    .bind(now)
                    .bind(reason)
                    .bind(i64::from(*hostile))
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Forgets what is known about `route` (the user saved or removed it again).
    pub async fn forget_route(
        &self,
        route: &crate::connector::route::Route,
    ) -> Result<(), ClientError> {
        sqlx::query("DELETE FROM route_health WHERE route = ?")
            .bind(Self::route_key(route)?)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // --- History -----------------------------------------------------------------------

    /// Stores a pending outgoing message (to a group: with a send per member).
    pub(crate) async fn insert_outgoing(
        &self,
        message_id: &[u8; 16],
        peer: &str,
        text: &str,
        created_ms: u64,
        group: Option<&OutgoingGroup>,
    ) -> Result<(), ClientError> {
        let mut tx = self.begin().await?;
        Self::insert_outgoing_in(&mut tx, message_id, peer, text, created_ms, group).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn insert_outgoing_in(
        tx: &mut Tx,
        message_id: &[u8; 16],
        peer: &str,
        text: &str,
        created_ms: u64,
        group: Option<&OutgoingGroup>,
    ) -> Result<(), ClientError> {
        sqlx::query(
            "INSERT INTO messages (message_id, peer, outgoing, body, created_ms, status)
             VALUES (?, ?, 1, ?, ?, 'pending')",
        )
        .bind(&message_id[..])
        .bind(peer)
        .bind(text)
        .bind(created_ms as i64)
        .execute(&mut **tx)
        .await?;
        if let Some(g) = group {
            Self::insert_group_sends(tx, message_id, g).await?;
        }
        Ok(())
    }

    /// Stores a pending outgoing message and its attachment (to be uploaded) together.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn insert_outgoing_with_attachment(
        &self,
        message_id: &[u8; 16],
        peer: &str,
        text: &str,
        created_ms: u64,
        attachment: &postern_protocol::schema::Attachment,
        ciphertext_path: &str,
        local_copy: &str,
        group: Option<&OutgoingGroup>,
    ) -> Result<(), ClientError> {
        let mut tx = self.begin().await?;
        Self::insert_outgoing_in(&mut tx, message_id, peer, text, created_ms, group).await?;
        Self::insert_attachment(
            &mut tx,
            message_id,
            true,
            attachment,
            TransferState::Uploading,
            Some(local_copy),
        )
        .await?;
        sqlx::query("UPDATE attachments SET upload_path = ? WHERE message_id = ?")
            .bind(ciphertext_path)
            .bind(&message_id[..])
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records the attachment of a message (inside the transaction storing the message).
    pub async fn insert_attachment(
        tx: &mut Tx,
        message_id: &[u8],
        outgoing: bool,
        a: &postern_protocol::schema::Attachment,
        state: TransferState,
        path: Option<&str>,
    ) -> Result<(), ClientError> {
        sqlx::query(
            "INSERT OR IGNORE INTO attachments (message_id, outgoing, media_id, key, nonce,
                 segment_size, size, ciphertext_size, sha256, file_name, content_type, state, path)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(message_id)
        .bind(outgoing as i64)
        .bind(&a.media_id)
        .bind(&a.key)
        .bind(&a.nonce)
        .bind(a.segment_size as i64)
        .bind(a.size as i64)
        .bind(a.ciphertext_size as i64)
        .bind(&a.sha256)
        .bind(&a.file_name)
        .bind(&a.content_type)
        .bind(state.as_str())
        .bind(path)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// The attachment of a message, keys included.
    pub async fn attachment(
        &self,
        message_id: &[u8],
    ) -> Result<Option<AttachmentRecord>, ClientError> {
        Ok(self
            .attachments_where("a.message_id = ?", Some(message_id))
            .await?
            .pop())
    }

    /// Incoming attachments still to fetch, oldest first.
    pub async fn attachments_to_download(&self) -> Result<Vec<AttachmentRecord>, ClientError> {
        self.attachments_where("a.state = 'downloading'", None)
            .await
    }

    async fn attachments_where(
        &self,
        filter: &str,
        message_id: Option<&[u8]>,
    ) -> Result<Vec<AttachmentRecord>, ClientError> {
        let sql = format!(
            "SELECT a.message_id, m.peer, a.outgoing, a.media_id, a.key, a.nonce, a.segment_size,
                    a.size, a.ciphertext_size, a.sha256, a.file_name, a.content_type, a.state,
                    a.transferred, a.upload_path, a.path, m.sender
             FROM attachments a JOIN messages m ON m.message_id = a.message_id
             WHERE {filter} ORDER BY m.rowid"
        );
        let mut q = sqlx::query(&sql);
        if let Some(id) = message_id {
            q = q.bind(id);
        }
        let rows = q.fetch_all(&self.pool).await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let id: Vec<u8> = r.get(0);
                Some(AttachmentRecord {
                    message_id: MessageId(id.try_into().ok()?),
                    peer: r.get(1),
                    outgoing: r.get::<i64, _>(2) != 0,
                    wire: postern_protocol::schema::Attachment {
                        media_id: r.get(3),
                        key: r.get(4),
                        nonce: r.get(5),
                        segment_size: r.get::<i64, _>(6) as u32,
                        size: r.get::<i64, _>(7) as u64,
                        ciphertext_size: r.get::<i64, _>(8) as u64,
                        sha256: r.get(9),
                        file_name: r.get(10),
                        content_type: r.get(11),
                    },
                    state: TransferState::parse(r.get::<&str, _>(12)),
                    transferred: r.get::<i64, _>(13) as u64,
                    upload_path: r.get(14),
                    path: r.get(15),
                    sender: r.get(16),
                })
            })
            .collect())
    }

    /// Records how far a transfer got.
    pub async fn set_transferred(&self, message_id: &[u8], bytes: u64) -> Result<(), ClientError> {
        sqlx::query("UPDATE attachments SET transferred = ? WHERE message_id = ?")
            .bind(bytes as i64)
            .bind(message_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Moves an attachment to `state`, with its file (`path`) or why it failed (`error`).
    pub async fn set_transfer_state(
        &self,
        message_id: &[u8],
        state: TransferState,
        path: Option<&str>,
        error: Option<&str>,
    ) -> Result<(), ClientError> {
        let mut tx = self.begin().await?;
        self.set_transfer_state_in(&mut tx, message_id, state, path, error)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// [`LocalStore::set_transfer_state`] inside a transaction.
    pub async fn set_transfer_state_in(
        &self,
        tx: &mut Tx,
        message_id: &[u8],
        state: TransferState,
        path: Option<&str>,
        error: Option<&str>,
    ) -> Result<(), ClientError> {
        sqlx::query(
            "UPDATE attachments SET state = ?, path = COALESCE(?, path), error = ?,
                 upload_path = CASE WHEN ? = 'uploaded' THEN NULL ELSE upload_path END,
                 transferred = CASE WHEN ? IN ('uploaded', 'done') THEN ciphertext_size
                                    ELSE transferred END
             WHERE message_id = ?",
        )
        .bind(state.as_str())
        .bind(path)
        .bind(error)
        .bind(state.as_str())
        .bind(state.as_str())
        .bind(message_id)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    pub async fn mark_sent(
        &self,
        message_id: &[u8],
        server_time_ms: u64,
    ) -> Result<(), ClientError> {
        sqlx::query(
            "UPDATE messages SET status = 'sent', server_time_ms = ?
             WHERE message_id = ? AND status = 'pending'",
        )
        .bind(server_time_ms as i64)
        .bind(message_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks an outgoing message delivered; returns its peer if it was ours.
    pub async fn mark_delivered(&self, message_id: &[u8]) -> Result<Option<String>, ClientError> {
        let peer: Option<String> = sqlx::query_scalar(
            "UPDATE messages SET status = 'delivered' WHERE message_id = ? AND outgoing = 1 RETURNING peer",
        )
        .bind(message_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(peer)
    }

    /// Marks an outgoing message that the server deleted undelivered (its queue
    /// time-to-live ran out) as failed with the reason "expired"; returns its peer.
    pub async fn mark_expired(&self, message_id: &[u8]) -> Result<Option<String>, ClientError> {
        let peer: Option<String> = sqlx::query_scalar(
            "UPDATE messages SET status = 'failed', failure = 'expired'
             WHERE message_id = ? AND outgoing = 1 AND status IN ('pending', 'sent')
             RETURNING peer",
        )
        .bind(message_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(peer)
    }

    /// Marks a pending outgoing message as never deliverable, keeping it in history.
    pub async fn mark_failed(&self, message_id: &[u8], reason: &str) -> Result<(), ClientError> {
        sqlx::query(
            "UPDATE messages SET status = 'failed', failure = ?
             WHERE message_id = ? AND outgoing = 1 AND status = 'pending'",
        )
        .bind(reason)
        .bind(message_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The status of a message in history, if it is there.
    pub async fn history_status(
        &self,
        message_id: &[u8],
    ) -> Result<Option<MessageStatus>, ClientError> {
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM messages WHERE message_id = ?")
                .bind(message_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(status.map(|s| MessageStatus::parse(&s)))
    }

    /// Whether this device already processed `message_id`: stored it, or decrypted it and
    /// would not show it ([`LocalStore::remember_ignored`]).
    pub async fn has_message(&self, message_id: &[u8]) -> Result<bool, ClientError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM messages WHERE message_id = ?1)
                  + (SELECT COUNT(*) FROM ignored_messages WHERE message_id = ?1)",
        )
        .bind(message_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(n > 0)
    }

    /// Records, in the decrypting transaction, that `message_id` was decrypted and not
    /// shown, so a second delivery of it is a duplicate (its Olm key is used up). Markers
    /// older than [`IGNORED_KEPT_MS`] go.
    pub async fn remember_ignored(
        &self,
        tx: &mut Tx,
        message_id: &[u8],
    ) -> Result<(), ClientError> {
        let now = postern_protocol::now_ms() as i64;
        sqlx::query("DELETE FROM ignored_messages WHERE ignored_ms < ?")
            .bind(now - IGNORED_KEPT_MS)
            .execute(&mut **tx)
            .await?;
        sqlx::query(
            "INSERT OR IGNORE INTO ignored_messages (message_id, ignored_ms) VALUES (?, ?)",
        )
        .bind(message_id)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Records an incoming message inside the decrypting transaction. Returns false if it
    /// was already there (a duplicate delivery).
    #[allow(clippy::too_many_arguments)]
    pub async fn insert_incoming(
        &self,
        tx: &mut Tx,
        message_id: &[u8],
        peer: &str,
        text: &str,
        created_ms: u64,
        server_time_ms: u64,
        status: MessageStatus,
    ) -> Result<bool, ClientError> {
        let r = sqlx::query(
            "INSERT OR IGNORE INTO messages (message_id, peer, outgoing, body, created_ms, server_time_ms, status)
             VALUES (?, ?, 0, ?, ?, ?, ?)",
        )
        .bind(message_id)
        .bind(peer)
        .bind(text)
        .bind(created_ms as i64)
        .bind(server_time_ms as i64)
        .bind(status.as_str())
        .execute(&mut **tx)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Conversations, the most recently active first: the last message of each and the
    /// number of incoming messages after the read marker.
    pub async fn conversations(&self) -> Result<Vec<Conversation>, ClientError> {
        let rows = sqlx::query(
            "SELECT m.peer, g.name, m.sender,
                    COALESCE((SELECT '📎 ' || a.file_name ||
                                     CASE WHEN m.body = '' THEN '' ELSE ' ' || m.body END
                              FROM attachments a WHERE a.message_id = m.message_id), m.body),
                    m.outgoing, m.status, m.created_ms, m.failure,
                    (SELECT COUNT(*) FROM messages u
                      WHERE u.peer = m.peer AND u.outgoing = 0 AND u.status != 'key_changed'
                        AND u.group_event = 0
                        AND u.rowid > COALESCE(
                            (SELECT read_rowid FROM conversation_reads r WHERE r.peer = m.peer), 0))
             FROM messages m
             LEFT JOIN groups g ON m.peer = 'group:' || lower(hex(g.group_id))
             WHERE m.rowid = (SELECT MAX(x.rowid) FROM messages x WHERE x.peer = m.peer)
             ORDER BY m.rowid DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let peer: String = r.get(0);
                let group_name: Option<String> = r.get(1);
                Conversation {
                    title: group_name.clone().unwrap_or_else(|| peer.clone()),
                    group: group_name.is_some(),
                    peer,
                    last_sender: r.get(2),
                    last_text: r.get(3),
                    last_outgoing: r.get::<i64, _>(4) != 0,
                    last_status: MessageStatus::parse(r.get::<&str, _>(5)),
                    last_ms: r.get::<i64, _>(6) as u64,
                    last_failure: r.get(7),
                    unread: r.get::<i64, _>(8) as u64,
                }
            })
            .collect())
    }

    /// Moves `peer`'s read marker past everything stored so far.
    pub async fn mark_read(&self, peer: &str) -> Result<(), ClientError> {
        sqlx::query(
            "INSERT INTO conversation_reads (peer, read_rowid)
             VALUES (?1, COALESCE((SELECT MAX(rowid) FROM messages WHERE peer = ?1), 0))
             ON CONFLICT(peer) DO UPDATE SET read_rowid = excluded.read_rowid",
        )
        .bind(peer)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Outgoing messages the server has not accepted yet, oldest first.
    pub async fn pending_outgoing(&self) -> Result<Vec<HistoryEntry>, ClientError> {
        self.query_history("WHERE m.status = 'pending' AND m.outgoing = 1", None)
            .await
    }

    pub async fn history(&self, peer: &str) -> Result<Vec<HistoryEntry>, ClientError> {
        let mut entries = self.query_history("WHERE m.peer = ?", Some(peer)).await?;
        if crate::groups::GroupId::from_conversation_key(peer).is_some() {
            let mut deliveries = self.group_deliveries(peer).await?;
            for e in entries.iter_mut().filter(|e| e.outgoing) {
                e.deliveries = deliveries.remove(&e.message_id.0).unwrap_or_default();
            }
        }
        Ok(entries)
    }

    async fn query_history(
        &self,
        filter: &str,
        peer: Option<&str>,
    ) -> Result<Vec<HistoryEntry>, ClientError> {
        let sql = format!(
            "SELECT m.message_id, m.peer, m.outgoing, m.body, m.created_ms, m.server_time_ms,
                    m.status, m.failure, a.file_name, a.content_type, a.size, a.state,
                    a.transferred, a.ciphertext_size, a.path, a.error, m.sender, m.group_event
             FROM messages m LEFT JOIN attachments a ON a.message_id = m.message_id
             {filter} ORDER BY m.created_ms, m.rowid"
        );
        let mut q = sqlx::query(&sql);
        if let Some(p) = peer {
            q = q.bind(p);
        }
        let rows = q.fetch_all(&self.pool).await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let id: Vec<u8> = r.get(0);
                Some(HistoryEntry {
                    message_id: MessageId(id.try_into().ok()?),
                    peer: r.get(1),
                    outgoing: r.get::<i64, _>(2) != 0,
                    text: r.get(3),
                    created_ms: r.get::<i64, _>(4) as u64,
                    server_time_ms: r.get::<Option<i64>, _>(5).map(|t| t as u64),
                    status: MessageStatus::parse(r.get::<&str, _>(6)),
                    failure: r.get(7),
                    attachment: r
                        .get::<Option<String>, _>(8)
                        .map(|file_name| AttachmentInfo {
                            file_name,
                            content_type: r.get(9),
                            size: r.get::<i64, _>(10) as u64,
                            state: TransferState::parse(r.get::<&str, _>(11)),
                            transferred: r.get::<i64, _>(12) as u64,
                            ciphertext_size: r.get::<i64, _>(13) as u64,
                            path: r.get(14),
                            error: r.get(15),
                        }),
                    sender: r.get(16),
                    group_event: r.get::<i64, _>(17) != 0,
                    deliveries: Vec::new(),
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::ProxyEntry;

    async fn store() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("profile.db"), [7; 32])
            .await
            .unwrap();
        (dir, store)
    }

    /// A message decrypted and not shown counts as processed, so a second delivery of it
    /// is dropped as a duplicate (not shown as undecryptable); old markers are pruned.
    #[tokio::test]
    async fn a_message_decrypted_and_not_shown_is_a_duplicate_when_delivered_again() {
        let (_dir, store) = store().await;
        let (old, refused) = ([1u8; 16], [2u8; 16]);
        sqlx::query("INSERT INTO ignored_messages (message_id, ignored_ms) VALUES (?, ?)")
            .bind(&old[..])
            .bind(postern_protocol::now_ms() as i64 - IGNORED_KEPT_MS - 1)
            .execute(&store.pool)
            .await
            .unwrap();
        assert!(!store.has_message(&refused).await.unwrap());
        let mut tx = store.begin().await.unwrap();
        store.remember_ignored(&mut tx, &refused).await.unwrap();
        tx.commit().await.unwrap();
        assert!(store.has_message(&refused).await.unwrap());
        assert!(
            !store.has_message(&old).await.unwrap(),
            "old markers are pruned"
        );
    }

    async fn incoming(store: &LocalStore, peer: &str, text: &str) {
        let mut tx = store.begin().await.unwrap();
        let id = MessageId::random();
        store
            .insert_incoming(&mut tx, &id.0, peer, text, 1, 2, MessageStatus::Received)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    #[tokio::test]
    async fn conversations_list_the_last_message_and_count_unread_until_read() {
        let (_dir, store) = store().await;
        incoming(&store, "bob", "one").await;
        incoming(&store, "bob", "two").await;
        store
            .insert_outgoing(&MessageId::random().0, "carol", "hi carol", 5, None)
            .await
            .unwrap();
        let list = store.conversations().await.unwrap();
        let peers: Vec<&str> = list.iter().map(|c| c.peer.as_str()).collect();
        assert_eq!(peers, ["carol", "bob"], "most recent first");
        assert_eq!(
            (list[0].last_status, list[0].last_outgoing, list[0].unread),
            (MessageStatus::Pending, true, 0)
        );
        assert_eq!((list[1].last_text.as_str(), list[1].unread), ("two", 2));

        store.mark_read("bob").await.unwrap();
        incoming(&store, "bob", "three").await;
        let bob = store.conversations().await.unwrap().remove(0);
        assert_eq!((bob.peer.as_str(), bob.unread), ("bob", 1));
    }

    fn device(id: u64, key: u8) -> ContactDevice {
        ContactDevice {
            device_id: id,
            curve25519: vec![key; 32],
            ed25519: Some(vec![key + 1; 32]),
        }
    }

    async fn pin(store: &LocalStore, devices: &[ContactDevice], complete: bool) -> bool {
        let mut tx = store.begin().await.unwrap();
        let changed = store
            .pin_devices(&mut tx, "bob", devices, complete)
            .await
            .unwrap();
        if changed {
            let now = postern_protocol::now_ms();
            store.record_key_change(&mut tx, "bob", now).await.unwrap();
        }
        tx.commit().await.unwrap();
        changed
    }

    fn markers(history: &[HistoryEntry]) -> usize {
        history
            .iter()
            .filter(|e| e.status == MessageStatus::KeyChanged)
            .count()
    }

    #[tokio::test]
    async fn first_use_pins_quietly_and_a_new_key_is_accepted_but_marked() {
        let (_dir, store) = store().await;
        assert!(!pin(&store, &[device(2, 10)], true).await, "first use");
        assert!(!pin(&store, &[device(2, 10)], true).await, "same keys");
        store.set_verified("bob", Some("1234")).await.unwrap();
        incoming(&store, "bob", "before").await;

        // Bob reinstalled: same device id, new keys. Accepted (the conversation goes on),
        // the old sessions dropped, a marker in the conversation, verification cleared.
        let mut tx = store.begin().await.unwrap();
        let account = vodozemac::olm::Account::new();
        let mut other = vodozemac::olm::Account::new();
        other.generate_one_time_keys(1);
        let otk = *other.one_time_keys().values().next().unwrap();
        let session = account
            .create_outbound_session(crate::crypto::session_config(), other.curve25519_key(), otk)
            .unwrap();
        store
            .save_session(&mut tx, "bob", 2, &session)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert!(pin(&store, &[device(2, 20)], true).await, "new keys");
        assert_eq!(store.contact_devices("bob").await.unwrap(), [device(2, 20)]);
        let mut tx = store.begin().await.unwrap();
        assert!(store.sessions(&mut tx, "bob", 2).await.unwrap().is_empty());
        tx.rollback().await.unwrap();
        let history = store.history("bob").await.unwrap();
        assert_eq!(markers(&history), 1);
        assert_eq!(history.last().unwrap().status, MessageStatus::KeyChanged);
        let v = store.verification("bob").await.unwrap();
        assert_eq!(v.verified_number, None);
        assert!(v.verified_ms.is_some() && v.key_changed_ms.is_some());
        // A marker is not an unread message.
        assert_eq!(store.conversations().await.unwrap()[0].unread, 1);

        // A new device id replacing the old one (the server's complete list): one change.
        assert!(pin(&store, &[device(3, 30)], true).await);
        assert_eq!(store.contact_devices("bob").await.unwrap(), [device(3, 30)]);
        assert_eq!(markers(&store.history("bob").await.unwrap()), 2);
    }

    #[tokio::test]
    async fn an_inbound_new_device_is_a_change_and_a_missing_ed25519_key_is_not() {
        let (_dir, store) = store().await;
        let mut curve_only = device(2, 10);
        curve_only.ed25519 = None;
        assert!(!pin(&store, &[curve_only], false).await, "first use");
        // Learning the Ed25519 key of the same device later is not a change.
        assert!(!pin(&store, &[device(2, 10)], true).await);
        assert_eq!(store.contact_devices("bob").await.unwrap(), [device(2, 10)]);
        // A message from a device never seen: kept alongside (the list is not complete).
        assert!(pin(&store, &[device(5, 50)], false).await);
        assert_eq!(store.contact_devices("bob").await.unwrap().len(), 2);
        assert_eq!(markers(&store.history("bob").await.unwrap()), 1);
    }

    #[tokio::test]
    async fn a_verified_mark_is_kept_until_cleared() {
        let (_dir, store) = store().await;
        assert_eq!(
            store.verification("bob").await.unwrap(),
            Verification::default()
        );
        store.set_verified("bob", Some("42")).await.unwrap();
        let v = store.verification("bob").await.unwrap();
        assert_eq!(v.verified_number.as_deref(), Some("42"));
        store.set_verified("bob", None).await.unwrap();
        let cleared = store.verification("bob").await.unwrap();
        assert_eq!(cleared.verified_number, None);
        assert_eq!(
            cleared.verified_ms, v.verified_ms,
            "when it was verified is kept"
        );
    }

    #[tokio::test]
    async fn proxies_keep_a_new_order() {
        let (_dir, store) = store().await;
        let a = ProxyEntry::parse("a.example").unwrap();
        let b = ProxyEntry::parse("b.example:5222").unwrap();
        store.add_proxy(&a).await.unwrap();
        store.add_proxy(&b).await.unwrap();
        store
            .replace_proxies(&[b.clone(), a.clone()])
            .await
            .unwrap();
        assert_eq!(store.proxies().await.unwrap(), [b, a]);
    }
}
