//! The agent's link to the fleet's Redis: one task that publishes this
//! host's decisions, applies the other hosts', and reconnects (reading
//! every live decision again) whenever the connection is lost.

use std::{
    collections::{BTreeMap, VecDeque},
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use redis::{AsyncCommands, IntoConnectionInfo, Script, aio::MultiplexedConnection};
use serde::{Deserialize, Serialize};
use tokio::{sync::mpsc, time::timeout};
use tracing::{info, warn};

use ipnet::IpNet;
use wsguard_common::SourceKey;

use super::{
    Change, Decision, DecisionInForce, FleetCounters, FleetReport, FleetSource, HostSeen, Target,
    decision::{self, Rules, Stored, now_ms},
    report_path,
};
use crate::{
    config::FleetConfig,
    events::{Event, EventSink, source_net},
    kernel::{
        Maps, PinnedState,
        mapped::{MappedSources, busiest},
        monotonic_ns,
    },
};

/// Sets a decision's key unless the key already holds one that lasts at
/// least as long (0: until removed, longest of all), then publishes it;
/// 1 when it did.
const SET_LONGEST: &str = r"
local current = redis.call('GET', KEYS[1])
local new_until = tonumber(ARGV[2])
if current then
  local ok, old = pcall(cjson.decode, current)
  if ok and type(old) == 'table' and type(old['until_ms']) == 'number' then
    local old_until = old['until_ms']
    if old_until == 0 or (new_until ~= 0 and old_until >= new_until) then
      return 0
    end
  end
end
if new_until == 0 then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
";

/// Deletes a decision's key and publishes the lift.
const LIFT: &str = r"
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
";

/// How long a host's report lives: it is refreshed every second.
const REPORT_TTL_MS: u64 = 10_000;
/// Longest wait for one Redis round trip before the link counts as lost.
const ROUND_TRIP: Duration = Duration::from_secs(5);

/// Sources each host reports every second: its busiest by new connections,
/// and its busiest by bytes.
const LOAD_TOP_K: usize = 64;
/// Longest list of sources read from one host's load report.
const LOAD_MAX_SOURCES: usize = 4 * LOAD_TOP_K;
/// A load report older than this is left out of the fleet's sums.
const LOAD_FRESH_MS: u64 = 2_500;
/// Most hosts' reports read in a second (a Redis that holds more is not
/// a fleet this agent can sum every second).
const MAX_HOSTS: usize = 1000;
/// The kernel's "second" (2^30 ns), in seconds.
const COUNT_SECOND: f64 = (1u64 << wsguard_common::maps::COUNT_SECOND_SHIFT) as f64 / 1e9;

/// A host's busiest sources over its last complete second, under
/// `<prefix>:load:<id>`: `[cidr, new connections, bytes]`.
#[derive(Debug, Serialize, Deserialize)]
struct LoadReport {
    reported_ms: u64,
    sources: Vec<(String, u32, u64)>,
}

/// A host's report under `<prefix>:host:<id>`.
#[derive(Debug, Serialize, Deserialize)]
struct HostReport {
    sent: u64,
    connected_since_unix: u64,
    reported_ms: u64,
}

pub struct Link {
    config: FleetConfig,
    rules: Rules,
    pins: PathBuf,
    incoming: mpsc::Receiver<Decision>,
    /// This host's decisions not yet in Redis.
    outbox: VecDeque<Decision>,
    /// Live decisions this host knows of (its own and the others').
    known: BTreeMap<Target, (u64, String)>,
    hosts: Vec<HostSeen>,
    last_error: Option<String>,
    connected_since: u64,
    sink: Arc<Mutex<EventSink>>,
    counters: Arc<FleetCounters>,
    /// The source table, mapped once the link first needs it.
    sources: Option<MappedSources>,
    /// The fleet's busiest sources, as of the last second.
    busiest: Vec<FleetSource>,
}

impl Link {
    pub fn new(
        config: FleetConfig,
        rules: Rules,
        pins: PathBuf,
        incoming: mpsc::Receiver<Decision>,
        sink: Arc<Mutex<EventSink>>,
        counters: Arc<FleetCounters>,
    ) -> Link {
        Link {
            config,
            rules,
            pins,
            incoming,
            outbox: VecDeque::new(),
            known: BTreeMap::new(),
            hosts: Vec::new(),
            last_error: None,
            connected_since: 0,
            sink,
            counters,
            sources: None,
            busiest: Vec::new(),
        }
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.config.key_prefix)
    }

    fn channel(&self) -> String {
        self.key("decisions")
    }

    fn emit(&self, event: Event) {
        self.sink
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .emit(event);
    }

    /// Keeps a decision of this host's for Redis; a full outbox lets the
    /// oldest go (counted).
    fn keep(&mut self, decision: Decision) {
        if self.outbox.len() >= self.config.outbox_size {
            self.outbox.pop_front();
            self.counters.outbox_dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.remember(&decision);
        self.outbox.push_back(decision);
        self.counters
            .outbox
            .store(self.outbox.len() as u64, Ordering::Relaxed);
    }

    fn remember(&mut self, decision: &Decision) {
        match decision.change {
            Change::Set { until_ms } => {
                let longer = self
                    .known
                    .get(&decision.target)
                    .is_none_or(|(until, _)| *until != 0 && (until_ms == 0 || until_ms > *until));
                if longer {
                    self.known
                        .insert(decision.target.clone(), (until_ms, decision.host.clone()));
                }
            }
            Change::Lift => {
                self.known.remove(&decision.target);
            }
        }
    }

    fn connection_info(&self) -> Result<redis::ConnectionInfo> {
        let mut info = self
            .config
            .redis_url
            .as_str()
            .into_connection_info()
            .context("fleet.redis_url")?;
        let mut redis = info.redis_settings().clone();
        if let Some(user) = &self.config.username {
            redis = redis.set_username(user);
        }
        if let Some(password) = &self.config.password {
            redis = redis.set_password(password);
        }
        info = info.set_redis_settings(redis);
        Ok(info)
    }

    /// One connection, from connecting until it is lost.
    async fn session(&mut self) -> Result<()> {
        let client = match &self.config.ca_pem {
            Some(ca) => redis::Client::build_with_tls(
                self.connection_info()?,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            )?,
            None => redis::Client::open(self.connection_info()?)?,
        };
        let mut conn = timeout(ROUND_TRIP, client.get_multiplexed_async_connection())
            .await
            .context("no answer")??;
        let mut pubsub = timeout(ROUND_TRIP, client.get_async_pubsub())
            .await
            .context("no answer")??;
        pubsub.subscribe(self.channel()).await?;
        self.connected_since = now_ms() / 1000;
        self.counters.connected.store(1, Ordering::Relaxed);
        self.last_error = None;
        info!(
            "fleet: connected to {} as host {}",
            self.config.redacted_url(),
            self.config.host_id
        );
        self.emit(Event::FleetConnection {
            connected: true,
            redis: self.config.redacted_url(),
            error: None,
        });
        // Subscribed first: a decision set from now on arrives as a
        // message, or is found by the read that follows.
        self.read_live_decisions(&mut conn).await?;
        self.republish_own();
        self.flush(&mut conn).await?;
        let mut messages = pubsub.into_on_message();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else {
                        bail!("the subscription ended");
                    };
                    self.on_message(message.get_payload_bytes());
                }
                decision = self.incoming.recv() => {
                    let Some(decision) = decision else { return Ok(()) };
                    self.keep(decision);
                    self.flush(&mut conn).await?;
                }
                _ = tick.tick() => {
                    self.report(&mut conn).await?;
                    self.share_load(&mut conn).await?;
                    self.flush(&mut conn).await?;
                    self.write_report();
                }
            }
        }
    }

    /// Every live decision in Redis, applied here.
    async fn read_live_decisions(&mut self, conn: &mut MultiplexedConnection) -> Result<()> {
        let prefix = format!("{}:", self.config.key_prefix);
        for key in scan(conn, &format!("{prefix}*")).await? {
            let Some(suffix) = key.strip_prefix(&prefix) else {
                continue;
            };
            // Reports, not decisions.
            if suffix.starts_with("host:") || suffix.starts_with("load:") {
                continue;
            }
            let value: Option<Vec<u8>> = timeout(ROUND_TRIP, conn.get(&key))
                .await
                .context("no answer")??;
            let Some(value) = value else { continue };
            match Decision::from_stored(suffix, &value, &self.rules) {
                // This host's own, from before a restart: its maps may have
                // lost it (a reboot), and it is this host's to publish again.
                Ok(Some(decision)) if decision.host == self.config.host_id => {
                    self.write_maps(&decision);
                    self.remember(&decision);
                }
                Ok(Some(decision)) => self.apply(decision, None),
                Ok(None) => {}
                Err(why) => self.reject(suffix, why),
            }
        }
        Ok(())
    }

    /// This host's live decisions, into the outbox again: a Redis that
    /// restarted empty gets them back (the longest still wins).
    fn republish_own(&mut self) {
        let now = now_ms();
        let own: Vec<Decision> = self
            .known
            .iter()
            .filter(|(_, (until, host))| {
                *host == self.config.host_id && (*until == 0 || *until > now)
            })
            .map(|(target, (until, host))| Decision {
                target: target.clone(),
                change: Change::Set { until_ms: *until },
                host: host.clone(),
                sent_ms: now,
            })
            .collect();
        let queued: Vec<Target> = self.outbox.iter().map(|d| d.target.clone()).collect();
        for decision in own {
            if !queued.contains(&decision.target) {
                self.outbox.push_back(decision);
            }
        }
    }

    /// Publishes the outbox, oldest first; what fails stays for the next
    /// connection.
    async fn flush(&mut self, conn: &mut MultiplexedConnection) -> Result<()> {
        let (set, lift) = (Script::new(SET_LONGEST), Script::new(LIFT));
        while let Some(decision) = self.outbox.front().cloned() {
            let key = self.key(&decision.target.key());
            let message = serde_json::to_string(&decision.message())?;
            let sent = match decision.change {
                Change::Set { until_ms } => {
                    let stored = serde_json::to_string(&Stored {
                        until_ms,
                        host: decision.host.clone(),
                        since_ms: decision.sent_ms,
                    })?;
                    let mut call = set.key(&key);
                    call.arg(stored)
                        .arg(until_ms)
                        .arg(self.channel())
                        .arg(&message);
                    timeout(ROUND_TRIP, call.invoke_async::<i64>(conn)).await
                }
                Change::Lift => {
                    let mut call = lift.key(&key);
                    call.arg(self.channel()).arg(&message);
                    timeout(ROUND_TRIP, call.invoke_async::<i64>(conn)).await
                }
            };
            sent.context("no answer")??;
            self.outbox.pop_front();
            self.counters.sent.fetch_add(1, Ordering::Relaxed);
            self.counters
                .outbox
                .store(self.outbox.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    fn on_message(&mut self, payload: &[u8]) {
        match Decision::from_message(payload, &self.rules) {
            Ok(Some(decision)) if decision.host == self.config.host_id => {}
            Ok(Some(decision)) => {
                let delay_ms = now_ms().saturating_sub(decision.sent_ms);
                self.counters.propagation.observe(delay_ms as f64 / 1000.0);
                self.apply(decision, Some(delay_ms));
            }
            Ok(None) => {}
            Err(why) => {
                let key = serde_json::from_slice::<serde_json::Value>(payload)
                    .ok()
                    .and_then(|v| v["key"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                self.reject(&key, why);
            }
        }
    }

    /// Writes `decision` into this host's maps: whether they changed,
    /// `None` (logged) when they could not be written.
    fn write_maps(&self, decision: &Decision) -> Option<bool> {
        match PinnedState::open(&self.pins).and_then(|mut s| decision.apply(&mut s)) {
            Ok(changed) => Some(changed),
            Err(e) => {
                warn!(
                    "fleet: cannot apply {} {} from {}: {e:#}",
                    decision.target.kind(),
                    decision.target.subject(),
                    decision.host
                );
                None
            }
        }
    }

    /// Writes a decision from another host into this host's maps.
    fn apply(&mut self, decision: Decision, delay_ms: Option<u64>) {
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let Some(changed) = self.write_maps(&decision) else {
            return;
        };
        if changed {
            self.counters.applied.fetch_add(1, Ordering::Relaxed);
        }
        self.remember(&decision);
        let (op, until_seconds) = match decision.change {
            Change::Set { until_ms } => (
                "set",
                (until_ms != 0).then(|| until_ms.saturating_sub(now_ms()).div_ceil(1000)),
            ),
            Change::Lift => ("lift", None),
        };
        self.emit(Event::FleetDecision {
            kind: decision.target.kind(),
            subject: decision.target.subject(),
            op,
            until_seconds,
            from: decision.host,
            delay_ms,
            changed,
        });
    }

    fn reject(&mut self, key: &str, why: decision::Rejected) {
        self.counters.count_rejected(why);
        warn!("fleet: rejected {key:?}: {}", why.name());
        self.emit(Event::FleetDecisionRejected {
            key: key.chars().take(200).collect(),
            reason: why.name(),
        });
    }

    /// Refreshes this host's report and reads the others'.
    async fn report(&mut self, conn: &mut MultiplexedConnection) -> Result<()> {
        let now = now_ms();
        let report = serde_json::to_string(&HostReport {
            sent: self.counters.sent.load(Ordering::Relaxed),
            connected_since_unix: self.connected_since,
            reported_ms: now,
        })?;
        let own = self.key(&format!("host:{}", self.config.host_id));
        timeout(
            ROUND_TRIP,
            redis::cmd("SET")
                .arg(&own)
                .arg(report)
                .arg("PX")
                .arg(REPORT_TTL_MS)
                .query_async::<()>(conn),
        )
        .await
        .context("no answer")??;
        let keys = scan(conn, &self.key("host:*")).await?;
        let mut hosts = Vec::new();
        for key in keys.into_iter().take(MAX_HOSTS) {
            let value: Option<Vec<u8>> = timeout(ROUND_TRIP, conn.get(&key))
                .await
                .context("no answer")??;
            let Some(report) = value.and_then(|v| serde_json::from_slice::<HostReport>(&v).ok())
            else {
                continue;
            };
            hosts.push(HostSeen {
                host: key.rsplit(':').next().unwrap_or_default().to_string(),
                report_age_seconds: now.saturating_sub(report.reported_ms) as f64 / 1e3,
                sent: report.sent,
                connected_since_unix: report.connected_since_unix,
            });
        }
        hosts.sort_by(|a, b| a.host.cmp(&b.host));
        self.hosts = hosts;
        Ok(())
    }

    /// Publishes this host's busiest sources, sums every host's, and bans
    /// fleet-wide a source whose total is over `[limits.fleet.per_source]`.
    async fn share_load(&mut self, conn: &mut MultiplexedConnection) -> Result<()> {
        if self.sources.is_none() {
            match MappedSources::open(&self.pins) {
                Ok(mapped) => self.sources = Some(mapped),
                Err(e) => {
                    warn!("fleet: cannot read the source table: {e:#}");
                    return Ok(());
                }
            }
        }
        let Some(mapped) = &self.sources else {
            return Ok(());
        };
        let now = now_ms();
        let mine = busiest(mapped.loads(monotonic_ns()), LOAD_TOP_K);
        let (v4, v6) = (self.rules.ipv4_prefix, self.rules.ipv6_prefix);
        let report = LoadReport {
            reported_ms: now,
            sources: mine
                .iter()
                .map(|l| {
                    (
                        source_net(&l.key, v4, v6).to_string(),
                        l.connections,
                        l.bytes,
                    )
                })
                .collect(),
        };
        timeout(
            ROUND_TRIP,
            redis::cmd("SET")
                .arg(self.key(&format!("load:{}", self.config.host_id)))
                .arg(serde_json::to_string(&report)?)
                .arg("PX")
                .arg(2 * LOAD_FRESH_MS)
                .query_async::<()>(conn),
        )
        .await
        .context("no answer")??;

        // The fleet's sums, from every fresh report.
        let mut totals: BTreeMap<IpNet, FleetSource> = BTreeMap::new();
        let prefix = self.key("load:");
        for key in scan(conn, &format!("{prefix}*"))
            .await?
            .into_iter()
            .take(MAX_HOSTS)
        {
            let host = key.strip_prefix(&prefix).unwrap_or_default().to_string();
            let value: Option<Vec<u8>> = timeout(ROUND_TRIP, conn.get(&key))
                .await
                .context("no answer")??;
            let Some(report) = value.and_then(|v| serde_json::from_slice::<LoadReport>(&v).ok())
            else {
                self.reject(&key, decision::Rejected::BadValue);
                continue;
            };
            if now.saturating_sub(report.reported_ms) > LOAD_FRESH_MS {
                continue;
            }
            for (cidr, connections, bytes) in report.sources.into_iter().take(LOAD_MAX_SOURCES) {
                let Ok(Target::Source(net)) = Target::parse_source(&cidr, &self.rules) else {
                    continue;
                };
                let total = totals.entry(net).or_insert_with(|| FleetSource {
                    source: net.to_string(),
                    ..Default::default()
                });
                total.new_connections_per_second += f64::from(connections) / COUNT_SECOND;
                total.bytes_per_second += bytes as f64 / COUNT_SECOND;
                total.hosts.push(host.clone());
            }
        }
        let limits = self.config.limits;
        for (net, total) in &totals {
            let over = limits
                .new_connections
                .is_some_and(|limit| total.new_connections_per_second > limit)
                || limits
                    .bytes
                    .is_some_and(|limit| total.bytes_per_second > limit);
            if over {
                self.fleet_ban(*net, total);
            }
        }
        let mut busiest: Vec<FleetSource> = totals.into_values().collect();
        busiest.sort_by(|a, b| {
            b.new_connections_per_second
                .total_cmp(&a.new_connections_per_second)
                .then(b.bytes_per_second.total_cmp(&a.bytes_per_second))
        });
        busiest.truncate(100);
        self.busiest = busiest;
        Ok(())
    }

    /// Bans a source over a fleet limit on this host and, through the
    /// outbox, on every host (each host that sees it over does the same;
    /// the longest ban wins).
    fn fleet_ban(&mut self, net: IpNet, total: &FleetSource) {
        // Banned already (by this limit a second ago, or otherwise): once
        // is enough.
        let key = SourceKey::from(net.addr());
        let banned = PinnedState::open(&self.pins)
            .and_then(|state| state.ban_of(&key))
            .is_ok_and(|ban| ban.is_some_and(|b| b.until_ns > monotonic_ns()));
        if banned {
            return;
        }
        let decision = Decision {
            target: Target::Source(net),
            change: Change::Set {
                until_ms: now_ms() + self.config.ban_duration.as_millis() as u64,
            },
            host: self.config.host_id.clone(),
            sent_ms: now_ms(),
        };
        if self.write_maps(&decision) != Some(true) {
            return;
        }
        info!(
            "fleet: {net} is over the fleet's limit ({:.0} new connections/s, {:.0} bytes/s from {}): banned on every host",
            total.new_connections_per_second,
            total.bytes_per_second,
            total.hosts.join(", ")
        );
        self.emit(Event::FleetLimitBan {
            source: net.to_string(),
            new_connections_per_second: total.new_connections_per_second.round() as u64,
            bytes_per_second: total.bytes_per_second.round() as u64,
            hosts: total.hosts.clone(),
            duration_seconds: self.config.ban_duration.as_secs(),
        });
        self.keep(decision);
    }

    /// `status --fleet`'s file.
    fn write_report(&mut self) {
        let now = now_ms();
        self.known
            .retain(|_, (until, _)| *until == 0 || *until > now);
        let rejected = self
            .counters
            .rejected
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .sum();
        let report = FleetReport {
            host_id: self.config.host_id.clone(),
            redis: self.config.redacted_url(),
            connected: self.counters.connected.load(Ordering::Relaxed) == 1,
            last_error: self.last_error.clone(),
            outbox: self.outbox.len() as u64,
            sent: self.counters.sent.load(Ordering::Relaxed),
            received: self.counters.received.load(Ordering::Relaxed),
            rejected,
            hosts: self.hosts.clone(),
            busiest: self.busiest.clone(),
            decisions: self
                .known
                .iter()
                .map(|(target, (until, host))| DecisionInForce {
                    kind: target.kind().into(),
                    subject: target.subject(),
                    until_unix_ms: *until,
                    from: host.clone(),
                })
                .collect(),
        };
        let path = report_path(&self.pins);
        super::write_report_file(|| {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let tmp = path.with_extension("fleet.tmp");
            let written = serde_json::to_vec_pretty(&report)
                .map_err(anyhow::Error::from)
                .and_then(|text| Ok(std::fs::write(&tmp, text)?))
                .and_then(|()| Ok(std::fs::rename(&tmp, &path)?));
            if let Err(e) = written {
                warn!("fleet: cannot write {}: {e:#}", path.display());
            }
        });
    }
}

/// The link's life: connect, serve, and after a loss wait (keeping this
/// host's decisions in the outbox) and connect again.
pub async fn run(mut link: Link) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let outcome = link.session().await;
        let was_connected = link.counters.connected.swap(0, Ordering::Relaxed) == 1;
        match outcome {
            Ok(()) => return, // the agent is stopping
            Err(e) => {
                let error = redis_error(&e);
                if was_connected || link.last_error.as_deref() != Some(error.as_str()) {
                    warn!(
                        "fleet: {} at {}: {error}; enforcing on this host alone until it is back",
                        if was_connected {
                            "lost Redis"
                        } else {
                            "cannot reach Redis"
                        },
                        link.config.redacted_url()
                    );
                    link.emit(Event::FleetConnection {
                        connected: false,
                        redis: link.config.redacted_url(),
                        error: Some(error.clone()),
                    });
                }
                link.last_error = Some(error);
                if was_connected {
                    backoff = Duration::from_millis(200);
                }
            }
        }
        link.write_report();
        let wake = tokio::time::Instant::now() + backoff;
        loop {
            tokio::select! {
                decision = link.incoming.recv() => match decision {
                    Some(decision) => {
                        link.keep(decision);
                        link.write_report();
                    }
                    None => return,
                },
                _ = tokio::time::sleep_until(wake) => break,
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(3));
    }
}

/// The keys matching `pattern`, a page at a time (SCAN, not KEYS: the
/// fleet's Redis may hold much else).
async fn scan(conn: &mut MultiplexedConnection, pattern: &str) -> Result<Vec<String>> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = timeout(
            ROUND_TRIP,
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(conn),
        )
        .await
        .context("no answer")??;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            return Ok(keys);
        }
    }
}

/// What went wrong, in words an operator can act on (a refused password
/// says so).
fn redis_error(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    let refused = e.chain().any(|cause| {
        cause
            .downcast_ref::<redis::RedisError>()
            .is_some_and(|r| r.kind() == redis::ErrorKind::AuthenticationFailed)
    });
    if refused || text.contains("WRONGPASS") || text.contains("NOAUTH") {
        format!(
            "Redis refused this host's credentials (fleet.username / fleet.password_file): {text}"
        )
    } else if text.contains("invalid peer certificate") {
        // rustls's words for a certificate it could not verify.
        format!(
            "the Redis server's certificate is not trusted (fleet.ca_file names the CA that signs it; without it, the system's CAs): {text}"
        )
    } else if text.contains("NOPERM") {
        format!(
            "the fleet's Redis user lacks a permission wsguard needs (README: A fleet of hosts): {text}"
        )
    } else {
        text
    }
}
