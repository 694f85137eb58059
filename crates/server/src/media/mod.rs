//! The media store: attachments' ciphertext on disk, uploaded in chunks and fetched by id.
//!
//! Clients encrypt a file with a key of its own before upload and send the key only inside
//! the end-to-end encrypted message, so what is stored here is ciphertext the server can
//! never read. An upload is named by 16 random bytes its uploader chose; knowing the id is
//! what lets a device fetch it (the id travels only inside encrypted messages).
//!
//! Resuming is the point of the design: a client on a path that dies every few kilobytes
//! asks where an upload stands ([`MediaStore::upload`] with no data) and goes on from
//! there, over whatever route works next. So the store never needs a chunk to arrive
//! whole twice, and an interrupted upload costs only what was in flight.
//!
//! On disk, in the media directory: `ID.meta` (owner, size, times, how much is known to be
//! on disk), `ID.part` while uploading and `ID` once complete. A partial upload is fsynced
//! every [`SYNC_EVERY`] bytes and its meta records that length; after a crash the part is
//! cut back to it, so a client resuming after a server crash is told a length that is
//! really there. A complete upload is fsynced before it is renamed into place.
//!
//! With [`RemoteConfig`] (S3-compatible object storage, [`remote`]), complete uploads move
//! to a bucket that several nodes share; partial ones stay on the receiving node's disk.
//!
//! Limits: the largest upload, a per-account quota (partial uploads reserve their whole
//! size), a time-to-live for complete uploads and a shorter one for abandoned partial
//! ones, and the free-disk high-water mark. The index of uploads is kept in memory (about
//! a hundred bytes each), read from the meta files at start.

mod remote;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::disk::DiskGuard;
pub use remote::RemoteConfig;
use remote::RemoteStore;

/// Length of a media id.
pub const MEDIA_ID_LEN: usize = 16;
/// Most bytes in one chunk, up or down (a chunk and its framing fit one Noise frame).
pub const MAX_CHUNK: usize = 60_000;
/// A partial upload is fsynced (and its meta updated) each time this much more arrived.
pub const SYNC_EVERY: u64 = 1024 * 1024;

/// An upload's id: 16 bytes chosen by the uploader.
pub type MediaId = [u8; MEDIA_ID_LEN];

/// What the media store accepts.
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// Where uploads live (created, mode 0700).
    pub dir: PathBuf,
    /// Largest upload, bytes.
    pub max_file_bytes: u64,
    /// Bytes one account may have stored (complete and partial uploads together).
    pub quota_bytes: u64,
    /// Uploads one account may have at once (each costs an index entry and three files,
    /// whatever its size).
    pub max_uploads_per_account: usize,
    /// A complete upload is deleted this long after it completed.
    pub ttl: Duration,
    /// A partial upload that made no progress for this long is deleted.
    pub partial_ttl: Duration,
    /// Uploads are refused while the media directory's disk has less free than this.
    pub min_free_disk: u64,
    /// Complete uploads go to this S3-compatible bucket (None: they stay in `dir`).
    pub remote: Option<RemoteConfig>,
}

impl MediaConfig {
    /// The defaults, in `dir`: 100 MiB per file, 1 GiB per account, 30 days, partial
    /// uploads kept a day, 512 MiB free disk.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_file_bytes: 100 * 1024 * 1024,
            quota_bytes: 1024 * 1024 * 1024,
            max_uploads_per_account: 10_000,
            ttl: Duration::from_secs(30 * 24 * 3600),
            partial_ttl: Duration::from_secs(24 * 3600),
            min_free_disk: 512 * 1024 * 1024,
            remote: None,
        }
    }
}

/// Why an upload or fetch was refused.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("no such upload (never made, not complete yet, or expired)")]
    NotFound,
    #[error("an upload of {size} bytes is over this server's limit of {max} bytes")]
    TooLarge { size: u64, max: u64 },
    #[error("over the account's media quota ({used} of {quota} bytes in use)")]
    QuotaExceeded { used: u64, quota: u64 },
    #[error("the account has {0} uploads stored, the most allowed at once")]
    TooManyUploads(usize),
    #[error("the server is short of disk space for media")]
    DiskFull,
    #[error("this id belongs to another upload")]
    Conflict,
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("media object storage: {0}")]
    Remote(String),
    #[error("media store I/O on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> MediaError + '_ {
    move |source| MediaError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Where an upload stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadState {
    pub stored: u64,
    pub size: u64,
    pub complete: bool,
}

/// What the meta file of an upload records.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    owner: String,
    size: u64,
    /// Bytes known to be on disk (fsynced); `size` once complete.
    synced: u64,
    complete: bool,
    created_ms: u64,
    /// Last progress (or completion), for expiry.
    touched_ms: u64,
    /// Complete and copied to the object storage bucket (the local copy is gone).
    #[serde(default)]
    remote: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    bytes: u64,
    uploads: usize,
}

struct Entry {
    meta: Meta,
    /// Bytes written (maybe not yet fsynced).
    stored: u64,
    /// One writer per upload at a time (the same client on two connections, say).
    writing: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Default)]
struct Index {
    entries: HashMap<MediaId, Entry>,
    /// Bytes reserved and uploads held, per account.
    usage: HashMap<String, Usage>,
    /// Complete uploads being copied to the bucket now.
    pushing: HashSet<MediaId>,
}

fn lock(index: &Mutex<Index>) -> std::sync::MutexGuard<'_, Index> {
    index.lock().unwrap_or_else(|p| p.into_inner())
}

/// Copies complete upload `id` to the bucket, then records it there and deletes the local
/// copy (fetches in between are served from disk).
async fn push(
    index: &Mutex<Index>,
    dir: &Path,
    remote: &RemoteStore,
    id: MediaId,
) -> Result<(), MediaError> {
    let result = remote.put_file(&id, &data_path(dir, &id)).await;
    let meta = {
        let mut guard = lock(index);
        guard.pushing.remove(&id);
        result?;
        guard.entries.get_mut(&id).map(|e| {
            e.meta.remote = true;
            e.meta.clone()
        })
    };
    let Some(meta) = meta else {
        // Expired while it was copied.
        return remote.delete(&id).await;
    };
    // The meta says "in the bucket" before the local copy goes: a crash in between leaves
    // a stray local file, which the next start removes.
    let dir = dir.to_path_buf();
    let written = tokio::task::spawn_blocking(move || {
        write_meta(&dir, &id, &meta)?;
        let data = data_path(&dir, &id);
        match std::fs::remove_file(&data) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(&data)(e)),
            _ => Ok(()),
        }
    })
    .await;
    if let Ok(Err(e)) = written {
        warn!(error = %e, "an upload copied to object storage is also still on disk");
    }
    Ok(())
}

/// The media store. Cheap to share behind an `Arc`.
pub struct MediaStore {
    config: MediaConfig,
    disk: DiskGuard,
    index: Arc<Mutex<Index>>,
    remote: Option<Arc<RemoteStore>>,
}

impl MediaStore {
    /// Opens (creating) the media directory and reads what is there: partial uploads are
    /// cut back to what was fsynced, leftovers without a meta file are removed.
    pub fn open(config: MediaConfig) -> Result<Self, MediaError> {
        let dir = config.dir.clone();
        postern_protocol::fsutil::private_dir(&dir).map_err(io_error(&dir))?;
        let mut index = Index::default();
        let mut known = std::collections::HashSet::new();
        for item in std::fs::read_dir(&dir).map_err(io_error(&dir))? {
            let item = item.map_err(io_error(&dir))?;
            let name = item.file_name().to_string_lossy().into_owned();
            let Some(hex_id) = name.strip_suffix(".meta") else {
                continue;
            };
            let Some(id) = parse_id(hex_id) else { continue };
            let path = item.path();
            let meta: Meta = match std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| toml::from_str(&t).ok())
            {
                Some(m) => m,
                None => {
                    warn!(file = %path.display(), "unreadable media meta file: upload dropped");
                    remove_upload(&dir, &id);
                    continue;
                }
            };
            let stored = if meta.complete {
                if meta.remote {
                    // In the bucket: a local copy left by a crash after the meta said so.
                    let _ = std::fs::remove_file(data_path(&dir, &id));
                }
                meta.size
            } else {
                // Cut back to what is known to be on disk (a crash may leave more, or
                // garbage past it); the uploader resumes from here.
                let part = part_path(&dir, &id);
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&part)
                    .map_err(io_error(&part))?;
                file.set_len(meta.synced).map_err(io_error(&part))?;
                meta.synced
            };
            let usage = index.usage.entry(meta.owner.clone()).or_default();
            usage.bytes += meta.size;
            usage.uploads += 1;
            known.insert(id);
            index.entries.insert(
                id,
                Entry {
                    meta,
                    stored,
                    writing: Arc::default(),
                },
            );
        }
        // Data files whose meta is gone (a crash between the two, or a half-deleted one).
        for item in std::fs::read_dir(&dir).map_err(io_error(&dir))? {
            let item = item.map_err(io_error(&dir))?;
            let name = item.file_name().to_string_lossy().into_owned();
            let hex_id = name.strip_suffix(".part").unwrap_or(&name);
            if name.ends_with(".meta") || name.ends_with(".tmp") {
                continue;
            }
            match parse_id(hex_id) {
                Some(id) if known.contains(&id) => {}
                _ => {
                    let _ = std::fs::remove_file(item.path());
                }
            }
        }
        info!(
            dir = %dir.display(),
            uploads = index.entries.len(),
            "media store open"
        );
        let remote = match &config.remote {
            Some(r) => Some(Arc::new(RemoteStore::new(r)?)),
            None => None,
        };
        Ok(Self {
            disk: DiskGuard::new(dir, config.min_free_disk),
            config,
            index: Arc::new(Mutex::new(index)),
            remote,
        })
    }

    /// With object storage: checks that the bucket answers (so a wrong endpoint or key
    /// stops the server at start, with the reason), then copies complete uploads still on
    /// disk to it. Without: nothing.
    pub async fn start_remote(&self) -> Result<(), MediaError> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        remote.check().await?;
        self.push_pending();
        Ok(())
    }

    /// Copies every complete upload still on disk to the bucket, in the background (also
    /// those whose copy failed before: called again periodically).
    pub fn push_pending(&self) {
        if self.remote.is_none() {
            return;
        }
        let waiting: Vec<MediaId> = self
            .index()
            .entries
            .iter()
            .filter(|(_, e)| e.meta.complete && !e.meta.remote)
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            self.push_later(id);
        }
    }

    /// Copies complete upload `id` to the bucket in the background (a retry of one whose
    /// copy failed before).
    fn push_later(&self, id: MediaId) {
        let Some(remote) = self.remote.clone() else {
            return;
        };
        if !self.index().pushing.insert(id) {
            return;
        }
        let (index, dir) = (self.index.clone(), self.config.dir.clone());
        tokio::spawn(async move {
            if let Err(e) = push(&index, &dir, &remote, id).await {
                warn!(error = %e, "an upload stays on disk for now (copied to object storage later)");
            }
        });
    }

    /// With object storage: makes sure complete upload `id` is in the bucket before the
    /// uploader is told it is complete — the message carrying it goes out next, and its
    /// recipient may fetch it through another node, which only finds it there.
    async fn ensure_pushed(&self, id: &MediaId) -> Result<(), MediaError> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        let in_bucket = self
            .index()
            .entries
            .get(id)
            .is_none_or(|e| e.meta.remote || !e.meta.complete);
        if in_bucket {
            return Ok(());
        }
        push(&self.index, &self.config.dir, remote, *id).await
    }

    pub fn config(&self) -> &MediaConfig {
        &self.config
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        lock(&self.index)
    }

    /// Bytes `owner` has reserved (complete and partial uploads).
    pub fn usage(&self, owner: &str) -> u64 {
        self.index().usage.get(owner).map_or(0, |u| u.bytes)
    }

    /// Writes `data` at `offset` of upload `id` of `size` bytes by `owner`, creating the
    /// upload if it is new. Only a chunk at the length already stored is written; any
    /// other (a repeat, or empty `data`) just gets the state, so the uploader knows where
    /// to go on from.
    pub async fn upload(
        &self,
        owner: &str,
        id: &MediaId,
        size: u64,
        offset: u64,
        data: impl Into<Vec<u8>>,
    ) -> Result<UploadState, MediaError> {
        // Owned, so the chunk moves to the writing thread without a copy.
        let data: Vec<u8> = data.into();
        if data.len() > MAX_CHUNK {
            return Err(MediaError::BadRequest("chunk larger than 60,000 bytes"));
        }
        let writing = self.reserve(owner, id, size)?;
        let _one_writer = writing.lock().await;
        let (state, created_ms) = {
            let index = self.index();
            let e = index.entries.get(id).ok_or(MediaError::NotFound)?;
            (e.state(), e.meta.created_ms)
        };
        if state.complete {
            // A repeat after a failed copy to the bucket tries it again.
            self.ensure_pushed(id).await?;
            return Ok(state);
        }
        if data.is_empty() || offset != state.stored {
            return Ok(state);
        }
        let end = offset + data.len() as u64;
        if end > size {
            return Err(MediaError::BadRequest("chunk past the end of the upload"));
        }
        if !self.disk.has_room() {
            return Err(MediaError::DiskFull);
        }
        let dir = self.config.dir.clone();
        let (id_copy, chunk) = (*id, data);
        let synced_before = {
            let index = self.index();
            index.entries.get(id).map_or(0, |e| e.meta.synced)
        };
        let complete = end == size;
        let sync = complete || end - synced_before >= SYNC_EVERY;
        let owner_name = owner.to_string();
        let now = postern_protocol::now_ms();
        tokio::task::spawn_blocking(move || {
            write_chunk(
                &dir,
                &id_copy,
                offset,
                &chunk,
                sync.then_some(Meta {
                    owner: owner_name,
                    size,
                    synced: end,
                    complete,
                    created_ms,
                    touched_ms: now,
                    remote: false,
                }),
            )
        })
        .await
        .map_err(|e| MediaError::Io {
            path: self.config.dir.display().to_string(),
            source: std::io::Error::other(e),
        })??;
        let state = {
            let mut index = self.index();
            let e = index.entries.get_mut(id).ok_or(MediaError::NotFound)?;
            e.stored = end;
            e.meta.touched_ms = now;
            if sync {
                e.meta.synced = end;
                e.meta.complete = complete;
            }
            e.state()
        };
        if state.complete {
            self.ensure_pushed(id).await?;
        }
        Ok(state)
    }

    /// The upload's writer lock, creating the upload (within the limits) if it is new.
    fn reserve(
        &self,
        owner: &str,
        id: &MediaId,
        size: u64,
    ) -> Result<Arc<tokio::sync::Mutex<()>>, MediaError> {
        let mut index = self.index();
        if let Some(e) = index.entries.get(id) {
            if e.meta.owner != owner || e.meta.size != size {
                return Err(MediaError::Conflict);
            }
            return Ok(e.writing.clone());
        }
        if size == 0 {
            return Err(MediaError::BadRequest("an upload of zero bytes"));
        }
        if size > self.config.max_file_bytes {
            return Err(MediaError::TooLarge {
                size,
                max: self.config.max_file_bytes,
            });
        }
        let used = index.usage.get(owner).copied().unwrap_or_default();
        if used.bytes.saturating_add(size) > self.config.quota_bytes {
            return Err(MediaError::QuotaExceeded {
                used: used.bytes,
                quota: self.config.quota_bytes,
            });
        }
        if used.uploads >= self.config.max_uploads_per_account {
            return Err(MediaError::TooManyUploads(used.uploads));
        }
        if !self.disk.has_room() {
            return Err(MediaError::DiskFull);
        }
        let now = postern_protocol::now_ms();
        let meta = Meta {
            owner: owner.to_string(),
            size,
            synced: 0,
            complete: false,
            created_ms: now,
            touched_ms: now,
            remote: false,
        };
        // The meta first: a part file without one is removed at the next start.
        write_meta(&self.config.dir, id, &meta)?;
        let part = part_path(&self.config.dir, id);
        std::fs::File::create(&part).map_err(io_error(&part))?;
        let usage = index.usage.entry(owner.to_string()).or_default();
        usage.bytes += size;
        usage.uploads += 1;
        let writing = Arc::<tokio::sync::Mutex<()>>::default();
        index.entries.insert(
            *id,
            Entry {
                meta,
                stored: 0,
                writing: writing.clone(),
            },
        );
        Ok(writing)
    }

    /// Up to `max_len` bytes of complete upload `id` from `offset`, and its size: from
    /// this node's disk, else (with object storage) from the bucket — which also holds the
    /// uploads other nodes took.
    pub async fn fetch(
        &self,
        id: &MediaId,
        offset: u64,
        max_len: u32,
    ) -> Result<(Vec<u8>, u64), MediaError> {
        let known = {
            let index = self.index();
            match index.entries.get(id) {
                Some(e) if !e.meta.complete => return Err(MediaError::NotFound),
                Some(e) => Some((e.meta.size, e.meta.remote)),
                None => None,
            }
        };
        let want = u64::from(max_len).min(MAX_CHUNK as u64);
        if let Some((size, false)) = known {
            match self.read_local(id, offset, want, size).await {
                // Moved to the bucket (or expired) between the index check and the read.
                Err(MediaError::NotFound) if self.remote.is_some() => {}
                other => return other,
            }
        }
        let Some(remote) = &self.remote else {
            return Err(MediaError::NotFound);
        };
        if let Some((size, _)) = known {
            if offset > size {
                return Err(MediaError::BadRequest("offset past the end of the upload"));
            }
            if offset == size {
                return Ok((Vec::new(), size));
            }
        }
        let (data, size) = remote.get_range(id, offset, want.max(1)).await?;
        if offset > size {
            return Err(MediaError::BadRequest("offset past the end of the upload"));
        }
        Ok((data, size))
    }

    async fn read_local(
        &self,
        id: &MediaId,
        offset: u64,
        want: u64,
        size: u64,
    ) -> Result<(Vec<u8>, u64), MediaError> {
        if offset > size {
            return Err(MediaError::BadRequest("offset past the end of the upload"));
        }
        let len = (size - offset).min(want) as usize;
        let path = data_path(&self.config.dir, id);
        let read = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let file = std::fs::File::open(&path).map_err(io_error(&path))?;
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, offset)
                .map_err(io_error(&path))?;
            Ok::<_, MediaError>(buf)
        })
        .await
        .map_err(|e| MediaError::Io {
            path: self.config.dir.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        match read {
            Ok(data) => Ok((data, size)),
            Err(MediaError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Err(MediaError::NotFound)
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes complete uploads older than the time-to-live and partial ones that made no
    /// progress for the partial time-to-live; returns how many.
    pub fn expire(&self, now_ms: u64) -> usize {
        let ttl = self.config.ttl.as_millis() as u64;
        let partial_ttl = self.config.partial_ttl.as_millis() as u64;
        let mut index = self.index();
        let old: Vec<MediaId> = index
            .entries
            .iter()
            .filter(|(_, e)| {
                let limit = if e.meta.complete { ttl } else { partial_ttl };
                now_ms.saturating_sub(e.meta.touched_ms) >= limit
                    // Not while a chunk is being written.
                    && e.writing.try_lock().is_ok()
            })
            .map(|(id, _)| *id)
            .collect();
        for id in &old {
            if let Some(e) = index.entries.remove(id) {
                if let Some(u) = index.usage.get_mut(&e.meta.owner) {
                    u.bytes = u.bytes.saturating_sub(e.meta.size);
                    u.uploads = u.uploads.saturating_sub(1);
                    if u.uploads == 0 {
                        index.usage.remove(&e.meta.owner);
                    }
                }
                remove_upload(&self.config.dir, id);
                if let (true, Some(remote)) = (e.meta.remote, &self.remote) {
                    let (remote, id) = (remote.clone(), *id);
                    tokio::spawn(async move {
                        if let Err(e) = remote.delete(&id).await {
                            warn!(error = %e, "an expired upload stays in the bucket (a lifecycle rule on the bucket removes such leftovers)");
                        }
                    });
                }
            }
        }
        old.len()
    }
}

impl Entry {
    fn state(&self) -> UploadState {
        UploadState {
            stored: self.stored,
            size: self.meta.size,
            complete: self.meta.complete,
        }
    }
}

/// Parses a media id from its 32 lowercase hex digits.
fn parse_id(hex_id: &str) -> Option<MediaId> {
    if hex_id.len() != MEDIA_ID_LEN * 2 || hex_id.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut id = [0u8; MEDIA_ID_LEN];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex_id.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

fn hex(id: &MediaId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn meta_path(dir: &Path, id: &MediaId) -> PathBuf {
    dir.join(format!("{}.meta", hex(id)))
}

fn part_path(dir: &Path, id: &MediaId) -> PathBuf {
    dir.join(format!("{}.part", hex(id)))
}

fn data_path(dir: &Path, id: &MediaId) -> PathBuf {
    dir.join(hex(id))
}

fn write_meta(dir: &Path, id: &MediaId, meta: &Meta) -> Result<(), MediaError> {
    let path = meta_path(dir, id);
    let text = toml::to_string(meta).map_err(|e| MediaError::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(e),
    })?;
    postern_protocol::fsutil::write_atomic(&path, text.as_bytes(), 0o600).map_err(io_error(&path))
}

/// Writes one chunk; with `synced`, fsyncs the data and records it (renaming a complete
/// upload into place).
fn write_chunk(
    dir: &Path,
    id: &MediaId,
    offset: u64,
    data: &[u8],
    synced: Option<Meta>,
) -> Result<(), MediaError> {
    use std::os::unix::fs::FileExt;
    let part = part_path(dir, id);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&part)
        .map_err(io_error(&part))?;
    file.write_all_at(data, offset).map_err(io_error(&part))?;
    let Some(meta) = synced else { return Ok(()) };
    file.sync_data().map_err(io_error(&part))?;
    drop(file);
    if meta.complete {
        let done = data_path(dir, id);
        std::fs::rename(&part, &done).map_err(io_error(&done))?;
    }
    write_meta(dir, id, &meta)?;
    // The renames (data into place, the meta file's) are durable once the directory is.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

fn remove_upload(dir: &Path, id: &MediaId) {
    for path in [data_path(dir, id), part_path(dir, id), meta_path(dir, id)] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(file = %path.display(), error = %e, "cannot delete expired media"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> MediaStore {
        let mut config = MediaConfig::new(dir.join("media"));
        config.max_file_bytes = 10 * 1024 * 1024;
        config.quota_bytes = 12 * 1024 * 1024;
        config.min_free_disk = 0;
        MediaStore::open(config).unwrap()
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    async fn upload_all(s: &MediaStore, owner: &str, id: &MediaId, data: &[u8]) {
        let mut offset = 0;
        for chunk in data.chunks(MAX_CHUNK) {
            let st = s
                .upload(owner, id, data.len() as u64, offset, chunk)
                .await
                .unwrap();
            offset = st.stored;
        }
        assert_eq!(offset, data.len() as u64);
    }

    async fn fetch_all(s: &MediaStore, id: &MediaId) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let (data, size) = s.fetch(id, out.len() as u64, 50_000).await.unwrap();
            out.extend_from_slice(&data);
            if out.len() as u64 == size {
                return out;
            }
            assert!(!data.is_empty(), "no progress");
        }
    }

    /// A node whose complete uploads go to `s3`'s bucket.
    fn node_on(dir: &Path, s3: &postern_test_kit::s3::S3Server) -> MediaStore {
        let mut config = MediaConfig::new(dir.join("media"));
        config.min_free_disk = 0;
        let mut remote = RemoteConfig::new(s3.endpoint(), &s3.bucket);
        remote.access_key = Some(s3.access_key.clone());
        remote.secret_key = Some(s3.secret_key.clone());
        config.remote = Some(remote);
        MediaStore::open(config).unwrap()
    }

    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !check() {
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn complete_uploads_move_to_the_bucket_and_every_node_serves_them() {
        let s3 = postern_test_kit::s3::S3Server::start("postern-media");
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (node_on(a_dir.path(), &s3), node_on(b_dir.path(), &s3));
        a.start_remote().await.unwrap();
        b.start_remote().await.unwrap();

        let id = [9u8; MEDIA_ID_LEN];
        let data = pattern(3 * MAX_CHUNK + 123);
        upload_all(&a, "alice", &id, &data).await;
        let key = format!("media/{}", hex(&id));
        let local = data_path(&a.config.dir, &id);
        eventually("the upload is in the bucket and gone from the disk", || {
            s3.object_keys().contains(&key) && !local.exists()
        })
        .await;
        // Node A serves it from the bucket now; node B, which never saw the upload, too.
        assert_eq!(fetch_all(&a, &id).await, data);
        assert_eq!(fetch_all(&b, &id).await, data);
        // The bucket holds exactly the uploaded bytes (ciphertext, as clients send it).
        assert_eq!(std::fs::read(s3.bucket_dir().join(&key)).unwrap(), data);
        // An id nobody uploaded is not found on either node.
        assert!(matches!(
            b.fetch(&[1; MEDIA_ID_LEN], 0, 100).await,
            Err(MediaError::NotFound)
        ));

        // A restart keeps knowing it is in the bucket.
        drop(a);
        let a = node_on(a_dir.path(), &s3);
        assert_eq!(fetch_all(&a, &id).await, data);
        // Expiry deletes it from the bucket.
        assert_eq!(a.expire(u64::MAX), 1);
        eventually("the expired upload is gone from the bucket", || {
            !s3.object_keys().contains(&key)
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bucket_that_refuses_the_credentials_stops_the_start_with_the_reason() {
        let s3 = postern_test_kit::s3::S3Server::start("postern-media");
        let dir = tempfile::tempdir().unwrap();
        let mut config = MediaConfig::new(dir.path().join("media"));
        let mut remote = RemoteConfig::new(s3.endpoint(), &s3.bucket);
        remote.access_key = Some(s3.access_key.clone());
        remote.secret_key = Some("not-the-secret".into());
        config.remote = Some(remote);
        let store = MediaStore::open(config).unwrap();
        let err = store.start_remote().await.unwrap_err().to_string();
        assert!(
            err.contains("bucket postern-media at http://127.0.0.1:") && err.contains("403"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_upload_in_chunks_is_fetched_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let data = pattern(2_500_000);
        let id = [1u8; 16];
        let st = s
            .upload("alice", &id, data.len() as u64, 0, &[])
            .await
            .unwrap();
        assert_eq!((st.stored, st.complete), (0, false));
        assert!(matches!(
            s.fetch(&id, 0, 100).await,
            Err(MediaError::NotFound)
        ));
        upload_all(&s, "alice", &id, &data).await;
        assert_eq!(fetch_all(&s, &id).await, data);
        assert_eq!(s.usage("alice"), data.len() as u64);
    }

    #[tokio::test]
    async fn a_chunk_at_the_wrong_offset_is_not_written_and_the_state_says_where_to_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let data = pattern(150_000);
        let id = [2u8; 16];
        let size = data.len() as u64;
        s.upload("alice", &id, size, 0, &data[..50_000])
            .await
            .unwrap();
        // A repeat of the first chunk (its answer was lost) and a chunk from the future.
        let st = s
            .upload("alice", &id, size, 0, &data[..50_000])
            .await
            .unwrap();
        assert_eq!(st.stored, 50_000);
        let st = s
            .upload("alice", &id, size, 100_000, &data[100_000..])
            .await
            .unwrap();
        assert_eq!(st.stored, 50_000);
        s.upload("alice", &id, size, 50_000, &data[50_000..100_000])
            .await
            .unwrap();
        let st = s
            .upload("alice", &id, size, 100_000, &data[100_000..])
            .await
            .unwrap();
        assert!(st.complete);
        assert_eq!(fetch_all(&s, &id).await, data);
    }

    #[tokio::test]
    async fn limits_size_quota_and_ownership() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let big = 10 * 1024 * 1024 + 1;
        assert!(matches!(
            s.upload("alice", &[3; 16], big, 0, &[]).await,
            Err(MediaError::TooLarge { .. })
        ));
        // 8 MiB reserved by a partial upload; 8 more would pass the 12 MiB quota.
        s.upload("alice", &[4; 16], 8 << 20, 0, &[]).await.unwrap();
        assert!(matches!(
            s.upload("alice", &[5; 16], 8 << 20, 0, &[]).await,
            Err(MediaError::QuotaExceeded { .. })
        ));
        // Another account has its own quota, but cannot write to alice's upload.
        s.upload("bob", &[5; 16], 8 << 20, 0, &[]).await.unwrap();
        assert!(matches!(
            s.upload("bob", &[4; 16], 8 << 20, 0, b"x").await,
            Err(MediaError::Conflict)
        ));
        assert!(matches!(
            s.upload("alice", &[4; 16], 1000, 0, b"x").await,
            Err(MediaError::Conflict)
        ));
        assert!(matches!(
            s.upload("alice", &[6; 16], 10, 0, &[0; 11]).await,
            Err(MediaError::BadRequest(_))
        ));
    }

    #[tokio::test]
    async fn tiny_uploads_are_bounded_by_count_not_only_by_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = MediaConfig::new(dir.path().join("media"));
        config.max_uploads_per_account = 3;
        config.min_free_disk = 0;
        let s = MediaStore::open(config).unwrap();
        for i in 0..3u8 {
            s.upload("alice", &[i; 16], 1, 0, &[]).await.unwrap();
        }
        assert!(matches!(
            s.upload("alice", &[9; 16], 1, 0, &[]).await,
            Err(MediaError::TooManyUploads(3))
        ));
        // An upload already made can still be written to and read.
        s.upload("alice", &[0; 16], 1, 0, b"x").await.unwrap();
        assert_eq!(s.fetch(&[0; 16], 0, 10).await.unwrap().0, b"x");
        s.upload("bob", &[9; 16], 1, 0, &[]).await.unwrap();
    }

    #[tokio::test]
    async fn after_a_restart_a_partial_upload_resumes_from_what_was_synced() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(3 * SYNC_EVERY as usize);
        let id = [7u8; 16];
        let size = data.len() as u64;
        {
            let s = store(dir.path());
            let mut offset = 0;
            while offset < SYNC_EVERY + 200_000 {
                let end = (offset as usize + MAX_CHUNK).min(data.len());
                offset = s
                    .upload("alice", &id, size, offset, &data[offset as usize..end])
                    .await
                    .unwrap()
                    .stored;
            }
        }
        let s = store(dir.path());
        let st = s.upload("alice", &id, size, 0, &[]).await.unwrap();
        assert!(
            st.stored >= SYNC_EVERY && st.stored < SYNC_EVERY + 200_000,
            "resumes from the last sync point, got {}",
            st.stored
        );
        assert_eq!(s.usage("alice"), size);
        let mut offset = st.stored;
        while offset < size {
            let end = (offset as usize + MAX_CHUNK).min(data.len());
            offset = s
                .upload("alice", &id, size, offset, &data[offset as usize..end])
                .await
                .unwrap()
                .stored;
        }
        assert_eq!(fetch_all(&s, &id).await, data);
        // Complete uploads survive a restart too.
        drop(s);
        let s = store(dir.path());
        assert_eq!(fetch_all(&s, &id).await, data);
    }

    #[tokio::test]
    async fn expiry_deletes_old_uploads_and_frees_the_quota() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let data = pattern(1000);
        upload_all(&s, "alice", &[8; 16], &data).await;
        s.upload("alice", &[9; 16], 5000, 0, &data[..])
            .await
            .unwrap();
        let now = postern_protocol::now_ms();
        assert_eq!(s.expire(now), 0);
        // A day later the partial one is gone; 30 days later the complete one.
        assert_eq!(s.expire(now + 24 * 3600 * 1000), 1);
        assert_eq!(s.usage("alice"), 1000);
        assert_eq!(s.expire(now + 30 * 24 * 3600 * 1000), 1);
        assert_eq!(s.usage("alice"), 0);
        assert!(matches!(
            s.fetch(&[8; 16], 0, 10).await,
            Err(MediaError::NotFound)
        ));
        assert_eq!(
            std::fs::read_dir(dir.path().join("media")).unwrap().count(),
            0
        );
    }

    #[test]
    fn ids_parse_from_their_file_names_only() {
        let id = [0xab; 16];
        assert_eq!(parse_id(&hex(&id)), Some(id));
        assert_eq!(parse_id("ab"), None);
        assert_eq!(parse_id(&hex(&id).to_uppercase()), None);
        assert_eq!(parse_id(&"zz".repeat(16)), None);
    }
}
