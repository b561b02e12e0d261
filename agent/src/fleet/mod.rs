//! A fleet of hosts that acts as one: every ban (of a source or a user) and
//! every runtime deny/allow entry one host decides is enforced by the
//! kernel maps of every host of the fleet, through Redis (or Valkey).
//!
//! - Each live decision is a key, `<prefix>:<kind>:<subject>`, whose
//!   expiry is the decision's, so a host that starts or reconnects late
//!   reads every live decision at once; each change is also published on
//!   `<prefix>:decisions` for speed.
//! - The longest ban (or entry) wins, in Redis (a script that never
//!   shortens a key) and in every host's maps; a lift on one host lifts the
//!   entry everywhere.
//! - While Redis cannot be reached, every host keeps enforcing on its own
//!   and keeps its own decisions in a bounded outbox, published once Redis
//!   is back; after every reconnect a host reads every live decision again
//!   and publishes its own live ones again (which repairs a Redis that
//!   restarted empty).
//! - Everything read from Redis is checked like operator input.
//!
//! The README's "A fleet of hosts" has the rules in full.

pub mod decision;
mod link;
pub mod spool;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use ipnet::IpNet;
use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::warn;
use wsguard_common::SourceKey;

pub use decision::{Change, Decision, Rejected, Target};

use crate::{
    agent_file,
    config::{Config, FleetConfig},
    events::{EventSink, source_net},
};

/// What the metrics show of the fleet.
#[derive(Debug)]
pub struct FleetCounters {
    pub configured: AtomicU64,
    pub connected: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// Received decisions that changed this host's maps.
    pub applied: AtomicU64,
    pub rejected: [AtomicU64; Rejected::ALL.len()],
    /// Decisions waiting for Redis, and those the full outbox let go.
    pub outbox: AtomicU64,
    pub outbox_dropped: AtomicU64,
    /// Seconds from a decision's publication to its arrival here.
    pub propagation: Histogram,
}

impl Default for FleetCounters {
    fn default() -> Self {
        FleetCounters {
            configured: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            rejected: Default::default(),
            outbox: AtomicU64::new(0),
            outbox_dropped: AtomicU64::new(0),
            propagation: Histogram::new([
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        }
    }
}

impl FleetCounters {
    pub fn count_rejected(&self, why: Rejected) {
        let i = Rejected::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.rejected[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// What the rest of the agent hands its own decisions to. Cheap to clone;
/// does nothing outside a fleet.
#[derive(Clone, Default)]
pub struct Fleet {
    inner: Option<Arc<Shared>>,
}

struct Shared {
    outgoing: mpsc::Sender<Decision>,
    host: String,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
    counters: Arc<FleetCounters>,
}

impl Fleet {
    /// Starts sharing this host's decisions, when the config has `[fleet]`.
    pub fn start(
        config: &Config,
        pins: &Path,
        sink: Arc<Mutex<EventSink>>,
        counters: Arc<FleetCounters>,
    ) -> Fleet {
        let Some(fleet) = config.fleet.clone() else {
            return Fleet::default();
        };
        counters.configured.store(1, Ordering::Relaxed);
        // Rustls needs a process-wide crypto provider for rediss://. Ring
        // builds without cmake (aws-lc-rs, which rustls now prefers for
        // post-quantum key exchange, needs it); a link to Redis does not
        // need post-quantum key exchange.
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (outgoing, incoming) = mpsc::channel(fleet.outbox_size);
        let rules = decision::Rules {
            accept_allow: fleet.accept_allow,
            ipv4_prefix: config.ipv4_prefix,
            ipv6_prefix: config.ipv6_prefix,
        };
        let shared = Shared {
            outgoing,
            host: fleet.host_id.clone(),
            ipv4_prefix: config.ipv4_prefix,
            ipv6_prefix: config.ipv6_prefix,
            counters: counters.clone(),
        };
        tokio::spawn(link::run(link::Link::new(
            fleet,
            rules,
            pins.to_owned(),
            incoming,
            sink,
            counters,
        )));
        Fleet {
            inner: Some(Arc::new(shared)),
        }
    }

    /// Shares a decision this host made.
    pub fn decided(&self, target: Target, change: Change) {
        let Some(shared) = &self.inner else { return };
        let decision = Decision {
            target,
            change,
            host: shared.host.clone(),
            sent_ms: decision::now_ms(),
        };
        if shared.outgoing.try_send(decision).is_err() {
            shared
                .counters
                .outbox_dropped
                .fetch_add(1, Ordering::Relaxed);
            warn!("fleet: the outbox is full; a decision stays on this host");
        }
    }

    /// A source's ban (by its tracking key) until `until_ns` (CLOCK_MONOTONIC).
    pub fn banned(&self, key: &SourceKey, until_ns: u64) {
        let Some(shared) = &self.inner else { return };
        self.decided(
            Target::Source(source_net(key, shared.ipv4_prefix, shared.ipv6_prefix)),
            Change::Set {
                until_ms: decision::wall_at(until_ns),
            },
        );
    }

    /// Shares what the CLI spooled since the last call.
    pub fn drain_spool(&self, pins: &Path) {
        let Some(shared) = &self.inner else { return };
        for spooled in spool::drain(pins) {
            let (target, change) = match spooled {
                spool::Spooled::BanLifted { addr } => {
                    let key = SourceKey::from(addr);
                    let net = source_net(&key, shared.ipv4_prefix, shared.ipv6_prefix);
                    (Target::Source(net), Change::Lift)
                }
                spool::Spooled::UserBanned { user, until_ms } => {
                    (Target::User(user), Change::Set { until_ms })
                }
                spool::Spooled::UserBanLifted { user } => (Target::User(user), Change::Lift),
                spool::Spooled::Listed {
                    allow,
                    net,
                    until_ms,
                } => (list_target(allow, net), Change::Set { until_ms }),
                spool::Spooled::Unlisted { allow, net } => (list_target(allow, net), Change::Lift),
            };
            self.decided(target, change);
        }
    }
}

fn list_target(allow: bool, net: IpNet) -> Target {
    if allow {
        Target::Allow(net)
    } else {
        Target::Deny(net)
    }
}

/// What `status --fleet` shows, written by the agent every second next to
/// its agent file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FleetReport {
    pub host_id: String,
    pub redis: String,
    pub connected: bool,
    /// Why the last connection attempt failed, while not connected.
    pub last_error: Option<String>,
    pub outbox: u64,
    pub sent: u64,
    pub received: u64,
    pub rejected: u64,
    /// Hosts that reported in the last 10 s, this one included.
    pub hosts: Vec<HostSeen>,
    /// The fleet's busiest sources over the last second (each host's
    /// busiest, summed), for `top --fleet`.
    #[serde(default)]
    pub busiest: Vec<FleetSource>,
    /// Live decisions this host knows of, and which host made each.
    pub decisions: Vec<DecisionInForce>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HostSeen {
    pub host: String,
    /// Seconds since its last report.
    pub report_age_seconds: f64,
    /// Decisions it has published since it started.
    pub sent: u64,
    pub connected_since_unix: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FleetSource {
    pub source: String,
    pub new_connections_per_second: f64,
    pub bytes_per_second: f64,
    /// The hosts that reported it.
    pub hosts: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DecisionInForce {
    pub kind: String,
    pub subject: String,
    /// Wall clock (ms since the epoch); 0 until removed.
    pub until_unix_ms: u64,
    pub from: String,
}

pub fn report_path(pin_dir: &Path) -> PathBuf {
    agent_file::path_for(pin_dir).with_extension("fleet.json")
}

/// Whether the report is closed for good (the agent is stopping). Writing
/// the report and closing it take turns on this lock, so that a report
/// written by the link as the agent stops cannot outlive it.
static REPORT_CLOSED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);

/// Writes the report with `write`, unless the agent is stopping.
fn write_report_file(write: impl FnOnce()) {
    let closed = REPORT_CLOSED.lock().unwrap_or_else(|e| e.into_inner());
    if !*closed {
        write();
    }
}

/// Removes the report for good, as the agent stops.
pub fn close_report(pin_dir: &Path) {
    let mut closed = REPORT_CLOSED.lock().unwrap_or_else(|e| e.into_inner());
    *closed = true;
    let _ = std::fs::remove_file(report_path(pin_dir));
}

impl FleetReport {
    pub fn read(pin_dir: &Path) -> Option<FleetReport> {
        let text = std::fs::read(report_path(pin_dir)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let now = decision::now_ms();
        let _ = writeln!(
            out,
            "fleet: host {} on {}: {}",
            self.host_id,
            self.redis,
            if self.connected {
                "connected".to_string()
            } else {
                format!(
                    "not connected ({})",
                    self.last_error.as_deref().unwrap_or("connecting")
                )
            }
        );
        let _ = writeln!(
            out,
            "decisions: {} sent, {} received, {} rejected, {} waiting in the outbox",
            self.sent, self.received, self.rejected, self.outbox
        );
        let _ = writeln!(out, "hosts seen ({}):", self.hosts.len());
        for h in &self.hosts {
            let _ = writeln!(
                out,
                "  {:<24} last report {:.1} s ago, {} decisions sent",
                h.host, h.report_age_seconds, h.sent
            );
        }
        let _ = writeln!(out, "decisions in force ({}):", self.decisions.len());
        for d in &self.decisions {
            let remaining = if d.until_unix_ms == 0 {
                "until removed".to_string()
            } else {
                format!(
                    "{:.0} s left",
                    d.until_unix_ms.saturating_sub(now) as f64 / 1e3
                )
            };
            let _ = writeln!(
                out,
                "  {:<9} {:<40} {:<16} from {}",
                d.kind, d.subject, remaining, d.from
            );
        }
        out
    }
}

/// `wsguard top --fleet`: the fleet's busiest sources, from the running
/// agent's fleet report, refreshed every `interval` (or once).
pub fn top(
    pin_dir: &Path,
    interval: std::time::Duration,
    limit: usize,
    once: bool,
) -> anyhow::Result<()> {
    use std::{fmt::Write as _, io::Write as _};
    loop {
        let Some(report) = FleetReport::read(pin_dir) else {
            anyhow::bail!(
                "no fleet report at {}: no agent with a [fleet] table runs with its state at {}",
                report_path(pin_dir).display(),
                pin_dir.display()
            );
        };
        let mut out = format!(
            "{:<40} {:>14} {:>14}  hosts\n",
            "source", "new conn/s", "bytes/s"
        );
        for source in report.busiest.iter().take(limit) {
            let _ = writeln!(
                out,
                "{:<40} {:>14.1} {:>14.0}  {}",
                source.source,
                source.new_connections_per_second,
                source.bytes_per_second,
                source.hosts.join(", ")
            );
        }
        if once {
            print!("{out}");
            return Ok(());
        }
        print!(
            "\x1b[2J\x1b[H{} hosts, the fleet's busiest sources over the last second (each host's busiest, summed)\n{out}",
            report.hosts.len()
        );
        std::io::stdout().flush()?;
        std::thread::sleep(interval);
    }
}

/// The `[fleet]` lines of the agent's summary and `check-config`.
pub fn summary(fleet: &FleetConfig) -> String {
    format!(
        "fleet: host {} shares bans and runtime list entries through {} (keys {}:*; {}; outbox {})",
        fleet.host_id,
        fleet.redacted_url(),
        fleet.key_prefix,
        if fleet.accept_allow {
            "allow entries from other hosts applied"
        } else {
            "allow entries from other hosts refused"
        },
        fleet.outbox_size
    )
}
