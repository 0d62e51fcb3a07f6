//! Database sync from a MySQL/MariaDB binlog (work in progress).
pub mod binlog;
