//! `wsguard-bench`: the measurements behind docs/benchmarks.md. Run it through
//! `cargo xtask bench [--quick]`, which installs iptables and nftables, builds
//! the agent and runs this as root.

mod contenders;
mod fairness;
mod fleet;
mod flood;
mod kernel_cost;
mod latency;
mod report;
mod stats;
mod syn_flood;

use std::{path::PathBuf, time::Duration};

use anyhow::{Result, ensure};
use clap::Parser;

use crate::kernel_cost::Effort;

#[derive(Parser)]
#[command(about = "Benchmarks wsguard against the XDP_PASS floor, iptables and nftables")]
struct Args {
    /// About two minutes instead of ten: fewer rounds and shorter phases.
    #[arg(long)]
    quick: bool,
    /// Section 1 only (the cost per packet in the kernel), printed as a
    /// table; docs/ is left as it is.
    #[arg(long)]
    cost_only: bool,
    /// Where benchmarks.md and the charts (benchmarks/*.svg) go.
    #[arg(long, default_value = "docs")]
    docs: PathBuf,
}

struct Plan {
    kernel: Effort,
    scales: [u32; 3],
    flood_rounds: usize,
    flood_phase: Duration,
    syn_flood_rounds: usize,
    syn_flood_phase: Duration,
    rejected_handshakes: usize,
    parallel_handshakes: usize,
    ban_sources: u8,
    /// Legitimate handshakes per second, and for how long.
    accepted_rate: u32,
    accepted_for: Duration,
    /// Incomplete heads held open, and handshakes measured meanwhile.
    held_heads: usize,
    handshakes_while_held: usize,
    fairness_rounds: usize,
    fairness_phase: Duration,
    /// Decisions timed from one host of a fleet to another, per run.
    fleet_decisions: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                kernel: Effort {
                    repeat: 1_000_000,
                    rounds: 3,
                    singles: 2_000,
                },
                scales: [1_000, 100_000, 1_000_000],
                flood_rounds: 2,
                flood_phase: Duration::from_secs(2),
                syn_flood_rounds: 1,
                syn_flood_phase: Duration::from_secs(3),
                rejected_handshakes: 1_000,
                parallel_handshakes: 8,
                ban_sources: 10,
                accepted_rate: 2_000,
                accepted_for: Duration::from_secs(2),
                held_heads: 1_000,
                handshakes_while_held: 200,
                fairness_rounds: 1,
                fairness_phase: Duration::from_secs(6),
                fleet_decisions: 200,
            }
        } else {
            Plan {
                kernel: Effort {
                    repeat: 2_000_000,
                    rounds: 7,
                    singles: 10_000,
                },
                scales: [1_000, 100_000, 1_000_000],
                flood_rounds: 5,
                flood_phase: Duration::from_secs(5),
                syn_flood_rounds: 3,
                syn_flood_phase: Duration::from_secs(5),
                rejected_handshakes: 3_000,
                parallel_handshakes: 8,
                ban_sources: 40,
                accepted_rate: 2_000,
                accepted_for: Duration::from_secs(5),
                held_heads: 4_000,
                handshakes_while_held: 1_000,
                fairness_rounds: 3,
                fairness_phase: Duration::from_secs(8),
                fleet_decisions: 1000,
            }
        }
    }

    fn describe(&self) -> Vec<(String, String)> {
        let k = &self.kernel;
        vec![
            (
                "sections 1–2".into(),
                format!(
                    "repeat {} per measurement, {} rounds; {} frames per round where each frame runs once",
                    k.repeat, k.rounds, k.singles
                ),
            ),
            (
                "sections 3, 5".into(),
                format!(
                    "{} rounds of {} s per phase, contenders in rotating order",
                    self.flood_rounds,
                    self.flood_phase.as_secs()
                ),
            ),
            (
                "section 6".into(),
                format!(
                    "{} rounds per contender, each on a fresh lab: {} s without a flood, then {} s of flood",
                    self.syn_flood_rounds,
                    self.syn_flood_phase.as_secs(),
                    self.syn_flood_phase.as_secs()
                ),
            ),
            (
                "section 4".into(),
                format!(
                    "{} rejected handshakes ({} at a time), {} bans; legitimate handshakes at {}/s for {} s, and {} of them while {} incomplete heads are held",
                    self.rejected_handshakes,
                    self.parallel_handshakes,
                    self.ban_sources,
                    self.accepted_rate,
                    self.accepted_for.as_secs(),
                    self.handshakes_while_held,
                    self.held_heads
                ),
            ),
            (
                "section 7".into(),
                format!(
                    "{} rounds of three runs of {} s, {} users each",
                    self.fairness_rounds,
                    self.fairness_phase.as_secs(),
                    fairness::USERS
                ),
            ),
            (
                "section 8".into(),
                format!(
                    "{} decisions per run, without and with a SYN flood",
                    self.fleet_decisions
                ),
            ),
        ]
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the benchmarks load BPF programs and create network namespaces: run them as root"
    );
    // On Ctrl-C or SIGTERM the measurement future is dropped, and with it
    // every lab namespace, agent and rule it set up.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        done = measure(&args) => done,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; the test hosts are removed"),
        _ = terminate.recv() => anyhow::bail!("terminated; the test hosts are removed"),
    }
}

async fn measure(args: &Args) -> Result<()> {
    let plan = Plan::new(args.quick);
    let machine = report::Machine::describe();

    eprintln!("bench: 1. cost per packet");
    let per_packet = kernel_cost::per_packet(plan.kernel)?;
    if args.cost_only {
        println!("{}", report::cost_table(&per_packet));
        return Ok(());
    }
    eprintln!("bench: 2. scale");
    let mut scale = Vec::new();
    for sources in plan.scales {
        scale.push(kernel_cost::scale(sources, plan.kernel)?);
    }
    let ban_kernel = kernel_cost::ban_latency(plan.kernel)?;
    eprintln!("bench: 3 and 5. protection under flood, overhead");
    let flood = flood::run(plan.flood_rounds, plan.flood_phase).await?;
    eprintln!("bench: 6. spoofed SYN flood: new clients");
    let syn_flood = syn_flood::run(plan.syn_flood_rounds, plan.syn_flood_phase).await?;
    eprintln!("bench: 4. enforcement latency");
    let rejected =
        latency::rejected_handshakes(plan.rejected_handshakes, plan.parallel_handshakes).await?;
    let ban_agent = latency::ban_after_rejections(plan.ban_sources).await?;
    let accepted = latency::accepted_at_rate(plan.accepted_rate, plan.accepted_for).await?;
    let accepted_held =
        latency::accepted_while_pending(plan.held_heads, plan.handshakes_while_held).await?;
    eprintln!("bench: 7. fairness behind one address");
    let fairness = fairness::run(plan.fairness_rounds, plan.fairness_phase).await?;
    eprintln!("bench: 8. a fleet: propagation");
    let fleet = fleet::run(plan.fleet_decisions).await?;

    let results = report::Results {
        quick: args.quick,
        machine,
        effort: plan.describe(),
        per_packet,
        scale,
        ban_kernel,
        flood,
        syn_flood,
        rejected,
        ban_agent,
        accepted,
        accepted_held,
        fairness,
        fleet,
    };
    report::write(&results, &args.docs)?;
    eprintln!(
        "bench: wrote {} and {}",
        args.docs.join("benchmarks.md").display(),
        args.docs.join("benchmarks/").display()
    );
    Ok(())
}
