//! The server's data directory: its key, its network file and its database.
//!
//! ```text
//! DIR/server.key     Noise static key pair (mode 0600) — the server's identity
//! DIR/network.toml   what clients import: address + public key
//! DIR/postern.db     SQLite database (+ -wal/-shm files)
//! ```

use std::io::Write;
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
        std::fs::create_dir_all(&self.root).map_err(ServerError::io(format!(
            "cannot create {}",
            self.root.display()
        )))?;
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
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let err = ServerError::io(format!("cannot write {}", path.display()));
    let mut f = opts
        .open(&tmp)
        .map_err(ServerError::io(format!("cannot write {}", tmp.display())))?;
    f.write_all(contents.as_bytes())
        .and_then(|_| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(err)
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
