//! Topic-based subscriptions: a matcher reads the node's change log and
//! stores each subscription's events; a worker per subscription delivers
//! them (REST hook, NATS core, NATS JetStream) with retries.

pub mod channel;
pub mod config;
pub mod notifier;

pub use config::{NatsConnection, SubsConfig};
pub use notifier::Notifier;
