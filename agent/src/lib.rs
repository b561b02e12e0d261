//! The wsguard agent: configuration, kernel program management and the
//! daemon. The `wsguard` binary (main.rs) is a thin CLI over this library;
//! the integration tests use it to load the same programs the daemon does.

pub mod agent_file;
pub mod config;
pub mod control;
pub mod daemon;
pub mod events;
pub mod fleet;
pub mod handshake;
pub mod inspection;
pub mod kernel;
pub mod metrics;
pub mod status;
pub mod top;
pub mod users;
