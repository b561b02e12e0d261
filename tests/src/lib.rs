//! Test support: test hosts in network namespaces, the `wsguard` agent as a
//! child process, WebSocket echo peers, and packets crafted for
//! BPF_PROG_TEST_RUN.
//!
//! Every namespace, link and pin a test creates is removed by a guard's Drop,
//! so a failing test cleans up too.

pub mod agent;
pub mod lab;
pub mod packets;
pub mod peers;
pub mod xdp;

pub use agent::Agent;
pub use lab::Lab;

use std::time::{Duration, Instant};

/// Polls `check` every 10 ms until it returns `Some`, or fails after `timeout`
/// with `what` in the message. Tests wait on events (a counter reaching a
/// value, a socket closing) through this, never on fixed sleeps.
pub async fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
