//! NATS JetStream as a second transport for the change records the HTTP
//! edges carry. The outbox publishes this node's change log to
//! `<prefix>.<node>.<ResourceType>` with `Nats-Msg-Id = <node>:<seq>` and
//! moves its cursor only after the PubAcks; subscribers follow other nodes
//! through durable pull consumers, apply through the same path as HTTP
//! edges, and ack only after the local commit.

pub mod agent;
pub mod auth;
pub mod config;
pub mod outbox;
pub mod subscriber;

pub use agent::NatsAgent;
pub use auth::AuthFiles;
pub use config::{Follow, Mode, NatsConfig};

/// `versions.via` of versions applied from NATS: the outbox never
/// publishes them again (they are in the stream under their origin).
pub const VIA_NATS: &str = "nats";

/// The cursor key of the outbox.
pub const OUTBOX_CURSOR: &str = "nats:outbox";

/// The edge name of a followed node (audit, dead letters, metrics).
pub fn edge_name(node: &str) -> String {
    format!("nats:{node}")
}
