//! End-to-end encryption with Olm (vodozemac): keys a device publishes, and how a
//! claimed key becomes a session.
//!
//! One-time and fallback keys are signed with the device's Ed25519 key over
//! `"postern-otk-v1:" || key`, and a sender checks the signature against the identity it
//! pinned, so the server cannot slip in keys of its own.

use vodozemac::olm::{Account, SessionConfig};
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey, Ed25519Signature};

use postern_protocol::schema::SignedKey;

use crate::ClientError;

/// Domain separation for key signatures.
const KEY_SIGNATURE_CONTEXT: &[u8] = b"postern-otk-v1:";
/// One-time keys a device keeps on the server.
pub const ONE_TIME_KEY_TARGET: usize = 50;
/// Top up when the server holds fewer than this.
pub const ONE_TIME_KEY_LOW: u32 = 25;

/// The Olm session flavour every Postern device uses.
pub fn session_config() -> SessionConfig {
    SessionConfig::version_1()
}

fn signed_message(key: &Curve25519PublicKey) -> Vec<u8> {
    let mut m = KEY_SIGNATURE_CONTEXT.to_vec();
    m.extend_from_slice(key.as_bytes());
    m
}

fn sign(account: &Account, key: &Curve25519PublicKey) -> SignedKey {
    SignedKey {
        public_key: key.to_vec(),
        signature: account.sign(signed_message(key)).to_bytes().to_vec(),
    }
}

/// Generates one-time keys up to `count` unpublished ones and returns them signed. The
/// caller uploads them and then calls `account.mark_keys_as_published()`.
pub fn unpublished_one_time_keys(account: &mut Account, count: usize) -> Vec<SignedKey> {
    let have = account.one_time_keys().len();
    if have < count {
        account.generate_one_time_keys(count - have);
    }
    let mut keys: Vec<_> = account.one_time_keys().into_iter().collect();
    keys.sort_by_key(|(id, _)| *id);
    keys.iter().map(|(_, k)| sign(account, k)).collect()
}

/// A fresh signed fallback key (used when the one-time keys run out).
pub fn new_fallback_key(account: &mut Account) -> Option<SignedKey> {
    account.generate_fallback_key();
    account
        .fallback_key()
        .values()
        .next()
        .map(|k| sign(account, k))
}

/// Checks a claimed key's signature and returns the key.
pub fn verify_signed_key(
    ed25519: &[u8],
    key: &SignedKey,
) -> Result<Curve25519PublicKey, ClientError> {
    let ed: [u8; 32] = ed25519
        .try_into()
        .map_err(|_| ClientError::Crypto("malformed Ed25519 identity key".into()))?;
    let ed = Ed25519PublicKey::from_slice(&ed).map_err(ClientError::crypto)?;
    let curve = Curve25519PublicKey::from_slice(&key.public_key).map_err(ClientError::crypto)?;
    let sig = Ed25519Signature::from_slice(&key.signature).map_err(ClientError::crypto)?;
    ed.verify(&signed_message(&curve), &sig).map_err(|_| {
        ClientError::Crypto(
            "a key from the server is not signed by the contact's device: refusing to use it"
                .into(),
        )
    })?;
    Ok(curve)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vodozemac::olm::OlmMessage;

    #[test]
    fn signed_keys_verify_and_tampering_is_caught() {
        let mut alice = Account::new();
        let keys = unpublished_one_time_keys(&mut alice, 3);
        assert_eq!(keys.len(), 3);
        let ed = alice.ed25519_key().as_bytes().to_vec();
        for k in &keys {
            verify_signed_key(&ed, k).unwrap();
        }
        let mut forged = keys[0].clone();
        forged.public_key =
            Curve25519PublicKey::from(&vodozemac::Curve25519SecretKey::new()).to_vec();
        assert!(verify_signed_key(&ed, &forged).is_err());
        let other = Account::new();
        assert!(verify_signed_key(other.ed25519_key().as_bytes(), &keys[0]).is_err());
    }

    #[test]
    fn claimed_key_starts_a_working_session() {
        let alice = Account::new();
        let mut bob = Account::new();
        let bob_keys = unpublished_one_time_keys(&mut bob, 1);
        bob.mark_keys_as_published();
        let otk = verify_signed_key(bob.ed25519_key().as_bytes(), &bob_keys[0]).unwrap();
        let mut out = alice
            .create_outbound_session(session_config(), bob.curve25519_key(), otk)
            .unwrap();
        let msg = out.encrypt(b"hello bob").unwrap();
        let OlmMessage::PreKey(pre) = msg else {
            panic!("first message is a pre-key message")
        };
        let res = bob
            .create_inbound_session(session_config(), alice.curve25519_key(), &pre)
            .unwrap();
        assert_eq!(res.plaintext, b"hello bob");
    }
}
