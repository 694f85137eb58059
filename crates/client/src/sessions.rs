//! End-to-end sessions: Olm encryption to every device of a contact, decryption of what
//! arrives, and keeping enough one-time keys on the server for others to reach us.
//!
//! Olm state is never cached in memory: each operation loads the pickles it needs inside
//! one database transaction and saves them before committing (see [`crate::store`]), so
//! two processes on one profile never fork a ratchet.

use postern_protocol::schema::{
    client_frame, server_frame, ClaimKeys, DeviceCiphertext, Envelope, ErrorCode, UploadKeys,
};
use vodozemac::olm::OlmMessage;
use vodozemac::Curve25519PublicKey;

use tokio::sync::broadcast;

use crate::connector::connection::Connection;
use crate::crypto::{self, ONE_TIME_KEY_TARGET};
use crate::events::Event;
use crate::store::{ContactDevice, LocalStore, Tx};
use crate::timeouts::REQUEST_TIMEOUT;
use crate::ClientError;

/// What decrypting an envelope gave.
pub(crate) enum Decrypted {
    /// The plaintext, and whether the sender's identity keys changed with this message
    /// (the new keys are pinned in the transaction; the caller marks the change in the
    /// conversation and announces it once committed).
    Plaintext { plain: Vec<u8>, key_changed: bool },
    /// It can never be decrypted, for this reason (it is recorded, then dropped).
    Never(String),
}

/// The E2E layer of one device.
#[derive(Clone)]
pub(crate) struct Sessions {
    store: LocalStore,
    events: broadcast::Sender<Event>,
}

/// A device of a contact as the server listed it, with the one-time (or fallback) key
/// claimed for it, if any, its signature checked.
type Claimed = (ContactDevice, Option<Curve25519PublicKey>);

impl Sessions {
    pub fn new(store: LocalStore, events: broadcast::Sender<Event>) -> Self {
        Self { store, events }
    }

    /// Asks the server for `peer`'s devices (claiming a key for each).
    async fn claim(&self, conn: &Connection, peer: &str) -> Result<Vec<Claimed>, ClientError> {
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
            return Err(ClientError::unexpected(answer));
        };
        let mut claimed = Vec::with_capacity(bundle.devices.len());
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
        Ok(claimed)
    }

    /// Reads `peer`'s current devices from the server and pins them (a safety number is
    /// then computed from what the server lists now, with every Ed25519 key known).
    /// Returns whether their keys changed. The claimed one-time keys are not used.
    pub async fn refresh_devices(
        &self,
        conn: &Connection,
        peer: &str,
    ) -> Result<bool, ClientError> {
        let claimed = self.claim(conn, peer).await?;
        let devices: Vec<ContactDevice> = claimed.into_iter().map(|(d, _)| d).collect();
        let mut tx = self.store.begin().await?;
        let changed = self
            .store
            .pin_devices(&mut tx, peer, &devices, true)
            .await?;
        if changed {
            let now = postern_protocol::now_ms();
            self.store.record_key_change(&mut tx, peer, now).await?;
        }
        tx.commit().await?;
        if changed {
            self.announce_key_change(peer);
        }
        Ok(changed)
    }

    pub fn announce_key_change(&self, peer: &str) {
        let _ = self.events.send(Event::KeyChanged {
            contact: peer.to_string(),
        });
    }

    /// One ciphertext per device of `peer`, starting sessions where we have none.
    /// `force_claim` re-reads the peer's devices from the server (they changed). A change
    /// of the peer's keys found on the way is marked in the conversation just before the
    /// message written at `written_ms`.
    pub async fn encrypt_for(
        &self,
        conn: &Connection,
        peer: &str,
        content: &[u8],
        force_claim: bool,
        written_ms: u64,
    ) -> Result<Vec<DeviceCiphertext>, ClientError> {
        let store = &self.store;
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
        let claimed = if need_claim {
            self.claim(conn, peer).await?
        } else {
            Vec::new()
        };

        let mut tx = store.begin().await?;
        let mut key_changed = false;
        if need_claim {
            // The server's list is every device the contact has now: new ones are
            // pinned, changed keys replace the pinned ones (and their sessions), devices
            // gone are forgotten — and a change is marked in the conversation.
            devices = claimed.iter().map(|(d, _)| d.clone()).collect();
            key_changed = store.pin_devices(&mut tx, peer, &devices, true).await?;
            if key_changed {
                store
                    .record_key_change(&mut tx, peer, written_ms.saturating_sub(1))
                    .await?;
            }
        }
        let account = store.load_account(&mut tx).await?;
        let mut out = Vec::with_capacity(devices.len());
        for device in &devices {
            let mut sessions = store.sessions(&mut tx, peer, device.device_id).await?;
            let mut session = if sessions.is_empty() {
                let (d, otk) = claimed
                    .iter()
                    .find(|(d, _)| d.device_id == device.device_id)
                    .ok_or_else(|| ClientError::Crypto("no key claimed for a device".into()))?;
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
        if key_changed {
            self.announce_key_change(peer);
        }
        Ok(out)
    }

    /// Decrypts inside `tx`, saving the session (and the account, for a new session).
    pub async fn decrypt(&self, tx: &mut Tx, e: &Envelope) -> Result<Decrypted, ClientError> {
        let store = &self.store;
        let message = match OlmMessage::from_parts(e.olm_type as usize, &e.ciphertext) {
            Ok(m) => m,
            Err(err) => return Ok(Decrypted::Never(format!("malformed ciphertext: {err}"))),
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
                return Ok(Decrypted::Plaintext {
                    plain,
                    key_changed: false,
                });
            }
        }
        let OlmMessage::PreKey(pre) = &message else {
            return Ok(Decrypted::Never(
                "no session can decrypt this message".into(),
            ));
        };
        let device = ContactDevice {
            device_id: e.sender_device_id,
            curve25519: pre.identity_key().to_vec(),
            ed25519: None,
        };
        // A device with new keys (the sender reinstalled, or keys were substituted) is
        // accepted; the caller marks the change in the conversation before this message,
        // or rolls it all back if the message cannot be stored.
        let key_changed = store.pin_devices(tx, &e.sender, &[device], false).await?;
        let mut account = store.load_account(tx).await?;
        let created =
            match account.create_inbound_session(crypto::session_config(), pre.identity_key(), pre)
            {
                Ok(c) => c,
                Err(err) => return Ok(Decrypted::Never(format!("cannot start a session: {err}"))),
            };
        store.save_account(tx, &account).await?;
        store
            .save_session(tx, &e.sender, e.sender_device_id, &created.session)
            .await?;
        Ok(Decrypted::Plaintext {
            plain: created.plaintext,
            key_changed,
        })
    }

    /// Uploads fresh one-time keys so the server holds about [`ONE_TIME_KEY_TARGET`].
    pub async fn top_up_keys(&self, conn: &Connection, remaining: u32) -> Result<(), ClientError> {
        let want = ONE_TIME_KEY_TARGET.saturating_sub(remaining as usize);
        if want == 0 {
            return Ok(());
        }
        let store = &self.store;
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
            return Err(ClientError::unexpected(answer));
        };
        let mut tx = store.begin().await?;
        let mut account = store.load_account(&mut tx).await?;
        account.mark_keys_as_published();
        store.save_account(&mut tx, &account).await?;
        tx.commit().await?;
        Ok(())
    }
}
