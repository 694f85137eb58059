//! The server's data directory: its key, its network file and its database.
//!
//! ```text
//! DIR/server.key     Noise static key pair (mode 0600) — the server's identity
//! DIR/network.toml   what clients import: address + public key
//! DIR/postern.db     SQLite database (+ -wal/-shm files), mode 0600
//! ```
//!
//! The directory itself is 0700: it holds the server's identity and every queued message.

use std::path::{Path, PathBuf};

use postern_protocol::network::NetworkFile;
use postern_protocol::noise::StaticKeypair;

use crate::ServerError;

pub const KEY_FILE: &str = "server.key";
pub const NETWORK_FILE: &str = "network.toml";
pub const DATABASE_FILE: &str = "postern.db";

/// Paths inside one data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

/// What `init` did.
#[derive(Debug)]
pub struct InitReport {
    pub network_file: PathBuf,
    pub public_key: String,
    /// False when an existing key was kept (init is idempotent; it never replaces a key).
    pub created_key: bool,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn key_path(&self) -> PathBuf {
        self.root.join(KEY_FILE)
    }

    pub fn network_path(&self) -> PathBuf {
        self.root.join(NETWORK_FILE)
    }

    pub fn database_path(&self) -> PathBuf {
        self.root.join(DATABASE_FILE)
    }

    /// Creates the directory and server key if missing and (re)writes `network.toml` with
    /// `public_address`. An existing key is never replaced: clients have pinned it.
    pub fn init(&self, public_address: &str) -> Result<InitReport, ServerError> {
        self.make_private()?;
        let (keys, created_key) = match self.load_key() {
            Ok(k) => (k, false),
            Err(_) if !self.key_path().exists() => {
                let k = StaticKeypair::generate();
                write_secret(&self.key_path(), &k.to_secret_string())?;
                (k, true)
            }
            Err(e) => return Err(e),
        };
        let network = NetworkFile::new(public_address, keys.public());
        std::fs::write(self.network_path(), network.to_toml()).map_err(ServerError::io(
            format!("cannot write {}", self.network_path().display()),
        ))?;
        Ok(InitReport {
            network_file: self.network_path(),
            public_key: keys.public_base64(),
            created_key,
        })
    }

    /// Creates the directory if needed and makes it 0700 (also one made by an older
    /// version, or by hand, with looser permissions).
    pub fn make_private(&self) -> Result<(), ServerError> {
        postern_protocol::fsutil::private_dir(&self.root).map_err(ServerError::io(format!(
            "cannot create {} (readable by its owner only)",
            self.root.display()
        )))
    }

    /// Loads the server's key pair.
    pub fn load_key(&self) -> Result<StaticKeypair, ServerError> {
        let path = self.key_path();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ServerError::Config(format!(
                    "no server key at {}: run `postern server init --data {}` first",
                    path.display(),
                    self.root.display()
                ))
            } else {
                ServerError::Io {
                    context: format!("cannot read {}", path.display()),
                    error: e,
                }
            }
        })?;
        StaticKeypair::from_secret_string(&text)
            .map_err(|e| ServerError::Config(format!("{} is damaged: {e}", path.display())))
    }
}

/// Writes a file readable only by its owner, atomically (temp file + rename).
pub fn write_secret(path: &Path, contents: &str) -> Result<(), ServerError> {
    postern_protocol::fsutil::write_atomic(
        path,
        contents.as_bytes(),
        postern_protocol::fsutil::FILE_MODE,
    )
    .map_err(ServerError::io(format!("cannot write {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_creates_a_private_key_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path().join("data"));
        let first = d.init("127.0.0.1:5222").unwrap();
        assert!(first.created_key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(d.key_path())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            let dir_mode = std::fs::metadata(d.root()).unwrap().permissions().mode();
            assert_eq!(dir_mode & 0o777, 0o700, "the data directory is private");
        }
        let second = d.init("example.org:443").unwrap();
        assert!(!second.created_key);
        assert_eq!(first.public_key, second.public_key);
        let nf = NetworkFile::load(&d.network_path()).unwrap();
        assert_eq!(nf.server.address, "example.org:443");
    }

    #[test]
    fn missing_key_says_what_to_run() {
        let dir = tempfile::tempdir().unwrap();
        let e = DataDir::new(dir.path()).load_key().unwrap_err().to_string();
        assert!(e.contains("postern server init"), "{e}");
    }
}
