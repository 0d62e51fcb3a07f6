//! Errors that end a sync run (a single failing resource does not: it is
//! counted and listed in the report).

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{0}")]
    Options(String),
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
    #[error("{what} answered {status}: {detail}")]
    Status {
        what: String,
        status: u16,
        detail: String,
    },
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("state file {path}: {reason}")]
    State { path: String, reason: String },
    #[error("local index: {0}")]
    Index(String),
}

impl From<rusqlite::Error> for SyncError {
    fn from(e: rusqlite::Error) -> Self {
        SyncError::Index(e.to_string())
    }
}
