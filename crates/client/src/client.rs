//! The client an app drives: create an account, connect, send, receive, read history.
//!
//! ```no_run
//! # async fn demo() -> Result<(), postern_client::ClientError> {
//! use postern_client::{Client, ConnectMode};
//! let client = Client::open(std::path::Path::new("/home/me/.postern")).await?;
//! let mut events = client.subscribe();
//! client.connect(ConnectMode::Receive).await?;
//! let id = client.send("bob", "hello").await?; // returns once the server has it (✓)
//! while let Ok(event) = events.recv().await { println!("{event:?}"); }
//! # Ok(()) }
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use postern_protocol::network::NetworkFile;
use postern_protocol::schema::{
    client_frame, server_frame, AckMessage, AckReceipt, ClaimKeys, Content, DeviceCiphertext,
    DeviceKeys, Envelope, ErrorCode, Ping, Receipt, Register, SendMessage, UploadKeys,
};
use postern_protocol::username;
use prost::Message as _;
use tokio::sync::{broadcast, mpsc, Mutex};
use tracing::{debug, warn};
use vodozemac::olm::{Account, OlmMessage};
use vodozemac::Curve25519PublicKey;

use crate::connection::{BoxStream, Connection, Push};
use crate::crypto::{self, ONE_TIME_KEY_LOW, ONE_TIME_KEY_TARGET};
use crate::events::{Event, IncomingMessage, MessageId};
use crate::manager::{HealthMap, STAGE_TIMEOUT};
use crate::profile::{ProfileDir, ProfileInfo, Secrets};
use crate::proxy::ProxyEntry;
use crate::route::{self, DialReport, Route};
use crate::store::{ContactDevice, HistoryEntry, LocalStore, MessageStatus};
use crate::ClientError;

/// Time allowed for connecting and the handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for one request's answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest message text, so one encrypted message always fits in one frame.
pub const MAX_TEXT_BYTES: usize = 16 * 1024;

/// Whether this connection receives pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectMode {
    /// Receive queued messages and receipts (an inbox, an app).
    Receive,
    /// Only send; queued messages wait for a receiving connection (`postern send`).
    SendOnly,
}

/// A Postern client for one profile. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    dir: ProfileDir,
    info: ProfileInfo,
    secrets: Secrets,
    server_key: [u8; 32],
    store: LocalStore,
    events: broadcast::Sender<Event>,
    conn: Mutex<Option<Arc<Connection>>>,
    /// What this run learned about routes (hostile relays, recent failures).
    health: std::sync::Mutex<HealthMap>,
}

/// What became of one pending message in [`Client::send_pending`].
#[derive(Debug)]
pub struct PendingOutcome {
    pub message_id: MessageId,
    pub to: String,
    pub result: Result<(), ClientError>,
}

/// What happened to one envelope.
enum Received {
    New(IncomingMessage),
    Duplicate,
    Undecryptable(String),
}

impl Client {
    /// Creates a profile in `home` and registers `username` on the network's server.
    /// Nothing is written unless the server accepts the registration.
    pub async fn create_account(
        home: &Path,
        name: &str,
        network: NetworkFile,
    ) -> Result<Client, ClientError> {
        Self::create_account_via(home, name, network, None).await
    }

    /// Like [`Client::create_account`], registering through `relay` (which is then saved
    /// as the first proxy) instead of connecting directly.
    pub async fn create_account_via(
        home: &Path,
        name: &str,
        network: NetworkFile,
        relay: Option<ProxyEntry>,
    ) -> Result<Client, ClientError> {
        username::validate(name).map_err(ClientError::InvalidInput)?;
        let dir = ProfileDir::new(home);
        if dir.exists() {
            return Err(ClientError::ProfileExists(home.display().to_string()));
        }
        let server_key = network
            .server_key()
            .map_err(|e| ClientError::Profile(format!("network file: {e}")))?;
        let secrets = Secrets::generate();
        let mut account = Account::new();
        let one_time_keys = crypto::unpublished_one_time_keys(&mut account, ONE_TIME_KEY_TARGET);
        let fallback_key = crypto::new_fallback_key(&mut account);

        let route = match &relay {
            Some(p) => Route::Relay(p.clone()),
            None => Route::Direct {
                address: network.server.address.clone(),
            },
        };
        let (stream, report) = route::dial(&route, STAGE_TIMEOUT).await;
        let stream = match (stream, report.failed) {
            (Ok(s), _) => s,
            (Err(()), Some((stage, failure))) => {
                return Err(ClientError::NoRoute {
                    mode: if relay.is_some() {
                        "on".into()
                    } else {
                        "off".into()
                    },
                    attempts: vec![DialReport {
                        route: route.to_string(),
                        stages: report.stages,
                        failed: Some((stage, failure)),
                    }],
                })
            }
            (Err(()), None) => return Err(ClientError::NotConnected),
        };
        let (conn, _pushes) =
            Connection::establish(stream, &secrets.noise, &server_key, true, CONNECT_TIMEOUT)
                .await?;
        let register = client_frame::Body::Register(Register {
            username: name.to_string(),
            keys: Some(DeviceKeys {
                curve25519: account.curve25519_key().to_vec(),
                ed25519: account.ed25519_key().as_bytes().to_vec(),
            }),
            one_time_keys,
            fallback_key,
        });
        let device = match conn.request(register, REQUEST_TIMEOUT).await {
            Ok(server_frame::Body::Registered(r)) => r.device.ok_or_else(|| {
                ClientError::Protocol(postern_protocol::ProtocolError::Violation(
                    "registration answer without a device".into(),
                ))
            })?,
            Ok(other) => return Err(unexpected(other)),
            Err(ClientError::Server { code, message })
                if code == ErrorCode::UsernameTaken as i32 =>
            {
                return Err(ClientError::InvalidInput(message))
            }
            Err(e) => return Err(e),
        };
        conn.shutdown().await;
        account.mark_keys_as_published();

        std::fs::create_dir_all(home)
            .map_err(|e| ClientError::Profile(format!("cannot create {}: {e}", home.display())))?;
        dir.save_secrets(&secrets)?;
        let store = LocalStore::open(&dir.database_path(), secrets.pickle_key).await?;
        let mut tx = store.begin().await?;
        store.save_account(&mut tx, &account).await?;
        tx.commit().await?;
        let info = ProfileInfo {
            username: device.username,
            device_id: device.device_id,
            network,
        };
        if let Some(p) = &relay {
            store.add_proxy(p).await?;
        }
        // Written last: its presence marks a complete profile.
        dir.save_info(&info)?;
        Ok(Self::from_parts(dir, info, secrets, server_key, store))
    }

    /// Opens an existing profile.
    pub async fn open(home: &Path) -> Result<Client, ClientError> {
        let dir = ProfileDir::new(home);
        let info = dir.load_info()?;
        let secrets = dir.load_secrets()?;
        let server_key = info
            .network
            .server_key()
            .map_err(|e| ClientError::Profile(format!("profile.toml network: {e}")))?;
        let store = LocalStore::open(&dir.database_path(), secrets.pickle_key).await?;
        Ok(Self::from_parts(dir, info, secrets, server_key, store))
    }

    fn from_parts(
        dir: ProfileDir,
        info: ProfileInfo,
        secrets: Secrets,
        server_key: [u8; 32],
        store: LocalStore,
    ) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            inner: Arc::new(Inner {
                dir,
                info,
                secrets,
                server_key,
                store,
                events,
                conn: Mutex::new(None),
                health: Default::default(),
            }),
        }
    }

    pub fn username(&self) -> &str {
        &self.inner.info.username
    }

    pub fn device_id(&self) -> u64 {
        self.inner.info.device_id
    }

    pub fn home(&self) -> &Path {
        self.inner.dir.root()
    }

    pub fn network(&self) -> &NetworkFile {
        &self.inner.info.network
    }

    /// Events from now on (connection state, messages, receipts).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    pub(crate) fn emit(&self, event: Event) {
        let _ = self.inner.events.send(event);
    }

    pub(crate) fn store(&self) -> &LocalStore {
        &self.inner.store
    }

    pub(crate) fn health(&self) -> std::sync::MutexGuard<'_, HealthMap> {
        self.inner.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn noise_keys(&self) -> &postern_protocol::noise::StaticKeypair {
        &self.inner.secrets.noise
    }

    pub(crate) fn server_key(&self) -> &[u8; 32] {
        &self.inner.server_key
    }

    /// Saved proxies, in order.
    pub async fn proxies(&self) -> Result<Vec<ProxyEntry>, ClientError> {
        self.inner.store.proxies().await
    }

    /// Saves a proxy (at the end of the list); returns false if it was already saved.
    pub async fn add_proxy(&self, proxy: &ProxyEntry) -> Result<bool, ClientError> {
        self.inner.store.add_proxy(proxy).await
    }

    /// Removes a saved proxy named by its number in `proxies()` (from 1), its host, or
    /// its `host:port`. Returns what was removed.
    pub async fn remove_proxy(&self, which: &str) -> Result<Vec<ProxyEntry>, ClientError> {
        let saved = self.proxies().await?;
        let chosen: Vec<ProxyEntry> = match which.parse::<usize>() {
            Ok(n) => saved.get(n.wrapping_sub(1)).cloned().into_iter().collect(),
            Err(_) => {
                let wanted = which.trim().to_ascii_lowercase();
                saved
                    .into_iter()
                    .filter(|p| {
                        p.host == wanted
                            || p.address() == wanted
                            || p.host == wanted.trim_matches(['[', ']'])
                    })
                    .collect()
            }
        };
        if chosen.is_empty() {
            return Err(ClientError::InvalidInput(format!(
                "no saved proxy matches {which:?}: see `postern proxy list`"
            )));
        }
        for p in &chosen {
            self.inner.store.remove_proxy(p).await?;
        }
        Ok(chosen)
    }

    /// Runs the handshake over an already-open stream (direct or through a relay) and
    /// starts handling pushes. `via` names the path in events.
    pub async fn connect_over(
        &self,
        stream: BoxStream,
        via: &str,
        mode: ConnectMode,
    ) -> Result<(), ClientError> {
        let (conn, pushes) = Connection::establish(
            stream,
            &self.inner.secrets.noise,
            &self.inner.server_key,
            mode == ConnectMode::SendOnly,
            // The same bound as `proxy check`: a black-holed route must not cost more
            // than the documented handshake timeout during fail-over.
            crate::manager::HANDSHAKE_TIMEOUT,
        )
        .await?;
        if conn.hello.device.as_ref().map(|d| d.device_id) != Some(self.inner.info.device_id) {
            return Err(ClientError::Profile(
                "the server does not know this device: was the server's database reset? \
                 create a new profile with `postern account create`"
                    .into(),
            ));
        }
        let conn = Arc::new(conn);
        let remaining = conn.hello.one_time_keys_remaining;
        *self.inner.conn.lock().await = Some(conn.clone());
        let _ = self.inner.events.send(Event::Connected {
            via: via.to_string(),
            handshake_ms: conn.handshake_time.as_millis() as u64,
        });
        let handler = self.clone();
        let handler_conn = conn.clone();
        tokio::spawn(async move { handler.handle_pushes(handler_conn, pushes).await });
        if mode == ConnectMode::Receive && remaining < ONE_TIME_KEY_LOW {
            self.top_up_keys(&conn, remaining).await?;
        }
        Ok(())
    }

    async fn connection(&self) -> Result<Arc<Connection>, ClientError> {
        match &*self.inner.conn.lock().await {
            Some(c) if !c.is_closed() => Ok(c.clone()),
            _ => Err(ClientError::NotConnected),
        }
    }

    pub async fn is_connected(&self) -> bool {
        self.connection().await.is_ok()
    }

    /// Waits until everything the server had queued for us when we connected (and all
    /// our acknowledgements) has been handled.
    pub async fn sync(&self) -> Result<(), ClientError> {
        let conn = self.connection().await?;
        // The server answers in order and pushes its backlog before reading our requests,
        // so once the pong is here every earlier push has reached the push queue.
        conn.request(client_frame::Body::Ping(Ping { nonce: 1 }), REQUEST_TIMEOUT)
            .await?;
        conn.barrier().await?;
        // And this one makes sure the server has processed the acknowledgements.
        conn.request(client_frame::Body::Ping(Ping { nonce: 2 }), REQUEST_TIMEOUT)
            .await?;
        Ok(())
    }

    /// Puts a message in the local history as pending, without sending it: whatever
    /// happens to the network afterwards, what was typed is kept.
    pub async fn queue(&self, to: &str, text: &str) -> Result<MessageId, ClientError> {
        Ok(self.queue_entry(to, text).await?.message_id)
    }

    async fn queue_entry(&self, to: &str, text: &str) -> Result<HistoryEntry, ClientError> {
        username::validate(to).map_err(|_| ClientError::UnknownContact(to.to_string()))?;
        if text.len() > MAX_TEXT_BYTES {
            return Err(ClientError::InvalidInput(format!(
                "the message is {} bytes; the limit is {MAX_TEXT_BYTES}",
                text.len()
            )));
        }
        if to == self.username() {
            return Err(ClientError::InvalidInput(
                "you cannot send a message to yourself".into(),
            ));
        }
        let entry = HistoryEntry {
            message_id: MessageId::random(),
            peer: to.to_string(),
            outgoing: true,
            text: text.to_string(),
            created_ms: postern_protocol::now_ms(),
            server_time_ms: None,
            status: MessageStatus::Pending,
        };
        self.inner
            .store
            .insert_outgoing(&entry.message_id.0, to, text, entry.created_ms)
            .await?;
        Ok(entry)
    }

    /// Sends `text` to `to`. Returns once the server holds it in the recipient's queue
    /// (✓). The message is in the local history (as pending) before anything is sent, so
    /// it is never lost; [`Client::send_pending`] retries it.
    pub async fn send(&self, to: &str, text: &str) -> Result<MessageId, ClientError> {
        let entry = self.queue_entry(to, text).await?;
        self.transmit_or_forget(&entry).await?;
        Ok(entry.message_id)
    }

    /// Transmits a pending message; one addressed to a user who does not exist can never
    /// be delivered, so it is removed from the history and reported.
    async fn transmit_or_forget(&self, entry: &HistoryEntry) -> Result<(), ClientError> {
        match self.transmit(entry).await {
            Err(ClientError::UnknownContact(c)) => {
                self.inner.store.delete_message(&entry.message_id.0).await?;
                Err(ClientError::UnknownContact(c))
            }
            other => other,
        }
    }

    /// Sends every message that was typed but not yet accepted by the server, oldest
    /// first. A message to a contact that does not exist is removed from the history and
    /// reported; a connection failure stops the run (the rest stay pending).
    pub async fn send_pending(&self) -> Result<Vec<PendingOutcome>, ClientError> {
        let mut outcomes = Vec::new();
        for entry in self.inner.store.pending_outgoing().await? {
            let result = match self.transmit_or_forget(&entry).await {
                Ok(()) => Ok(()),
                // Problems with this one message: report it and go on with the next.
                Err(e @ (ClientError::UnknownContact(_) | ClientError::Server { .. })) => Err(e),
                Err(e) => return Err(e),
            };
            outcomes.push(PendingOutcome {
                message_id: entry.message_id,
                to: entry.peer,
                result,
            });
        }
        Ok(outcomes)
    }

    /// Encrypts for every device of the recipient and hands the message to the server.
    async fn transmit(&self, entry: &HistoryEntry) -> Result<(), ClientError> {
        let conn = self.connection().await?;
        let content = Content {
            message_id: entry.message_id.0.to_vec(),
            sender: self.username().to_string(),
            recipient: entry.peer.clone(),
            sent_at_ms: entry.created_ms,
            text: entry.text.clone(),
        }
        .encode_to_vec();
        let mut reclaimed = false;
        loop {
            let ciphertexts = self
                .encrypt_for(&conn, &entry.peer, &content, reclaimed)
                .await?;
            let request = client_frame::Body::Send(SendMessage {
                message_id: entry.message_id.0.to_vec(),
                recipient: entry.peer.clone(),
                ciphertexts,
            });
            match conn.request(request, REQUEST_TIMEOUT).await {
                Ok(server_frame::Body::MessageAccepted(a)) => {
                    self.inner
                        .store
                        .mark_sent(&entry.message_id.0, a.server_time_ms)
                        .await?;
                    let _ = self.inner.events.send(Event::Sent {
                        message_id: entry.message_id,
                        to: entry.peer.clone(),
                    });
                    return Ok(());
                }
                Ok(other) => return Err(unexpected(other)),
                Err(ClientError::Server { code, .. })
                    if code == ErrorCode::DevicesChanged as i32 && !reclaimed =>
                {
                    reclaimed = true;
                }
                Err(ClientError::Server { code, .. }) if code == ErrorCode::UnknownUser as i32 => {
                    return Err(ClientError::UnknownContact(entry.peer.clone()))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One ciphertext per device of `peer`, starting sessions where we have none.
    async fn encrypt_for(
        &self,
        conn: &Connection,
        peer: &str,
        content: &[u8],
        force_claim: bool,
    ) -> Result<Vec<DeviceCiphertext>, ClientError> {
        let store = &self.inner.store;
        let mut devices = store.contact_devices(peer).await?;
        let mut need_claim = force_claim || devices.is_empty();
        if !need_claim {
            let mut tx = store.begin().await?;
            for d in &devices {
                if store.sessions(&mut tx, peer, d.device_id).await?.is_empty() {
                    need_claim = true;
                }
            }
            tx.rollback().await?;
        }
        let mut claimed = Vec::new();
        if need_claim {
            let answer = conn
                .request(
                    client_frame::Body::ClaimKeys(ClaimKeys {
                        username: peer.to_string(),
                    }),
                    REQUEST_TIMEOUT,
                )
                .await
                .map_err(|e| match e {
                    ClientError::Server { code, .. } if code == ErrorCode::UnknownUser as i32 => {
                        ClientError::UnknownContact(peer.to_string())
                    }
                    e => e,
                })?;
            let server_frame::Body::KeyBundle(bundle) = answer else {
                return Err(unexpected(answer));
            };
            for b in bundle.devices {
                let keys = b
                    .keys
                    .ok_or_else(|| ClientError::Crypto("device without keys".into()))?;
                let otk = match &b.one_time_key {
                    Some(k) => Some(crypto::verify_signed_key(&keys.ed25519, k)?),
                    None => None,
                };
                claimed.push((
                    ContactDevice {
                        device_id: b.device_id,
                        curve25519: keys.curve25519,
                        ed25519: Some(keys.ed25519),
                    },
                    otk,
                ));
            }
            devices = claimed.iter().map(|(d, _)| d.clone()).collect();
        }

        let mut tx = store.begin().await?;
        let account = store.load_account(&mut tx).await?;
        let mut out = Vec::with_capacity(devices.len());
        for device in &devices {
            let mut sessions = store.sessions(&mut tx, peer, device.device_id).await?;
            let mut session = if sessions.is_empty() {
                let (d, otk) = claimed
                    .iter()
                    .find(|(d, _)| d.device_id == device.device_id)
                    .ok_or_else(|| ClientError::Crypto("no key claimed for a device".into()))?;
                store.pin_device(&mut tx, peer, d).await?;
                let otk = otk.ok_or_else(|| {
                    ClientError::Crypto(format!(
                        "{peer}'s device {} has no keys left on the server; ask them to come online",
                        d.device_id
                    ))
                })?;
                let identity =
                    Curve25519PublicKey::from_slice(&d.curve25519).map_err(ClientError::crypto)?;
                account
                    .create_outbound_session(crypto::session_config(), identity, otk)
                    .map_err(ClientError::crypto)?
            } else {
                if let Some((d, _)) = claimed
                    .iter()
                    .find(|(d, _)| d.device_id == device.device_id)
                {
                    store.pin_device(&mut tx, peer, d).await?;
                }
                sessions.swap_remove(0)
            };
            let (olm_type, body) = session
                .encrypt(content)
                .map_err(ClientError::crypto)?
                .to_parts();
            store
                .save_session(&mut tx, peer, device.device_id, &session)
                .await?;
            out.push(DeviceCiphertext {
                device_id: device.device_id,
                olm_type: olm_type as u32,
                body,
            });
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Handles pushes in order until the connection closes.
    async fn handle_pushes(self, conn: Arc<Connection>, mut pushes: mpsc::Receiver<Push>) {
        while let Some(push) = pushes.recv().await {
            match push {
                Push::Frame(server_frame::Body::Envelope(e)) => {
                    if let Err(err) = self.on_envelope(&conn, e).await {
                        // Not acknowledged: the server will deliver it again.
                        warn!(error = %err, "could not process an incoming message");
                    }
                }
                Push::Frame(server_frame::Body::Receipt(r)) => {
                    if let Err(err) = self.on_receipt(&conn, r).await {
                        warn!(error = %err, "could not record a delivery receipt");
                    }
                }
                Push::Frame(server_frame::Body::KeysLow(k)) => {
                    let client = self.clone();
                    let conn = conn.clone();
                    tokio::spawn(async move {
                        if let Err(e) = client.top_up_keys(&conn, k.one_time_keys_remaining).await {
                            warn!(error = %e, "could not upload one-time keys");
                        }
                    });
                }
                Push::Frame(other) => debug!(?other, "ignoring unexpected push"),
                Push::Barrier(done) => {
                    let _ = done.send(());
                }
                Push::Closed(reason) => {
                    let _ = self.inner.events.send(Event::Disconnected { reason });
                    break;
                }
            }
        }
    }

    async fn on_envelope(&self, conn: &Connection, e: Envelope) -> Result<(), ClientError> {
        let id = MessageId::try_from(&e.message_id[..]).map_err(ClientError::InvalidInput)?;
        let outcome = self.receive(&e, id).await?;
        conn.notify(client_frame::Body::AckMessage(AckMessage {
            message_id: e.message_id.clone(),
        }))
        .await?;
        match outcome {
            Received::New(m) => {
                let _ = self.inner.events.send(Event::Incoming(m));
            }
            Received::Duplicate => debug!(%id, "duplicate delivery dropped"),
            Received::Undecryptable(reason) => {
                let _ = self.inner.events.send(Event::Undecryptable {
                    message_id: id,
                    from: e.sender.clone(),
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Decrypts and stores one envelope; Olm state and the message commit together.
    async fn receive(&self, e: &Envelope, id: MessageId) -> Result<Received, ClientError> {
        let store = &self.inner.store;
        if store.has_message(&id.0).await? {
            return Ok(Received::Duplicate);
        }
        let mut tx = store.begin().await?;
        let decrypted = self.decrypt(&mut tx, e).await?;
        let plaintext = match decrypted {
            Ok(plain) => plain,
            Err(reason) => {
                tx.rollback().await?;
                let mut tx = store.begin().await?;
                store
                    .insert_incoming(
                        &mut tx,
                        &id.0,
                        &e.sender,
                        "",
                        0,
                        e.server_time_ms,
                        MessageStatus::Undecryptable,
                    )
                    .await?;
                tx.commit().await?;
                return Ok(Received::Undecryptable(reason));
            }
        };
        let content = match Content::decode(&plaintext[..]) {
            Ok(c)
                if c.message_id == e.message_id
                    && c.sender == e.sender
                    && c.recipient == self.username() =>
            {
                c
            }
            _ => {
                tx.rollback().await?;
                return Ok(Received::Undecryptable(
                    "the decrypted content does not match its envelope".into(),
                ));
            }
        };
        let fresh = store
            .insert_incoming(
                &mut tx,
                &id.0,
                &e.sender,
                &content.text,
                content.sent_at_ms,
                e.server_time_ms,
                MessageStatus::Received,
            )
            .await?;
        tx.commit().await?;
        Ok(if fresh {
            Received::New(IncomingMessage {
                message_id: id,
                from: e.sender.clone(),
                text: content.text,
                sent_at_ms: content.sent_at_ms,
                server_time_ms: e.server_time_ms,
            })
        } else {
            Received::Duplicate
        })
    }

    /// Decrypts inside `tx`, saving the session (and the account, for a new session).
    /// The inner `Err` is a reason the message can never be decrypted.
    async fn decrypt(
        &self,
        tx: &mut crate::store::Tx,
        e: &Envelope,
    ) -> Result<Result<Vec<u8>, String>, ClientError> {
        let store = &self.inner.store;
        let message = match OlmMessage::from_parts(e.olm_type as usize, &e.ciphertext) {
            Ok(m) => m,
            Err(err) => return Ok(Err(format!("malformed ciphertext: {err}"))),
        };
        let sessions = store.sessions(tx, &e.sender, e.sender_device_id).await?;
        for mut session in sessions {
            let matches = match &message {
                OlmMessage::PreKey(p) => p.session_id() == session.session_id(),
                OlmMessage::Normal(_) => true,
            };
            if !matches {
                continue;
            }
            if let Ok(plain) = session.decrypt(&message) {
                store
                    .save_session(tx, &e.sender, e.sender_device_id, &session)
                    .await?;
                return Ok(Ok(plain));
            }
        }
        let OlmMessage::PreKey(pre) = &message else {
            return Ok(Err("no session can decrypt this message".into()));
        };
        let device = ContactDevice {
            device_id: e.sender_device_id,
            curve25519: pre.identity_key().to_vec(),
            ed25519: None,
        };
        if let Err(err) = store.pin_device(tx, &e.sender, &device).await {
            return Ok(Err(err.to_string()));
        }
        let mut account = store.load_account(tx).await?;
        let created =
            match account.create_inbound_session(crypto::session_config(), pre.identity_key(), pre)
            {
                Ok(c) => c,
                Err(err) => return Ok(Err(format!("cannot start a session: {err}"))),
            };
        store.save_account(tx, &account).await?;
        store
            .save_session(tx, &e.sender, e.sender_device_id, &created.session)
            .await?;
        Ok(Ok(created.plaintext))
    }

    async fn on_receipt(&self, conn: &Connection, r: Receipt) -> Result<(), ClientError> {
        let peer = self.inner.store.mark_delivered(&r.message_id).await?;
        conn.notify(client_frame::Body::AckReceipt(AckReceipt {
            message_id: r.message_id.clone(),
        }))
        .await?;
        if let (Some(to), Ok(id)) = (peer, MessageId::try_from(&r.message_id[..])) {
            let _ = self
                .inner
                .events
                .send(Event::Delivered { message_id: id, to });
        }
        Ok(())
    }

    /// Uploads fresh one-time keys so the server holds about [`ONE_TIME_KEY_TARGET`].
    async fn top_up_keys(&self, conn: &Connection, remaining: u32) -> Result<(), ClientError> {
        let want = ONE_TIME_KEY_TARGET.saturating_sub(remaining as usize);
        if want == 0 {
            return Ok(());
        }
        let store = &self.inner.store;
        let mut tx = store.begin().await?;
        let mut account = store.load_account(&mut tx).await?;
        let keys = crypto::unpublished_one_time_keys(&mut account, want);
        store.save_account(&mut tx, &account).await?;
        tx.commit().await?;
        let answer = conn
            .request(
                client_frame::Body::UploadKeys(UploadKeys {
                    one_time_keys: keys,
                    fallback_key: None,
                }),
                REQUEST_TIMEOUT,
            )
            .await?;
        let server_frame::Body::KeysUploaded(_) = answer else {
            return Err(unexpected(answer));
        };
        let mut tx = store.begin().await?;
        let mut account = store.load_account(&mut tx).await?;
        account.mark_keys_as_published();
        store.save_account(&mut tx, &account).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The conversation with `peer`, oldest first.
    pub async fn history(&self, peer: &str) -> Result<Vec<HistoryEntry>, ClientError> {
        self.inner.store.history(peer).await
    }

    /// Drops the current connection (for example when it stopped answering); the
    /// connection manager, if running, builds a new one.
    pub async fn drop_connection(&self) {
        if let Some(c) = self.inner.conn.lock().await.take() {
            c.shutdown().await;
        }
    }

    /// Closes the connection (if any) and the local database.
    pub async fn close(&self) {
        if let Some(c) = self.inner.conn.lock().await.take() {
            c.shutdown().await;
        }
        self.inner.store.close().await;
    }
}

fn unexpected(body: server_frame::Body) -> ClientError {
    ClientError::Protocol(postern_protocol::ProtocolError::Violation(format!(
        "unexpected answer from the server: {body:?}"
    )))
}
