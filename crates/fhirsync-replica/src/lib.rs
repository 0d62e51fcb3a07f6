//! Replication between fhirsync nodes. A child drives every exchange with
//! its parent: it pulls the parent's `$changes` (long-poll) and applies them
//! in one transaction with the pull cursor, and pushes its own change log to
//! the parent's `$apply`, moving the push cursor only after the parent
//! confirmed. Decisions (skip, fast-forward, conflict policy, retry) are
//! the pure functions of `fhirsync_core::replicate`; this crate is the loop
//! around them.

pub mod agent;
pub mod config;
pub mod edge;
pub mod filter;
pub mod verify;

pub use agent::Replicator;
pub use config::{EdgeConfig, FilterConfig, OnError};
