//! `fhirsync sync`: copy, compare and follow FHIR data between any two FHIR
//! servers (fhirsync nodes included) or from a directory, in the spirit of
//! Smile CDR's `synchronize-fhir-servers`, option for option.
//!
//! Pure decisions (retry timing, id prefixing, canonical hashing) are plain
//! functions; [`client`] and [`source`] do the I/O; [`run`] drives a mode.

pub mod bulk;
pub mod canonical;
pub mod client;
pub mod compare;
pub mod error;
pub mod files;
pub mod history;
pub mod ids;
pub mod incremental;
pub mod options;
pub mod report;
pub mod retry;
pub mod run;
pub mod semaphore;
pub mod source;
pub mod summaries;
pub mod tls;
pub mod upload;

pub use error::SyncError;
pub use options::{Mode, SyncOptions};
pub use report::Report;
