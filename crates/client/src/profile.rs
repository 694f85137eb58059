//! The profile directory: one account's device on this machine.
//!
//! ```text
//! HOME/profile.toml   username, device id and the network (server address + key)
//! HOME/secrets.toml   device Noise key and the key that encrypts Olm pickles (0600)
//! HOME/client.db      Olm account and sessions (encrypted pickles), contacts, history
//! ```
//! `HOME` comes from `--home` or `POSTERN_HOME`, so several users can share a machine.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use postern_protocol::network::NetworkFile;
use postern_protocol::noise::StaticKeypair;
use serde::{Deserialize, Serialize};

use crate::ClientError;

pub const PROFILE_FILE: &str = "profile.toml";
pub const SECRETS_FILE: &str = "secrets.toml";
pub const DATABASE_FILE: &str = "client.db";

/// Public facts about the profile.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProfileInfo {
    pub username: String,
    pub device_id: u64,
    pub network: NetworkFile,
}

#[derive(Serialize, Deserialize)]
struct SecretsFile {
    noise_key: String,
    pickle_key: String,
}

/// Secrets of the device; never leave the machine.
#[derive(Clone)]
pub struct Secrets {
    pub noise: StaticKeypair,
    pub pickle_key: [u8; 32],
}

impl Secrets {
    pub fn generate() -> Self {
        Self {
            noise: StaticKeypair::generate(),
            pickle_key: rand::random(),
        }
    }
}

/// Locates the files of a profile directory.
#[derive(Debug, Clone)]
pub struct ProfileDir {
    root: PathBuf,
}

impl ProfileDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn database_path(&self) -> PathBuf {
        self.root.join(DATABASE_FILE)
    }

    pub fn exists(&self) -> bool {
        self.root.join(PROFILE_FILE).exists()
    }

    pub fn load_info(&self) -> Result<ProfileInfo, ClientError> {
        let path = self.root.join(PROFILE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ClientError::NoProfile(self.root.display().to_string())
            } else {
                ClientError::Profile(format!("cannot read {}: {e}", path.display()))
            }
        })?;
        toml::from_str(&text)
            .map_err(|e| ClientError::Profile(format!("{} is damaged: {e}", path.display())))
    }

    pub fn save_info(&self, info: &ProfileInfo) -> Result<(), ClientError> {
        let text = toml::to_string(info).map_err(|e| ClientError::Profile(e.to_string()))?;
        write_file(&self.root.join(PROFILE_FILE), &text, 0o644)
    }

    pub fn load_secrets(&self) -> Result<Secrets, ClientError> {
        let path = self.root.join(SECRETS_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ClientError::Profile(format!("cannot read {}: {e}", path.display())))?;
        let damaged =
            |e: String| ClientError::Profile(format!("{} is damaged: {e}", path.display()));
        let file: SecretsFile = toml::from_str(&text).map_err(|e| damaged(e.to_string()))?;
        let noise = StaticKeypair::from_secret_string(&file.noise_key).map_err(damaged)?;
        let pickle_key = base64::engine::general_purpose::STANDARD
            .decode(&file.pickle_key)
            .ok()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .ok_or_else(|| damaged("pickle_key must be 32 bytes of base64".into()))?;
        Ok(Secrets { noise, pickle_key })
    }

    pub fn save_secrets(&self, secrets: &Secrets) -> Result<(), ClientError> {
        let file = SecretsFile {
            noise_key: secrets.noise.to_secret_string(),
            pickle_key: base64::engine::general_purpose::STANDARD.encode(secrets.pickle_key),
        };
        let text = format!(
            "# Device secrets of this Postern profile. Never share this file.\n{}",
            toml::to_string(&file).map_err(|e| ClientError::Profile(e.to_string()))?
        );
        write_file(&self.root.join(SECRETS_FILE), &text, 0o600)
    }
}

/// Writes atomically (temp file, fsync, rename) with the given Unix mode (the shared
/// private-file writer).
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), ClientError> {
    postern_protocol::fsutil::write_atomic(path, contents.as_bytes(), mode)
        .map_err(|e| ClientError::Profile(format!("cannot write {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_round_trip_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = ProfileDir::new(dir.path());
        let s = Secrets::generate();
        p.save_secrets(&s).unwrap();
        let back = p.load_secrets().unwrap();
        assert_eq!(back.pickle_key, s.pickle_key);
        assert_eq!(back.noise.public(), s.noise.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(SECRETS_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_missing_profile_is_its_own_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = ProfileDir::new(dir.path()).load_info().unwrap_err();
        assert!(matches!(e, ClientError::NoProfile(_)), "{e}");
        assert!(e.to_string().contains("no profile in"), "{e}");
    }
}
