//! The `[console]` table and the `fhirsync user` command that manages the
//! console's users file.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use fhirsync_api::console::db::DbReceiverLink;
use fhirsync_api::console::{users, ConsoleConfig, Role};
use serde::Deserialize;

/// Where the console listens unless `[console] listen` says otherwise. Taken
/// (a second node on the machine), the node starts with its console off
/// and says so; an address set by the operator must be free.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8081";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleSection {
    /// `IP:PORT`, or `off`. Loopback unless set; another address needs `[tls]`.
    pub listen: String,
    /// Default: `console-users` in the data directory.
    pub users_file: Option<PathBuf>,
    pub session_idle_s: u64,
    pub lockout_failures: u32,
    pub lockout_s: u64,
    /// A `fhirsync db-receiver` (its `listen` URL) whose sites and
    /// conflicts the console shows, with its admin token.
    pub db_receiver_url: Option<String>,
    pub db_receiver_admin_token: Option<String>,
}

impl Default for ConsoleSection {
    fn default() -> Self {
        let d = ConsoleConfig::new(PathBuf::new());
        ConsoleSection {
            listen: DEFAULT_LISTEN.into(),
            users_file: None,
            session_idle_s: d.session_idle_s,
            lockout_failures: d.lockout_failures,
            lockout_s: d.lockout_s,
            db_receiver_url: None,
            db_receiver_admin_token: None,
        }
    }
}

impl ConsoleSection {
    pub fn users_file(&self, data_dir: &Path) -> PathBuf {
        self.users_file
            .clone()
            .unwrap_or_else(|| data_dir.join("console-users"))
    }

    /// Where to listen (`None`: off), checked against the TLS setting.
    pub fn addr(&self, tls: bool) -> anyhow::Result<Option<SocketAddr>> {
        if self.listen == "off" {
            return Ok(None);
        }
        let a: SocketAddr = self
            .listen
            .parse()
            .with_context(|| format!("[console] listen '{}' is not IP:PORT or off", self.listen))?;
        if !a.ip().is_loopback() && !tls {
            bail!(
                "[console] listen {a} is not a loopback address: the console needs [tls] to be served to the network"
            );
        }
        if self.db_receiver_url.is_some() != self.db_receiver_admin_token.is_some() {
            bail!("[console] db_receiver_url and db_receiver_admin_token go together");
        }
        if self.lockout_failures == 0 || self.session_idle_s == 0 {
            bail!("[console] lockout_failures and session_idle_s must be at least 1");
        }
        Ok(Some(a))
    }

    pub fn config(&self, data_dir: &Path, tls: bool) -> ConsoleConfig {
        let mut c = ConsoleConfig::new(self.users_file(data_dir));
        c.secure_cookies = tls;
        c.session_idle_s = self.session_idle_s;
        c.lockout_failures = self.lockout_failures;
        c.lockout_s = self.lockout_s;
        c.db_receiver = self
            .db_receiver_url
            .clone()
            .zip(self.db_receiver_admin_token.clone())
            .map(|(url, admin_token)| DbReceiverLink { url, admin_token });
        c
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum UserCmd {
    /// Add a user, or replace one's role and password. The password is the
    /// first line of standard input.
    Add {
        name: String,
        #[arg(long, value_parser = ["admin", "viewer"])]
        role: String,
    },
    /// Remove a user.
    Remove { name: String },
    /// List users and roles.
    List,
}

pub fn run(file: &Path, cmd: UserCmd) -> anyhow::Result<()> {
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match cmd {
        UserCmd::Add { name, role } => {
            let role = Role::parse(&role).context("role must be admin or viewer")?;
            let mut pw = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut pw)
                .context("cannot read the password from standard input")?;
            let pw = pw.trim_end_matches(['\n', '\r']);
            users::add(file, &name, role, pw)?;
            println!(
                "user {name} ({}) saved in {}",
                role.as_str(),
                file.display()
            );
        }
        UserCmd::Remove { name } => {
            if !users::remove(file, &name)? {
                bail!("there is no user '{name}' in {}", file.display());
            }
            println!("user {name} removed from {}", file.display());
        }
        UserCmd::List => {
            for u in users::load(file)? {
                println!("{}\t{}", u.name, u.role.as_str());
            }
        }
    }
    Ok(())
}
