//! JSON-lines event records, one per decision worth a human's attention:
//! bans started (from the kernel's ring buffer) and ended, list entries that
//! expired, config reloaded or rejected, agent started and stopped.
//!
//! Under a flood of events, at most [`MAX_PER_KIND_PER_SECOND`] records of a
//! kind are written each second; the rest are counted and summarised in one
//! `summary` record, so the output never grows without bound.

use std::{
    collections::HashMap,
    fs::OpenOptions,
    io::Write,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Instant, SystemTime},
};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{Value, json};
use wsguard_common::{Ban, SourceKey};

use crate::{config::EventsOutput, metrics::AgentCounters};

pub const MAX_PER_KIND_PER_SECOND: u32 = 50;

/// Every event record the agent writes, with the fields the README's event
/// table lists (a test holds the two together). Serialised as
/// `{"ts": …, "event": "<snake_case kind>", …fields}`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    AgentStarted {
        config: PathBuf,
        interfaces: Vec<String>,
        dry_run: bool,
        took_over: Vec<String>,
    },
    AgentStopped {
        programs_stay_attached: bool,
    },
    ConfigReloaded {
        config: PathBuf,
    },
    ConfigRejected {
        config: PathBuf,
        error: String,
    },
    HandshakeRejected {
        source: String,
        server: String,
        reason: &'static str,
        dry_run: bool,
        /// The user its version 2 ticket named, once the ticket checked out.
        user: Option<String>,
    },
    /// A user's connections were cut: over budget for longer than
    /// `over_budget_timeout`, or banned.
    UserCut {
        user: String,
        class: Option<String>,
        connections: usize,
        over_budget_seconds: f64,
        banned: bool,
        dry_run: bool,
    },
    /// `ban.users`: a user cut for staying over budget is refused for `duration_seconds`.
    UserBanStarted {
        user: String,
        duration_seconds: u64,
        dry_run: bool,
    },
    DeadlineCut {
        source: String,
        server: String,
        reason: &'static str,
        dry_run: bool,
    },
    BanStarted {
        /// `address/prefix`.
        source: String,
        duration_seconds: u64,
        dry_run: bool,
    },
    BanEnded {
        source: String,
        how: BanEnd,
    },
    ListEntryExpired {
        list: &'static str,
        cidr: String,
    },
    InterfaceGone {
        interface: String,
    },
    InterfaceReattached {
        interface: String,
    },
    /// A decision another host of the fleet made, applied here (`changed`:
    /// whether this host's maps changed; a longer one may already hold).
    FleetDecision {
        /// `ban`, `user_ban`, `deny` or `allow`.
        kind: &'static str,
        subject: String,
        /// `set` or `lift`.
        op: &'static str,
        until_seconds: Option<u64>,
        from: String,
        /// From its publication to its arrival; none when read back
        /// after a (re)connect.
        delay_ms: Option<u64>,
        changed: bool,
    },
    /// A source's total over the fleet went past `[limits.fleet.per_source]`:
    /// banned on every host.
    FleetLimitBan {
        source: String,
        new_connections_per_second: u64,
        bytes_per_second: u64,
        /// The hosts that reported it.
        hosts: Vec<String>,
        duration_seconds: u64,
    },
    /// A decision read from the fleet that was not applied.
    FleetDecisionRejected {
        key: String,
        reason: &'static str,
    },
    /// The link to the fleet's Redis came up or went down.
    FleetConnection {
        connected: bool,
        redis: String,
        error: Option<String>,
    },
    Summary {
        of: String,
        suppressed: u64,
        window_seconds: u64,
    },
}

pub struct EventSink {
    out: Box<dyn Write + Send>,
    window_start: Instant,
    written: HashMap<String, u32>,
    suppressed: HashMap<String, u64>,
    counters: Arc<AgentCounters>,
}

impl EventSink {
    pub fn open(output: &EventsOutput, counters: Arc<AgentCounters>) -> Result<EventSink> {
        let out: Box<dyn Write + Send> = match output {
            EventsOutput::Stdout => Box::new(std::io::stdout()),
            EventsOutput::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("cannot open events.output {}", path.display()))?,
            ),
        };
        Ok(EventSink::to_writer(out, counters))
    }

    pub fn to_writer(out: Box<dyn Write + Send>, counters: Arc<AgentCounters>) -> EventSink {
        EventSink {
            out,
            window_start: Instant::now(),
            written: HashMap::new(),
            suppressed: HashMap::new(),
            counters,
        }
    }

    /// Writes the event as one line, unless its kind already used its share
    /// of the current second.
    pub fn emit(&mut self, event: Event) {
        self.roll_window();
        let record = serde_json::to_value(&event).expect("events serialise");
        let kind = record["event"].as_str().unwrap_or_default().to_string();
        let written = self.written.entry(kind.clone()).or_default();
        if *written >= MAX_PER_KIND_PER_SECOND {
            *self.suppressed.entry(kind).or_default() += 1;
            self.counters
                .events_suppressed
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        *written += 1;
        self.write(record);
    }

    fn write(&mut self, fields: Value) {
        let mut record = json!({
            "ts": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        });
        if let (Some(record), Value::Object(fields)) = (record.as_object_mut(), fields) {
            record.extend(fields);
        }
        let _ = writeln!(self.out, "{record}");
        let _ = self.out.flush();
    }

    /// Ends the current one-second window, summarising what was suppressed.
    pub fn roll_window(&mut self) {
        if self.window_start.elapsed().as_secs() < 1 {
            return;
        }
        self.window_start = Instant::now();
        self.written.clear();
        for (of, suppressed) in std::mem::take(&mut self.suppressed) {
            let summary = Event::Summary {
                of,
                suppressed,
                window_seconds: 1,
            };
            self.write(serde_json::to_value(&summary).expect("events serialise"));
        }
    }
}

/// A tracking key as the network it stands for.
pub fn source_net(key: &SourceKey, ipv4_prefix: u8, ipv6_prefix: u8) -> ipnet::IpNet {
    let addr = IpAddr::from(*key);
    let prefix = if addr.is_ipv4() {
        ipv4_prefix
    } else {
        ipv6_prefix
    };
    ipnet::IpNet::new(addr, prefix)
        .map(|n| n.trunc())
        .unwrap_or_else(|_| ipnet::IpNet::from(addr))
}

/// The source a ban key stands for, as "address/prefix".
pub fn source_prefix(key: &SourceKey, ipv4_prefix: u8, ipv6_prefix: u8) -> String {
    match IpAddr::from(*key) {
        IpAddr::V4(a) => format!("{a}/{ipv4_prefix}"),
        IpAddr::V6(a) => format!("{a}/{ipv6_prefix}"),
    }
}

/// Notices bans ending, which the kernel does silently (on the first packet
/// after the end, or never if the source goes quiet).
#[derive(Default)]
pub struct BanWatch {
    known: HashMap<SourceKey, Ban>,
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BanEnd {
    Expired,
    Lifted,
}

impl BanWatch {
    /// Compares the bans in the map now with those seen last time; returns
    /// the ones that ended, and the keys of expired bans to remove.
    pub fn update(
        &mut self,
        current: &[(SourceKey, Ban)],
        now_ns: u64,
    ) -> (Vec<(SourceKey, BanEnd)>, Vec<SourceKey>) {
        let mut ended = Vec::new();
        let mut expired = Vec::new();
        let mut live = HashMap::new();
        for (key, ban) in current {
            if ban.until_ns <= now_ns {
                expired.push(*key);
                ended.push((*key, BanEnd::Expired));
            } else {
                live.insert(*key, *ban);
            }
        }
        for (key, ban) in &self.known {
            if !live.contains_key(key) && !expired.contains(key) {
                ended.push((
                    *key,
                    if ban.until_ns <= now_ns {
                        BanEnd::Expired
                    } else {
                        BanEnd::Lifted
                    },
                ));
            }
        }
        self.known = live;
        (ended, expired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_flood_of_events_is_capped_and_summarised() {
        let buffer = Shared::default();
        let counters = Arc::new(AgentCounters::default());
        let mut sink = EventSink::to_writer(Box::new(buffer.clone()), counters.clone());
        for i in 0..120 {
            sink.emit(Event::BanStarted {
                source: format!("198.18.0.{i}/32"),
                duration_seconds: 60,
                dry_run: false,
            });
        }
        sink.emit(Event::ConfigReloaded {
            config: "/etc/wsguard/wsguard.toml".into(),
        });
        sink.window_start -= std::time::Duration::from_secs(2);
        sink.roll_window();
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let records: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let count = |kind: &str| records.iter().filter(|r| r["event"] == kind).count();
        assert_eq!(count("ban_started"), MAX_PER_KIND_PER_SECOND as usize);
        assert_eq!(
            count("config_reloaded"),
            1,
            "other kinds have their own share"
        );
        let summary = records.iter().find(|r| r["event"] == "summary").unwrap();
        assert_eq!(summary["of"], "ban_started");
        assert_eq!(summary["suppressed"], 70);
        assert_eq!(counters.events_suppressed.load(Ordering::Relaxed), 70);
        assert!(
            records
                .iter()
                .all(|r| r["ts"].as_str().is_some_and(|t| t.ends_with('Z')))
        );
    }

    /// One record of every kind. The match has no wildcard, so a new kind
    /// does not compile until it is here (and then in the README).
    fn one_of_each() -> Vec<Event> {
        let s = String::new;
        let all = vec![
            Event::AgentStarted {
                config: PathBuf::new(),
                interfaces: vec![],
                dry_run: false,
                took_over: vec![],
            },
            Event::AgentStopped {
                programs_stay_attached: false,
            },
            Event::ConfigReloaded {
                config: PathBuf::new(),
            },
            Event::ConfigRejected {
                config: PathBuf::new(),
                error: s(),
            },
            Event::HandshakeRejected {
                source: s(),
                server: s(),
                reason: "",
                dry_run: false,
                user: None,
            },
            Event::UserCut {
                user: s(),
                class: None,
                connections: 0,
                over_budget_seconds: 0.0,
                banned: false,
                dry_run: false,
            },
            Event::UserBanStarted {
                user: s(),
                duration_seconds: 0,
                dry_run: false,
            },
            Event::DeadlineCut {
                source: s(),
                server: s(),
                reason: "",
                dry_run: false,
            },
            Event::BanStarted {
                source: s(),
                duration_seconds: 0,
                dry_run: false,
            },
            Event::BanEnded {
                source: s(),
                how: BanEnd::Expired,
            },
            Event::ListEntryExpired {
                list: "",
                cidr: s(),
            },
            Event::InterfaceGone { interface: s() },
            Event::InterfaceReattached { interface: s() },
            Event::FleetDecision {
                kind: "",
                subject: s(),
                op: "",
                until_seconds: None,
                from: s(),
                delay_ms: None,
                changed: false,
            },
            Event::FleetDecisionRejected {
                key: s(),
                reason: "",
            },
            Event::FleetLimitBan {
                source: s(),
                new_connections_per_second: 0,
                bytes_per_second: 0,
                hosts: vec![],
                duration_seconds: 0,
            },
            Event::FleetConnection {
                connected: false,
                redis: s(),
                error: None,
            },
            Event::Summary {
                of: s(),
                suppressed: 0,
                window_seconds: 0,
            },
        ];
        for event in &all {
            match event {
                Event::AgentStarted { .. }
                | Event::AgentStopped { .. }
                | Event::ConfigReloaded { .. }
                | Event::ConfigRejected { .. }
                | Event::HandshakeRejected { .. }
                | Event::UserCut { .. }
                | Event::UserBanStarted { .. }
                | Event::DeadlineCut { .. }
                | Event::BanStarted { .. }
                | Event::BanEnded { .. }
                | Event::ListEntryExpired { .. }
                | Event::InterfaceGone { .. }
                | Event::InterfaceReattached { .. }
                | Event::FleetDecision { .. }
                | Event::FleetDecisionRejected { .. }
                | Event::FleetLimitBan { .. }
                | Event::FleetConnection { .. }
                | Event::Summary { .. } => {}
            }
        }
        all
    }

    /// (kind, sorted fields) from the README's event table: the backticked
    /// names of the fields column, leaving out the values in parentheses.
    fn readme_table() -> Vec<(String, Vec<String>)> {
        let readme = include_str!("../../README.md");
        let table = readme
            .split("| event | fields |")
            .nth(1)
            .expect("the README has an event table");
        let backticked = |text: &str| -> Vec<String> {
            text.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect()
        };
        table
            .lines()
            .skip(2)
            .take_while(|line| line.starts_with('|'))
            .map(|line| {
                let cells: Vec<&str> = line.split('|').collect();
                let mut fields = String::new();
                let mut depth = 0;
                for c in cells[2].chars() {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ if depth == 0 => fields.push(c),
                        _ => {}
                    }
                }
                let mut fields = backticked(&fields);
                fields.sort();
                (backticked(cells[1]).concat(), fields)
            })
            .collect()
    }

    #[test]
    fn the_readme_event_table_lists_every_kind_with_its_fields() {
        let mut written: Vec<(String, Vec<String>)> = one_of_each()
            .iter()
            .map(|event| {
                let Value::Object(record) = serde_json::to_value(event).unwrap() else {
                    panic!("an event is an object");
                };
                let kind = record["event"].as_str().unwrap().to_string();
                let mut fields: Vec<String> =
                    record.keys().filter(|k| *k != "event").cloned().collect();
                fields.sort();
                (kind, fields)
            })
            .collect();
        written.sort();
        let mut documented = readme_table();
        documented.sort();
        assert_eq!(written, documented);
    }
}
