//! The network file (`network.toml`): how a client finds and authenticates a server.
//!
//! ```toml
//! # Postern network file: import it with `postern account create NAME --network FILE`.
//! [server]
//! address = "chat.example.org:5222"
//! public_key = "base64 of the server's 32-byte Noise static key"
//! # Optional: more nodes of the same service (same key); clients race and fail over.
//! addresses = ["node2.example.org:5222", "node3.example.org:5222"]
//! ```
//!
//! The public key is the trust anchor: a client talks only to a server that proves it
//! holds the matching private key, whatever path (relay, censor, attacker) lies between.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::noise::{decode_key, encode_key};

/// Most extra server addresses a network file may list.
pub const MAX_ADDRESSES: usize = 32;

/// A parsed network file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkFile {
    pub server: ServerEntry,
}

/// Where the server is and which key it must prove it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerEntry {
    /// `host:port` clients connect to (directly, when no relay is used).
    pub address: String,
    /// Base64 of the server's Curve25519 static public key.
    pub public_key: String,
    /// Further `host:port` addresses of the same service (other nodes holding the same
    /// key): the client races them with `address` and fails over to one that works.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

/// Why a network file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NetworkFileError {
    #[error("cannot read network file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("network file {path} is not valid: {reason}")]
    Invalid { path: String, reason: String },
}

impl NetworkFile {
    pub fn new(address: impl Into<String>, public_key: &[u8; 32]) -> Self {
        Self {
            server: ServerEntry {
                address: address.into(),
                public_key: encode_key(public_key),
                addresses: Vec::new(),
            },
        }
    }

    /// Parses and validates the TOML text; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, NetworkFileError> {
        let invalid = |reason: String| NetworkFileError::Invalid {
            path: origin.to_string(),
            reason,
        };
        let file: NetworkFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        file.server_key()
            .map_err(|e| invalid(format!("server.public_key: {e}")))?;
        if !file.server.address.contains(':') {
            return Err(invalid(format!(
                "server.address {:?} must be host:port",
                file.server.address
            )));
        }
        if let Some(bad) = file.server.addresses.iter().find(|a| !a.contains(':')) {
            return Err(invalid(format!(
                "server.addresses: {bad:?} must be host:port"
            )));
        }
        if file.server.addresses.len() > MAX_ADDRESSES {
            return Err(invalid(format!(
                "server.addresses: at most {MAX_ADDRESSES} addresses"
            )));
        }
        Ok(file)
    }

    /// Every address of the service: `address` first, then `addresses`, without repeats.
    pub fn server_addresses(&self) -> Vec<String> {
        let mut all = vec![self.server.address.clone()];
        for a in &self.server.addresses {
            if !all.contains(a) {
                all.push(a.clone());
            }
        }
        all
    }

    pub fn load(path: &Path) -> Result<Self, NetworkFileError> {
        let text = std::fs::read_to_string(path).map_err(|error| NetworkFileError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The server's pinned static key.
    pub fn server_key(&self) -> Result<[u8; 32], String> {
        decode_key(&self.server.public_key)
    }

    /// A short, readable digest of the server key, for people to compare with what the
    /// operator publishes: the first 16 bytes of its SHA-256, in groups of four hex digits.
    pub fn key_fingerprint(&self) -> Result<String, String> {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.server_key()?);
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        Ok(hex
            .as_bytes()
            .chunks(4)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(" "))
    }

    /// The file's text, with a comment explaining it.
    pub fn to_toml(&self) -> String {
        format!(
            "# Postern network file: clients import it with\n\
             #   postern account create NAME --network network.toml\n\
             # The public key is the server's identity; clients refuse any server that cannot prove it.\n\
             {}",
            toml::to_string(self).expect("a NetworkFile always serialises")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let f = NetworkFile::new("127.0.0.1:5222", &[7u8; 32]);
        let back = NetworkFile::parse(&f.to_toml(), "test").unwrap();
        assert_eq!(back, f);
        assert_eq!(back.server_key().unwrap(), [7u8; 32]);
    }

    #[test]
    fn several_addresses_round_trip_and_are_checked() {
        let mut f = NetworkFile::new("a:1", &[7u8; 32]);
        f.server.addresses = vec!["b:2".into(), "a:1".into(), "c:3".into()];
        let back = NetworkFile::parse(&f.to_toml(), "test").unwrap();
        assert_eq!(back.server_addresses(), vec!["a:1", "b:2", "c:3"]);
        let key = f.server.public_key.clone();
        let bad = format!("[server]\naddress='a:1'\npublic_key='{key}'\naddresses=['nope']");
        let e = NetworkFile::parse(&bad, "n.toml").unwrap_err().to_string();
        assert!(e.contains("server.addresses") && e.contains("nope"), "{e}");
        // A file without the field (every older one) has one address.
        let old = format!("[server]\naddress='a:1'\npublic_key='{key}'");
        assert_eq!(
            NetworkFile::parse(&old, "n").unwrap().server_addresses(),
            vec!["a:1"]
        );
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let e = NetworkFile::parse("[server]\naddress='x:1'\npublic_key='abc'", "n.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("n.toml") && e.contains("public_key"), "{e}");
        let e = NetworkFile::parse("nothing", "n.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("n.toml"), "{e}");
    }
}
