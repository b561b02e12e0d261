//! Test support: test hosts in network namespaces, the `wsguard` agent as a
//! child process, WebSocket echo peers, and packets crafted for
//! BPF_PROG_TEST_RUN.
//!
//! Every namespace, link and pin a test creates is removed by a guard's Drop,
//! so a failing test cleans up too.

pub mod agent;
pub mod fairness;
pub mod lab;
pub mod packets;
pub mod peers;
pub mod raw_tcp;
pub mod redis;
pub mod xdp;

pub use agent::Agent;
pub use lab::Lab;

use std::time::{Duration, Instant};

/// Polls `check` every 10 ms until it returns `Some`, or fails after `timeout`
/// with `what` in the message. Tests wait on events (a counter reaching a
/// value, a socket closing) through this, never on fixed sleeps.
pub async fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
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

/// A lab with an echo server on port 8080 in the server namespace and the
/// agent protecting the server's interface. Fields drop in order: the agent
/// stops before the server and the namespaces go.
pub struct Setup {
    pub agent: Agent,
    pub server: peers::EchoServer,
    /// The server's IPv4 (or, for [`Setup::start_v6`], IPv6) address and port.
    pub addr: std::net::SocketAddr,
    pub lab: Lab,
}

impl Setup {
    pub const PORT: u16 = 8080;

    /// `body` is the config without `[agent]`; `{id}` in it becomes the lab's
    /// id (the third octet of its IPv4 addresses) and `{id6}` the same in hex
    /// (the third group of its IPv6 addresses).
    pub async fn start(body: &str) -> anyhow::Result<Setup> {
        Setup::start_on(body, false).await
    }

    pub async fn start_v6(body: &str) -> anyhow::Result<Setup> {
        Setup::start_on(body, true).await
    }

    async fn start_on(body: &str, v6: bool) -> anyhow::Result<Setup> {
        let lab = Lab::new()?;
        let server = peers::EchoServer::start(&lab.server, Self::PORT).await?;
        let agent = Agent::start(
            &lab,
            &body
                .replace("{id}", &lab.id.to_string())
                .replace("{id6}", &format!("{:x}", lab.id)),
        )?;
        let addr = std::net::SocketAddr::new(lab.server_addr(v6), Self::PORT);
        Ok(Setup {
            agent,
            server,
            addr,
            lab,
        })
    }
}
