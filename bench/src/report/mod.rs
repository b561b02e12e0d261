//! docs/benchmarks.md, the SVG charts next to it, and the raw results as JSON:
//! `sections.rs` writes one section each, `table.rs` builds markdown
//! tables, `charts.rs` draws the charts.

mod charts;
mod sections;

pub use sections::cost_table;
pub mod table;

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::{
    contenders::Contender,
    flood::{Attack, Phase},
    kernel_cost::{BanLatency, CostRow, ScaleRow},
    latency::Latency,
    stats::Spread,
};

#[derive(Serialize)]
pub struct Machine {
    pub date: String,
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub iptables: String,
    pub nftables: String,
}

impl Machine {
    pub fn describe() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_else(|| "unknown".into());
        let memory_kib: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        let version = |program: &str, arg: &str| {
            std::process::Command::new(program)
                .arg(arg)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_else(|_| "not installed".into())
        };
        Machine {
            date: version("date", "-u"),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: memory_kib / (1024.0 * 1024.0),
            iptables: version("iptables", "-V"),
            nftables: version("nft", "-v"),
        }
    }
}

#[derive(Serialize)]
pub struct Results {
    pub quick: bool,
    pub machine: Machine,
    /// What each section ran, in words (repeat counts, rounds, durations).
    pub effort: Vec<(String, String)>,
    pub per_packet: Vec<CostRow>,
    pub scale: Vec<ScaleRow>,
    pub ban_kernel: BanLatency,
    pub flood: Vec<Phase>,
    pub syn_flood: Vec<crate::syn_flood::SynFloodRun>,
    pub rejected: Latency,
    pub ban_agent: Latency,
    pub accepted: crate::latency::Accepted,
    pub accepted_held: crate::latency::Accepted,
    pub fairness: Vec<crate::fairness::FairnessRun>,
    pub fleet: Vec<crate::fleet::PropagationRun>,
}

/// Median (with spread) over rounds of `f` for one contender and attack.
fn over_rounds(phases: &[Phase], c: Contender, a: Attack, f: impl Fn(&Phase) -> f64) -> Spread {
    let v: Vec<f64> = phases
        .iter()
        .filter(|p| p.contender == c && p.attack == a)
        .map(f)
        .collect();
    Spread::of(&v)
}

/// Per round, `f(phase) / f(reference phase of the same round)`.
fn ratio_over_rounds(
    phases: &[Phase],
    (c, a): (Contender, Attack),
    (rc, ra): (Contender, Attack),
    f: impl Fn(&Phase) -> f64,
) -> Spread {
    let v: Vec<f64> = phases
        .iter()
        .filter(|p| p.contender == c && p.attack == a)
        .filter_map(|p| {
            let r = phases
                .iter()
                .find(|q| q.contender == rc && q.attack == ra && q.round == p.round)?;
            Some(f(p) / f(r))
        })
        .collect();
    Spread::of(&v)
}

pub fn write(results: &Results, docs: &Path) -> Result<()> {
    let charts = docs.join("benchmarks");
    std::fs::create_dir_all(&charts)?;
    charts::cost_chart(&results.per_packet, &charts.join("cost-per-packet.svg"))?;
    charts::flood_chart(&results.flood, &charts.join("flood-p99.svg"))?;
    charts::flood_cpu_chart(&results.flood, &charts.join("flood-cpu.svg"))?;
    charts::latency_chart(&results.rejected, &charts.join("enforcement-latency.svg"))?;
    std::fs::write(
        charts.join("results.json"),
        serde_json::to_string_pretty(results)?,
    )?;
    std::fs::write(docs.join("benchmarks.md"), markdown(results))?;
    Ok(())
}

fn markdown(r: &Results) -> String {
    [
        sections::header(r),
        sections::cost_per_packet(r),
        sections::scale(r),
        sections::flood(r),
        sections::enforcement_latency(r),
        sections::overhead(r),
        crate::syn_flood::markdown(&r.syn_flood),
        crate::fairness::markdown(&r.fairness),
        crate::fleet::markdown(&r.fleet),
        sections::findings(r),
        sections::READING.to_string(),
    ]
    .concat()
}
