//! Database sync from a MySQL/MariaDB binlog: a sender follows a site's
//! tables and delivers row changes in batches (HTTP or NATS JetStream); a
//! receiver applies them to a central database by `uuid`, in the sender's
//! order, converting DATETIMEs between zones, with a per-site cursor and a
//! conflict queue.

pub mod binlog;
pub mod config;
pub mod display;
pub mod nats;
pub mod receiver;
pub mod record;
pub mod schema;
pub mod sender;
pub mod server;
pub mod status;
pub mod tz;

pub use binlog::BinlogError;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Binlog(#[from] BinlogError),
    #[error("database: {0}")]
    Sql(#[from] mysql_async::Error),
    #[error("{0}")]
    Schema(String),
    #[error("{0}")]
    Config(String),
    #[error("site {0} is not registered at the receiver: run `fhirsync db-receiver --config FILE site add {0}` there")]
    UnknownSite(String),
    #[error("{table} {key}: its {column} refers to {parent} {parent_key}, which the receiver does not have")]
    MissingParent {
        table: String,
        key: String,
        column: String,
        parent: String,
        parent_key: String,
    },
    #[error("bad record: {0}")]
    BadRecord(String),
    #[error("the receiver refused the batch: {0}")]
    Refused(String),
    #[error("delivery: {0}")]
    Delivery(String),
    #[error("{0}")]
    State(String),
    #[error("no open conflict {0}")]
    NoConflict(i64),
}

/// Seconds of wait before the n-th retry (1, 2, 4, ... 30).
pub fn backoff(attempt: u32) -> std::time::Duration {
    backoff_capped(attempt, std::time::Duration::from_secs(30))
}

/// The n-th retry's wait, doubling from 1 s up to `max`.
pub fn backoff_capped(attempt: u32, max: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_millis(1000u64 << attempt.min(16)).min(max)
}

/// Runs `f` until it answers anything but a `Delivery` error (what may
/// pass later: a connection, a 5xx), waiting longer each time.
pub async fn retrying<T, F, Fut>(what: &str, mut f: F) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    let mut attempt = 0;
    loop {
        match f().await {
            Err(DbError::Delivery(e)) => {
                let wait = backoff(attempt);
                tracing::warn!(error = %e, retry_in = ?wait, "{what}");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}
