//! Attachments: files sent with a message, encrypted end to end, moved in resumable chunks.
//!
//! Sending: the file is encrypted here with a key made for it alone (XChaCha20-Poly1305 in
//! the STREAM construction, from RustCrypto's `chacha20poly1305`, in segments of
//! [`SEGMENT`] bytes so no file is ever held in memory whole), the ciphertext is kept in
//! the profile and uploaded to the server's media store in chunks, and only then does the
//! message go out — with the media id, key, nonce, size, type and the ciphertext's SHA-256
//! inside the Olm-encrypted content. The server and any relay see ciphertext and sizes.
//!
//! Receiving: the message is stored and acknowledged at once (a big file never holds up
//! the chat); the ciphertext is fetched into the profile, checked against the digest, and
//! decrypted into `files/` (every segment authenticated; truncation is detected too).
//!
//! Both directions resume: an upload asks the server how much it holds and goes on from
//! there; a download goes on from the length of its partial file. A window of chunks is in
//! flight at once (throughput over long paths), and the chunk size adapts ([`ChunkSizer`]):
//! it halves when a connection dies before a single chunk got through, so a path that dies
//! every few kilobytes still moves a little on every connection, and grows back while
//! chunks arrive.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chacha20poly1305::aead::stream::{DecryptorBE32, EncryptorBE32};
use chacha20poly1305::{Key, KeyInit, XChaCha20Poly1305};
use postern_protocol::schema::{
    client_frame, server_frame, Attachment, ErrorCode, MediaFetch, MediaUpload,
};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;

use crate::connector::connection::{Answer, Connection};
use crate::connector::media::{MediaPath, MediaRoute};
use crate::events::{Event, MessageId};
use crate::store::{AttachmentRecord, LocalStore, TransferState};
use crate::timeouts::REQUEST_TIMEOUT;
use crate::ClientError;

/// Plaintext bytes per STREAM segment (each gets a 16-byte tag).
pub const SEGMENT: usize = 64 * 1024;
const TAG: usize = 16;
const KEY_LEN: usize = 32;
/// XChaCha20's 24-byte nonce less STREAM's 5 bytes of counter and last-segment flag.
const NONCE_PREFIX_LEN: usize = 19;
/// Chunks in flight at once on one connection.
pub const WINDOW: usize = 16;
/// Chunk sizes: the adaptive range, and where a transfer starts.
pub const MIN_CHUNK: usize = 2 * 1024;
pub const MAX_CHUNK: usize = 56 * 1024;
const START_CHUNK: usize = 32 * 1024;
/// Successive chunks that must arrive before the chunk size doubles again.
const GROW_AFTER: u32 = 4;

/// The chunk size, adapted to how long connections live.
#[derive(Debug)]
pub struct ChunkSizer {
    size: usize,
    streak: u32,
}

impl Default for ChunkSizer {
    fn default() -> Self {
        Self {
            size: START_CHUNK,
            streak: 0,
        }
    }
}

impl ChunkSizer {
    pub fn size(&self) -> usize {
        self.size
    }

    /// A chunk got through.
    pub fn arrived(&mut self) {
        self.streak += 1;
        if self.streak >= GROW_AFTER {
            self.streak = 0;
            self.size = (self.size * 2).min(MAX_CHUNK);
        }
    }

    /// A connection died before any chunk got through on it.
    pub fn connection_lost_empty(&mut self) {
        self.streak = 0;
        self.size = (self.size / 2).max(MIN_CHUNK);
    }
}

/// A name safe to create in a directory: the last path component of what the sender
/// wrote, without control characters or a leading dot, at most 120 characters.
pub fn safe_file_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned: String = last
        .chars()
        .filter(|c| !c.is_control())
        .collect::<String>()
        .trim()
        .trim_start_matches('.')
        .to_string();
    let cleaned = if cleaned.chars().count() > 120 {
        // Keep the extension.
        let ext = Path::new(&cleaned)
            .extension()
            .and_then(|e| e.to_str())
            .filter(|e| e.len() <= 10)
            .map(|e| format!(".{e}"))
            .unwrap_or_default();
        let stem: String = cleaned.chars().take(120 - ext.chars().count()).collect();
        format!("{stem}{ext}")
    } else {
        cleaned
    };
    if cleaned.is_empty() {
        "attachment".into()
    } else {
        cleaned
    }
}

/// Reads until `buf` is full or the file ends; returns how many bytes were read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Encrypts `src` into `dst` with a fresh key; returns what the recipient needs (with a
/// fresh media id), the file name and type as given.
pub(crate) fn seal_file(
    src: &Path,
    dst: &Path,
    file_name: &str,
    content_type: &str,
) -> Result<Attachment, ClientError> {
    let key: [u8; KEY_LEN] = rand::random();
    let nonce: [u8; NONCE_PREFIX_LEN] = rand::random();
    let cipher = XChaCha20Poly1305::new(Key::from_slice(&key));
    let mut enc = EncryptorBE32::from_aead(cipher, nonce.as_ref().into());
    let mut input = std::fs::File::open(src).map_err(ClientError::file(src))?;
    let out = std::fs::File::create(dst).map_err(ClientError::file(dst))?;
    let mut out = std::io::BufWriter::new(out);
    let mut digest = Sha256::new();
    let (mut size, mut ciphertext_size) = (0u64, 0u64);
    let mut cur = vec![0u8; SEGMENT];
    let mut next = vec![0u8; SEGMENT];
    let mut cur_len = read_full(&mut input, &mut cur).map_err(ClientError::file(src))?;
    loop {
        let next_len = read_full(&mut input, &mut next).map_err(ClientError::file(src))?;
        size += cur_len as u64;
        let sealed = if next_len == 0 {
            let sealed = enc
                .encrypt_last(&cur[..cur_len])
                .map_err(ClientError::crypto)?;
            digest.update(&sealed);
            out.write_all(&sealed).map_err(ClientError::file(dst))?;
            ciphertext_size += sealed.len() as u64;
            break;
        } else {
            enc.encrypt_next(&cur[..cur_len])
                .map_err(ClientError::crypto)?
        };
        digest.update(&sealed);
        out.write_all(&sealed).map_err(ClientError::file(dst))?;
        ciphertext_size += sealed.len() as u64;
        std::mem::swap(&mut cur, &mut next);
        cur_len = next_len;
    }
    let out = out
        .into_inner()
        .map_err(|e| ClientError::file(dst)(e.into_error()))?;
    out.sync_all().map_err(ClientError::file(dst))?;
    Ok(Attachment {
        media_id: rand::random::<[u8; 16]>().to_vec(),
        key: key.to_vec(),
        nonce: nonce.to_vec(),
        segment_size: SEGMENT as u32,
        size,
        ciphertext_size,
        sha256: digest.finalize().to_vec(),
        file_name: safe_file_name(file_name),
        content_type: content_type.to_string(),
    })
}

/// The ciphertext size `a` must have, if its fields are sane.
fn expected_ciphertext_size(a: &Attachment) -> Option<u64> {
    let seg = a.segment_size as u64;
    if !(1024..=1024 * 1024).contains(&seg) {
        return None;
    }
    let segments = a.size.div_ceil(seg).max(1);
    a.size.checked_add(segments.checked_mul(TAG as u64)?)
}

/// Checks what an incoming attachment announces before anything is fetched.
pub(crate) fn check_announced(a: &Attachment) -> Result<(), String> {
    if a.media_id.len() != 16 {
        return Err("malformed media id".into());
    }
    if a.key.len() != KEY_LEN || a.nonce.len() != NONCE_PREFIX_LEN || a.sha256.len() != 32 {
        return Err("malformed key, nonce or digest".into());
    }
    if expected_ciphertext_size(a) != Some(a.ciphertext_size) {
        return Err("its sizes do not add up".into());
    }
    Ok(())
}

/// Checks the ciphertext `src` against `a`'s digest, then decrypts it into `dst` (through
/// a temporary file, so `dst` is whole or absent).
pub(crate) fn open_file(src: &Path, dst: &Path, a: &Attachment) -> Result<(), ClientError> {
    check_announced(a).map_err(ClientError::AttachmentCorrupt)?;
    let corrupt = |why: &str| ClientError::AttachmentCorrupt(why.to_string());
    let mut digest = Sha256::new();
    let mut input = std::fs::File::open(src).map_err(ClientError::file(src))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = read_full(&mut input, &mut buf).map_err(ClientError::file(src))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        digest.update(&buf[..n]);
    }
    if total != a.ciphertext_size {
        return Err(corrupt("wrong length"));
    }
    if digest.finalize().as_slice() != a.sha256.as_slice() {
        return Err(corrupt("digest mismatch"));
    }
    let cipher = XChaCha20Poly1305::new(Key::from_slice(&a.key));
    let mut dec = DecryptorBE32::from_aead(cipher, a.nonce.as_slice().into());
    let mut input = std::fs::File::open(src).map_err(ClientError::file(src))?;
    let tmp = dst.with_extension("postern-tmp");
    let out = std::fs::File::create(&tmp).map_err(ClientError::file(&tmp))?;
    let mut out = std::io::BufWriter::new(out);
    let result = (|| {
        let seg = a.segment_size as usize + TAG;
        let mut piece = vec![0u8; seg];
        let mut left = a.ciphertext_size;
        let mut plain_len = 0u64;
        loop {
            let want = (seg as u64).min(left) as usize;
            read_full(&mut input, &mut piece[..want]).map_err(ClientError::file(src))?;
            left -= want as u64;
            let plain = if left == 0 {
                let plain = dec
                    .decrypt_last(&piece[..want])
                    .map_err(|_| corrupt("a segment failed authentication"))?;
                out.write_all(&plain).map_err(ClientError::file(&tmp))?;
                plain_len += plain.len() as u64;
                break;
            } else {
                dec.decrypt_next(&piece[..want])
                    .map_err(|_| corrupt("a segment failed authentication"))?
            };
            out.write_all(&plain).map_err(ClientError::file(&tmp))?;
            plain_len += plain.len() as u64;
        }
        if plain_len != a.size {
            return Err(corrupt("wrong plaintext length"));
        }
        let out = out
            .into_inner()
            .map_err(|e| ClientError::file(&tmp)(e.into_error()))?;
        out.sync_all().map_err(ClientError::file(&tmp))?;
        std::fs::rename(&tmp, dst).map_err(ClientError::file(dst))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A path in `dir` for `name` that does not exist yet: `name`, else `stem (2).ext`, ….
pub fn unique_path(dir: &Path, name: &str) -> PathBuf {
    let first = dir.join(name);
    if !first.exists() {
        return first;
    }
    let p = Path::new(name);
    let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or(name);
    let ext = p
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| format!(".{e}"))
        .unwrap_or_default();
    (2..)
        .map(|n| dir.join(format!("{stem} ({n}){ext}")))
        .find(|c| !c.exists())
        .expect("an unbounded range has a free name")
}

/// The server's answer to a refused media request, in the user's terms.
fn media_refusal(e: ClientError, a: &Attachment) -> ClientError {
    match e {
        ClientError::Server { code, message } => {
            if code == ErrorCode::MediaUnavailable as i32 {
                ClientError::MediaUnavailable("this server keeps no attachments".into())
            } else if code == ErrorCode::MediaTooLarge as i32 {
                ClientError::MediaUnavailable(format!(
                    "the file ({}) is larger than this server takes",
                    postern_protocol::units::human_bytes(a.size)
                ))
            } else if code == ErrorCode::MediaNotFound as i32 {
                ClientError::MediaUnavailable(
                    "the file is no longer on the server (expired, or never uploaded)".into(),
                )
            } else {
                ClientError::Server { code, message }
            }
        }
        other => other,
    }
}

/// Whether an error ends a transfer for good (rather than for this connection or this
/// run): the message or attachment is then marked failed with it.
pub(crate) fn is_permanent(e: &ClientError) -> bool {
    match e {
        ClientError::AttachmentTooLarge { .. }
        | ClientError::MediaUnavailable(_)
        | ClientError::AttachmentCorrupt(_) => true,
        ClientError::Server { code, .. } => *code == ErrorCode::MediaConflict as i32,
        _ => false,
    }
}

/// What the server said about its media store when this connection opened.
fn check_limits(conn: &Connection, a: &Attachment) -> Result<(), ClientError> {
    match &conn.hello.media {
        Some(m) if m.max_file_bytes > 0 => {
            if a.ciphertext_size > m.max_file_bytes {
                return Err(ClientError::AttachmentTooLarge {
                    bytes: a.size,
                    limit: m.max_file_bytes,
                });
            }
            Ok(())
        }
        _ => Err(ClientError::MediaUnavailable(
            "this server keeps no attachments".into(),
        )),
    }
}

fn lock(m: &Mutex<ChunkSizer>) -> std::sync::MutexGuard<'_, ChunkSizer> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Uploads the ciphertext at `rec.upload_path`, from where the server stands, calling
/// `progress` with the bytes the server holds after each chunk it acknowledged.
pub(crate) async fn upload(
    conn: &Connection,
    rec: &AttachmentRecord,
    sizer: &Mutex<ChunkSizer>,
    progress: &mut (impl FnMut(u64) + Send),
) -> Result<(), ClientError> {
    let a = &rec.wire;
    let path = PathBuf::from(
        rec.upload_path
            .as_deref()
            .ok_or_else(|| ClientError::Profile("an attachment to upload has no file".into()))?,
    );
    let size = a.ciphertext_size;
    check_limits(conn, a)?;
    let chunk = |offset: u64, data: Vec<u8>| {
        client_frame::Body::MediaUpload(MediaUpload {
            media_id: a.media_id.clone(),
            size,
            offset,
            data,
        })
    };
    let stored = |answer: server_frame::Body| match answer {
        server_frame::Body::MediaState(s) => Ok((s.stored, s.complete)),
        other => Err(ClientError::unexpected(other)),
    };
    // Where the server stands (a new upload is created by this).
    let (mut acked, complete) = stored(
        conn.request(chunk(0, Vec::new()), REQUEST_TIMEOUT)
            .await
            .map_err(|e| media_refusal(e, a))?,
    )?;
    progress(acked);
    if complete {
        return Ok(());
    }
    let mut file = std::fs::File::open(&path).map_err(ClientError::file(&path))?;
    let mut window: std::collections::VecDeque<(u64, Answer)> = Default::default();
    let mut next = acked;
    let mut got_through = false;
    let result: Result<(), ClientError> = async {
        loop {
            while window.len() < WINDOW && next < size {
                let len = (lock(sizer).size() as u64).min(size - next) as usize;
                let mut data = vec![0u8; len];
                read_at(&mut file, next, &mut data).map_err(ClientError::file(&path))?;
                let answer = conn.send_request(chunk(next, data)).await?;
                next += len as u64;
                window.push_back((next, answer));
            }
            let Some((end, answer)) = window.pop_front() else {
                return Ok(());
            };
            let (now, complete) = stored(
                answer
                    .wait(REQUEST_TIMEOUT)
                    .await
                    .map_err(|e| media_refusal(e, a))?,
            )?;
            acked = now;
            got_through = true;
            lock(sizer).arrived();
            progress(acked);
            if complete {
                return Ok(());
            }
            if now != end {
                // Not where this chunk ended (another connection moved it on, or a chunk
                // was lost): drop the window and go on from what the server holds.
                window.clear();
                next = now;
            }
        }
    }
    .await;
    if let Err(e) = &result {
        if e.is_connection_problem() && !got_through {
            lock(sizer).connection_lost_empty();
        }
    }
    result
}

fn read_at(file: &mut std::fs::File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

/// Fetches `rec`'s ciphertext into `part` (appending from its current length), calling
/// `progress` with the bytes held after each chunk.
pub(crate) async fn download(
    conn: &Connection,
    rec: &AttachmentRecord,
    part: &Path,
    sizer: &Mutex<ChunkSizer>,
    progress: &mut (impl FnMut(u64) + Send),
) -> Result<(), ClientError> {
    let a = &rec.wire;
    let size = a.ciphertext_size;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(part)
        .map_err(ClientError::file(part))?;
    let mut have = file.metadata().map_err(ClientError::file(part))?.len();
    if have > size {
        // Not ours to trust: start again.
        file.set_len(0).map_err(ClientError::file(part))?;
        have = 0;
    }
    progress(have);
    let mut window: std::collections::VecDeque<(u64, u32, Answer)> = Default::default();
    let mut next = have;
    let mut got_through = false;
    let result: Result<(), ClientError> = async {
        while have < size {
            while window.len() < WINDOW && next < size {
                let len = (lock(sizer).size() as u64).min(size - next) as u32;
                let answer = conn
                    .send_request(client_frame::Body::MediaFetch(MediaFetch {
                        media_id: a.media_id.clone(),
                        offset: next,
                        max_len: len,
                    }))
                    .await?;
                window.push_back((next, len, answer));
                next += u64::from(len);
            }
            let Some((offset, len, answer)) = window.pop_front() else {
                break;
            };
            let data = match answer
                .wait(REQUEST_TIMEOUT)
                .await
                .map_err(|e| media_refusal(e, a))?
            {
                server_frame::Body::MediaData(d) if d.offset == offset && d.size == size => d.data,
                server_frame::Body::MediaData(d) if d.size != size => {
                    return Err(ClientError::AttachmentCorrupt(format!(
                        "the server holds {} bytes where {size} were announced",
                        d.size
                    )))
                }
                other => return Err(ClientError::unexpected(other)),
            };
            if data.is_empty() || data.len() > len as usize {
                return Err(ClientError::unexpected(server_frame::Body::MediaData(
                    Default::default(),
                )));
            }
            file.write_all(&data).map_err(ClientError::file(part))?;
            have += data.len() as u64;
            got_through = true;
            lock(sizer).arrived();
            progress(have);
            if (data.len() as u32) < len && have < size {
                // A short answer: ask again from here.
                window.clear();
                next = have;
            }
        }
        file.sync_all().map_err(ClientError::file(part))?;
        Ok(())
    }
    .await;
    if let Err(e) = &result {
        if e.is_connection_problem() && !got_through {
            lock(sizer).connection_lost_empty();
        }
    }
    result
}

/// A progress reporter that calls `report` when the percentage changes (and at the end).
pub(crate) fn throttled(total: u64, mut report: impl FnMut(u64)) -> impl FnMut(u64) {
    let mut last_pct = None;
    move |done| {
        let pct = (done.saturating_mul(100)).checked_div(total).unwrap_or(100);
        if last_pct != Some(pct) || done == total {
            last_pct = Some(pct);
            report(done);
        }
    }
}

/// Moves attachments for one profile: uploads before their message goes out, downloads
/// after their message arrived; reports progress as events and in the history. Cheap to
/// clone.
#[derive(Clone)]
pub(crate) struct Transfers {
    store: LocalStore,
    events: broadcast::Sender<Event>,
    /// Where files wait for upload (`outgoing/`), arrive (`incoming/`) and are saved
    /// (`files/`), inside the profile.
    root: PathBuf,
    sizer: Arc<Mutex<ChunkSizer>>,
    /// Bytes moved in this run, to tell whether a connection made progress.
    moved: Arc<AtomicU64>,
    /// A relay's media port, when the chat connection's relay offers one.
    media: Arc<MediaPath>,
}

impl Transfers {
    pub fn new(
        store: LocalStore,
        events: broadcast::Sender<Event>,
        root: &Path,
        media: Arc<MediaPath>,
    ) -> Self {
        Self {
            store,
            events,
            root: root.to_path_buf(),
            sizer: Arc::default(),
            moved: Arc::default(),
            media,
        }
    }

    /// Where attachments go with `chat` as the chat connection.
    pub async fn media_route(&self, chat: &Arc<Connection>) -> MediaRoute {
        self.media.route(chat).await
    }

    pub async fn close(&self) {
        self.media.close().await;
    }

    /// Bytes moved (either way) in this run.
    pub fn moved(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }

    fn dir(&self, name: &str) -> Result<PathBuf, ClientError> {
        let dir = self.root.join(name);
        postern_protocol::fsutil::private_dir(&dir).map_err(ClientError::file(&dir))?;
        Ok(dir)
    }

    /// The media connection lost mid-transfer: the media port is left alone for a while
    /// and the caller goes on over the chat connection (from where the transfer stopped).
    async fn media_lost(&self, e: &ClientError) {
        self.media
            .failed(&format!("lost during a transfer: {e}"))
            .await;
    }

    /// Encrypts `src` into the profile for sending, named `name` (default: its own file
    /// name), and keeps a copy of the file (so the conversation can show it). Returns the
    /// attachment, the ciphertext's path and the copy's.
    pub async fn seal(
        &self,
        message_id: &MessageId,
        src: &Path,
        name: Option<&str>,
    ) -> Result<(Attachment, PathBuf, PathBuf), ClientError> {
        let meta = std::fs::metadata(src).map_err(ClientError::file(src))?;
        if !meta.is_file() {
            return Err(ClientError::InvalidInput(format!(
                "{} is not a file",
                src.display()
            )));
        }
        let name = safe_file_name(&match name {
            Some(n) => n.to_string(),
            None => src
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        });
        let content_type = mime_guess::from_path(&name)
            .first_or_octet_stream()
            .essence_str()
            .to_string();
        let encrypted = self.dir("outgoing")?.join(format!("{message_id}.enc"));
        let copy = unique_path(&self.dir("files")?, &name);
        let (src, enc, copy2) = (src.to_path_buf(), encrypted.clone(), copy.clone());
        let wire = tokio::task::spawn_blocking(move || {
            let wire = seal_file(&src, &enc, &name, &content_type)?;
            std::fs::copy(&src, &copy2).map_err(ClientError::file(&copy2))?;
            Ok::<_, ClientError>(wire)
        })
        .await
        .map_err(|e| ClientError::Profile(format!("encrypting the file failed: {e}")))?;
        match wire {
            Ok(wire) => Ok((wire, encrypted, copy)),
            Err(e) => {
                let _ = std::fs::remove_file(&encrypted);
                let _ = std::fs::remove_file(&copy);
                Err(e)
            }
        }
    }

    fn progress_event(&self, rec: &AttachmentRecord, total: u64) -> impl FnMut(u64) + Send + use<> {
        let (events, moved) = (self.events.clone(), self.moved.clone());
        let (message_id, peer, outgoing) = (rec.message_id, rec.peer.clone(), rec.outgoing);
        let file_name = rec.wire.file_name.clone();
        let mut last = None::<u64>;
        let mut report = throttled(total, move |done| {
            let _ = events.send(Event::Transfer {
                message_id,
                peer: peer.clone(),
                outgoing,
                file_name: file_name.clone(),
                done,
                total,
            });
        });
        move |done| {
            if let Some(before) = last {
                moved.fetch_add(done.saturating_sub(before), Ordering::Relaxed);
            }
            last = Some(done);
            report(done)
        }
    }

    fn failed(&self, rec: &AttachmentRecord, reason: &str) {
        let _ = self.events.send(Event::AttachmentFailed {
            message_id: rec.message_id,
            peer: rec.peer.clone(),
            outgoing: rec.outgoing,
            file_name: rec.wire.file_name.clone(),
            reason: reason.to_string(),
        });
    }

    /// Uploads the attachment of a pending message if it is not on the server yet.
    /// A permanent refusal marks the attachment failed (the caller fails the message).
    pub async fn upload(
        &self,
        chat: &Arc<Connection>,
        rec: &AttachmentRecord,
    ) -> Result<(), ClientError> {
        if rec.state != TransferState::Uploading {
            return Ok(());
        }
        // Through the relay's media port if it has one; if that connection is lost, on
        // over the chat connection.
        let (conn, separate) = self.media.connection(chat).await;
        match self.upload_on(&conn, rec).await {
            Err(e) if separate && e.is_connection_problem() => {
                self.media_lost(&e).await;
                self.upload_on(chat, rec).await
            }
            other => other,
        }
    }

    async fn upload_on(
        &self,
        conn: &Connection,
        rec: &AttachmentRecord,
    ) -> Result<(), ClientError> {
        let id = rec.message_id.0;
        let mut progress = self.progress_event(rec, rec.wire.ciphertext_size);
        let mut last_saved = 0;
        let store = self.store.clone();
        let mut on_progress = |done: u64| {
            progress(done);
            if done - last_saved >= 1024 * 1024 {
                last_saved = done;
                let store = store.clone();
                tokio::spawn(async move { store.set_transferred(&id, done).await });
            }
        };
        let uploaded = match upload(conn, rec, &self.sizer, &mut on_progress).await {
            // The encrypted copy is gone or damaged: no connection will ever fix that.
            Err(e @ ClientError::File { .. }) => Err(ClientError::AttachmentCorrupt(format!(
                "the encrypted copy kept for sending is unreadable ({e}): send the file again"
            ))),
            other => other,
        };
        match uploaded {
            Ok(()) => {
                self.store
                    .set_transfer_state(&id, TransferState::Uploaded, None, None)
                    .await?;
                if let Some(path) = &rec.upload_path {
                    let _ = std::fs::remove_file(path);
                }
                Ok(())
            }
            Err(e) if is_permanent(&e) => {
                let reason = e.to_string();
                self.store
                    .set_transfer_state(&id, TransferState::Failed, None, Some(&reason))
                    .await?;
                if let Some(path) = &rec.upload_path {
                    let _ = std::fs::remove_file(path);
                }
                self.failed(rec, &reason);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Fetches, checks and decrypts every attachment still to download, oldest first.
    /// Returns the ones saved. A connection problem stops it (what arrived is kept);
    /// an attachment that can never be fetched is marked failed and the rest go on.
    pub async fn download_all(
        &self,
        chat: &Arc<Connection>,
    ) -> Result<Vec<SavedAttachment>, ClientError> {
        let (conn, separate) = self.media.connection(chat).await;
        match self.download_all_on(&conn).await {
            Err(e) if separate && e.is_connection_problem() => {
                self.media_lost(&e).await;
                self.download_all_on(chat).await
            }
            other => other,
        }
    }

    async fn download_all_on(
        &self,
        conn: &Connection,
    ) -> Result<Vec<SavedAttachment>, ClientError> {
        let mut saved = Vec::new();
        for rec in self.store.attachments_to_download().await? {
            let id = rec.message_id.0;
            let part = self
                .dir("incoming")?
                .join(format!("{}.part", rec.message_id));
            let mut progress = self.progress_event(&rec, rec.wire.ciphertext_size);
            let fetched = download(conn, &rec, &part, &self.sizer, &mut progress).await;
            let result = match fetched {
                Ok(()) => {
                    let files = self.dir("files")?;
                    let dst = unique_path(&files, &safe_file_name(&rec.wire.file_name));
                    let (part2, dst2, wire) = (part.clone(), dst.clone(), rec.wire.clone());
                    tokio::task::spawn_blocking(move || open_file(&part2, &dst2, &wire))
                        .await
                        .map_err(|e| ClientError::Profile(format!("decrypting failed: {e}")))?
                        .map(|()| dst)
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(dst) => {
                    let _ = std::fs::remove_file(&part);
                    let path = dst.display().to_string();
                    self.store
                        .set_transfer_state(&id, TransferState::Done, Some(&path), None)
                        .await?;
                    let _ = self.events.send(Event::AttachmentSaved {
                        message_id: rec.message_id,
                        from: rec.sender.clone().unwrap_or_else(|| rec.peer.clone()),
                        conversation: rec.peer.clone(),
                        file_name: rec.wire.file_name.clone(),
                        path: path.clone(),
                    });
                    saved.push(SavedAttachment {
                        message_id: rec.message_id,
                        from: rec.sender.clone().unwrap_or_else(|| rec.peer.clone()),
                        path: dst,
                    });
                }
                Err(e) if is_permanent(&e) => {
                    let _ = std::fs::remove_file(&part);
                    let reason = e.to_string();
                    self.store
                        .set_transfer_state(&id, TransferState::Failed, None, Some(&reason))
                        .await?;
                    self.failed(&rec, &reason);
                }
                Err(e) => {
                    let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
                    let _ = self.store.set_transferred(&id, have).await;
                    return Err(e);
                }
            }
        }
        Ok(saved)
    }
}

/// An incoming attachment now saved in the profile.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SavedAttachment {
    pub message_id: MessageId,
    pub from: String,
    pub path: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 253) as u8).collect()
    }

    fn round_trip(len: usize) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("in.bin");
        std::fs::write(&src, pattern(len)).unwrap();
        let enc = dir.path().join("enc");
        let a = seal_file(&src, &enc, "in.bin", "application/octet-stream").unwrap();
        assert_eq!(a.size, len as u64);
        assert_eq!(std::fs::metadata(&enc).unwrap().len(), a.ciphertext_size);
        assert_eq!(expected_ciphertext_size(&a), Some(a.ciphertext_size));
        check_announced(&a).unwrap();
        let out = dir.path().join("out.bin");
        open_file(&enc, &out, &a).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), pattern(len), "length {len}");
    }

    #[test]
    fn files_of_every_shape_round_trip() {
        for len in [
            0,
            1,
            SEGMENT - 1,
            SEGMENT,
            SEGMENT + 1,
            3 * SEGMENT,
            1_000_003,
        ] {
            round_trip(len);
        }
    }

    #[test]
    fn a_changed_truncated_or_rekeyed_ciphertext_is_refused_and_nothing_is_saved() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("in.bin");
        std::fs::write(&src, pattern(3 * SEGMENT + 5)).unwrap();
        let enc = dir.path().join("enc");
        let a = seal_file(&src, &enc, "in.bin", "application/octet-stream").unwrap();
        let good = std::fs::read(&enc).unwrap();
        let out = dir.path().join("out.bin");

        let mut flipped = good.clone();
        flipped[SEGMENT + 100] ^= 1;
        std::fs::write(&enc, &flipped).unwrap();
        assert!(matches!(
            open_file(&enc, &out, &a),
            Err(ClientError::AttachmentCorrupt(_))
        ));

        std::fs::write(&enc, &good[..good.len() - SEGMENT]).unwrap();
        assert!(open_file(&enc, &out, &a).is_err());

        // The right bytes and digest, the wrong key: authentication fails.
        std::fs::write(&enc, &good).unwrap();
        let mut other_key = a.clone();
        other_key.key = vec![9; 32];
        assert!(matches!(
            open_file(&enc, &out, &other_key),
            Err(ClientError::AttachmentCorrupt(_))
        ));
        assert!(!out.exists());
        assert!(!out.with_extension("postern-tmp").exists());
        open_file(&enc, &out, &a).unwrap();
    }

    #[test]
    fn announcements_with_sizes_that_do_not_add_up_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("in.bin");
        std::fs::write(&src, pattern(100)).unwrap();
        let a = seal_file(&src, &dir.path().join("enc"), "x", "y").unwrap();
        let mut bad = a.clone();
        bad.ciphertext_size += 1;
        assert!(check_announced(&bad).is_err());
        let mut bad = a.clone();
        bad.segment_size = 0;
        assert!(check_announced(&bad).is_err());
        let mut bad = a;
        bad.key.pop();
        assert!(check_announced(&bad).is_err());
    }

    #[test]
    fn file_names_from_senders_cannot_leave_the_directory() {
        assert_eq!(safe_file_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_file_name("C:\\Users\\x\\photo.jpg"), "photo.jpg");
        assert_eq!(safe_file_name(".bashrc"), "bashrc");
        assert_eq!(safe_file_name("a\u{0}b\nc.txt"), "abc.txt");
        assert_eq!(safe_file_name(".."), "attachment");
        assert_eq!(safe_file_name(""), "attachment");
        let long = format!("{}.jpeg", "x".repeat(300));
        let cut = safe_file_name(&long);
        assert_eq!(cut.chars().count(), 120);
        assert!(cut.ends_with(".jpeg"));
    }

    #[test]
    fn the_chunk_size_halves_on_empty_connections_and_grows_back() {
        let mut s = ChunkSizer::default();
        assert_eq!(s.size(), START_CHUNK);
        for _ in 0..10 {
            s.connection_lost_empty();
        }
        assert_eq!(s.size(), MIN_CHUNK);
        for _ in 0..GROW_AFTER {
            s.arrived();
        }
        assert_eq!(s.size(), 2 * MIN_CHUNK);
        for _ in 0..100 {
            s.arrived();
        }
        assert_eq!(s.size(), MAX_CHUNK);
    }

    #[test]
    fn unique_paths_do_not_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let first = unique_path(dir.path(), "a.txt");
        std::fs::write(&first, "1").unwrap();
        let second = unique_path(dir.path(), "a.txt");
        assert_eq!(second.file_name().unwrap(), "a (2).txt");
    }
}
