//! Acting on handshake verdicts: tell the kernel, cut rejected connections
//! (SOCK_DESTROY), count failures per source and ban repeat offenders.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::Result;
use serde_json::json;
use tracing::{debug, warn};
use wsguard_common::{Flow, FlowKey, Reason, SourceKey};

use super::{
    Rejection, destroy,
    inspector::{Connection, Outcome},
};
use crate::{
    config::Config,
    events::{EventSink, source_prefix},
    kernel::{self, Kernel},
    metrics::AgentCounters,
};

/// Rejections per source within the ban window.
#[derive(Default)]
pub struct Failures {
    by_source: HashMap<SourceKey, (u32, Instant)>,
}

impl Failures {
    /// Counts one; returns true when the source reached `threshold`.
    fn add(&mut self, source: SourceKey, window: Duration, threshold: u32, now: Instant) -> bool {
        if self.by_source.len() > 100_000 {
            self.by_source
                .retain(|_, (_, since)| now.duration_since(*since) < window);
        }
        let entry = self.by_source.entry(source).or_insert((0, now));
        if now.duration_since(entry.1) >= window {
            *entry = (0, now);
        }
        entry.0 += 1;
        if threshold != 0 && entry.0 >= threshold {
            entry.0 = 0;
            return true;
        }
        false
    }
}

fn flow_key((client, server): Connection) -> FlowKey {
    FlowKey {
        client: kernel::source_key(client.ip()).addr,
        server: kernel::source_key(server.ip()).addr,
        client_port: client.port(),
        server_port: server.port(),
        _pad: 0,
    }
}

pub struct Context<'a> {
    pub kernel: &'a mut Kernel,
    pub config: &'a Config,
    pub sink: &'a mut EventSink,
    pub counters: &'a AgentCounters,
    pub failures: &'a mut Failures,
}

pub fn apply(cx: &mut Context, connection: Connection, outcome: Outcome) -> Result<()> {
    let key = flow_key(connection);
    let reason = match outcome {
        Outcome::Accept => {
            cx.counters.count_handshake("accepted", "ok");
            return cx.kernel.set_flow_state(&key, Flow::ACCEPTED);
        }
        Outcome::Reject(reason) => reason,
    };
    let (client, server) = connection;
    // Allow-listed while its handshake was in flight: never cut or banned.
    if cx.kernel.is_allow_listed(client.ip()) {
        debug!("{client}: allow-listed since its handshake began, not rejected");
        return cx.kernel.set_flow_state(&key, Flow::ACCEPTED);
    }
    // In dry run the kernel still learns the verdict: it counts what it would
    // drop and passes it. Nothing is destroyed or banned.
    let dry_run = cx.config.settings.is_dry_run(Reason::FlowRejected);
    cx.kernel.set_flow_state(&key, Flow::REJECTED)?;
    if !dry_run {
        if let Err(e) = destroy::destroy(client, server) {
            debug!("SOCK_DESTROY {client} -> {server}: {e:#}");
        }
    }
    cx.counters.count_handshake(
        if dry_run { "would_reject" } else { "rejected" },
        reason.name(),
    );
    let kind = if reason == Rejection::Deadline {
        "deadline_cut"
    } else {
        "handshake_rejected"
    };
    cx.sink.emit(
        kind,
        json!({"source": client.ip().to_canonical().to_string(), "server": server.to_string(), "reason": reason.name(), "dry_run": dry_run}),
    );

    let handshake = &cx.config.handshake;
    let source = cx
        .config
        .settings
        .tracking_key(&kernel::source_key(client.ip()));
    let window = cx.config.ban.window.get_ref().0;
    if cx.failures.add(
        source,
        window,
        handshake.failures_before_ban,
        Instant::now(),
    ) {
        let duration = cx.config.ban.duration.get_ref().0;
        if !dry_run {
            if let Err(e) = cx
                .kernel
                .ban(&source, kernel::monotonic_ns() + duration.as_nanos() as u64)
            {
                warn!("cannot ban {}: {e:#}", client.ip().to_canonical());
            }
        }
        cx.sink.emit(
            "ban_started",
            json!({
                "source": source_prefix(&source, cx.config.ipv4_prefix, cx.config.ipv6_prefix),
                "duration_seconds": duration.as_secs(),
                "dry_run": dry_run,
                "cause": "handshake_failures",
            }),
        );
    }
    Ok(())
}
