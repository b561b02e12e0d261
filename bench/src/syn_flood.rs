//! Section 6: a spoofed-source SYN flood at the sender's full speed, and
//! whether new legitimate clients still get in. Contenders: no filter with
//! the kernel's own SYN cookies, iptables SYNPROXY with hashlimit, wsguard
//! without SYN cookies and wsguard with them, each on a fresh lab.
//!
//! Per contender and round: the long-lived client's echo p99 without a
//! flood, then a flood phase during which the long-lived client keeps
//! echoing and new WebSocket clients connect one after another (each must
//! finish its handshake within 1 s), and the softirq CPU time per flood
//! packet. For wsguard, how many flood sources ended in its per-source map.

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde::Serialize;
use wsguard::kernel::Maps;
use wsguard_tests::{
    Agent,
    lab::send_frames,
    peers::{WsClient, ws_connect},
};

use crate::{
    contenders::PORT,
    flood::{Attack, Cpu, FloodLab, echo_once},
    report::table::Table,
    stats::p50_p99,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Defence {
    KernelCookies,
    Synproxy,
    WsguardWithoutCookies,
    WsguardCookies,
}

impl Defence {
    pub const ALL: [Defence; 4] = [
        Defence::KernelCookies,
        Defence::Synproxy,
        Defence::WsguardWithoutCookies,
        Defence::WsguardCookies,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Defence::KernelCookies => "no filter, kernel SYN cookies",
            Defence::Synproxy => "iptables SYNPROXY + hashlimit",
            Defence::WsguardWithoutCookies => "wsguard, syn_cookies off",
            Defence::WsguardCookies => "wsguard, syn_cookies on",
        }
    }
}

/// One contender, one round.
#[derive(Clone, Debug, Serialize)]
pub struct SynFloodRun {
    pub defence: Defence,
    pub round: usize,
    pub seconds: f64,
    pub flood_sent: u64,
    pub softirq_ms: f64,
    pub new_clients: u64,
    /// New clients whose WebSocket handshake finished within 1 s.
    pub new_clients_in_time: u64,
    pub baseline_p99_us: f64,
    pub flood_p99_us: f64,
    /// Flood sources (198.19.0.0/16) in wsguard's per-source map at the end,
    /// and all sources there.
    pub flood_sources_tracked: Option<usize>,
    pub sources_tracked: Option<usize>,
}

impl SynFloodRun {
    pub fn flood_pps(&self) -> f64 {
        self.flood_sent as f64 / self.seconds
    }

    pub fn softirq_ns_per_packet(&self) -> f64 {
        self.softirq_ms * 1e6 / self.flood_sent.max(1) as f64
    }

    pub fn new_clients_ratio(&self) -> f64 {
        self.new_clients_in_time as f64 / self.new_clients.max(1) as f64
    }
}

/// The defence in place in the lab's server namespace; removed on drop.
struct Installed<'a> {
    lab: &'a FloodLab,
    defence: Defence,
    agent: Option<Agent>,
}

fn iptables(lab: &FloodLab, args: &str) -> Result<()> {
    let ns = &lab.lab.server.name;
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "iptables"])
        .args(args.split_whitespace())
        .output()
        .context("running iptables")?;
    anyhow::ensure!(
        out.status.success(),
        "iptables {args}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// SYNPROXY as its documentation sets it up, with a per-source hashlimit on
/// the connections it lets through (the same 20/s, burst 40, as wsguard's
/// default).
const SYNPROXY_RULES: [&str; 4] = [
    "-t raw -A PREROUTING -p tcp --dport 8080 --syn -j CT --notrack",
    "-A INPUT -p tcp --dport 8080 -m conntrack --ctstate INVALID,UNTRACKED -j SYNPROXY --sack-perm --timestamp --wscale 7 --mss 1460",
    "-A INPUT -p tcp --dport 8080 -m conntrack --ctstate INVALID -j DROP",
    "-A INPUT -p tcp --dport 8080 -m conntrack --ctstate NEW -m hashlimit --hashlimit-name wsg_syn --hashlimit-mode srcip --hashlimit-above 20/second --hashlimit-burst 40 -j DROP",
];

impl<'a> Installed<'a> {
    fn new(lab: &'a FloodLab, defence: Defence) -> Result<Installed<'a>> {
        let mut agent = None;
        match defence {
            Defence::KernelCookies => {}
            Defence::Synproxy => {
                for rule in SYNPROXY_RULES {
                    iptables(lab, rule)?;
                }
                // Also part of SYNPROXY's documented setup: an ACK that
                // conntrack has not seen stays INVALID and reaches SYNPROXY,
                // instead of being picked up mid-stream and reset by the
                // listener.
                lab.lab.server.run(|| {
                    std::fs::write("/proc/sys/net/netfilter/nf_conntrack_tcp_loose", "0")
                        .context("nf_conntrack_tcp_loose")
                })?;
            }
            Defence::WsguardWithoutCookies | Defence::WsguardCookies => {
                let on = defence == Defence::WsguardCookies;
                agent = Some(Agent::start(
                    &lab.lab,
                    &format!(
                        "[protect]\nports = [{PORT}]\n[tracking]\nmax_sources = 1024\n[syn_cookies]\nenabled = {on}\n"
                    ),
                )?);
            }
        }
        Ok(Installed {
            lab,
            defence,
            agent,
        })
    }

    fn tracked(&self) -> Result<Option<(usize, usize)>> {
        let Some(agent) = &self.agent else {
            return Ok(None);
        };
        let sources = agent.state()?.tracked_sources()?;
        let flood = sources
            .iter()
            .filter(|(key, _)| key.addr[10..14] == [0xff, 0xff, 198, 19])
            .count();
        Ok(Some((flood, sources.len())))
    }
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        if self.defence == Defence::Synproxy {
            let _ = iptables(self.lab, "-t raw -F PREROUTING");
            let _ = iptables(self.lab, "-F INPUT");
        }
    }
}

/// Echo round trips of the long-lived client until `deadline`, in µs.
async fn echoes(ws: &mut WsClient, deadline: Instant) -> Vec<f64> {
    let payload = "x".repeat(64);
    let mut rtts = Vec::new();
    while Instant::now() < deadline {
        let sent_at = Instant::now();
        match echo_once(ws, &payload).await {
            Ok(()) => rtts.push(sent_at.elapsed().as_secs_f64() * 1e6),
            // A lost echo counts as the 1 s it waited.
            Err(_) => rtts.push(1e6),
        }
    }
    rtts
}

async fn one_run(
    lab: &FloodLab,
    defence: Defence,
    round: usize,
    block: u8,
    phase: Duration,
) -> Result<SynFloodRun> {
    let installed = Installed::new(lab, defence)?;
    let long_lived: IpAddr = lab.lab.client_v4(2).into();
    let mut ws = ws_connect(
        &lab.lab.client,
        long_lived,
        lab.addr,
        Duration::from_secs(3),
    )
    .await
    .context("long-lived client")?;
    let baseline = echoes(&mut ws, Instant::now() + phase).await;

    let frames = lab.flood_frames(Attack::SynFloodFullSpeed, block);
    let cpu_before = Cpu::now()?;
    let started = Instant::now();
    let deadline = started + phase;
    let stop = Arc::new(AtomicBool::new(false));
    let sender_stop = stop.clone();
    let (netns, interface) = (lab.lab.client.path(), lab.lab.client_if.clone());
    let mut n = 0usize;
    let stream = std::iter::from_fn(move || {
        n += 1;
        if n.is_multiple_of(64)
            && (Instant::now() >= deadline || sender_stop.load(Ordering::Relaxed))
        {
            return None;
        }
        Some(frames[n % frames.len()].clone())
    });
    let sender = tokio::task::spawn_blocking(move || send_frames(netns, interface, stream));

    // New clients, one after another, from the lab's other client addresses.
    let newcomers = async {
        let (mut tried, mut in_time) = (0u64, 0u64);
        let mut host = 3u8;
        while Instant::now() < deadline {
            let source: IpAddr = lab.lab.client_v4(host).into();
            host = if host >= 41 { 3 } else { host + 1 };
            tried += 1;
            if let Ok(mut client) =
                ws_connect(&lab.lab.client, source, lab.addr, Duration::from_secs(1)).await
            {
                in_time += 1;
                let _ = futures_util::SinkExt::close(&mut client).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (tried, in_time)
    };
    let (flood_rtts, (new_clients, new_clients_in_time)) =
        tokio::join!(echoes(&mut ws, deadline), newcomers);
    stop.store(true, Ordering::Relaxed);
    let flood_sent = sender.await??;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = Cpu::now()?.since(&cpu_before);
    let tracked = installed.tracked()?;
    let _ = futures_util::SinkExt::close(&mut ws).await;
    Ok(SynFloodRun {
        defence,
        round,
        seconds,
        flood_sent,
        softirq_ms: cpu.softirq_ms,
        new_clients,
        new_clients_in_time,
        baseline_p99_us: p50_p99(&baseline).1,
        flood_p99_us: p50_p99(&flood_rtts).1,
        flood_sources_tracked: tracked.map(|t| t.0),
        sources_tracked: tracked.map(|t| t.1),
    })
}

/// Every defence `rounds` times, in rotating order, each on a fresh lab so
/// that no listener or conntrack state carries over.
pub async fn run(rounds: usize, phase: Duration) -> Result<Vec<SynFloodRun>> {
    let mut runs = Vec::new();
    for round in 0..rounds {
        for k in 0..Defence::ALL.len() {
            let defence = Defence::ALL[(k + round) % Defence::ALL.len()];
            let lab = FloodLab::new().await?;
            let block = (200 + round * Defence::ALL.len() + k) as u8;
            let run = one_run(&lab, defence, round, block, phase).await?;
            eprintln!(
                "bench: round {round} {:<32} flood {:>6.0} kpps, softirq {:>5.0} ns/pkt, new clients {}/{} in 1 s, p99 {:>6.0} → {:>6.0} µs, flood sources tracked {:?}",
                defence.name(),
                run.flood_pps() / 1e3,
                run.softirq_ns_per_packet(),
                run.new_clients_in_time,
                run.new_clients,
                run.baseline_p99_us,
                run.flood_p99_us,
                run.flood_sources_tracked
            );
            runs.push(run);
        }
    }
    Ok(runs)
}

/// The report's section 6.
pub fn markdown(runs: &[SynFloodRun]) -> String {
    use crate::stats::Spread;
    let of = |d: Defence, f: fn(&SynFloodRun) -> f64| {
        Spread::of(
            &runs
                .iter()
                .filter(|r| r.defence == d)
                .map(f)
                .collect::<Vec<_>>(),
        )
    };
    let kernel_ns = of(Defence::KernelCookies, SynFloodRun::softirq_ns_per_packet).median;
    let synproxy_ns = of(Defence::Synproxy, SynFloodRun::softirq_ns_per_packet).median;
    let mut md = String::from(
        "\n## 6. Spoofed SYN flood: do new clients get in?\n\n\
         A SYN flood from random sources in 198.19.0.0/16 at the sender's full speed, against each \
         defence on a fresh lab (the server's listener has the default backlog and \
         `tcp_syncookies = 1`; wsguard runs with its default limits and `tracking.max_sources = 1024`). \
         While it lasts, the long-lived client keeps echoing and new WebSocket clients connect one \
         after another from 39 other addresses; a new client counts when its handshake completes \
         within 1 s. \"p99 × calm\" is the long-lived client's echo p99 under the flood over its p99 \
         just before, in the same run (a lost echo counts as 1 s). The softirq time per flood packet \
         is tick-sampled over the phase and includes the legitimate clients' packets; the sender runs \
         on the same two cores, so a cheaper defence also lets it send more.\n\n",
    );
    let mut table = Table::new([
        "defence",
        "flood kpps",
        "softirq ns per flood packet",
        "× kernel cookies",
        "new clients in 1 s",
        "p99 × calm",
        "flood sources in wsguard's map",
    ]);
    for d in Defence::ALL {
        let tracked = runs
            .iter()
            .filter(|r| r.defence == d)
            .filter_map(|r| {
                Some(format!(
                    "{} of {}",
                    r.flood_sources_tracked?, r.sources_tracked?
                ))
            })
            .collect::<Vec<_>>();
        table.row([
            d.name().to_string(),
            of(d, |r| r.flood_pps() / 1e3).show(0),
            of(d, SynFloodRun::softirq_ns_per_packet).show(0),
            format!(
                "{:.2}",
                of(d, SynFloodRun::softirq_ns_per_packet).median / kernel_ns
            ),
            of(d, |r| 100.0 * r.new_clients_ratio()).show(1) + " %",
            of(d, |r| r.flood_p99_us / r.baseline_p99_us).show(2),
            if tracked.is_empty() {
                "–".to_string()
            } else {
                tracked.join(", ")
            },
        ]);
    }
    md.push_str(&table.to_string());
    let cookies_ns = of(Defence::WsguardCookies, SynFloodRun::softirq_ns_per_packet).median;
    md.push_str(&format!(
        "\nSoftirq time per flood packet, wsguard with cookies against iptables SYNPROXY: {:.1}× lower \
         (target: at least 3×); against the kernel's own cookies: {:.2}× (target: below 1).\n",
        synproxy_ns / cookies_ns,
        cookies_ns / kernel_ns
    ));
    md
}
