//! Prometheus text exposition at `http://<metrics.listen>/metrics`.
//!
//! Every scrape reads the pinned maps afresh (the same [`Snapshot`] as
//! `wsguard status`), so the numbers are the kernel's own, not a copy.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};
use tracing::{info, warn};

use crate::{
    kernel::PinnedState,
    status::{Snapshot, verdict},
};

/// Counts the daemon keeps itself (the rest comes from the maps).
#[derive(Debug, Default)]
pub struct AgentCounters {
    pub reloads_ok: AtomicU64,
    pub reloads_rejected: AtomicU64,
    pub events_suppressed: AtomicU64,
    /// Inspected connections awaiting a verdict now.
    pub pending_handshakes: AtomicU64,
    /// Single-use tickets remembered now, and how many fit.
    pub replay_cache_entries: AtomicU64,
    pub replay_cache_capacity: AtomicU64,
    /// Users with a connection open now (bound by a version 2 ticket).
    pub connected_users: AtomicU64,
    /// Users whose connections were cut for staying over budget or a ban.
    pub user_cuts: AtomicU64,
    /// Handshakes judged, by (verdict, reason).
    pub handshakes: std::sync::Mutex<std::collections::BTreeMap<(&'static str, &'static str), u64>>,
    pub fleet: Arc<crate::fleet::FleetCounters>,
}

impl AgentCounters {
    pub fn count_handshake(&self, verdict: &'static str, reason: &'static str) {
        *self
            .handshakes
            .lock()
            .unwrap()
            .entry((verdict, reason))
            .or_default() += 1;
    }
}

#[derive(Debug)]
struct KernelCollector {
    pin_dir: PathBuf,
    agent: Arc<AgentCounters>,
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: &[(Vec<(&str, String)>, u64)],
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Vec<(&str, String)>, f64)],
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let snapshot = match PinnedState::open(&self.pin_dir).and_then(|s| Snapshot::take(&s)) {
            Ok(s) => s,
            Err(e) => {
                warn!("metrics: cannot read the pinned maps: {e:#}");
                return gauge(
                    &mut encoder,
                    "wsguard_up",
                    "Whether the kernel state could be read.",
                    &[(vec![], 0.0)],
                );
            }
        };
        gauge(
            &mut encoder,
            "wsguard_up",
            "Whether the kernel state could be read.",
            &[(vec![], 1.0)],
        )?;
        let traffic: Vec<_> = snapshot
            .counters
            .iter()
            .filter(|(r, _)| verdict(*r) != "event")
            .collect();
        let labelled = |r: &wsguard_common::Reason| {
            vec![
                ("reason", r.name().to_string()),
                ("verdict", verdict(*r).to_string()),
            ]
        };
        counter(
            &mut encoder,
            "wsguard_packets",
            "Packets to protected ports, by the reason they were passed or dropped.",
            None,
            &traffic
                .iter()
                .map(|(r, c)| (labelled(r), c.packets))
                .collect::<Vec<_>>(),
        )?;
        counter(
            &mut encoder,
            "wsguard_frame",
            "Frame bytes (from the Ethernet header) to protected ports, by reason.",
            Some(&Unit::Bytes),
            &traffic
                .iter()
                .map(|(r, c)| (labelled(r), c.bytes))
                .collect::<Vec<_>>(),
        )?;
        let would: Vec<_> = snapshot
            .would_drop
            .iter()
            .filter(|(r, _)| r.is_drop())
            .collect();
        counter(
            &mut encoder,
            "wsguard_would_drop_packets",
            "Packets a family in dry run would have dropped, by reason.",
            None,
            &would
                .iter()
                .map(|(r, c)| (vec![("reason", r.name().to_string())], c.packets))
                .collect::<Vec<_>>(),
        )?;
        counter(
            &mut encoder,
            "wsguard_would_drop_frame",
            "Frame bytes a family in dry run would have dropped, by reason.",
            Some(&Unit::Bytes),
            &would
                .iter()
                .map(|(r, c)| (vec![("reason", r.name().to_string())], c.bytes))
                .collect::<Vec<_>>(),
        )?;
        let events: Vec<_> = snapshot
            .counters
            .iter()
            .filter(|(r, _)| verdict(*r) == "event")
            .collect();
        counter(
            &mut encoder,
            "wsguard_kernel_events",
            "Events counted by the kernel programs (bans started, connections opened and closed, full maps).",
            None,
            &events
                .iter()
                .map(|(r, c)| (vec![("event", r.name().to_string())], c.packets))
                .collect::<Vec<_>>(),
        )?;
        let cookie = |reason: wsguard_common::Reason| {
            snapshot
                .counters
                .iter()
                .find(|(r, _)| *r == reason)
                .map_or(0, |(_, c)| c.packets)
        };
        counter(
            &mut encoder,
            "wsguard_syn_cookies",
            "SYN cookies: SYNs answered with one (sent), ACKs that returned a valid one (validated), segments of no connection without one (failed).",
            None,
            &[
                (
                    vec![("result", "sent".to_string())],
                    cookie(wsguard_common::Reason::SynCookieSent),
                ),
                (
                    vec![("result", "validated".to_string())],
                    cookie(wsguard_common::Reason::SynCookieValidated),
                ),
                (
                    vec![("result", "failed".to_string())],
                    cookie(wsguard_common::Reason::SynCookieFailed),
                ),
            ],
        )?;
        let would_ban = snapshot
            .would_drop
            .iter()
            .find(|(r, _)| *r == wsguard_common::Reason::BanStarted)
            .map_or(0, |(_, c)| c.packets);
        counter(
            &mut encoder,
            "wsguard_would_ban",
            "Bans dry run would have imposed.",
            None,
            &[(vec![], would_ban)],
        )?;
        gauge(
            &mut encoder,
            "wsguard_active_bans",
            "Sources banned now.",
            &[(vec![], snapshot.bans.len() as f64)],
        )?;
        gauge(
            &mut encoder,
            "wsguard_tracked_sources",
            "Sources with live buckets (entries the kernel created in the source map, at most its capacity).",
            &[(vec![], snapshot.tracked_sources as f64)],
        )?;
        let open: u64 = snapshot.open_connections.iter().map(|(_, n)| n).sum();
        gauge(
            &mut encoder,
            "wsguard_open_connections",
            "Established connections to protected ports, from counted sources.",
            &[(vec![], open as f64)],
        )?;
        let ratio = |n: usize, max: u32| if max == 0 { 0.0 } else { n as f64 / max as f64 };
        gauge(
            &mut encoder,
            "wsguard_map_fill_ratio",
            "How full a map is (entries / capacity).",
            &[
                (
                    vec![("map", "sources".to_string())],
                    ratio(snapshot.tracked_sources, snapshot.max_sources),
                ),
                (
                    vec![("map", "bans".to_string())],
                    ratio(snapshot.bans.len(), snapshot.max_bans),
                ),
                (
                    vec![("map", "users".to_string())],
                    ratio(snapshot.users, snapshot.max_users),
                ),
            ],
        )?;
        gauge(
            &mut encoder,
            "wsguard_users_tracked",
            "Users with a budget or a ban in the kernel's user map.",
            &[(vec![], snapshot.users as f64)],
        )?;
        gauge(
            &mut encoder,
            "wsguard_users_connected",
            "Users (named by version 2 tickets) with a connection open.",
            &[(
                vec![],
                self.agent.connected_users.load(Ordering::Relaxed) as f64,
            )],
        )?;
        gauge(
            &mut encoder,
            "wsguard_user_bound_connections",
            "Connections whose bytes are charged to a user's budget.",
            &[(vec![], snapshot.bound_connections as f64)],
        )?;
        counter(
            &mut encoder,
            "wsguard_user_cuts",
            "Users whose connections were cut (over budget past over_budget_timeout, or banned).",
            None,
            &[(vec![], self.agent.user_cuts.load(Ordering::Relaxed))],
        )?;
        gauge(
            &mut encoder,
            "wsguard_list_entries",
            "Allow and deny list entries in effect.",
            &[
                (
                    vec![("list", "allow".to_string())],
                    snapshot.allow_entries as f64,
                ),
                (
                    vec![("list", "deny".to_string())],
                    snapshot.deny_entries as f64,
                ),
            ],
        )?;
        counter(
            &mut encoder,
            "wsguard_config_reloads",
            "Config reloads, by result.",
            None,
            &[
                (
                    vec![("result", "ok".to_string())],
                    self.agent.reloads_ok.load(Ordering::Relaxed),
                ),
                (
                    vec![("result", "rejected".to_string())],
                    self.agent.reloads_rejected.load(Ordering::Relaxed),
                ),
            ],
        )?;
        let handshakes: Vec<_> = self
            .agent
            .handshakes
            .lock()
            .unwrap()
            .iter()
            .map(|((verdict, reason), n)| {
                (
                    vec![
                        ("verdict", verdict.to_string()),
                        ("reason", reason.to_string()),
                    ],
                    *n,
                )
            })
            .collect();
        counter(
            &mut encoder,
            "wsguard_handshakes",
            "Handshakes judged, by verdict and reason.",
            None,
            &handshakes,
        )?;
        gauge(
            &mut encoder,
            "wsguard_pending_handshakes",
            "Inspected connections awaiting a verdict now (bounded by handshake.max_pending).",
            &[(
                vec![],
                self.agent.pending_handshakes.load(Ordering::Relaxed) as f64,
            )],
        )?;
        gauge(
            &mut encoder,
            "wsguard_ticket_replay_cache_entries",
            "Single-use tickets remembered until they expire.",
            &[(
                vec![],
                self.agent.replay_cache_entries.load(Ordering::Relaxed) as f64,
            )],
        )?;
        gauge(
            &mut encoder,
            "wsguard_ticket_replay_cache_capacity",
            "How many single-use tickets the cache holds (handshake.ticket.replay_cache_size).",
            &[(
                vec![],
                self.agent.replay_cache_capacity.load(Ordering::Relaxed) as f64,
            )],
        )?;
        counter(
            &mut encoder,
            "wsguard_events_suppressed",
            "Event records summarised instead of written, under a flood of events.",
            None,
            &[(vec![], self.agent.events_suppressed.load(Ordering::Relaxed))],
        )?;
        self.encode_fleet(&mut encoder)?;
        // Program run time, when the kernel keeps it (sysctl kernel.bpf_stats_enabled=1).
        let programs: Vec<_> = snapshot
            .programs
            .iter()
            .filter(|p| p.run_count > 0)
            .collect();
        if !programs.is_empty() {
            counter(
                &mut encoder,
                "wsguard_program_runs",
                "Runs of each attached program (kernel.bpf_stats_enabled).",
                None,
                &programs
                    .iter()
                    .map(|p| (vec![("link", p.link.clone())], p.run_count))
                    .collect::<Vec<_>>(),
            )?;
            let mut family = encoder.encode_descriptor(
                "wsguard_program_run_time",
                "Time spent in each attached program (kernel.bpf_stats_enabled).",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?;
            for p in programs {
                ConstCounter::new(p.run_time_ns as f64 / 1e9)
                    .encode(family.encode_family(&vec![("link", p.link.clone())])?)?;
            }
        }
        Ok(())
    }
}

impl KernelCollector {
    /// The fleet's link, when `[fleet]` is configured.
    fn encode_fleet(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let fleet = &self.agent.fleet;
        if fleet.configured.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        gauge(
            encoder,
            "wsguard_fleet_connected",
            "Whether the link to the fleet's Redis is up.",
            &[(vec![], load(&fleet.connected) as f64)],
        )?;
        for (name, help, value) in [
            (
                "wsguard_fleet_decisions_sent",
                "This host's decisions written to the fleet's Redis.",
                &fleet.sent,
            ),
            (
                "wsguard_fleet_decisions_received",
                "Decisions of other hosts received (published, or read back after a connect).",
                &fleet.received,
            ),
            (
                "wsguard_fleet_decisions_applied",
                "Received decisions that changed this host's maps (a longer one may already hold).",
                &fleet.applied,
            ),
            (
                "wsguard_fleet_outbox_dropped",
                "Decisions of this host's that a full outbox let go while Redis was out of reach.",
                &fleet.outbox_dropped,
            ),
        ] {
            counter(encoder, name, help, None, &[(vec![], load(value))])?;
        }
        let rejected: Vec<_> = crate::fleet::Rejected::ALL
            .iter()
            .zip(&fleet.rejected)
            .map(|(why, n)| (vec![("reason", why.name().to_string())], load(n)))
            .collect();
        counter(
            encoder,
            "wsguard_fleet_decisions_rejected",
            "Decisions read from the fleet that were not applied, by reason.",
            None,
            &rejected,
        )?;
        gauge(
            encoder,
            "wsguard_fleet_outbox",
            "This host's decisions waiting for the fleet's Redis.",
            &[(vec![], load(&fleet.outbox) as f64)],
        )?;
        let family = encoder.encode_descriptor(
            "wsguard_fleet_propagation",
            "From a decision's publication on another host to its arrival here.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        fleet.propagation.encode(family)
    }
}

/// Binds `listen` and serves /metrics until the process ends.
pub async fn serve(listen: SocketAddr, pin_dir: PathBuf, agent: Arc<AgentCounters>) -> Result<()> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(KernelCollector { pin_dir, agent }));
    let registry = Arc::new(registry);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen for metrics on {listen} (metrics.listen)"))?;
    info!("metrics at http://{listen}/metrics");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let registry = registry.clone();
                    async move { Ok::<_, std::convert::Infallible>(respond(&request, &registry)) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(())
}

fn respond(request: &Request<hyper::body::Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    if request.uri().path() != "/metrics" {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from("see /metrics\n")))
            .unwrap();
    }
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => Response::builder()
            .header(
                "Content-Type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(body)))
            .unwrap(),
        Err(_) => Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    }
}
