//! The client an app drives: a thin façade over the connector, the E2E sessions, the
//! outbox and the inbox, with an [`Event`] stream.
//!
//! ```no_run
//! # async fn demo() -> Result<(), postern_client::ClientError> {
//! use postern_client::{Client, ConnectMode};
//! let client = Client::open(std::path::Path::new("/home/me/.postern")).await?;
//! let mut events = client.subscribe();
//! let _running = client.keep_connected(ConnectMode::Receive); // reconnects by itself
//! let id = client.queue("bob", "hello").await?; // saved; goes out as soon as a route works
//! while let Ok(event) = events.recv().await { println!("{event:?}"); }
//! # Ok(()) }
//! ```

use std::path::Path;
use std::sync::Arc;

use postern_protocol::network::NetworkFile;
use postern_protocol::schema::{
    client_frame, group_change, server_frame, DeviceKeys, ErrorCode, Ping, Register,
};
use postern_protocol::username;
use tokio::sync::{broadcast, mpsc, Mutex};
use vodozemac::olm::Account;

use crate::attachments::{SavedAttachment, Transfers};
use crate::connector::connection::{Connection, Push};
use crate::connector::health::{self, HealthMap};
use crate::connector::media::{MediaPath, MediaRoute};
use crate::connector::route::{DialReport, Route};
use crate::connector::{self, ConnectMode, ConnectReport, Connected, Connector, OnConnected};
use crate::crypto::{self, ONE_TIME_KEY_LOW, ONE_TIME_KEY_TARGET};
use crate::events::{Event, MessageId};
use crate::groups::{self, GroupId, GroupInfo, MembershipChange, MAX_GROUP_MEMBERS};
use crate::inbox::Inbox;
use crate::outbox::{Outbox, PendingOutcome};
use crate::profile::{ProfileDir, ProfileInfo, Secrets};
use crate::proxy::{ProxyEntry, ProxyMode};
use crate::safety::{DeviceIdentity, Party, SafetyNumber};
use crate::sessions::Sessions;
use crate::store::{Conversation, HistoryEntry, LocalStore};
use crate::timeouts::REQUEST_TIMEOUT;
use crate::ClientError;

/// How many times one operation (sending what is pending, fetching the inbox) connects
/// again after its connection was lost without making progress.
pub const RECONNECTS_PER_OPERATION: usize = 3;

/// A Postern client for one profile. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    dir: ProfileDir,
    info: ProfileInfo,
    store: LocalStore,
    events: broadcast::Sender<Event>,
    connector: Arc<Connector>,
    outbox: Outbox,
    inbox: Inbox,
    sessions: Sessions,
    transfers: Transfers,
    /// The connection in use, and the mode it was opened in.
    conn: Mutex<Option<(Arc<Connection>, ConnectMode)>>,
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

        let (routes, mode) = match &relay {
            Some(p) => (vec![Route::Relay(p.clone())], ProxyMode::On),
            None => (
                network
                    .server_addresses()
                    .into_iter()
                    .map(|address| Route::Direct { address })
                    .collect(),
                ProxyMode::Off,
            ),
        };
        let Connected { conn, .. } = connector::race_routes(
            routes,
            &secrets.noise,
            &server_key,
            ConnectMode::SendOnly,
            mode,
        )
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
            Ok(other) => return Err(ClientError::unexpected(other)),
            Err(ClientError::Server { code, .. }) if code == ErrorCode::UsernameTaken as i32 => {
                return Err(ClientError::UsernameTaken(name.to_string()))
            }
            Err(e) => return Err(e),
        };
        conn.shutdown().await;
        account.mark_keys_as_published();

        // Other users of this machine must not read the profile: directory 0700.
        postern_protocol::fsutil::private_dir(home)
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
        let connector = Arc::new(Connector::new(
            store.clone(),
            secrets.noise.clone(),
            server_key,
            info.network.server_addresses(),
            events.clone(),
        ));
        let sessions = Sessions::new(store.clone(), events.clone());
        let media = Arc::new(MediaPath::new(secrets.noise.clone(), server_key));
        let transfers = Transfers::new(store.clone(), events.clone(), dir.root(), media);
        let outbox = Outbox::new(
            store.clone(),
            transfers.clone(),
            sessions.clone(),
            events.clone(),
            info.username.clone(),
        );
        let inbox = Inbox::new(
            store.clone(),
            sessions.clone(),
            events.clone(),
            info.username.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                dir,
                info,
                store,
                events,
                connector,
                outbox,
                inbox,
                sessions,
                transfers,
                conn: Mutex::new(None),
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

    // --- Proxies and routes -----------------------------------------------------------

    /// Saved proxies, in order.
    pub async fn proxies(&self) -> Result<Vec<ProxyEntry>, ClientError> {
        self.inner.store.proxies().await
    }

    /// Saves a proxy (at the end of the list); returns false if it was already saved.
    /// Saving it again also forgets what was learned about it (a relay found hostile is
    /// tried again).
    pub async fn add_proxy(&self, proxy: &ProxyEntry) -> Result<bool, ClientError> {
        let added = self.inner.store.add_proxy(proxy).await?;
        self.inner
            .store
            .forget_route(&Route::Relay(proxy.clone()))
            .await?;
        Ok(added)
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
            return Err(ClientError::NoSuchProxy(which.to_string()));
        }
        for p in &chosen {
            self.inner.store.remove_proxy(p).await?;
            self.inner
                .store
                .forget_route(&Route::Relay(p.clone()))
                .await?;
        }
        Ok(chosen)
    }

    pub async fn proxy_mode(&self) -> Result<ProxyMode, ClientError> {
        self.inner.connector.proxy_mode().await
    }

    pub async fn set_proxy_mode(&self, mode: ProxyMode) -> Result<(), ClientError> {
        self.inner.connector.set_proxy_mode(mode).await
    }

    /// The routes the current mode allows, in the order they are tried.
    pub async fn candidates(&self) -> Result<Vec<Route>, ClientError> {
        self.inner.connector.candidates().await
    }

    /// What is remembered about each route.
    pub async fn route_health(&self) -> Result<HealthMap, ClientError> {
        self.inner.connector.health().await
    }

    /// The route that worked last (from an earlier run too).
    pub async fn last_route(&self) -> Result<Option<Route>, ClientError> {
        Ok(health::last_worked(&self.route_health().await?))
    }

    /// Routes whose far end failed the server's authentication (not used until a check
    /// through them succeeds, or they are saved again).
    pub async fn hostile_routes(&self) -> Result<Vec<Route>, ClientError> {
        self.inner.connector.hostile_routes().await
    }

    /// The green tick: runs the real path over `route` (TCP, TLS if set, the server's
    /// handshake) without using the connection.
    pub async fn check_route(&self, route: &Route) -> Result<DialReport, ClientError> {
        self.inner.connector.check_route(route).await
    }

    /// Checks a media port: it must accept a TCP connection in time.
    pub async fn check_media(&self, proxy: &ProxyEntry) -> Option<DialReport> {
        self.inner.connector.check_media(proxy).await
    }

    /// Where attachments go over the connection in use (None: not connected): the chat
    /// connection, or the relay's media port — tried now if it was not yet — with the
    /// reason it failed if it did.
    pub async fn media_route(&self) -> Option<MediaRoute> {
        let (conn, _) = self.connection().await.ok()?;
        Some(self.inner.transfers.media_route(&conn).await)
    }

    // --- Connecting -------------------------------------------------------------------

    /// Races the allowed routes and uses the first that completes the server's
    /// handshake; remembers every outcome.
    pub async fn connect(&self, mode: ConnectMode) -> Result<ConnectReport, ClientError> {
        let Connected {
            conn,
            pushes,
            report,
        } = self.inner.connector.connect(mode).await?;
        let conn = Arc::new(conn);
        self.install(&conn, mode).await?;
        let inbox = self.inner.inbox.clone();
        tokio::spawn(async move { inbox.handle_pushes(conn, pushes).await });
        Ok(report)
    }

    /// Keeps a connection up until the returned handle is aborted: connects (racing),
    /// sends what is pending, handles what arrives, and after a drop or a stall connects
    /// again and goes on where it stopped.
    pub fn keep_connected(&self, mode: ConnectMode) -> tokio::task::JoinHandle<()> {
        self.inner.connector.clone().keep_connected(
            mode,
            Serve {
                client: self.clone(),
                mode,
            },
        )
    }

    /// Makes `conn` the connection in use, after checking the server knows this device.
    async fn install(&self, conn: &Arc<Connection>, mode: ConnectMode) -> Result<(), ClientError> {
        if conn.hello.device.as_ref().map(|d| d.device_id) != Some(self.inner.info.device_id) {
            conn.shutdown().await;
            return Err(ClientError::UnknownDevice);
        }
        *self.inner.conn.lock().await = Some((conn.clone(), mode));
        let remaining = conn.hello.one_time_keys_remaining;
        if mode == ConnectMode::Receive && remaining < ONE_TIME_KEY_LOW {
            let sessions = self.inner.sessions.clone();
            let conn = conn.clone();
            tokio::spawn(async move {
                if let Err(e) = sessions.top_up_keys(&conn, remaining).await {
                    tracing::warn!(error = %e, "could not upload one-time keys");
                }
            });
        }
        Ok(())
    }

    async fn connection(&self) -> Result<(Arc<Connection>, ConnectMode), ClientError> {
        match &*self.inner.conn.lock().await {
            Some((c, mode)) if !c.is_closed() => Ok((c.clone(), *mode)),
            _ => Err(ClientError::NotConnected),
        }
    }

    /// The connection in use, or a new one (in the mode of the last one).
    async fn connection_or_reconnect(&self) -> Result<Arc<Connection>, ClientError> {
        let mode = match &*self.inner.conn.lock().await {
            Some((c, _)) if !c.is_closed() => return Ok(c.clone()),
            Some((_, mode)) => *mode,
            None => return Err(ClientError::NotConnected),
        };
        self.connect(mode).await?;
        Ok(self.connection().await?.0)
    }

    pub async fn is_connected(&self) -> bool {
        self.connection().await.is_ok()
    }

    /// Drops the connection in use (for example when it stopped answering).
    pub async fn drop_connection(&self) {
        if let Some((c, _)) = self.inner.conn.lock().await.as_ref() {
            c.shutdown().await;
        }
    }

    /// Closes the connection (if any) and the local database.
    pub async fn close(&self) {
        if let Some((c, _)) = self.inner.conn.lock().await.take() {
            c.shutdown().await;
        }
        self.inner.transfers.close().await;
        self.inner.store.close().await;
    }

    // --- Messages -----------------------------------------------------------------------

    /// Waits until everything the server had queued for us when we connected (and all
    /// our acknowledgements) has been handled.
    pub async fn sync(&self) -> Result<(), ClientError> {
        let (conn, _) = self.connection().await?;
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

    /// Receives everything queued for this device, connecting (in receive mode) if
    /// needed. A connection lost on the way is replaced, as long as each one makes
    /// progress (a path that dies every few kilobytes still gets a whole backlog
    /// through: what was stored and acknowledged is never fetched again).
    pub async fn receive_all(&self) -> Result<(), ClientError> {
        if self.connection().await.is_err() {
            self.connect(ConnectMode::Receive).await?;
        }
        self.with_reconnects(
            || self.inner.inbox.stored() + self.inner.transfers.moved(),
            async |_| self.sync().await,
        )
        .await
    }

    /// Fetches, checks and decrypts every attachment still to download into the
    /// profile's `files/` directory, over the connection in use (connecting again, raced,
    /// whenever it is lost, for as long as each connection moves some bytes: a transfer
    /// goes on where it stopped). Returns the files saved. One that can never be fetched
    /// (expired on the server, or altered) is marked failed and reported as an event.
    pub async fn fetch_attachments(&self) -> Result<Vec<SavedAttachment>, ClientError> {
        if self.inner.store.attachments_to_download().await?.is_empty() {
            return Ok(Vec::new());
        }
        let transfers = &self.inner.transfers;
        let mut saved = Vec::new();
        self.with_reconnects(
            || transfers.moved(),
            async |conn| {
                saved.extend(transfers.download_all(&conn).await?);
                Ok(())
            },
        )
        .await?;
        Ok(saved)
    }

    /// Like [`Client::queue`], with a file: it is encrypted into the profile at once (so
    /// it may change or vanish afterwards) and uploaded before the message goes out;
    /// `caption` is the message's text (may be empty).
    pub async fn queue_file(
        &self,
        to: &str,
        file: &Path,
        caption: &str,
    ) -> Result<MessageId, ClientError> {
        self.inner.outbox.queue_file(to, file, None, caption).await
    }

    /// [`Client::queue_file`] with the name the recipient sees (an app that received the
    /// file's bytes under a temporary name).
    pub async fn queue_file_named(
        &self,
        to: &str,
        file: &Path,
        name: &str,
        caption: &str,
    ) -> Result<MessageId, ClientError> {
        self.inner
            .outbox
            .queue_file(to, file, Some(name), caption)
            .await
    }

    /// The file of a message's attachment kept here (sent, or received and decrypted),
    /// with its name and type as the message gave them.
    pub async fn attachment_file(
        &self,
        message_id: &MessageId,
    ) -> Result<Option<(std::path::PathBuf, String, String)>, ClientError> {
        Ok(self
            .inner
            .store
            .attachment(&message_id.0)
            .await?
            .and_then(|r| {
                let path = std::path::PathBuf::from(r.path?);
                path.is_file()
                    .then_some((path, r.wire.file_name, r.wire.content_type))
            }))
    }

    /// What the server's media store takes, as it said on the connection in use (None:
    /// not connected, or the server keeps no media).
    pub async fn media_limits(&self) -> Option<postern_protocol::schema::MediaLimits> {
        let (conn, _) = self.connection().await.ok()?;
        conn.hello.media.filter(|m| m.max_file_bytes > 0)
    }

    /// Runs `op` over the connection in use, and again over a new one (raced, in the
    /// same mode) whenever the connection is lost — for as long as connections make
    /// progress, as `progress` counts it, and at most [`RECONNECTS_PER_OPERATION`] times
    /// in a row without any.
    async fn with_reconnects<T>(
        &self,
        progress: impl Fn() -> u64,
        mut op: impl AsyncFnMut(Arc<Connection>) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let mut fruitless = 0;
        loop {
            let before = progress();
            let result = match self.connection_or_reconnect().await {
                Ok(conn) => op(conn).await,
                Err(e) => Err(e),
            };
            match result {
                Err(e) if e.is_connection_problem() => {
                    self.drop_connection().await;
                    fruitless = if progress() > before {
                        0
                    } else {
                        fruitless + 1
                    };
                    if fruitless > RECONNECTS_PER_OPERATION {
                        return Err(e);
                    }
                }
                other => return other,
            }
        }
    }

    /// Puts a message in the local history as pending, without sending it: whatever
    /// happens to the network afterwards, what was typed is kept. A running
    /// [`Client::keep_connected`] sends it on its next connection; [`Client::send_pending`]
    /// sends it now.
    pub async fn queue(&self, to: &str, text: &str) -> Result<MessageId, ClientError> {
        Ok(self.inner.outbox.queue(to, text).await?.message_id)
    }

    /// Sends `text` to `to` over the connection in use. Returns once the server holds it
    /// in the recipient's queue (✓). The message is in the local history (as pending)
    /// before anything is sent, so it is never lost.
    pub async fn send(&self, to: &str, text: &str) -> Result<MessageId, ClientError> {
        let entry = self.inner.outbox.queue(to, text).await?;
        let (conn, _) = self.connection().await?;
        self.inner.outbox.transmit(&conn, &entry).await?;
        Ok(entry.message_id)
    }

    /// Sends every message that was typed but not yet accepted by the server, oldest
    /// first, connecting again (racing the routes) if the connection is lost on the way.
    /// A message to a contact that does not exist is marked failed and reported in its
    /// outcome.
    pub async fn send_pending(&self) -> Result<Vec<PendingOutcome>, ClientError> {
        let mut outcomes = Vec::new();
        let outbox = &self.inner.outbox;
        let transfers = &self.inner.transfers;
        self.with_reconnects(
            || outbox.handled() + transfers.moved(),
            async |conn| outbox.flush(&conn, &mut outcomes).await,
        )
        .await?;
        Ok(outcomes)
    }

    /// Sends what is pending over the connection in use, if there is one (an app calls
    /// this after [`Client::queue`] while [`Client::keep_connected`] runs; without a
    /// connection the messages go out on the next one). Never connects by itself.
    pub async fn flush_pending(&self) -> Result<Vec<PendingOutcome>, ClientError> {
        let (conn, _) = self.connection().await?;
        let mut outcomes = Vec::new();
        self.inner.outbox.flush(&conn, &mut outcomes).await?;
        Ok(outcomes)
    }

    /// Conversations, the most recently active first, with their last message and how
    /// many incoming messages are unread.
    pub async fn conversations(&self) -> Result<Vec<Conversation>, ClientError> {
        self.inner.store.conversations().await
    }

    /// Marks everything received from `peer` so far as read.
    pub async fn mark_read(&self, peer: &str) -> Result<(), ClientError> {
        self.inner.store.mark_read(peer).await
    }

    /// Puts the saved proxies in a new order: `order` lists every saved proxy once, as
    /// its current number (from 1).
    pub async fn reorder_proxies(&self, order: &[usize]) -> Result<(), ClientError> {
        let saved = self.proxies().await?;
        let mut seen = vec![false; saved.len()];
        let mut reordered = Vec::with_capacity(saved.len());
        for &n in order {
            match n.checked_sub(1).and_then(|i| seen.get_mut(i)) {
                Some(s) if !*s => {
                    *s = true;
                    reordered.push(saved[n - 1].clone());
                }
                _ => return Err(ClientError::NoSuchProxy(n.to_string())),
            }
        }
        if reordered.len() != saved.len() {
            return Err(ClientError::InvalidInput(format!(
                "the new order names {} of the {} saved proxies: name each once",
                reordered.len(),
                saved.len()
            )));
        }
        self.inner.store.replace_proxies(&reordered).await
    }

    /// [`Client::check_route`], recording each stage in `progress` as it completes, so
    /// an app can show the check live ([`crate::route::Progress::watch`]).
    pub async fn check_route_with(
        &self,
        route: &Route,
        progress: &crate::route::Progress,
    ) -> Result<DialReport, ClientError> {
        self.inner.connector.check_route_with(route, progress).await
    }

    /// The conversation with `peer`, oldest first.
    pub async fn history(&self, peer: &str) -> Result<Vec<HistoryEntry>, ClientError> {
        self.inner.store.history(peer).await
    }

    // --- Groups ------------------------------------------------------------------------

    /// Every group this device knows (the ones it left too, marked so).
    pub async fn groups(&self) -> Result<Vec<GroupInfo>, ClientError> {
        self.inner.store.groups().await
    }

    /// The group `which` names: its name, its id (or the first 6 or more hex digits of
    /// it), or its conversation key. A name shared by several groups is refused with
    /// their ids.
    pub async fn find_group(&self, which: &str) -> Result<GroupInfo, ClientError> {
        let groups = self.inner.store.groups().await?;
        if let Some(id) = GroupId::from_conversation_key(which) {
            return groups
                .into_iter()
                .find(|g| g.id == id)
                .ok_or_else(|| ClientError::NoSuchGroup(which.to_string()));
        }
        let named: Vec<&GroupInfo> = groups.iter().filter(|g| g.name == which).collect();
        match named.as_slice() {
            [one] => return Ok((*one).clone()),
            [] => {}
            many => {
                return Err(ClientError::AmbiguousGroup {
                    name: which.to_string(),
                    ids: many.iter().map(|g| g.id.to_string()).collect(),
                })
            }
        }
        let hex = which.to_ascii_lowercase();
        let by_id: Vec<&GroupInfo> = groups
            .iter()
            .filter(|g| hex.len() >= 6 && g.id.to_string().starts_with(&hex))
            .collect();
        match by_id.as_slice() {
            [one] => Ok((*one).clone()),
            _ => Err(ClientError::NoSuchGroup(which.to_string())),
        }
    }

    /// Creates a group of this account and `members`; the news goes out with the next
    /// send (as for a message, it is saved first and never lost).
    pub async fn create_group(
        &self,
        name: &str,
        members: &[String],
    ) -> Result<MembershipChange, ClientError> {
        let name = name.trim();
        groups::check_name(name)?;
        let mut all = groups::check_new_members(self.username(), members)?;
        all.insert(self.username().to_string());
        self.check_group_size(all.len())?;
        let group = GroupInfo {
            id: GroupId::random(),
            name: name.to_string(),
            epoch: 1,
            members: all.into_iter().collect(),
            joined: true,
            created_ms: postern_protocol::now_ms(),
        };
        self.change_group(None, group, group_change::Kind::Created, Vec::new())
            .await
    }

    /// Adds `members` to a group this account is in; they receive the messages written
    /// from now on (not the earlier ones).
    pub async fn add_to_group(
        &self,
        which: &str,
        members: &[String],
    ) -> Result<MembershipChange, ClientError> {
        let before = self.joined_group(which).await?;
        let new = groups::check_new_members(self.username(), members)?;
        if let Some(m) = new.iter().find(|m| before.has(m)) {
            return Err(ClientError::InvalidInput(format!(
                "{m} is in the group {:?} already",
                before.name
            )));
        }
        let mut after = before.clone();
        after.members.extend(new.iter().cloned());
        after.members.sort();
        self.check_group_size(after.members.len())?;
        after.epoch += 1;
        self.change_group(
            Some(&before),
            after,
            group_change::Kind::Added,
            new.into_iter().collect(),
        )
        .await
    }

    /// Removes `members` from a group this account is in: they are told, and no message
    /// written from now on goes to them.
    pub async fn remove_from_group(
        &self,
        which: &str,
        members: &[String],
    ) -> Result<MembershipChange, ClientError> {
        let before = self.joined_group(which).await?;
        if members.iter().any(|m| m == self.username()) {
            return Err(ClientError::InvalidInput(
                "to take yourself out of a group, leave it".into(),
            ));
        }
        let gone = groups::check_new_members(self.username(), members)?;
        if let Some(m) = gone.iter().find(|m| !before.has(m)) {
            return Err(ClientError::InvalidInput(format!(
                "{m} is not in the group {:?}",
                before.name
            )));
        }
        let mut after = before.clone();
        after.members.retain(|m| !gone.contains(m));
        after.epoch += 1;
        self.change_group(
            Some(&before),
            after,
            group_change::Kind::Removed,
            gone.into_iter().collect(),
        )
        .await
    }

    /// Leaves a group: the others are told, and nothing they write reaches this account
    /// any more. The conversation is kept.
    pub async fn leave_group(&self, which: &str) -> Result<MembershipChange, ClientError> {
        let before = self.joined_group(which).await?;
        let mut after = before.clone();
        after.members.retain(|m| m != self.username());
        after.joined = false;
        after.epoch += 1;
        self.change_group(Some(&before), after, group_change::Kind::Left, Vec::new())
            .await
    }

    /// Saves the group as `after` and queues the change to the members concerned.
    async fn change_group(
        &self,
        before: Option<&GroupInfo>,
        after: GroupInfo,
        kind: group_change::Kind,
        subjects: Vec<String>,
    ) -> Result<MembershipChange, ClientError> {
        let change = groups::change(kind, subjects);
        let message_id = self
            .inner
            .outbox
            .queue_group_change(before, &after, change)
            .await?;
        Ok(MembershipChange {
            group: after,
            message_id,
        })
    }

    async fn joined_group(&self, which: &str) -> Result<GroupInfo, ClientError> {
        let group = self.find_group(which).await?;
        if !group.joined {
            return Err(ClientError::NotInGroup(group.name));
        }
        Ok(group)
    }

    fn check_group_size(&self, members: usize) -> Result<(), ClientError> {
        if members > MAX_GROUP_MEMBERS {
            return Err(ClientError::InvalidInput(format!(
                "a group has at most {MAX_GROUP_MEMBERS} members (this one would have {members}): \
                 each message is encrypted for every member's devices"
            )));
        }
        Ok(())
    }

    // --- Safety numbers ---------------------------------------------------------------

    /// The safety number with `contact`, to compare in person, and whether the user
    /// verified it. Over the connection in use, if any, the contact's devices are read
    /// from the server first (a change of their keys is then marked at once, and every
    /// key the number needs is known); without one, the number comes from the keys
    /// pinned here. Never connects by itself.
    pub async fn safety_number(&self, contact: &str) -> Result<ContactSafety, ClientError> {
        self.check_contact(contact)?;
        let (mut checked_with_server, mut changed_now) = (false, false);
        if let Ok((conn, _)) = self.connection().await {
            match self.inner.sessions.refresh_devices(&conn, contact).await {
                Ok(changed) => (checked_with_server, changed_now) = (true, changed),
                Err(e) if e.is_connection_problem() => {
                    tracing::debug!(error = %e, "safety number from the pinned keys")
                }
                Err(e) => return Err(e),
            }
        }
        let (number, devices) = self.compute_safety_number(contact).await?;
        let v = self.inner.store.verification(contact).await?;
        let verified = v.verified_number.as_deref() == Some(number.digits());
        let changed_since_verified = !verified
            && (v.verified_number.is_some()
                || matches!((v.verified_ms, v.key_changed_ms), (Some(a), Some(c)) if c >= a));
        Ok(ContactSafety {
            contact: contact.to_string(),
            groups: number.groups().into_iter().map(str::to_string).collect(),
            qr_payload: number.qr_payload(),
            number,
            verified,
            verified_ms: v.verified_ms,
            key_changed_ms: v.key_changed_ms,
            changed_since_verified,
            devices,
            checked_with_server,
            changed_now,
        })
    }

    /// Marks `contact` verified: the user compared `number` (the digits shown, spaces
    /// allowed) in person. Refused if it is not the number of the keys pinned now (they
    /// changed since it was shown). A later change of the contact's keys clears the mark.
    pub async fn mark_verified(&self, contact: &str, number: &str) -> Result<(), ClientError> {
        self.check_contact(contact)?;
        let (current, _) = self.compute_safety_number(contact).await?;
        let given: String = number.chars().filter(|c| !c.is_whitespace()).collect();
        if given != current.digits() {
            return Err(ClientError::SafetyNumberChanged(contact.to_string()));
        }
        self.inner
            .store
            .set_verified(contact, Some(current.digits()))
            .await
    }

    /// Clears `contact`'s verified mark.
    pub async fn clear_verified(&self, contact: &str) -> Result<(), ClientError> {
        self.check_contact(contact)?;
        self.inner.store.set_verified(contact, None).await
    }

    fn check_contact(&self, contact: &str) -> Result<(), ClientError> {
        username::validate(contact).map_err(|_| ClientError::UnknownContact(contact.into()))?;
        if contact == self.username() {
            return Err(ClientError::InvalidInput(
                "a safety number is between you and a contact: name the contact".into(),
            ));
        }
        Ok(())
    }

    /// The safety number from the keys pinned here, without asking the server (for a QR
    /// code of a number just shown, say).
    pub async fn pinned_safety_number(&self, contact: &str) -> Result<SafetyNumber, ClientError> {
        self.check_contact(contact)?;
        Ok(self.compute_safety_number(contact).await?.0)
    }

    /// The number from this device's keys and the contact's pinned ones, and how many
    /// devices of the contact it covers.
    async fn compute_safety_number(
        &self,
        contact: &str,
    ) -> Result<(SafetyNumber, usize), ClientError> {
        let pinned = self.inner.store.contact_devices(contact).await?;
        if pinned.is_empty() {
            return Err(ClientError::NoContactKeys(contact.to_string()));
        }
        let theirs = pinned
            .iter()
            .map(|d| DeviceIdentity::from_slices(d.ed25519.as_deref(), &d.curve25519))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ClientError::ContactKeysIncomplete(contact.to_string()))?;
        let store = &self.inner.store;
        let mut tx = store.begin().await?;
        let account = store.load_account(&mut tx).await;
        tx.rollback().await?;
        let account = account?;
        let ours = [DeviceIdentity {
            ed25519: *account.ed25519_key().as_bytes(),
            curve25519: account.curve25519_key().to_bytes(),
        }];
        let number = SafetyNumber::compute(
            Party {
                username: self.username(),
                devices: &ours,
            },
            Party {
                username: contact,
                devices: &theirs,
            },
        )?;
        Ok((number, theirs.len()))
    }
}

/// A contact's safety number, and what the user verified.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ContactSafety {
    pub contact: String,
    /// The 60 digits (as one string; `groups` has them in twelve groups of five).
    pub number: SafetyNumber,
    pub groups: Vec<String>,
    /// What a QR code of the number carries ([`SafetyNumber::qr_payload`]).
    pub qr_payload: String,
    /// The user confirmed this very number.
    pub verified: bool,
    /// When the user last confirmed a number for this contact.
    pub verified_ms: Option<u64>,
    /// When the contact's identity keys last changed after first use.
    pub key_changed_ms: Option<u64>,
    /// The user had verified the contact, and the keys changed since.
    pub changed_since_verified: bool,
    /// How many of the contact's devices the number covers.
    pub devices: usize,
    /// The contact's devices were just read from the server; false: computed from the
    /// keys pinned here (not connected).
    pub checked_with_server: bool,
    /// The contact's keys changed in this very check.
    pub changed_now: bool,
}

/// What [`Client::keep_connected`] does with each connection.
struct Serve {
    client: Client,
    mode: ConnectMode,
}

impl OnConnected for Serve {
    async fn serve(&self, conn: Arc<Connection>, pushes: mpsc::Receiver<Push>) {
        let client = &self.client;
        if let Err(e) = client.install(&conn, self.mode).await {
            tracing::warn!(error = %e, "connection not usable");
            return;
        }
        let flush = async {
            let mut outcomes = Vec::new();
            if let Err(e) = client.inner.outbox.flush(&conn, &mut outcomes).await {
                tracing::debug!(error = %e, "pending messages not sent yet");
            }
            for o in outcomes {
                if let Err(e) = o.result {
                    tracing::warn!(to = %o.to, error = %e, "a pending message was not sent");
                }
            }
        };
        // Attachments are fetched in the background: those waiting from before, then
        // each one announced by a message on this connection.
        let mut events = client.subscribe();
        let downloads = async {
            flush.await;
            loop {
                if let Err(e) = client.inner.transfers.download_all(&conn).await {
                    tracing::debug!(error = %e, "attachments not fetched yet");
                }
                loop {
                    match events.recv().await {
                        Ok(Event::Incoming(m)) if m.attachment.is_some() => break,
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
                    }
                }
            }
        };
        let handle = client.inner.inbox.handle_pushes(conn.clone(), pushes);
        // The connection's end ends the pushes, and with them this connection's work.
        tokio::select! {
            () = handle => {}
            () = downloads => {}
        }
    }
}
