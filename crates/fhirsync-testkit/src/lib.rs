//! Harnesses that start real fhirsync servers on 127.0.0.1 (in-process or
//! as a child process, each with its own data directory, stopped on drop)
//! and seeded generators of realistic FHIR data.

pub mod browser;
pub mod clock;
pub mod gen;
pub mod hook;
pub mod mariadb;
pub mod nats;
pub mod nats_jwt;
pub mod postgres;
pub mod proxy;
pub mod server;
pub mod sim;
pub mod smart;
pub mod tcp;
pub mod tls;

pub use nats::{NatsCluster, NatsServer};
pub use proxy::{Proxy, ProxyOptions};
pub use server::{InProcess, NodeProcess};
pub use tcp::{Link, TcpProxy};

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
