//! Typed storage errors; the API layer maps each to an HTTP status.

use fhirsync_core::search::SearchError;
use fhirsync_core::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error(transparent)]
    Search(#[from] SearchError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0} is not known")]
    NotFound(String),
    #[error("{0} has been deleted")]
    Gone(String),
    #[error("{0}")]
    VersionConflict(String),
    #[error("{0}")]
    MultipleMatches(String),
    #[error("{0}")]
    Unprocessable(String),
    /// The request does not fit the current state (409).
    #[error("{0}")]
    State(String),
    #[error("bundle entry {index}: {source}")]
    Entry {
        index: usize,
        #[source]
        source: Box<StoreError>,
    },
    #[error("the store is shutting down")]
    ShuttingDown,
    #[error("storage failure: {0}")]
    Backend(String),
}

impl StoreError {
    /// The HTTP status this error stands for.
    pub fn status(&self) -> u16 {
        match self {
            StoreError::Invalid(v) => match v {
                ValidationError::Json(_)
                | ValidationError::NotAnObject
                | ValidationError::MissingId
                | ValidationError::TypeMismatch { .. } => 400,
                _ => 422,
            },
            StoreError::Search(_) | StoreError::BadRequest(_) => 400,
            StoreError::NotFound(_) => 404,
            StoreError::Gone(_) => 410,
            StoreError::VersionConflict(_) | StoreError::MultipleMatches(_) => 412,
            StoreError::Unprocessable(_) => 422,
            StoreError::State(_) => 409,
            StoreError::Entry { source, .. } => source.status(),
            StoreError::ShuttingDown => 503,
            StoreError::Backend(_) => 500,
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}
