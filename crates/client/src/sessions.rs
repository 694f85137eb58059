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

use crate::connector::connection::Connection;
use crate::crypto::{self, ONE_TIME_KEY_TARGET};
use crate::store::{ContactDevice, LocalStore, Tx};
use crate::timeouts::REQUEST_TIMEOUT;
use crate::ClientError;

/// What decrypting an envelope gave.
pub(crate) enum Decrypted {
    Plaintext(Vec<u8>),
    /// It can never be decrypted, for this reason (it is recorded, then dropped).
    Never(String),
}

/// The E2E layer of one device.
#[derive(Clone)]
pub(crate) struct Sessions {
    store: LocalStore,
}

impl Sessions {
    pub fn new(store: LocalStore) -> Self {
        Self { store }
    }

    /// One ciphertext per device of `peer`, starting sessions where we have none.
    /// `force_claim` re-reads the peer's devices from the server (they changed).
    pub async fn encrypt_for(
        &self,
        conn: &Connection,
        peer: &str,
        content: &[u8],
        force_claim: bool,
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
                return Err(ClientError::unexpected(answer));
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
                return Ok(Decrypted::Plaintext(plain));
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
        if let Err(err) = store.pin_device(tx, &e.sender, &device).await {
            return Ok(Decrypted::Never(err.to_string()));
        }
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
        Ok(Decrypted::Plaintext(created.plaintext))
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
