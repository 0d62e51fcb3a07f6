//! A real PostgreSQL server for tests: `initdb` in its own temporary
//! directory, a free port on 127.0.0.1, trust authentication; killed on
//! drop. Run as root (CI), the server runs as the `postgres` user, which
//! PostgreSQL requires.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

pub struct Postgres {
    pub port: u16,
    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    pub url: String,
    bin: PathBuf,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// The user and group the server runs as, when not this process's.
    owner: Option<(u32, u32)>,
    /// Extra `-c name=value` settings of the server.
    settings: Vec<String>,
}

/// How long a new server may take to accept connections.
const START_S: u64 = 60;

/// The directory of Debian's `postgresql` binaries (the newest major
/// version installed), or `PG_BIN_DIR`.
pub fn bin_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("PG_BIN_DIR") {
        return Some(PathBuf::from(d));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

/// Whether the server binaries are installed.
pub fn available() -> bool {
    bin_dir().is_some()
}

/// The uid and gid of the `postgres` user, from `/etc/passwd`.
fn postgres_user() -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == "postgres")
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        })
        .flatten()
        .ok_or_else(|| anyhow::anyhow!("running as root and there is no postgres user"))
}

impl Postgres {
    /// A new cluster with one database, `postgres`. A second try on a new
    /// port when the first fails (another process may take a free port
    /// between the check and the bind).
    pub fn start() -> anyhow::Result<Postgres> {
        Self::start_with(None, &[])
    }

    /// A server with these `name=value` settings (`postgres -c`).
    pub fn start_configured(settings: &[String]) -> anyhow::Result<Postgres> {
        Self::start_with(None, settings)
    }

    /// A server that also takes TLS connections, with this certificate
    /// and key (PEM files, copied into its directory).
    pub fn start_tls(cert: &Path, key: &Path) -> anyhow::Result<Postgres> {
        Self::start_with(Some((cert, key)), &[])
    }

    fn start_with(tls: Option<(&Path, &Path)>, settings: &[String]) -> anyhow::Result<Postgres> {
        Self::try_start(tls, settings).or_else(|e| {
            eprintln!("postgres: {e:#}; trying again");
            Self::try_start(tls, settings)
        })
    }

    fn command(&self, prog: &str) -> Command {
        let mut c = Command::new(self.bin.join(prog));
        if let Some((uid, gid)) = self.owner {
            c.uid(uid).gid(gid);
        }
        c
    }

    fn try_start(tls: Option<(&Path, &Path)>, settings: &[String]) -> anyhow::Result<Postgres> {
        let bin = bin_dir()
            .ok_or_else(|| anyhow::anyhow!("no PostgreSQL server (apt-get install postgresql)"))?;
        let dir = tempfile::tempdir()?;
        let root = std::fs::metadata("/proc/self")?.uid() == 0;
        let owner = if root { Some(postgres_user()?) } else { None };
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        let port = free_port();
        let mut pg = Postgres {
            port,
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            bin,
            child: None,
            dir,
            owner,
            settings: settings.to_vec(),
        };
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            for (from, name) in [(cert, "server.crt"), (key, "server.key")] {
                let to = pg.dir.path().join(name);
                std::fs::copy(from, &to)?;
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))?;
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(&to, Some(uid), Some(gid))?;
                }
                let setting = if name == "server.crt" {
                    "ssl_cert_file"
                } else {
                    "ssl_key_file"
                };
                pg.settings.push(format!("{setting}={}", to.display()));
            }
            pg.settings.push("ssl=on".into());
        }
        let data = pg.data();
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .args(["--locale=C"])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.launch()?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.log())?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(self.log(), Some(uid), Some(gid))?;
        }
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "max_connections=200"])
            .args(self.settings.iter().flat_map(|x| ["-c", x.as_str()]))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(START_S);
        loop {
            let ready = self
                .command("pg_isready")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let log = std::fs::read_to_string(self.log()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                anyhow::bail!(
                    "postgres exited before it listened ({st}): {}",
                    tail.join(" | ")
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "postgres did not start in {START_S} s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A URL of database `db` on this server.
    pub fn url_of(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Makes a new empty database; returns its URL.
    pub fn create_db(&self, db: &str) -> String {
        self.sql(&format!("CREATE DATABASE \"{db}\""));
        self.url_of(db)
    }

    /// Runs SQL with `psql` as `postgres` in database `postgres`; returns
    /// the rows (unaligned, tuples only); panics on failure.
    pub fn sql(&self, sql: &str) -> String {
        let out = self
            .command("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-X", "-A", "-t"])
            .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
            .current_dir(Path::new("/"))
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// SIGKILL of the server (its children follow it down).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // A fast shutdown (SIGINT) ends the server's own processes too.
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Some(c) = self.child.as_mut() {
                    if c.try_wait().ok().flatten().is_some() {
                        self.child = None;
                        return;
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_and_makes_databases() {
        if !available() {
            panic!("PostgreSQL is not installed (apt-get install postgresql)");
        }
        let pg = Postgres::start().unwrap();
        assert_eq!(pg.sql("SELECT 40 + 2").trim(), "42");
        let url = pg.create_db("fhirsync_a");
        assert!(url.ends_with("/fhirsync_a"));
        assert!(pg
            .sql("SELECT datname FROM pg_database")
            .contains("fhirsync_a"));
    }
}
