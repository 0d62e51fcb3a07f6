//! The `fhirsync` command: `serve` runs a node, `import` loads files into a
//! node's store without HTTP, `sync` copies between servers, `export`
//! takes a bulk export from a server, `demo` shows
//! replication, `status`/`conflicts`/`deadletters` call a node's admin API,
//! `backup`/`restore` copy a node's database, and `db-sender`/`db-receiver`
//! sync MySQL/MariaDB databases from the binlog.

mod admin_cmd;
mod agents;
mod auth_cfg;
mod backup_cmd;
mod config;
mod console_cfg;
mod db_cmd;
mod demo;
mod export_cmd;
mod import;
mod lock;
mod migrate_cmd;
mod nats_cmd;
mod serve;
mod sync_cmd;
mod tls;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fhirsync",
    version,
    about = "Keeps FHIR R4 data in sync between sites"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Flags shared by the commands that open a node's store.
#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// TOML configuration file.
    #[arg(long, env = "FHIRSYNC_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Directory of the node's embedded database [default: ./fhirsync-data].
    #[arg(long, env = "FHIRSYNC_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// This node's id (fixed once the data directory exists).
    #[arg(long, env = "FHIRSYNC_NODE_ID", global = true)]
    pub node_id: Option<String>,
    /// Let requests without a token read and write everything (`[auth] anonymous`).
    #[arg(long, env = "FHIRSYNC_ANONYMOUS", global = true)]
    pub anonymous: bool,
    /// The web console's address, or `off` (`[console] listen`) [default: 127.0.0.1:8081].
    #[arg(long, env = "FHIRSYNC_CONSOLE_LISTEN", global = true)]
    pub console_listen: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: FHIR REST API and change feed over HTTP.
    Serve {
        #[command(flatten)]
        node: NodeArgs,
        /// Address to listen on [default: 127.0.0.1:8080].
        #[arg(long, env = "FHIRSYNC_LISTEN")]
        listen: Option<String>,
    },
    /// Copy, compare or follow FHIR data between two servers or from a directory.
    Sync(Box<sync_cmd::SyncArgs>),
    /// Bulk Data export from a FHIR server into NDJSON files and a manifest.
    Export(Box<export_cmd::ExportArgs>),
    /// Start a parent and two children on 127.0.0.1 and show data flowing.
    Demo(demo::DemoArgs),
    /// A running node's edges, children, conflicts and dead letters.
    Status {
        #[command(flatten)]
        target: admin_cmd::Target,
    },
    /// Compare a running node with its parent (anti-entropy); with
    /// --repair, repair what differs. Exits 1 when differences remain.
    Verify {
        #[command(flatten)]
        target: admin_cmd::Target,
        /// Repair what differs through the normal apply path.
        #[arg(long)]
        repair: bool,
        /// The edge to verify [default: the node's parent edge].
        #[arg(long)]
        edge: Option<String>,
    },
    /// List, show and resolve a running node's conflicts.
    Conflicts {
        #[command(flatten)]
        target: admin_cmd::Target,
        #[command(subcommand)]
        cmd: admin_cmd::ConflictsCmd,
    },
    /// NATS helpers.
    Nats {
        #[command(subcommand)]
        cmd: nats_cmd::NatsCmd,
    },
    /// List and retry a running node's dead letters.
    Deadletters {
        #[command(flatten)]
        target: admin_cmd::Target,
        #[command(subcommand)]
        cmd: admin_cmd::DeadLettersCmd,
    },
    /// Manage the web console's users (the users file, argon2 hashes).
    User {
        #[command(flatten)]
        node: NodeArgs,
        /// The users file [default: `[console] users_file`, else DATA_DIR/console-users].
        #[arg(long, global = true)]
        users_file: Option<PathBuf>,
        #[command(subcommand)]
        cmd: console_cfg::UserCmd,
    },
    /// Follow a MySQL/MariaDB binlog and deliver row changes to a receiver.
    DbSender(db_cmd::SenderArgs),
    /// Apply row changes from senders to a central database; manage sites
    /// and conflicts.
    DbReceiver(db_cmd::ReceiverArgs),
    /// Load .json resources, Bundles and .ndjson files into a node's store,
    /// all or nothing.
    Import {
        #[command(flatten)]
        node: NodeArgs,
        /// Resources per batch handed to the writer.
        #[arg(long, default_value_t = 2000)]
        batch_size: usize,
        /// Files or directories (searched for .json and .ndjson).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Write a consistent copy of a SQLite node's database to OUT, while
    /// the node serves.
    Backup {
        #[command(flatten)]
        node: NodeArgs,
        /// The backup file to write (it must not exist).
        out: PathBuf,
    },
    /// Put a backup in place of a stopped node's database (the old one is
    /// kept beside it); the node then rejoins its parent safely.
    Restore {
        #[command(flatten)]
        node: NodeArgs,
        /// The backup file (of this node).
        backup: PathBuf,
    },
    /// Move a stopped SQLite node into an empty PostgreSQL database, with
    /// its log, index and sync state.
    Migrate(migrate_cmd::MigrateArgs),
    /// Rebuild the search index of a node's store (the node stopped; a
    /// node also rebuilds an out-of-date index by itself, while serving),
    /// or with `--url` index a running node's versions again in place
    /// (after a SearchParameter was defined).
    Reindex {
        #[command(flatten)]
        node: NodeArgs,
        /// A running node's address: reindex it while it serves.
        #[arg(long)]
        url: Option<String>,
        /// The running node's admin token, when it has one.
        #[arg(long, env = "FHIRSYNC_ADMIN_TOKEN", requires = "url")]
        admin_token: Option<String>,
    },
}

/// The allocator: parsing, validating and indexing allocate many small,
/// short-lived values on several threads, where mimalloc is markedly
/// cheaper than the system's (see docs/benchmarks.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Serve { node, listen } => {
            config::Config::load(&node, listen.as_deref()).and_then(serve::run)
        }
        Command::Sync(a) => sync_cmd::run(*a),
        Command::Export(a) => export_cmd::run(*a),
        Command::Demo(a) => demo::run(a),
        Command::Nats { cmd } => nats_cmd::run(cmd),
        Command::Status { target } => admin_cmd::status(target),
        Command::Conflicts { target, cmd } => admin_cmd::conflicts(target, cmd),
        Command::Verify {
            target,
            repair,
            edge,
        } => admin_cmd::verify(target, repair, edge),
        Command::Deadletters { target, cmd } => admin_cmd::dead_letters(target, cmd),
        Command::User {
            node,
            users_file,
            cmd,
        } => config::Config::load(&node, None).and_then(|c| {
            let f = users_file.unwrap_or_else(|| c.console.users_file(&c.data_dir));
            console_cfg::run(&f, cmd)
        }),
        Command::DbSender(a) => db_cmd::sender(a),
        Command::Migrate(a) => migrate_cmd::run(a),
        Command::Backup { node, out } => {
            config::Config::load(&node, None).and_then(|c| backup_cmd::backup(c, &out))
        }
        Command::Restore { node, backup } => {
            config::Config::load(&node, None).and_then(|c| backup_cmd::restore(c, &backup))
        }
        Command::DbReceiver(a) => db_cmd::receiver(a),
        Command::Import {
            node,
            batch_size,
            paths,
        } => config::Config::load(&node, None).and_then(|c| import::run(c, batch_size, &paths)),
        Command::Reindex {
            url: Some(url),
            admin_token,
            ..
        } => admin_cmd::reindex(admin_cmd::Target {
            url,
            admin_token,
            json: false,
        }),
        Command::Reindex { node, .. } => {
            config::Config::load(&node, None).and_then(import::reindex)
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the reason and its causes.
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("fhirsync: error: {}", msg.join(": "));
            ExitCode::FAILURE
        }
    }
}
