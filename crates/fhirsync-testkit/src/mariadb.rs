//! A real MariaDB server for tests: its own data directory, a free port on
//! 127.0.0.1, the binlog on (ROW, full row metadata unless told
//! otherwise); killed on drop.

use crate::free_port;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct MariaDb {
    pub port: u16,
    /// `mysql://root@127.0.0.1:PORT/`
    pub url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

/// Where Debian's `mariadb-server` puts the server.
pub fn available() -> bool {
    std::path::Path::new("/usr/sbin/mariadbd").exists()
}

impl MariaDb {
    /// ROW binlog with full row metadata.
    pub fn start() -> anyhow::Result<MariaDb> {
        Self::start_with(&["--binlog-format=ROW", "--binlog-row-metadata=FULL"])
    }

    /// The binlog on, with `extra` server options. A second try on a new
    /// port when the first fails (another process may take a free port
    /// between the check and the bind).
    pub fn start_with(extra: &[&str]) -> anyhow::Result<MariaDb> {
        Self::try_start(extra).or_else(|e| {
            eprintln!("mariadb: {e:#}; trying again");
            Self::try_start(extra)
        })
    }

    fn try_start(extra: &[&str]) -> anyhow::Result<MariaDb> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        let out = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "mariadb-install-db failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Its own temporary directory: implicit temporary tables (e.g. of
        // information_schema queries) then live and die with this server,
        // whatever else cleans the system's.
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp)?;
        let port = free_port();
        let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
        let child = Command::new("/usr/sbin/mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", dir.path().join("sock").display()))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .arg(format!("--log-bin={}", data.join("binlog").display()))
            .arg("--server-id=1")
            .arg(format!("--user={user}"))
            .args(["--innodb-buffer-pool-size=32M", "--skip-name-resolve"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("server.log"))?)
            .spawn()?;
        let mut db = MariaDb {
            port,
            url: format!("mysql://root@127.0.0.1:{port}/"),
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new("mariadb")
                .args([
                    "-h127.0.0.1",
                    &format!("-P{port}"),
                    "-uroot",
                    "-e",
                    "SELECT 1",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Ok(db);
            }
            if let Some(st) = db.child.try_wait()? {
                let log =
                    std::fs::read_to_string(db._dir.path().join("server.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                anyhow::bail!(
                    "mariadbd exited before it listened ({st}): {}",
                    tail.join(" | ")
                );
            }
            anyhow::ensure!(Instant::now() < deadline, "mariadbd did not start in 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs SQL with the `mariadb` client as root; panics on failure.
    pub fn sql(&self, sql: &str) -> String {
        let out = Command::new("mariadb")
            .args([
                "-h127.0.0.1",
                &format!("-P{}", self.port),
                "-uroot",
                "-N",
                "-B",
                "-e",
                sql,
            ])
            .output()
            .expect("the mariadb client");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
