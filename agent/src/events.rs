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
    sync::{Arc, atomic::Ordering},
    time::{Instant, SystemTime},
};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use wsguard_common::{Ban, SourceKey};

use crate::{config::EventsOutput, metrics::AgentCounters, status::source_addr};

pub const MAX_PER_KIND_PER_SECOND: u32 = 50;

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

    /// Writes `{"ts": …, "event": kind, …fields}` as one line, unless this
    /// kind already used its share of the current second.
    pub fn emit(&mut self, kind: &str, fields: Value) {
        self.roll_window();
        let written = self.written.entry(kind.to_string()).or_default();
        if *written >= MAX_PER_KIND_PER_SECOND {
            *self.suppressed.entry(kind.to_string()).or_default() += 1;
            self.counters
                .events_suppressed
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        *written += 1;
        self.write(kind, fields);
    }

    fn write(&mut self, kind: &str, fields: Value) {
        let mut record = json!({
            "ts": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            "event": kind,
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
        for (kind, count) in std::mem::take(&mut self.suppressed) {
            self.write(
                "summary",
                json!({"of": kind, "suppressed": count, "window_seconds": 1}),
            );
        }
    }
}

/// The source a ban key stands for, as "address/prefix".
pub fn source_prefix(key: &SourceKey, ipv4_prefix: u8, ipv6_prefix: u8) -> String {
    match source_addr(key) {
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
            sink.emit("ban_started", json!({"n": i}));
        }
        sink.emit("config_reloaded", json!({}));
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
}
