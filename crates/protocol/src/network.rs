//! The network file (`network.toml`): how a client finds and authenticates a server.
//!
//! ```toml
//! # Postern network file: import it with `postern account create NAME --network FILE`.
//! [server]
//! address = "chat.example.org:5222"
//! public_key = "base64 of the server's 32-byte Noise static key"
//! ```
//!
//! The public key is the trust anchor: a client talks only to a server that proves it
//! holds the matching private key, whatever path (relay, censor, attacker) lies between.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::noise::{decode_key, encode_key};

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
        Ok(file)
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
