//! A real PostgreSQL for tests (Debian package `postgresql`): a cluster made with `initdb`
//! in a temporary directory and started with `pg_ctl` on a random port, listening only on a
//! unix socket inside that directory (no TCP). PostgreSQL refuses to run as root, so when
//! the test runs as root the cluster runs as `nobody` (through `runuser`). The server is
//! stopped (`pg_ctl stop -m immediate`) and the directory removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A running PostgreSQL cluster; stopped and deleted on drop.
pub struct Postgres {
    bin: PathBuf,
    root: PathBuf,
    port: u16,
    run_as: Option<String>,
}

/// The directory holding `initdb`, `pg_ctl` and `postgres` (the newest version installed).
fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn check(what: &str, out: std::io::Result<Output>) -> Output {
    let out = out.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Postgres {
    /// Installs PostgreSQL if missing (as root), makes a cluster and starts it; returns once
    /// it accepts connections.
    pub fn start() -> Postgres {
        crate::apt::ensure_that(
            || bin_dir().is_some(),
            "/usr/lib/postgresql/*/bin/initdb",
            &["postgresql"],
            "the PostgreSQL tests",
        );
        let bin = bin_dir().expect("the postgresql package installs /usr/lib/postgresql/*/bin");
        let root = std::env::temp_dir().join(format!(
            "postern-pg-{}-{}",
            std::process::id(),
            crate::free_port()
        ));
        std::fs::create_dir_all(&root).expect("create the PostgreSQL directory");
        let run_as = is_root().then(|| "nobody".to_string());
        if let Some(user) = &run_as {
            let uid = check(
                "id -u nobody",
                Command::new("id").args(["-u", user]).output(),
            );
            let gid = check(
                "id -g nobody",
                Command::new("id").args(["-g", user]).output(),
            );
            let parse = |o: &Output| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u32>()
                    .expect("a numeric id")
            };
            std::os::unix::fs::chown(&root, Some(parse(&uid)), Some(parse(&gid)))
                .expect("give the PostgreSQL directory to nobody");
        }
        let pg = Postgres {
            bin,
            root,
            port: crate::free_port(),
            run_as,
        };
        let data = pg.root.join("data");
        check(
            "initdb",
            pg.command("initdb")
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
                .output(),
        );
        let options = format!(
            "-k {} -p {} -c listen_addresses='' -c max_connections=300 -c deadlock_timeout=50ms",
            pg.root.display(),
            pg.port
        );
        check(
            "pg_ctl start",
            pg.command("pg_ctl")
                .arg("-D")
                .arg(&data)
                .args(["-o", &options, "-w", "-t", "60", "-l"])
                .arg(pg.root.join("log"))
                .arg("start")
                .output(),
        );
        pg.watchdog();
        pg
    }

    /// One cluster for the whole test process (each test takes its own database). Statics
    /// are never dropped, so a watchdog stops it when the process exits.
    pub fn shared() -> &'static Postgres {
        static SHARED: std::sync::OnceLock<Postgres> = std::sync::OnceLock::new();
        SHARED.get_or_init(Postgres::start)
    }

    /// Creates a database with a fresh unique name and returns its URL.
    pub fn fresh_database(&self) -> String {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.create_database(&format!("t{}_{n}", std::process::id()))
    }

    /// Stops the cluster and deletes its directory once this process has ended, however
    /// it ends (a panic, or a test binary exiting with the shared cluster still up).
    fn watchdog(&self) {
        let stop = format!(
            "{} -D {} -m immediate -w stop",
            self.bin.join("pg_ctl").display(),
            self.root.join("data").display()
        );
        let stop = match &self.run_as {
            Some(user) => format!("runuser -u {user} -- {stop}"),
            None => stop,
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             if [ -d {root} ]; then cd /; {stop} >/dev/null 2>&1; rm -rf {root}; fi",
            pid = std::process::id(),
            root = self.root.display(),
        );
        let _ = Command::new("sh")
            .args(["-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c.current_dir(&self.root);
                c
            }
            None => Command::new(path),
        }
    }

    /// The directory holding the unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates database `name` (letters, digits and `_`).
    pub fn create_database(&self, name: &str) -> String {
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        check(
            "psql CREATE DATABASE",
            self.command("psql")
                .args(["-X", "-q", "-U", "postgres", "-d", "postgres", "-h"])
                .arg(&self.root)
                .args(["-p", &self.port.to_string(), "-c"])
                .arg(format!("CREATE DATABASE {name}"))
                .output(),
        );
        self.url(name)
    }

    /// A `postgres://` URL for database `name` through the unix socket.
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgres://postgres@localhost:{}/{name}?host={}",
            self.port,
            self.root.display()
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.root.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_starts_takes_a_database_and_stops() {
        let pg = Postgres::start();
        let url = pg.create_database("t1");
        assert!(url.contains("/t1?host="));
        let root = pg.root.clone();
        assert!(root.join(format!(".s.PGSQL.{}", pg.port())).exists());
        drop(pg);
        assert!(!root.exists());
    }
}
